"""A first run: ``python3 -m fgattn_cute.demo``.

Builds a random key index (about 30% of the scores kept) for a small problem, runs
``fg.sparse_attention`` (the CuTe kernel on a Hopper GPU, the float32 reference on CPU), and
compares it with a dense masked attention written in plain torch.
"""

from __future__ import annotations

import math
import sys

import torch

import fgattn_cute as fg


def dense_masked_attention(q, k, v, tile_mask, q_tile, scale):
    """Plain torch, float32: every score computed, the dropped ones masked to -inf."""
    row_tile = torch.arange(q.shape[1], device=q.device) // q_tile
    mask = tile_mask[:, :, row_tile, :]  # [B, H, Sq, Sk]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key: all zeros
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float())


def _pick_device():
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        return torch.device("cuda")
    return torch.device("cpu")


def main(B=1, H=4, seqlen=1000, head_dim=64, q_tile=128, keep=0.3, seed=0, out=sys.stdout):
    device, dtype = _pick_device(), torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, seqlen, H, head_dim, generator=gen) for _ in range(3))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    n_tiles = math.ceil(seqlen / q_tile)
    tile_mask = (torch.rand(B, H, n_tiles, seqlen, generator=gen) < keep).to(device)
    index = fg.KeyIndex.from_mask(tile_mask, q_tile=q_tile, seqlen_q=seqlen)
    scale = head_dim**-0.5

    backend = "auto"
    note = "CuTe kernel" if device.type == "cuda" else "float32 reference (no Hopper GPU here)"
    result = fg.sparse_attention(q, k, v, index, backend="auto")

    expected = dense_masked_attention(q, k, v, tile_mask, q_tile, scale)
    err = (result.float() - expected).abs().max().item()
    density = index.density().item()
    print(f"fgattn-cute {fg.__version__} demo on {device} ({dtype}), backend={backend!r}: {note}",
          file=out)
    print(f"problem: B={B} H={H} seqlen={seqlen} head_dim={head_dim} q_tile={q_tile}, "
          f"index capacity {index.capacity}", file=out)
    print(f"density (kept fraction of scores): {density:.4f}", file=out)
    print(f"max |sparse_attention - dense masked attention|: {err:.3e}", file=out)
    tolerance = 3e-2  # bf16 inputs and output
    ok = err <= tolerance
    print("OK" if ok else f"MISMATCH (tolerance {tolerance})", file=out)
    return err, density, ok


if __name__ == "__main__":
    sys.exit(0 if main()[2] else 1)
