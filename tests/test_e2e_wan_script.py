"""perf/e2e_wan.py --quick: the end-to-end script's logic on a toy Wan model (CPU: fg's
float32 reference backend). The real sizes need a GPU and are not run by the tests."""

import json

import pytest

pytest.importorskip("diffusers")

from perf_script import load_perf_script  # noqa: E402


def _load():
    return load_perf_script("e2e_wan")


def test_quick_run_writes_json_and_markdown(tmp_path):
    e2e = _load()
    meta, records = e2e.main(["--quick", "--device", "cpu", "--out", str(tmp_path),
                              "--keeps", "0.3,0.1"])
    assert meta["quick"] and meta["backend"] == "reference"
    systems = [r["system"] for r in records]
    assert systems == ["sdpa", "fgattn-0.3", "fgattn-0.1"]  # no FA4 on CPU
    for r in records:
        assert r["finite"] and r["step_ms"] > 0 and r["tokens"] == 3 * 8 * 8
        assert r["attention_calls"] == 2  # one per layer: self-attention only
        assert 0 < r["attention_share"] < 1
    sparse = [r for r in records if r["system"] != "sdpa"]
    assert [round(r["density"], 2) for r in sparse] == [0.3, 0.1]
    assert all(r["rel_err_vs_sdpa"] > 0 for r in sparse)
    (json_path,) = tmp_path.glob("e2e-wan-cpu-*-quick.json")
    assert json.loads(json_path.read_text())["records"] == records
    (md_path,) = tmp_path.glob("e2e-wan-cpu-*-quick.md")
    assert "| fgattn-0.1 |" in md_path.read_text()


def test_wan_1_3b_config_and_token_counts():
    e2e = _load()
    cfg = e2e.WAN_1_3B
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (
        30, 12, 128)
    assert (cfg["ffn_dim"], cfg["text_dim"], cfg["patch_size"]) == (8960, 4096, (1, 2, 2))
    assert e2e.n_tokens(cfg, e2e.SIZES["480p"]) == 32760
    assert e2e.n_tokens(cfg, e2e.SIZES["720p"]) == 75600
