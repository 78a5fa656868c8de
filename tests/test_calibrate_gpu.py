"""The calibrate kernel (fgattn_cute/kernels/calibrate_sm90.py) against the float64 rule.

Kept sets must equal the rule wherever a key's tile-max probability is not within 1e-4 (relative)
of the cut; there the kernel's float32 LSE (hardware exp2, its own summation order) may round
either way. Outputs are poisoned before each run, and every list is checked in full: ascending,
in range, zero after its count. Skipped without a Hopper GPU.
"""

import math

import pytest
import torch
from predict_brute import keep_with_margin

import fgattn_cute as fg
from fgattn_cute.host.launch import run_calibrate_sm90
from fgattn_cute.predict._args import keep_words

pytestmark = pytest.mark.gpu


def _qk(B, sq, sk, H, D, dtype, seed, spread=2.2):
    """Entries N(0, spread^2): scores scale * q . k with standard deviation spread^2 (about 5),
    peaked enough that thresholds of a few units keep some keys and drop others."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, sq, H, D, generator=g) * spread).to(dtype)
    k = (torch.randn(B, sk, H, D, generator=g) * spread).to(dtype)
    return q, k


def _run_poisoned(qg, kg, q_tile, threshold, scale, keep, capacity):
    B, sq, H, _ = qg.shape
    sk = kg.shape[1]
    n_tiles = math.ceil(sq / q_tile)
    indices = torch.full((B, H, n_tiles, capacity), -7, dtype=torch.int32, device="cuda")
    counts = torch.full((B, H, n_tiles), -7, dtype=torch.int32, device="cuda")
    log_cut = math.log(threshold / sk) if threshold > 0 else -math.inf
    run_calibrate_sm90(qg, kg, keep_words(keep, sk, qg.device), q_tile, scale, log_cut,
                       capacity, indices=indices, counts=counts)
    return indices.cpu(), counts.cpu()


def _run_config_poisoned(config, q, k, threshold):
    """The kept-key mask of one compiled calibrate configuration (not the package's default)
    on CPU q, k (no always-keep keys), its outputs poisoned first."""
    from fgattn_cute.host.compile import compile_fwd

    B, sq, H, D = q.shape
    sk = k.shape[1]
    n_tiles, cap = math.ceil(sq / config.q_tile), math.ceil(sk / 128) * 128
    indices = torch.full((B, H, n_tiles, cap), -7, dtype=torch.int32, device="cuda")
    counts = torch.full((B, H, n_tiles), -7, dtype=torch.int32, device="cuda")
    compile_fwd(config)(q.cuda(), k.cuda(), keep_words(None, sk, torch.device("cuda")), indices,
                        counts, D**-0.5, math.log(threshold / sk))
    return _lists_to_mask(indices.cpu(), counts.cpu(), sk)


def _lists_to_mask(indices, counts, sk):
    B, H, T, cap = indices.shape
    slot = torch.arange(cap)
    valid = slot < counts.unsqueeze(-1).long()
    assert ((indices >= 0) & (indices < sk) | ~valid).all(), "key out of range"
    assert (indices[~valid] == 0).all(), "slots past the count must be zero"
    assert (~valid[..., 1:] | (indices[..., 1:] > indices[..., :-1])).all(), "not ascending"
    mask = torch.zeros(B, H, T, sk + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(valid, indices, sk).long(), True)
    return mask[..., :sk]


CASES = [
    # B, Sq, Sk, H, D, q_tile, dtype
    (1, 1000, 1000, 2, 128, 128, torch.bfloat16),  # partial q tile, Sk % 32 != 0
    (2, 300, 517, 3, 64, 64, torch.float16),  # Sq != Sk
    (1, 256, 100, 1, 128, 128, torch.bfloat16),  # one partial key tile
    (1, 130, 9000, 1, 128, 64, torch.float16),  # several bitmap words per thread
    (1, 64, 20000, 2, 64, 128, torch.bfloat16),  # one partial q tile, many key tiles
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])))
@pytest.mark.parametrize("threshold", [2.0, 16.0])
def test_kernel_matches_float64_rule(case, threshold):
    B, sq, sk, H, D, q_tile, dtype = case
    q, k = _qk(B, sq, sk, H, D, dtype, seed=sq + sk)
    scale = D**-0.5
    cap = math.ceil(sk / 128) * 128
    indices, counts = _run_poisoned(q.cuda(), k.cuda(), q_tile, threshold, scale, None, cap)
    got = _lists_to_mask(indices, counts, sk)
    assert torch.equal(counts, got.sum(-1).int())
    rule, ambiguous = keep_with_margin(q, k, q_tile, threshold, scale, rel=1e-4)
    assert rule.any() and not rule.all(), "a case that cannot fail"
    bad = (got != rule) & ~ambiguous
    assert not bad.any(), f"{int(bad.sum())} keys differ from the rule"


def test_threshold_extremes_and_always_keep():
    q, k = _qk(1, 200, 700, 2, 128, torch.bfloat16, seed=5)
    qg, kg = q.cuda(), k.cuda()
    every = fg.predict.calibrate(qg, kg, 128, 0.0, backend="cute")
    assert (every.counts == 700).all()
    assert torch.equal(every.to_mask().cpu(), torch.ones(1, 2, 2, 700, dtype=torch.bool))
    ids = [0, 31, 32, 255, 699]
    none = fg.predict.calibrate(qg, kg, 128, 1e9, always_keep=ids, backend="cute")
    expected = torch.zeros(1, 2, 2, 700, dtype=torch.bool)
    expected[..., ids] = True
    assert torch.equal(none.to_mask().cpu(), expected)
    none.validate()


def test_capacity_and_strided_inputs():
    # q and k as views into one packed [B, S, 3, H, D] tensor (strided, as in a fused QKV).
    g = torch.Generator().manual_seed(11)
    qkv = (torch.randn(1, 640, 3, 2, 128, generator=g) * 2.0).to(torch.bfloat16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    qkv_g = qkv.cuda()
    # threshold 64 keeps 195-224 keys per row here (float64 rule): over 128, within 256.
    index = fg.predict.calibrate(qkv_g[:, :, 0], qkv_g[:, :, 1], 128, 64.0, capacity=200,
                                 backend="cute")
    assert index.capacity == 256 and 128 < int(index.counts.max()) <= 256
    rule, ambiguous = keep_with_margin(q, k, 128, 64.0, 128**-0.5, rel=1e-4)
    assert not ((index.to_mask().cpu() != rule) & ~ambiguous).any()


def test_backends_agree_on_video_like_inputs():
    from fgattn_cute.testing import video_like_qkv

    q, k, _ = video_like_qkv(4, 16, 24, 4, 128, seed=3, dtype=torch.bfloat16, text_tokens=16)
    qg, kg = q.cuda(), k.cuda()
    cute = fg.predict.calibrate(qg, kg, 128, 1.0, backend="cute").to_mask().cpu()
    torch_path = fg.predict.calibrate(qg, kg, 128, 1.0, backend="torch").to_mask().cpu()
    rule, ambiguous = keep_with_margin(q, k, 128, 1.0, 128**-0.5, rel=1e-4)
    assert not ((cute != torch_path) & ~ambiguous).any()
    assert 0.0 < cute.float().mean().item() < 0.9


def test_cute_backend_refuses_what_it_cannot_run():
    q, k = _qk(1, 128, 128, 1, 96, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match="head dims"):
        fg.predict.calibrate(q.cuda(), k.cuda(), 128, backend="cute")
    q, k = _qk(1, 128, 128, 1, 128, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match="q_tile"):
        fg.predict.calibrate(q.cuda(), k.cuda(), 32, backend="cute")


def test_exp2_on_the_fma_pipe_matches_exp2():
    """softmax.exp2_fma (pass 1's polynomial exponential) on a grid of x <= 0, edges included,
    against float64 exp2: within 3e-7 relative (ex2.approx.f32 is about 2 ulp); below -125
    (and -inf) it gives about 2**-125, never 0, a denormal or a wrapped exponent."""
    import cutlass.cute as cute

    from fgattn_cute.kernels.softmax import exp2_fma

    @cute.kernel
    def kernel(mX: cute.Tensor, mY: cute.Tensor):
        i = cute.arch.block_idx()[0] * 256 + cute.arch.thread_idx()[0]
        if i < cute.size(mX):
            mY[i] = exp2_fma(mX[i])

    @cute.jit
    def launch(mX: cute.Tensor, mY: cute.Tensor):
        kernel(mX, mY).launch(grid=[cute.ceil_div(cute.size(mX), 256), 1, 1], block=[256, 1, 1])

    x = torch.cat([torch.linspace(-130.0, 0.0, 1_000_001), -torch.logspace(-8, 0, 1001),
                   torch.tensor([0.0, -0.5, -1.5, -124.5, -125.0, -126.0, -float("inf")])])
    x = x.float().cuda()
    y = torch.full_like(x, float("nan"))  # poisoned
    fn = cute.compile(launch, cute.runtime.from_dlpack(x), cute.runtime.from_dlpack(y))
    fn(cute.runtime.from_dlpack(x), cute.runtime.from_dlpack(y))
    torch.cuda.synchronize()
    want = torch.exp2(x.double().clamp_min(-125.0))
    rel = (y.double() / want - 1).abs()
    worst = int(rel.argmax())
    assert float(rel[worst]) < 3e-7, f"relative error {float(rel[worst]):.3g} at {float(x[worst])}"
    # -126 and -inf land on 2**-125 (times the polynomial's 1 + 1.2e-7 at f = 0): normal floats
    assert bool((y >= 2.0**-126).all()) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("D,every,lazy", [(128, 0, False), (128, 2, False), (128, 4, False),
                                          (128, 4, True), (128, 0, True), (64, 8, True),
                                          (64, 0, True), (64, 8, False)])
def test_exponentials_on_either_pipe_give_the_rule(D, every, lazy):
    """calibrate's kernel with none, half, a quarter or an eighth of pass 1's exponentials on
    the FMA pipe (an eighth is head dim 64's default), with and without the lazy row max: the
    same kept sets as the float64 rule outside the 1e-4 margin."""
    from fgattn_cute.host.compile import CalibrateConfig

    q, k = _qk(1, 1000, 3000, 2, D, torch.bfloat16, seed=21)
    config = CalibrateConfig(D, "bfloat16", 128, fma_exp_every=every, lazy_max=lazy)
    got = _run_config_poisoned(config, q, k, 4.0)
    rule, ambiguous = keep_with_margin(q, k, 128, 4.0, D**-0.5, rel=1e-4)
    assert rule.any() and not rule.all(), "a case that cannot fail"
    assert not ((got != rule) & ~ambiguous).any()


@pytest.mark.parametrize("lazy", [False, True])
def test_row_max_that_grows_across_key_tiles(lazy):
    """Keys scaled up along the sequence, so each row's max keeps rising tile after tile, by
    more than the lazy row max tolerates (64 in log2 units): the redo path, against the rule."""
    from fgattn_cute.host.compile import CalibrateConfig

    sk = 4000
    q, k = _qk(1, 512, sk, 2, 128, torch.bfloat16, seed=7)
    ramp = 1.0 + 4.0 * torch.arange(sk, dtype=torch.float32) / sk
    k = (k.float() * ramp[None, :, None, None]).to(torch.bfloat16)
    got = _run_config_poisoned(CalibrateConfig(128, "bfloat16", 128, lazy_max=lazy), q, k, 1.0)
    rule, ambiguous = keep_with_margin(q, k, 128, 1.0, 128**-0.5, rel=1e-4)
    assert rule.any() and not rule.all(), "a case that cannot fail"
    assert not ((got != rule) & ~ambiguous).any()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_q_in_registers_gives_the_same_lists(case):
    """Q as the wgmmas' register operand (CalibrateConfig.q_in_regs): the same lists as Q from
    shared memory, and the float64 rule outside the 1e-4 margin."""
    from fgattn_cute.host.compile import CalibrateConfig

    B, sq, sk, H, D, q_tile, dtype = case
    q, k = _qk(B, sq, sk, H, D, dtype, seed=sq + 3 * sk)
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    threshold = 2.0
    smem = _run_config_poisoned(CalibrateConfig(D, name, q_tile, q_in_regs=False), q, k,
                                threshold)
    regs = _run_config_poisoned(CalibrateConfig(D, name, q_tile, q_in_regs=True), q, k,
                                threshold)
    rule, ambiguous = keep_with_margin(q, k, q_tile, threshold, D**-0.5, rel=1e-4)
    assert rule.any() and not rule.all(), "a case that cannot fail"
    assert torch.equal(regs, smem)
    assert not ((regs != rule) & ~ambiguous).any()
