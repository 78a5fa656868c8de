"""Brute-force constructions (Python loops, float64) that the tests compare against."""

from __future__ import annotations

import math

import torch


def random_mask(gen, B, H, n_tiles, seqlen_k, keep, empty_and_full=True):
    """bool [B, H, n_tiles, seqlen_k] with about ``keep`` kept; optionally forces the first row
    empty and the last row full, so every test sees both."""
    mask = torch.rand(B, H, n_tiles, seqlen_k, generator=gen) < keep
    if empty_and_full:
        mask[0, 0, 0] = False
        mask[-1, -1, -1] = True
    return mask


def lists_from_mask(mask):
    """{(b, h, t): [kept key ids]} by loops."""
    B, H, T, S = mask.shape
    out = {}
    for b in range(B):
        for h in range(H):
            for t in range(T):
                out[(b, h, t)] = [j for j in range(S) if bool(mask[b, h, t, j])]
    return out


def block_to_key_mask(block_mask, k_block, seqlen_k):
    rows = block_mask.tolist()
    return torch.tensor(
        [[[[row[j // k_block] for j in range(seqlen_k)] for row in head] for head in batch]
         for batch in rows],
        dtype=torch.bool,
    ).reshape(*block_mask.shape[:3], seqlen_k)


def assert_index_matches(index, lists, capacity=None):
    """``index`` holds exactly ``lists``, padded with zeros, at a capacity multiple of 128."""
    assert index.indices.dtype == torch.int32 and index.counts.dtype == torch.int32
    assert index.indices.is_contiguous() and index.counts.is_contiguous()
    assert index.capacity % 128 == 0 and index.capacity > 0
    if capacity is not None:
        assert index.capacity == capacity
    B, H, T, cap = index.indices.shape
    assert len(lists) == B * H * T
    for (b, h, t), keys in lists.items():
        n = len(keys)
        assert int(index.counts[b, h, t]) == n, (b, h, t)
        row = index.indices[b, h, t].tolist()
        assert row[:n] == keys, (b, h, t)
        assert row[n:] == [0] * (cap - n), (b, h, t)


def density(lists, q_tile, seqlen_q, seqlen_k, B, H):
    kept = 0
    for (_, _, t), keys in lists.items():
        rows = min(seqlen_q, (t + 1) * q_tile) - t * q_tile
        kept += rows * len(keys)
    return kept / (B * H * seqlen_q * seqlen_k)


def dense_masked_attention(q, k, v, tile_mask, q_tile, scale=None):
    """float64 dense attention with the tile mask expanded to query rows.

    Returns out [B, Sq, H, D] and lse [B, H, Sq]; rows with no kept key give 0 and -inf."""
    q, k, v = (x.double() for x in (q, k, v))
    B, Sq, H, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    row_tile = torch.arange(Sq) // q_tile
    mask = tile_mask[:, :, row_tile, :]  # [B, H, Sq, Sk]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse
