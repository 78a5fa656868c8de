"""fg.predict.pooled_top_p and top_p_mask against a full-sort reference of the documented rule."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from predict_brute import MASS_SCALE, pooled_probs64, top_p_sorted

import fgattn_cute as fg
from fgattn_cute.predict import pooled as pooled_mod
from fgattn_cute.testing import video_like_qkv

PS = [0.05, 0.5, 0.9, 0.99, 1.0]


def _qk(seed, B, H, Sq, Sk, D, dtype=torch.bfloat16, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Sq, H, D, generator=gen) * spread).to(dtype)
    k = (torch.randn(B, Sk, H, D, generator=gen) * spread).to(dtype)
    return q, k


def _random_probs(seed, rows, n, ties=False, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, n, generator=gen) * spread
    if ties:
        logits = (logits * 2).round() / 2  # many exactly equal probabilities
    return torch.softmax(logits, dim=-1)


@pytest.fixture(params=[False, True], ids=["big_chunks", "tiny_chunks"])
def chunking(request, monkeypatch):
    if request.param:
        monkeypatch.setitem(pooled_mod._ROW_ELEMS, "cpu", 150)
    return request.param


def _mass64(probs, mask):
    return (probs.double() * mask).sum(-1)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [1, 2, 37, 1000, 3001])
@pytest.mark.parametrize("p", PS)
def test_top_p_mask_equals_full_sort(n, p, ties):
    probs = _random_probs(n, 6, n, ties)
    assert torch.equal(fg.predict.top_p_mask(probs, p), top_p_sorted(probs, p))


def test_top_p_mask_kept_mass_and_minimality():
    probs = _random_probs(1, 40, 500, spread=2.0)
    for p in (0.3, 0.8, 0.95):
        mask = fg.predict.top_p_mask(probs, p)
        mass = _mass64(probs, mask)
        assert bool((mass >= p - 1e-6).all())
        # Removing the smallest kept key (the last in the documented order) drops below p.
        kept_probs = torch.where(mask, probs, float("inf"))
        smallest = kept_probs.min(-1).values.double()
        assert bool((mass - smallest < p + 1e-6).all())
        # Exact, in the integer units of the rule.
        m = (probs * MASS_SCALE).to(torch.int64)
        total = m.sum(-1)
        target = torch.tensor([math.ceil(float(t) * p) for t in total.tolist()])
        kept = (m * mask).sum(-1)
        assert bool((kept >= target).all())
        assert bool((kept - (torch.where(mask, m, 2**62).min(-1).values) < target).all())


def test_top_p_ties_lower_index_first():
    # Uniform rows: every probability equal, so the kept set is a prefix of the key ids.
    n = 100
    probs = torch.full((3, n), 1.0 / n)
    for p in (0.01, 0.333, 0.5, 0.999):
        mask = fg.predict.top_p_mask(probs, p)
        m = int(probs[0, 0] * MASS_SCALE)
        need = math.ceil(math.ceil(float(m * n) * p) / m)
        expected = torch.arange(n) < need
        assert torch.equal(mask, expected.expand(3, n)), p
    # Two tied keys at the boundary: only the lower index is taken when one suffices.
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1]])
    assert fg.predict.top_p_mask(probs, 0.25).tolist() == [[False, True, False, False, False]]
    assert fg.predict.top_p_mask(probs, 0.55).tolist() == [[False, True, False, True, False]]
    assert fg.predict.top_p_mask(probs, 0.65).tolist() == [[False, True, True, True, False]]
    assert fg.predict.top_p_mask(probs, 0.85).tolist() == [[True, True, True, True, False]]


def test_top_p_mask_reaches_p_exactly():
    # Exact binary probabilities: the mass of key 0 is exactly 0.5.
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    assert fg.predict.top_p_mask(probs, 0.5).tolist() == [[True, False, False]]
    just_above = math.nextafter(0.5, 1.0)  # 0.5 + 2**-53: key 0 alone no longer reaches p
    assert fg.predict.top_p_mask(probs, just_above).tolist() == [[True, True, False]]
    assert fg.predict.top_p_mask(probs, 0.75).tolist() == [[True, True, False]]
    assert fg.predict.top_p_mask(probs, math.nextafter(0.75, 1.0)).tolist() == [[True] * 3]


def test_top_p_mask_shapes_and_edges():
    probs = _random_probs(2, 12, 50).view(2, 3, 2, 50)
    out = fg.predict.top_p_mask(probs, 0.7)
    assert out.shape == probs.shape and out.dtype == torch.bool
    assert torch.equal(out, top_p_sorted(probs, 0.7))
    assert bool(fg.predict.top_p_mask(probs, 1.0).all())
    one_hot = torch.zeros(2, 10)
    one_hot[0, 3] = 1.0
    one_hot[1, 9] = 1.0
    assert fg.predict.top_p_mask(one_hot, 0.999).nonzero().tolist() == [[0, 3], [1, 9]]
    # A row of zeros has no mass: nothing is kept (p < 1).
    assert not fg.predict.top_p_mask(torch.zeros(1, 5), 0.5).any()
    # Tiny probabilities (below 2**-52) weigh nothing; they are never needed for p < 1.
    row = torch.tensor([[1.0, 1e-30, 0.0]])
    assert fg.predict.top_p_mask(row, 0.999999).tolist() == [[True, False, False]]


@given(
    n=st.integers(1, 300),
    p=st.floats(0.001, 1.0),
    spread=st.floats(0.0, 30.0),
    quant=st.sampled_from([0.0, 0.25, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_top_p_mask_property(n, p, spread, quant, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, n, generator=gen) * spread
    if quant:
        logits = (logits / quant).round() * quant
    probs = torch.softmax(logits, -1)
    assert torch.equal(fg.predict.top_p_mask(probs, p), top_p_sorted(probs, p))


# (B, H, seqlen_q, seqlen_k, D, q_tile)
CASES = [
    (1, 1, 1, 1, 8, 64),
    (2, 3, 100, 77, 16, 64),
    (1, 2, 257, 129, 32, 128),
    (1, 2, 97, 255, 16, 1),
    (2, 1, 50, 301, 8, 7),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_pooled_top_p_equals_full_sort(case, p, chunking):
    B, H, Sq, Sk, D, M = case
    q, k = _qk(3, B, H, Sq, Sk, D)
    index = fg.predict.pooled_top_p(q, k, q_tile=M, p=p)
    assert isinstance(index, fg.KeyIndex) and index.trusted
    assert (index.batch, index.heads, index.seqlen_q, index.seqlen_k, index.q_tile) == (
        B, H, Sq, Sk, M)
    probs = fg.predict.pooled_probs(q, k, q_tile=M)
    assert torch.equal(index.to_mask(), top_p_sorted(probs, p))
    # The float32 probabilities are those of the float64 definition, and hold mass >= p.
    ref = pooled_probs64(q, k, M, D**-0.5)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-4)
    assert bool((_mass64(ref, index.to_mask()) >= p - 1e-5).all())


def test_pooled_top_p_dtypes_and_scale():
    for dtype in (torch.float16, torch.float32):
        q, k = _qk(4, 1, 2, 150, 90, 16, dtype)
        index = fg.predict.pooled_top_p(q, k, q_tile=64, p=0.8, softmax_scale=0.3)
        probs = fg.predict.pooled_probs(q, k, q_tile=64, softmax_scale=0.3)
        torch.testing.assert_close(probs.double(), pooled_probs64(q, k, 64, 0.3), atol=1e-6,
                                   rtol=1e-4)
        assert torch.equal(index.to_mask(), top_p_sorted(probs, 0.8))


def test_tile_means_partial_tile():
    q, _ = _qk(5, 2, 3, 70, 1, 8, torch.float32)
    means = fg.predict.tile_means(q, 32)
    assert means.shape == (2, 3, 3, 8)
    torch.testing.assert_close(means[:, :, 2], q[:, 64:70].mean(dim=1))
    torch.testing.assert_close(means[:, :, 0], q[:, :32].mean(dim=1))


@pytest.mark.parametrize("form", ["bool", "ids", "list"])
def test_always_keep(form):
    q, k = _qk(6, 2, 2, 130, 100, 16)
    ids = [0, 5, 99]
    if form == "bool":
        keep = torch.zeros(100, dtype=torch.bool)
        keep[ids] = True
    elif form == "ids":
        keep = torch.tensor(ids, dtype=torch.int16)
    else:
        keep = ids
    index = fg.predict.pooled_top_p(q, k, 64, p=0.3, always_keep=keep)
    probs = fg.predict.pooled_probs(q, k, 64)
    expected = top_p_sorted(probs, 0.3)
    expected[..., ids] = True
    assert torch.equal(index.to_mask(), expected)
    # The selection itself is unchanged: always_keep does not count towards p.
    extra = torch.zeros(100, dtype=torch.bool)
    extra[ids] = True
    plain = fg.predict.pooled_top_p(q, k, 64, p=0.3).to_mask()
    assert torch.equal(index.to_mask() & ~extra, plain & ~extra)


def test_p_one_keeps_everything_and_capacity():
    q, k = _qk(7, 1, 2, 128, 300, 16)
    full = fg.predict.pooled_top_p(q, k, 64, p=1.0)
    assert bool((full.counts == 300).all())
    small = fg.predict.pooled_top_p(q, k, 64, p=0.2, capacity=300)
    assert small.capacity == 384
    with pytest.raises(ValueError, match="capacity"):
        fg.predict.pooled_top_p(q, k, 64, p=1.0, capacity=200)


def test_deterministic():
    q, k = _qk(8, 2, 2, 200, 180, 16)
    a = fg.predict.pooled_top_p(q, k, 64, p=0.9)
    b = fg.predict.pooled_top_p(q, k, 64, p=0.9)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)


def test_video_like_inputs():
    q, k, _ = video_like_qkv(3, 8, 8, 3, 32, seed=1, text_tokens=4)
    low = fg.predict.pooled_top_p(q, k, 64, p=0.5)
    high = fg.predict.pooled_top_p(q, k, 64, p=0.95)
    assert 0 < float(low.density()) < float(high.density()) < 1
    assert bool((high.to_mask() | ~low.to_mask()).all())  # nested in p


def test_select_fn_hook():
    q, k = _qk(9, 1, 2, 130, 100, 16)
    seen = []

    def select_fn(probs, p):
        seen.append((tuple(probs.shape), p.dtype, float(p)))
        return fg.predict.top_p_select(probs, p)

    index = fg.predict.pooled_top_p(q, k, 64, p=0.8, select_fn=select_fn)
    assert seen == [((2 * 3, 100), torch.float64, 0.8)]
    assert torch.equal(index.to_mask(), top_p_sorted(fg.predict.pooled_probs(q, k, 64), 0.8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit notices from inductor
def test_compiled_select_equals_eager():
    select = fg.predict.compiled_top_p_select()
    assert fg.predict.compiled_top_p_select() is select  # built once
    probs = _random_probs(11, 16, 700, ties=True)
    for p in (0.3, 0.9, 0.999):  # p is a tensor: one compilation for every p
        p_t = torch.tensor(p, dtype=torch.float64)
        assert torch.equal(select(probs, p_t), top_p_sorted(probs, p))


def test_backend_argument():
    q, k = _qk(8, 1, 1, 40, 50, 16)
    with pytest.raises(ValueError, match="backend"):
        fg.predict.pooled_top_p(q, k, 64, backend="triton")
    with pytest.raises(RuntimeError, match="backend: .*Hopper"):
        fg.predict.pooled_top_p(q, k, 64, 0.9, backend="cute")
    with pytest.raises(RuntimeError, match="backend: .*select_fn"):
        fg.predict.pooled_top_p(q, k, 64, 0.9, backend="cute",
                                select_fn=pooled_mod.top_p_select)
    auto = fg.predict.pooled_top_p(q, k, 64, 0.9)
    torch_path = fg.predict.pooled_top_p(q, k, 64, 0.9, backend="torch")
    assert torch.equal(auto.indices, torch_path.indices)
    assert torch.equal(auto.counts, torch_path.counts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_in_three_is_float32_accurate(dtype):
    """The kernel path's scores: tile means split in three 16-bit parts against [k; k; k]
    equal the float32 dot products to float32 accuracy (checked here with float64 sums)."""
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(5, 7, 64, generator=gen) * 0.3
    k = (torch.randn(5, 200, 64, generator=gen) * 2).to(dtype)
    parts = pooled_mod._split_in_three(means, dtype)
    assert parts.dtype == dtype and parts.shape == (5, 7, 192)
    rebuilt = parts[..., :64].double() + parts[..., 64:128].double() + parts[..., 128:].double()
    # Relative to the largest mean: fp16's third part can be subnormal for tiny entries.
    biggest = means.double().abs().amax(dim=-1, keepdim=True)
    assert ((rebuilt - means.double()).abs() <= biggest * 2**-20).all()
    k3 = torch.cat([k, k, k], dim=-1).double()
    split = parts.double() @ k3.transpose(1, 2)
    exact = means.double() @ k.double().transpose(1, 2)
    scale = means.double().abs() @ k.double().abs().transpose(1, 2)
    assert ((split - exact).abs() <= scale * 2**-20).all()
