"""The pooled-scores kernel's two store paths side by side, in one process, next to FA4 dense.

    python perf/ab_scores.py --shapes wan480-h24,wan720-h40,cogvideox [--rounds 5]

For each shape: the package's `PooledScoresSm90` with register stores (compact rows) and with
TMA stores from shared memory (`PooledScoresConfig.tma_store`; rows padded to a multiple of 4
keys, as the launcher makes them, where Sk is not one) on the same split tile means and k, in
interleaved rounds (each round the median of 10 calls, the order alternating), outputs poisoned
first and compared bitwise. Prints each path's median over the rounds and its ratio to FA4
dense.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from bench_predict import SHAPES  # noqa: E402
from sweep import card_info, median_ms  # noqa: E402

from fgattn_cute.host.compile import PooledScoresConfig, compile_fwd  # noqa: E402
from fgattn_cute.host.launch import run_tile_means_split_sm90  # noqa: E402
from fgattn_cute.kernels.pooled_scores_sm90 import BLOCKS_PER_CTA, TILE_N  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="wan480-h24")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(card_info()[0])
    for name in args.shapes.split(","):
        seqlen, heads, head_dim = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = baselines.random_qkv(seqlen, heads, head_dim, g)
        dense = median_ms(baselines.fa4_dense(q, k, v), 5)
        split = run_tile_means_split_sm90(q, 128)
        n_tiles = split.shape[2]
        parts = math.ceil(seqlen / (BLOCKS_PER_CTA * TILE_N))
        scale = head_dim ** -0.5
        paths = {}
        for label, tma_store in (("register", False), ("tma", True)):
            fn = compile_fwd(PooledScoresConfig(head_dim, "bfloat16", tma_store))
            row = -(-seqlen // 4) * 4 if tma_store else seqlen
            out = torch.full((1, heads, n_tiles, row), float("nan"), device="cuda")[..., :seqlen]
            stats = torch.full((1, heads, n_tiles, parts, 3), float("nan"), device="cuda")
            paths[label] = (functools.partial(fn, split, k, out, stats, scale), out, stats)
            paths[label][0]()
        torch.cuda.synchronize()
        (_, reg_out, reg_stats), (_, tma_out, tma_stats) = paths.values()
        same = (not reg_out.isnan().any().item() and torch.equal(reg_out, tma_out)
                and torch.equal(reg_stats, tma_stats))
        times = {label: [] for label in paths}
        labels = list(paths)
        for r in range(args.rounds):
            for label in labels[r % 2:] + labels[:r % 2]:
                times[label].append(median_ms(paths[label][0], 10))
        print(f"{name} (S={seqlen} H={heads} D={head_dim}, {n_tiles} tiles): FA4 dense "
              f"{dense:.3f} ms; outputs bitwise equal: {same}")
        for label, t in times.items():
            mid = sorted(t)[len(t) // 2]
            print(f"  {label:9s} {mid:.3f} ms = {mid / dense:.4f}x dense   rounds "
                  + " ".join(f"{x:.3f}" for x in t))


if __name__ == "__main__":
    main()
