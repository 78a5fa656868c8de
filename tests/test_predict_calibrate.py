"""fg.predict.calibrate against the float64 brute-force rule."""

import math

import pytest
import torch
from predict_brute import keep_with_margin, tile_max_probs64

import fgattn_cute as fg
from fgattn_cute.predict import _args
from fgattn_cute.predict import exact as calibrate_mod
from fgattn_cute.testing import video_like_qkv

# (B, H, seqlen_q, seqlen_k, D, q_tile)
CASES = [
    (1, 1, 1, 1, 8, 64),
    (2, 3, 100, 77, 16, 64),
    (1, 2, 257, 129, 32, 128),
    (1, 2, 97, 255, 16, 1),
    (2, 1, 50, 301, 8, 7),
    (1, 2, 130, 64, 16, 300),
]
THRESHOLDS = [0.0, 0.25, 1.0, 4.0]


def _qk(seed, B, H, Sq, Sk, D, dtype=torch.bfloat16, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Sq, H, D, generator=gen) * spread).to(dtype)
    k = (torch.randn(B, Sk, H, D, generator=gen) * spread).to(dtype)
    return q, k


@pytest.fixture(params=[False, True], ids=["big_chunks", "tiny_chunks"])
def chunking(request, monkeypatch):
    """Also run with budgets small enough to split heads, query rows, tiles and keys."""
    if request.param:
        monkeypatch.setitem(calibrate_mod._SCORE_ELEMS, "cpu", 40)
        monkeypatch.setattr(calibrate_mod, "_HEAD_ELEMS", 500)
    return request.param


