"""The predictors on a GPU against their CPU path on the same inputs (skipped without Hopper).

The two devices compute float32 matmuls, exponentials and softmaxes with different kernels, so
the probabilities differ in their last bits: kept sets are compared exactly wherever the rule is
not within a small margin of its cut, and the selection logic itself (top_p_mask, integer
arithmetic) is compared bit for bit on identical probabilities.
"""

import pytest
import torch
from predict_brute import MASS_SCALE, keep_with_margin, top_p_sorted

import fgattn_cute as fg
from fgattn_cute.testing import video_like_qkv

pytestmark = pytest.mark.gpu


def _inputs(dtype=torch.bfloat16):
    q, k, _ = video_like_qkv(4, 16, 24, 4, 128, seed=3, dtype=dtype, text_tokens=16)
    return q, k, q.cuda(), k.cuda()


@pytest.mark.parametrize("q_tile", [64, 128])
@pytest.mark.parametrize("threshold", [0.5, 2.0])
def test_calibrate_gpu_matches_cpu(q_tile, threshold):
    q, k, qg, kg = _inputs()
    keep = torch.arange(16, device="cuda")
    cpu = fg.predict.calibrate(q, k, q_tile, threshold, always_keep=keep.cpu()).to_mask()
    gpu = fg.predict.calibrate(qg, kg, q_tile, threshold, always_keep=keep)
    assert gpu.device.type == "cuda" and gpu.trusted
    rule, ambiguous = keep_with_margin(q, k, q_tile, threshold, 128**-0.5, rel=1e-4)
    rule[..., :16] = True
    ambiguous[..., :16] = False
    got = gpu.to_mask().cpu()
    assert not ((got != cpu) & ~ambiguous).any()
    assert not ((got != rule) & ~ambiguous).any()


def test_kernel_lse_on_hopper():
    q, k, qg, kg = _inputs()
    scale = 128**-0.5
    lse = fg.predict.kernel_lse(qg, kg, scale)  # the CuTe kernel's LSE over a dense list
    torch.testing.assert_close(lse.cpu(), fg.predict.query_lse(q, k, scale), atol=5e-5,
                               rtol=1e-5)
    gpu = fg.predict.calibrate(qg, kg, 128, 1.0, lse_fn=fg.predict.kernel_lse).to_mask().cpu()
    rule, ambiguous = keep_with_margin(q, k, 128, 1.0, scale, rel=1e-4)
    assert not ((gpu != rule) & ~ambiguous).any()


@pytest.mark.parametrize("q_tile", [64, 128])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_pooled_top_p_gpu_matches_cpu(q_tile, p):
    q, k, qg, kg = _inputs()
    probs_cpu = fg.predict.pooled_probs(q, k, q_tile)
    probs_gpu = fg.predict.pooled_probs(qg, kg, q_tile)
    torch.testing.assert_close(probs_gpu.cpu(), probs_cpu, atol=1e-7, rtol=1e-4)
    # The selection is integer arithmetic: bit-identical on identical probabilities.
    assert torch.equal(fg.predict.top_p_mask(probs_cpu.cuda(), p).cpu(),
                       top_p_sorted(probs_cpu, p))
    # The torch path on the GPU selects from exactly probs_gpu (the kernel path from its own
    # probabilities: tests/test_top_p_gpu.py).
    gpu = fg.predict.pooled_top_p(qg, kg, q_tile, p, always_keep=[0, 1], backend="torch")
    expected = top_p_sorted(probs_gpu.cpu(), p)
    expected[..., :2] = True
    assert torch.equal(gpu.to_mask().cpu(), expected)
    cpu = fg.predict.pooled_top_p(q, k, q_tile, p, always_keep=[0, 1]).to_mask()
    differ = (gpu.to_mask().cpu() != cpu).float().mean().item()
    assert differ < 5e-3  # only keys at the boundary may flip between devices
    kept = (probs_cpu.double() * gpu.to_mask().cpu()).sum(-1)
    assert bool((kept >= p - 1e-4).all())


def test_top_p_mask_gpu_equals_sort_with_ties():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 5000, generator=gen) * 4).round()  # many ties
    probs = torch.softmax(logits, -1)
    for p in (0.3, 0.9, 0.999):
        assert torch.equal(fg.predict.top_p_mask(probs.cuda(), p).cpu(), top_p_sorted(probs, p))
    mass = (probs * MASS_SCALE).to(torch.int64)
    assert int(mass.sum(-1).max()) < 2**53


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_select_on_gpu():
    q, k, qg, kg = _inputs()
    eager = fg.predict.pooled_top_p(qg, kg, 128, 0.9, backend="torch")
    select = fg.predict.compiled_top_p_select()
    compiled = fg.predict.pooled_top_p(qg, kg, 128, 0.9, select_fn=select)
    assert torch.equal(eager.indices, compiled.indices)
    assert torch.equal(eager.counts, compiled.counts)


def test_tf32_does_not_change_the_predictors():
    """The torch paths' float32 matmuls stay IEEE when the caller allows TF32 (the kernel paths
    do no float32 matmul, so they would pass whatever the setting)."""
    _, _, qg, kg = _inputs()

    def both():
        return (fg.predict.calibrate(qg, kg, 128, 1.0, backend="torch"),
                fg.predict.pooled_top_p(qg, kg, 128, 0.9, backend="torch"))

    ref = both()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed: the predictors must not use it
    try:
        got = both()
    finally:
        torch.set_float32_matmul_precision(before)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)


def test_predictors_do_not_sync():
    _, _, qg, kg = _inputs()
    keep = torch.arange(16, device="cuda")
    fg.predict.calibrate(qg, kg, 128, 1.0, always_keep=keep)  # warm-up
    fg.predict.pooled_top_p(qg, kg, 128, 0.9, always_keep=keep)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fg.predict.calibrate(qg, kg, 128, 1.0, always_keep=keep)
        fg.predict.pooled_top_p(qg, kg, 128, 0.9, always_keep=keep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cache_on_gpu():
    _, _, qg, kg = _inputs()
    cache = fg.predict.SparsityCache(lambda q, k: fg.predict.pooled_top_p(q, k, 128, 0.9),
                                     recalibrate_at={3}, dense_steps=1)
    out = [cache.get(0, step, qg, kg) for step in range(5)]
    assert out[0] is None
    for index in out[2:]:
        assert index.device.type == "cuda"
        assert torch.equal(index.indices, out[1].indices)
    assert cache.stats["predictor_calls"] == 2
