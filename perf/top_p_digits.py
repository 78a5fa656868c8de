"""How many of a row's keys share tau's bin in the top-p selection's first radix round, with the
kernel's fixed digits and with a first digit placed per row (CPU, the torch path's pooled
probabilities; a count, not a timing). See perf/NOTES.md, "The selection with each row in
registers (session 11)".

    python perf/top_p_digits.py [--seqlen 32760 --rows 64 --p 0.9]

For each kind of input it prints the highest bit in which a row's weighted keys differ (of the
float bits less 2^-52's), the share of keys in tau's first-round bin now (bits 17-28) and with
the 12-bit digit just below that bit, and the share of 32-key warp steps that then run round 2's
atomic path (1 - (1 - share)^32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgattn_cute.predict import pooled  # noqa: E402
from fgattn_cute.testing import video_like_qkv  # noqa: E402

FIRST_SHIFT, FIRST_BITS = 17, 12  # the kernel's first digit (top_p_sm90.ROUNDS[0])


def tau_bits(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Each row's boundary value tau (float bits less 2^-52's), by a full sort."""
    scale = pooled._MASS_SCALE
    total = (probs * scale).to(torch.int64).sum(-1)
    target = torch.ceil(total.double() * p).to(torch.int64)
    ordered, _ = torch.sort(probs, -1, descending=True)
    cumulative = (ordered * scale).to(torch.int64).cumsum(-1)
    pos = (cumulative < target[:, None]).sum(-1).clamp(max=probs.shape[1] - 1)
    return ordered.gather(1, pos[:, None]).view(torch.int32) - pooled._LOW_BITS


def report(name: str, probs: torch.Tensor, p: float):
    rb = probs.contiguous().view(torch.int32) - pooled._LOW_BITS
    weighted = rb >= 0
    tau = tau_bits(probs, p)
    lo = torch.where(weighted, rb, torch.full_like(rb, 2**30)).amin(-1)
    hi = torch.where(weighted, rb, torch.full_like(rb, -1)).amax(-1)
    top = torch.tensor([int(x).bit_length() - 1 for x in (lo ^ hi)])
    placed = (top - (FIRST_BITS - 1)).clamp(min=0)[:, None]
    n = weighted.sum(-1).double()
    now = (((rb >> FIRST_SHIFT) == (tau >> FIRST_SHIFT)) & weighted).sum(-1) / n
    per_row = (((rb >> placed) == (tau >> placed)) & weighted).sum(-1) / n
    now, per_row = now.mean().item(), per_row.mean().item()
    print(f"{name:12s} rows {probs.shape[0]:4d}  highest differing bit {top.float().mean():5.1f}  "
          f"keys in tau's bin: now {now:.4f}, placed per row {per_row:.5f}  "
          f"warp steps on round 2's atomic path: now {1 - (1 - now) ** 32:.3f}, "
          f"placed {1 - (1 - per_row) ** 32:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seqlen", type=int, default=32760)
    ap.add_argument("--rows", type=int, default=64, help="query tiles (rows) per kind of input")
    ap.add_argument("--p", type=float, default=0.9)
    args = ap.parse_args(argv)
    S, D = args.seqlen, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, S, 1, D, generator=g).bfloat16()
    k = torch.randn(1, S, 1, D, generator=g).bfloat16()
    report("random", pooled.pooled_probs(q, k, 128).reshape(-1, S)[: args.rows].float(), args.p)
    frames = -(-S // (30 * 52))
    q, k, _ = video_like_qkv(frames=frames, height=30, width=52, heads=1, head_dim=D, seed=0)
    q, k = q[:, :S], k[:, :S]
    probs = pooled.pooled_probs(q, k, 128).reshape(-1, S)[: args.rows].float()
    report("video_like", probs, args.p)


if __name__ == "__main__":
    main()
