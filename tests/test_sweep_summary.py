"""perf/plot.py: the sweep summary (bar check and speed of light) from records, no GPU."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))

import plot  # noqa: E402

S, H, D = 32768, 4, 128
CEIL = {"matmul_tflops": 800.0, "copy_tbps": 4.0}


def _record(system, keep, ms, engine="", granularity="128x1"):
    return {"seqlen": S, "heads": H, "head_dim": D, "shape": "toy", "system": system,
            "engine": engine, "granularity": granularity, "keep": keep, "ms": ms,
            "tflops": 4 * S * S * D * H * keep / ms / 1e9, "card": "H200",
            "card_name": "NVIDIA H200", "clocks": "-", "commit": "abc1234",
            "versions": {}, "ceilings": CEIL}


@pytest.fixture
def records():
    return [
        _record("fa4_dense", 1.0, 3.0),
        _record("fgattn", 1.0, 3.1, "cpasync"),
        _record("fgattn", 0.3, 1.2, "cpasync"),
        _record("fgattn", 0.3, 1.5, "tma"),
        _record("fa4_block", 0.3, 1.0, granularity="128x128"),
        _record("fgattn", 0.05000026, 0.25, "cpasync"),  # a measured keep, not exactly 0.05
    ]


def test_summary_checks_the_bar_and_gives_the_speed_of_light(records, tmp_path):
    meta = {"card_name": "NVIDIA H200", "date": "2026-11-27", "commit": "abc1234",
            "clocks": "-", "ceilings": CEIL}
    text = plot.summarize(meta, records, str(tmp_path / "sweep-H200-2026-11-27"))
    assert (tmp_path / "sweep-H200-2026-11-27.md").read_text() == text
    # keep 1: 3.1 <= 1.05 x 3.0; keep 0.3: 1.2 > 1.1 x 0.3 x 3.0 = 0.99
    assert "keep 1.000: best fgattn 3.100 ms vs bar 3.150 ms -> meets the bar" in text
    assert "keep 0.300: best fgattn 1.200 ms vs bar 0.990 ms -> MISSES the bar" in text
    assert "NOT faster than every FA4 variant at this keep (1.000 ms best)" in text
    # speed of light at keep 0.3: 4 S^2 D H keep FLOPs over the 800 TF/s ceiling
    tflop = 4 * S * S * D * H * 0.3 / 1e12
    floor_ms = tflop / 800 * 1e3
    row = next(line for line in text.splitlines() if line.startswith("| 0.3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(tflop, abs=0.005)
    assert float(cells[2]) == pytest.approx(floor_ms, abs=0.0005)
    # the best engine (cp.async, 1.2 ms: 69% of the ceiling) and the best FA4 system (1.0 ms)
    gather_tbps = 256 * 0.3 * S * D * 2 * 2 * H / 1.2e-3 / 1e12
    assert cells[5] == f"1.200 ({100 * floor_ms / 1.2:.0f}%, {gather_tbps:.1f})"
    assert cells[6] == f"1.000 ({100 * floor_ms / 1.0:.0f}%)"
    # keep 0.05 has its own row (it once merged into 0.1 and vanished)
    assert any(line.startswith("| 0.05 |") for line in text.splitlines())


def test_main_rewrites_the_summary_of_a_json(records, tmp_path):
    path = tmp_path / "sweep-H200-2026-11-27.json"
    path.write_text(json.dumps(records))
    plot.main([str(path)])
    text = (tmp_path / "sweep-H200-2026-11-27.md").read_text()
    assert text.startswith("# Sweep on NVIDIA H200 (2026-11-27, commit abc1234)")
    assert "Speed of light" in text


def test_write_records_names_the_file_by_kind_card_and_date(tmp_path):
    import sweep

    meta = {"card": "H200", "date": "2026-11-27"}
    records = [dict(meta, ms=1.5)]
    path = sweep.write_records(records, tmp_path / "new", "bench-cache", meta)
    assert path == tmp_path / "new" / "bench-cache-H200-2026-11-27.json"
    assert json.loads(path.read_text()) == records


def test_summary_names_the_timing_method(records, tmp_path):
    meta = {"card_name": "NVIDIA H200", "date": "2026-11-28", "commit": "abc1234",
            "clocks": "-", "ceilings": CEIL}
    old = plot.summarize(meta, records, str(tmp_path / "old"))
    assert "single calls, each after a sync" in old and "back-to-back" not in old
    new = [dict(r, ms_synced=r["ms"] * 1.05, batch=4) for r in records]
    text = plot.summarize(meta, new, str(tmp_path / "new"))
    assert "back-to-back batches" in text and "single calls, each after a sync" not in text


def test_x_ideal_divides_by_the_median_of_fa4_dense_timings(records, tmp_path):
    meta = {"card_name": "NVIDIA H200", "date": "2026-11-28", "commit": "abc1234",
            "clocks": "-", "ceilings": CEIL}
    more = records + [_record("fa4_dense", 1.0, 2.0), _record("fa4_dense", 1.0, 4.0)]
    assert plot.dense_ms(more) == 3.0
    text = plot.summarize(meta, more, str(tmp_path / "x"))
    assert "FA4 dense: 3.00 ms" in text and "median of 3 timings" in text and "2.00-4.00" in text
