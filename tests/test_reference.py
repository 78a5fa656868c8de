"""The float32 reference against a dense masked softmax computed in float64."""

import math

import pytest
import torch
from brute import dense_masked_attention, random_mask

import fgattn_cute as fg
from fgattn_cute import reference as reference_mod

# (B, H, seqlen_q, seqlen_k, D, q_tile)
CASES = [
    (1, 1, 1, 1, 16, 64),
    (2, 3, 100, 77, 32, 64),
    (1, 2, 257, 129, 64, 128),
    (2, 2, 97, 255, 16, 48),
    (1, 3, 50, 301, 8, 7),
    (2, 1, 130, 64, 32, 128),
]


def _inputs(seed, B, H, Sq, Sk, D, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=gen).to(dtype)
    k = torch.randn(B, Sk, H, D, generator=gen).to(dtype)
    v = torch.randn(B, Sk, H, D, generator=gen).to(dtype)
    return q, k, v, gen


@pytest.fixture(params=[False, True], ids=["big_chunks", "tiny_chunks"])
def chunking(request, monkeypatch):
    """Also run with chunk budgets small enough to split heads, tiles and list slots."""
    if request.param:
        monkeypatch.setattr(reference_mod, "_CHUNK_ELEMS", 3000)
        monkeypatch.setattr(reference_mod, "_MAX_SLOTS", 5)
    return request.param


def _check(out, lse, ref_out, ref_lse):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-4)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (lse[empty] < 0).all()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_reference_matches_dense_float64(case, keep, chunking):
    B, H, Sq, Sk, D, M = case
    q, k, v, gen = _inputs(10, B, H, Sq, Sk, D)
    mask = random_mask(gen, B, H, math.ceil(Sq / M), Sk, keep)
    index = fg.KeyIndex.from_mask(mask, M, Sq)
    out, lse = fg.reference.sparse_attention(q, k, v, index, return_lse=True)
    assert out.shape == (B, Sq, H, D) and lse.shape == (B, H, Sq)
    ref_out, ref_lse = dense_masked_attention(q, k, v, mask, M)
    _check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_half_inputs_compute_in_float32(dtype):
    B, H, Sq, Sk, D, M = 2, 2, 150, 140, 32, 64
    q, k, v, gen = _inputs(11, B, H, Sq, Sk, D, dtype)
    mask = random_mask(gen, B, H, math.ceil(Sq / M), Sk, 0.4)
    out, lse = fg.reference.sparse_attention(
        q, k, v, fg.KeyIndex.from_mask(mask, M, Sq), return_lse=True
    )
    assert out.dtype == torch.float32
    ref_out, ref_lse = dense_masked_attention(q, k, v, mask, M)  # same rounded inputs, float64
    _check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_reference_softmax_scale(scale):
    B, H, Sq, Sk, D, M = 1, 2, 70, 90, 16, 64
    q, k, v, gen = _inputs(12, B, H, Sq, Sk, D)
    mask = random_mask(gen, B, H, 2, Sk, 0.5)
    index = fg.KeyIndex.from_mask(mask, M, Sq)
    out, lse = fg.reference.sparse_attention(q, k, v, index, softmax_scale=scale, return_lse=True)
    ref_out, ref_lse = dense_masked_attention(q, k, v, mask, M, scale=scale)
    _check(out, lse, ref_out, ref_lse)


def test_reference_default_scale_is_rsqrt_head_dim():
    q, k, v, _ = _inputs(13, 1, 1, 64, 64, 16)
    index = fg.KeyIndex.dense(1, 1, 64, 64, 64, "cpu")
    default = fg.reference.sparse_attention(q, k, v, index)
    explicit = fg.reference.sparse_attention(q, k, v, index, softmax_scale=0.25)
    assert torch.equal(default, explicit)


def test_reference_empty_tiles_give_zero_and_minus_inf():
    q, k, v, _ = _inputs(14, 1, 2, 100, 50, 16)
    mask = torch.zeros(1, 2, 2, 50, dtype=torch.bool)
    mask[0, 1, 1, 3] = True
    out, lse = fg.reference.sparse_attention(
        q, k, v, fg.KeyIndex.from_mask(mask, 64, 100), return_lse=True
    )
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.equal(out[0, :64, 1], torch.zeros_like(out[0, :64, 1]))
    assert torch.isneginf(lse[0, 0]).all() and torch.isneginf(lse[0, 1, :64]).all()
    # one key: softmax is 1, the output is that value row
    torch.testing.assert_close(out[0, 64:, 1], v[0, 3, 1].expand(36, 16))
    assert torch.isfinite(lse[0, 1, 64:]).all()


def test_reference_returns_out_only_by_default():
    q, k, v, _ = _inputs(15, 1, 1, 10, 10, 8)
    out = fg.reference.sparse_attention(q, k, v, fg.KeyIndex.dense(1, 1, 10, 10, 64, "cpu"))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 10, 1, 8)


def test_reference_follows_the_lists_not_a_mask():
    """Keys listed for one tile only are not seen by the other tiles of the same head."""
    B, H, Sq, Sk, D, M = 1, 1, 128, 20, 8, 64
    q, k, v, _ = _inputs(16, B, H, Sq, Sk, D)
    indices = torch.zeros(1, 1, 2, 3, dtype=torch.int64)
    indices[0, 0, 0] = torch.tensor([2, 5, 19])
    indices[0, 0, 1] = torch.tensor([0, 1, 0])
    counts = torch.tensor([[[3, 2]]])
    index = fg.KeyIndex.from_indices(indices, counts, M, Sq, Sk)
    out = fg.reference.sparse_attention(q, k, v, index)
    mask = torch.zeros(1, 1, 2, Sk, dtype=torch.bool)
    mask[0, 0, 0, [2, 5, 19]] = True
    mask[0, 0, 1, [0, 1]] = True
    ref_out, _ = dense_masked_attention(q, k, v, mask, M)
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-4)


def test_reference_accepts_strided_inputs():
    """q, k, v views with a contiguous last dim but other strides (e.g. a fused qkv)."""
    B, S, H, D = 2, 70, 3, 16
    gen = torch.Generator().manual_seed(17)
    qkv = torch.randn(B, S, 3, H, D, generator=gen)
    q, k, v = qkv.unbind(2)
    mask = random_mask(gen, B, H, 2, S, 0.5)
    out = fg.reference.sparse_attention(q, k, v, fg.KeyIndex.from_mask(mask, 64, S))
    ref_out, _ = dense_masked_attention(q, k, v, mask, 64)
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-4)
