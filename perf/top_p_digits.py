"""How many of a row's keys share tau's bin in the top-p selection's first radix round, with the
fixed first digit (bits 17-28) and with the first round the kernel plans per row, and how many
rounds that plan takes (CPU, the torch path's pooled probabilities; a count, not a timing). See
perf/NOTES.md, "The selection with each row in registers (session 11)" and "The first radix
round placed per row, on the GPU (session 12)".

    python perf/top_p_digits.py [--seqlen 32760 --head-dim 128 --rows 64 --p 0.9]

For each kind of input it prints the highest bit in which a row's weighted keys differ (of the
float bits less 2^-52's), the share of keys in tau's first-round bin with the fixed digit and
with the planned one (`digit_plan` of fgattn_cute/kernels/top_p_sm90.py: 4,096 bins of
rb >> shift1 from the row's lowest key), the planned rounds (mean), and the share of 32-key
warp steps that then run round 2's atomic path (1 - (1 - share)^32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgattn_cute.kernels.top_p_sm90 import (  # noqa: E402
    DIGIT_BITS,
    FIRST_DIGIT,
    HIST_BINS,
    PLAN_MARGIN,
)
from fgattn_cute.predict import pooled  # noqa: E402
from fgattn_cute.testing import video_like_qkv  # noqa: E402

FIRST_SHIFT = FIRST_DIGIT[0]  # the kernel's fixed first digit: bits 17-28


def planned_shift(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift1, base1) per row, as the kernel's `digit_plan` computes them from the row's
    smallest and largest probabilities."""
    low_bits = pooled._LOW_BITS
    lo = (probs.amin(-1).view(torch.int32) - low_bits - PLAN_MARGIN).clamp(min=0).tolist()
    hi = (probs.amax(-1).view(torch.int32) - low_bits + PLAN_MARGIN).clamp(min=0).tolist()
    shifts, bases = [], []
    for a, b in zip(lo, hi, strict=True):
        s = max((b - a).bit_length() - DIGIT_BITS, 0)
        if (b >> s) - (a >> s) >= HIST_BINS:
            s += 1
        shifts.append(s if s <= FIRST_SHIFT else FIRST_SHIFT)
        bases.append(a >> s if s <= FIRST_SHIFT else 0)
    return torch.tensor(shifts)[:, None], torch.tensor(bases)[:, None]


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
    shift1, _ = planned_shift(probs)
    rounds = 1 + (shift1 > 0).double() + (shift1 > DIGIT_BITS).double()
    n = weighted.sum(-1).double()
    fixed = (((rb >> FIRST_SHIFT) == (tau >> FIRST_SHIFT)) & weighted).sum(-1) / n
    per_row = (((rb >> shift1) == (tau >> shift1)) & weighted).sum(-1) / n
    fixed, per_row = fixed.mean().item(), per_row.mean().item()
    print(f"{name:12s} rows {probs.shape[0]:4d}  highest differing bit {top.float().mean():5.1f}  "
          f"keys in tau's bin: fixed digit {fixed:.4f}, placed per row {per_row:.5f} "
          f"(shift {shift1.double().mean():4.1f}, {rounds.mean():.2f} rounds)  "
          f"warp steps on round 2's atomic path: fixed {1 - (1 - fixed) ** 32:.3f}, "
          f"placed {1 - (1 - per_row) ** 32:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seqlen", type=int, default=32760)
    ap.add_argument("--rows", type=int, default=64, help="query tiles (rows) per kind of input")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--p", type=float, default=0.9)
    args = ap.parse_args(argv)
    S, D = args.seqlen, args.head_dim
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
