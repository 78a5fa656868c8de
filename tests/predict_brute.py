"""Brute-force versions of the predictors' rules (float64, full sort) for the predict tests."""

from __future__ import annotations

import math

import torch

MASS_SCALE = float(2**52)


def probs64(q, k, scale):
    """float64 softmax(scale Q K^T) [B, H, Sq, Sk]."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.softmax(s, dim=-1)


def tile_max_probs64(q, k, q_tile, scale):
    """float64 [B, H, T, Sk]: max over each tile's real queries of the probabilities."""
    probs = probs64(q, k, scale)
    B, H, sq, sk = probs.shape
    n_tiles = math.ceil(sq / q_tile)
    probs = torch.nn.functional.pad(probs, (0, 0, 0, n_tiles * q_tile - sq), value=-1.0)
    return probs.view(B, H, n_tiles, q_tile, sk).amax(dim=3)


def keep_with_margin(q, k, q_tile, threshold, scale, rel=1e-4):
    """(keep, ambiguous): float64 rule and the entries within ``rel`` of the cut."""
    m = tile_max_probs64(q, k, q_tile, scale)
    cut = threshold / k.shape[1]
    keep = m >= cut
    ambiguous = (m - cut).abs() <= rel * cut
    return keep, ambiguous


def top_p_sorted(probs, p):
    """The documented top-p rule with a full stable sort (Python loop over rows): bool, shape of
    ``probs`` (float32 [..., N])."""
    shape = probs.shape
    rows = probs.reshape(-1, shape[-1])
    out = torch.zeros(rows.shape, dtype=torch.bool)
    if p >= 1.0:
        return ~out.reshape(shape)
    mass = (rows * MASS_SCALE).to(torch.int64)
    for r in range(rows.shape[0]):
        total = int(mass[r].sum())
        if total == 0:
            continue
        target = math.ceil(float(total) * p)
        order = torch.sort(rows[r], descending=True, stable=True).indices
        cum = torch.cumsum(mass[r][order], 0)
        n = int((cum < target).sum()) + 1
        out[r, order[:n]] = True
    return out.reshape(shape)


def pooled_probs64(q, k, q_tile, scale):
    """float64 [B, H, T, Sk]: softmax of scale * (mean of the tile's real queries) . k."""
    B, sq, H, D = q.shape
    n_tiles = math.ceil(sq / q_tile)
    means = torch.stack(
        [q[:, t * q_tile:min(sq, (t + 1) * q_tile)].double().mean(dim=1) for t in range(n_tiles)],
        dim=2,
    )  # [B, H, T, D]
    logits = torch.einsum("bhtd,bkhd->bhtk", means, k.double()) * scale
    return torch.softmax(logits, dim=-1)