def _assert_rule(index, q, k, q_tile, threshold, scale, extra=None):
    keep, ambiguous = keep_with_margin(q, k, q_tile, threshold, scale)
    if extra is not None:
        keep = keep | extra
        ambiguous = ambiguous & ~extra
    got = index.to_mask()
    wrong = (got != keep) & ~ambiguous
    assert not wrong.any(), f"{int(wrong.sum())} entries differ from the float64 rule"
    assert int(ambiguous.sum()) <= max(2, keep.numel() // 1000)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_calibrate_matches_float64_rule(case, threshold, chunking):
    B, H, Sq, Sk, D, M = case
    q, k = _qk(1, B, H, Sq, Sk, D)
    index = fg.predict.calibrate(q, k, q_tile=M, threshold=threshold)
    assert isinstance(index, fg.KeyIndex) and index.trusted
    assert (index.batch, index.heads, index.seqlen_q, index.seqlen_k, index.q_tile) == (
        B, H, Sq, Sk, M)
    _assert_rule(index, q, k, M, threshold, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_calibrate_dtypes_and_scale(dtype):
    q, k = _qk(2, 1, 2, 150, 90, 16, dtype)
    index = fg.predict.calibrate(q, k, q_tile=64, threshold=0.7, softmax_scale=0.4)
    _assert_rule(index, q, k, 64, 0.7, 0.4)


def test_threshold_extremes():
    q, k = _qk(3, 1, 2, 200, 100, 16)
    assert torch.equal(fg.predict.calibrate(q, k, 64, threshold=0.0).to_mask(),
                       torch.ones(1, 2, 4, 100, dtype=torch.bool))
    # No probability exceeds 1, so threshold > Sk keeps nothing.
    none = fg.predict.calibrate(q, k, 64, threshold=101.0)
    assert int(none.counts.sum()) == 0
    # Every tile keeps its queries' arg-max keys at threshold 1 (max prob >= 1/Sk always).
    ones = fg.predict.calibrate(q, k, 64, threshold=1.0)
    assert bool((ones.counts >= 1).all())


def test_partial_last_tile_ignores_padding():
    # 65 queries at q_tile 64: the last tile holds one real query; its kept set must be that
    # query's own rule, not influenced by the 63 padding rows.
    q, k = _qk(4, 1, 1, 65, 300, 8)
    index = fg.predict.calibrate(q, k, q_tile=64, threshold=1.5)
    m = tile_max_probs64(q, k, 64, 8**-0.5)
    last = index.to_mask()[0, 0, 1]
    assert torch.equal(last, m[0, 0, 1] >= 1.5 / 300)
    assert int(last.sum()) < 300


@pytest.mark.parametrize("form", ["bool", "ids", "list", "int32"])
def test_always_keep(form):
    q, k = _qk(5, 2, 2, 130, 100, 16)
    ids = [0, 3, 99, 3]
    if form == "bool":
        keep = torch.zeros(100, dtype=torch.bool)
        keep[ids] = True
    elif form == "ids":
        keep = torch.tensor(ids)
    elif form == "int32":
        keep = torch.tensor(ids, dtype=torch.int32)
    else:
        keep = ids
    index = fg.predict.calibrate(q, k, 64, threshold=50.0, always_keep=keep)
    extra = torch.zeros(100, dtype=torch.bool)
    extra[ids] = True
    assert bool(index.to_mask()[..., extra].all())
    _assert_rule(index, q, k, 64, 50.0, 16**-0.5, extra=extra)


def test_capacity():
    q, k = _qk(6, 1, 2, 128, 300, 16)
    index = fg.predict.calibrate(q, k, 64, threshold=2.0, capacity=300)
    assert index.capacity == 384
    full = fg.predict.calibrate(q, k, 64, threshold=0.0)
    assert full.capacity == 384
    with pytest.raises(ValueError, match="capacity"):
        fg.predict.calibrate(q, k, 64, threshold=0.0, capacity=128)


def test_deterministic():
    q, k = _qk(7, 2, 2, 200, 180, 16)
    a = fg.predict.calibrate(q, k, 64, threshold=0.5)
    b = fg.predict.calibrate(q, k, 64, threshold=0.5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)


def test_query_lse_and_column_max(chunking):
    q, k = _qk(8, 2, 3, 90, 70, 16)
    scale = 16**-0.5
    lse = fg.predict.query_lse(q, k, scale)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-6)
    colmax = fg.predict.tile_column_max_probs(q, k, lse, 32, scale)
    torch.testing.assert_close(colmax.double(), tile_max_probs64(q, k, 32, scale),
                               atol=1e-7, rtol=1e-4)
    mask = fg.predict.tile_keep_mask(q, k, lse, 32, scale, 0.8)
    assert torch.equal(mask, colmax >= 0.8 / 70)


def test_hooks():
    q, k = _qk(9, 1, 2, 100, 80, 16)
    scale = 16**-0.5
    calls = []

    def lse_fn(q_, k_, scale_):
        calls.append(("lse", scale_))
        s = torch.einsum("bqhd,bkhd->bhqk", q_.double(), k_.double()) * scale_
        return torch.logsumexp(s, -1).float()

    def mask_fn(q_, k_, lse, q_tile, scale_, threshold):
        calls.append(("mask", q_tile, threshold))
        return fg.predict.tile_keep_mask(q_, k_, lse, q_tile, scale_, threshold)

    index = fg.predict.calibrate(q, k, 64, 0.5, lse_fn=lse_fn, mask_fn=mask_fn)
    assert calls == [("lse", scale), ("mask", 64, 0.5)]
    _assert_rule(index, q, k, 64, 0.5, scale)
    with pytest.raises(ValueError, match="lse_fn"):
        fg.predict.calibrate(q, k, 64, lse_fn=lambda *a: torch.zeros(1, 2, 99))
    with pytest.raises(TypeError, match="lse_fn"):
        fg.predict.calibrate(q, k, 64, lse_fn=lambda *a: None)


def test_video_like_inputs_sparse_and_exact():
    q, k, _ = video_like_qkv(3, 8, 8, 3, 32, seed=0, text_tokens=4)
    index = fg.predict.calibrate(q, k, 64, threshold=1.0)
    density = float(index.density())
    assert 0.02 < density < 0.9
    _assert_rule(index, q, k, 64, 1.0, 32**-0.5)
    assert math.isclose(density, float(index.to_mask().float().mean()), rel_tol=0.2)


def test_kernel_lse_matches_query_lse(monkeypatch):
    monkeypatch.setattr(calibrate_mod, "_KERNEL_INDEX_BYTES", 1000)  # one head per chunk
    q, k = _qk(10, 2, 3, 150, 90, 16)
    scale = 16**-0.5
    torch.testing.assert_close(fg.predict.kernel_lse(q, k, scale),
                               fg.predict.query_lse(q, k, scale), atol=1e-5, rtol=1e-6)
    index = fg.predict.calibrate(q, k, 64, 0.6, lse_fn=fg.predict.kernel_lse)
    _assert_rule(index, q, k, 64, 0.6, scale)


def test_backend_argument():
    q, k = _qk(3, 1, 1, 40, 50, 16)
    with pytest.raises(ValueError, match="backend"):
        fg.predict.calibrate(q, k, 64, backend="triton")
    with pytest.raises(RuntimeError, match="backend: .*Hopper"):
        fg.predict.calibrate(q, k, 64, backend="cute")
    auto = fg.predict.calibrate(q, k, 64, 1.0)
    torch_path = fg.predict.calibrate(q, k, 64, 1.0, backend="torch")
    assert torch.equal(auto.indices, torch_path.indices)
    assert torch.equal(auto.counts, torch_path.counts)


def test_keep_words_bit_order():
    """Key j at bit j % 32 of int32 word j // 32: the kernel's bitmap order."""
    sk = 70
    keep = torch.zeros(sk, dtype=torch.bool)
    ids = [0, 5, 31, 32, 63, 64, 69]
    keep[ids] = True
    words = _args.keep_words(keep, sk, torch.device("cpu"))
    assert words.dtype == torch.int32 and words.shape == (3,)
    bits = [(int(words[j // 32]) >> (j % 32)) & 1 for j in range(96)]
    assert [j for j, b in enumerate(bits) if b] == ids
    assert torch.equal(_args.keep_words(None, sk, torch.device("cpu")),
                       torch.zeros(3, dtype=torch.int32))
