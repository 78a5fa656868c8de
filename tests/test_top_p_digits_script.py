"""perf/top_p_digits.py (CPU): its tau is the full-sort rule's, and it runs on a toy size."""

import torch
from perf_script import load_perf_script

from fgattn_cute.predict import pooled


def _load():
    return load_perf_script("top_p_digits")


def test_tau_is_the_smallest_kept_probability():
    digits = _load()
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(5, 700, generator=g) * 2, -1)
    keep = pooled.top_p_select(probs, torch.tensor(0.9, dtype=torch.float64))
    tau = digits.tau_bits(probs, 0.9)
    smallest_kept = torch.where(keep, probs, torch.full_like(probs, 2.0)).amin(-1)
    assert torch.equal(tau.squeeze(1), smallest_kept.view(torch.int32) - pooled._LOW_BITS)


def test_toy_run(capsys):
    _load().main(["--seqlen", "2000", "--rows", "4"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["random", "video_like"]
    assert all("placed per row" in line for line in out)
