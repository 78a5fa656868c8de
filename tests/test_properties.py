"""Property tests (hypothesis, derandomized): many random shapes and masks."""

import math

import pytest
import torch
from brute import (
    assert_index_matches,
    block_to_key_mask,
    dense_masked_attention,
    density,
    lists_from_mask,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fgattn_cute as fg


@st.composite
def problems(draw, max_sk=300):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    q_tile = draw(st.sampled_from([1, 7, 48, 64, 128]))
    seqlen_q = draw(st.integers(1, 200))
    seqlen_k = draw(st.integers(1, max_sk))
    keep = draw(st.sampled_from([0.0, 0.05, 0.3, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n_tiles = math.ceil(seqlen_q / q_tile)
    mask = torch.rand(B, H, n_tiles, seqlen_k, generator=gen) < keep
    return B, H, q_tile, seqlen_q, seqlen_k, mask, gen


@settings(max_examples=60)
@given(problems())
def test_from_mask_round_trips(problem):
    B, H, M, Sq, Sk, mask, _ = problem
    lists = lists_from_mask(mask)
    index = fg.KeyIndex.from_mask(mask, M, Sq)
    assert_index_matches(index, lists)
    assert torch.equal(index.to_mask(), mask)
    assert float(index.density()) == pytest.approx(
        density(lists, M, Sq, Sk, B, H), rel=1e-6, abs=1e-12
    )
    back = index.pack().unpack()
    assert torch.equal(back.indices, index.indices) and torch.equal(back.counts, index.counts)
    adopted = fg.KeyIndex.from_indices(index.indices.long(), index.counts, M, Sq, Sk)
    assert torch.equal(adopted.indices, index.indices)
    biggest = max(len(v) for v in lists.values())
    if biggest > 0:
        tight = fg.KeyIndex.from_mask(mask, M, Sq, capacity=biggest)
        assert_index_matches(tight, lists, capacity=math.ceil(biggest / 128) * 128)


@settings(max_examples=30)
@given(problems(max_sk=200), st.integers(1, 70))
def test_from_block_mask_equals_expanded_mask(problem, k_block):
    B, H, M, Sq, Sk, _, gen = problem
    n_blocks = math.ceil(Sk / k_block)
    block_mask = torch.rand(B, H, math.ceil(Sq / M), n_blocks, generator=gen) < 0.4
    index = fg.KeyIndex.from_block_mask(block_mask, M, Sq, k_block, Sk)
    assert_index_matches(index, lists_from_mask(block_to_key_mask(block_mask, k_block, Sk)))


@settings(max_examples=40)
@given(problems(max_sk=150), st.sampled_from([8, 16, 40]))
def test_reference_matches_dense(problem, head_dim):
    B, H, M, Sq, Sk, mask, gen = problem
    q = torch.randn(B, Sq, H, head_dim, generator=gen)
    k = torch.randn(B, Sk, H, head_dim, generator=gen)
    v = torch.randn(B, Sk, H, head_dim, generator=gen)
    index = fg.KeyIndex.from_mask(mask, M, Sq)
    out, lse = fg.reference.sparse_attention(q, k, v, index, return_lse=True)
    ref_out, ref_lse = dense_masked_attention(q, k, v, mask, M)
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-4)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), atol=2e-5, rtol=1e-5)

