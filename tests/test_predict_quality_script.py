"""perf/quality.py on a toy size (CPU, float32 reference): outputs and the interpolation."""

import json
import math

from perf_script import load_perf_script


def _load():
    return load_perf_script("quality")


def test_interp():
    quality = _load()
    pts = [(0.1, 1e-1), (0.4, 1e-2), (1.0, 1e-6)]
    val, text = quality._interp(pts, 1e-2)
    assert math.isclose(val, 0.4) and text == "0.4"
    val, _ = quality._interp(pts, math.sqrt(1e-1 * 1e-2))  # halfway in log-log
    assert math.isclose(val, math.sqrt(0.1 * 0.4))
    assert quality._interp(pts, 1e-7) == (None, "> 1")
    assert quality._interp(pts, 0.5) == (None, "< 0.1")


def test_toy_run_writes_outputs(tmp_path, monkeypatch):
    quality = _load()
    monkeypatch.setitem(quality.SIZES, "small",
                        dict(frames=2, height=8, width=12, heads=2, head_dim=32))
    monkeypatch.setattr(quality, "THRESHOLDS", [0.1, 1.0, 10.0])
    monkeypatch.setattr(quality, "TOP_PS", [0.5, 0.99])
    payload = quality.main(["--device", "cpu", "--out", str(tmp_path), "--no-plot",
                            "--reps", "1"])
    assert payload["meta"]["backend"] == "reference"
    results = payload["results"]
    assert len(results) == 4 * (3 + 2)
    assert {r["granularity"] for r in results} == {"Mx1 q128", "Mx1 q64", "block 128",
                                                   "block 64"}
    for r in results:
        assert 0 < r["kept"] <= 1 and 0 <= r["rel_l2"] < 2
    # More kept, less error, along each M x 1 threshold curve.
    curve = sorted((r["kept"], r["rel_l2"]) for r in results
                   if r["rule"] == "threshold" and r["granularity"] == "Mx1 q64")
    assert curve[-1][1] <= curve[0][1]
    stem = tmp_path / "quality-small-cpu"
    assert json.loads(stem.with_suffix(".json").read_text())["results"] == results
    assert "| threshold | block 64 |" in stem.with_suffix(".md").read_text()
    assert not stem.with_suffix(".png").exists()
