"""The whole pooled_top_p pipeline against a copy of its kernels from before the scores kernel
handed over softmax statistics (session 15), in one process, next to FA4 dense.

    python perf/ab_pooled.py --scores old_scores.py --select old_top_p.py 32760x24x128

--scores / --select: module files (e.g. `git show b610ddb:fgattn_cute/kernels/...`) defining
`PooledScoresSm90` (split means, k, scores, stream) and `TopPSelectSm90` (raw logits, keep
words, indices, counts, scale, p, stream). Three systems, in interleaved rounds, each the
median of its repetitions: those kernels called by hand ("before"), the package's kernels
called by hand through the launchers ("kernels"), and `fg.predict.pooled_top_p` itself
("pooled_top_p", which adds its host work before the first launch). Prints each time, its
ratio to FA4 dense, and how many rows' lists differ between "before" and the package.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from ab_kernel import load_variant, variant_options  # noqa: E402
from sweep import card_info, median_ms  # noqa: E402

import fgattn_cute as fg  # noqa: E402
from fgattn_cute.host.compile import (  # noqa: E402
    PooledScoresConfig,
    TopPConfig,
    _dsl_dtype,
)
from fgattn_cute.host.launch import (  # noqa: E402
    run_pooled_scores_sm90,
    run_tile_means_split_sm90,
    run_top_p_select_sm90,
)


def compile_before(scores_path: str, select_path: str, head_dim: int, seqlen_k: int):
    """The old scores and selection kernels, compiled for the package's configurations."""
    import cutlass
    import cutlass.cute as cute

    scores_cls = load_variant(scores_path).PooledScoresSm90
    select_cls = load_variant(select_path).TopPSelectSm90
    s = PooledScoresConfig(head_dim, "bfloat16").fake_args()  # (A, K, out, stats, scale, stream)
    scores = cute.compile(scores_cls(_dsl_dtype("bfloat16"), head_dim), s[0], s[1], s[2], s[5],
                          options="--enable-tvm-ffi")
    config = TopPConfig.for_rows(seqlen_k)
    t = config.fake_args()  # (rows, stats, words, indices, counts, p, stream)
    select = cute.compile(
        select_cls(False, config.row_in_smem, **variant_options(
            select_cls, short_rows=config.short_rows, max_ctas=config.max_ctas)),
        t[0], *t[2:5], cutlass.Float32(1.0), *t[5:], options="--enable-tvm-ffi")
    return scores, select


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shapes", nargs="+", help="SxHxD, e.g. 32760x24x128")
    p.add_argument("--scores", required=True)
    p.add_argument("--select", required=True)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(card_info()[0])
    for shape in args.shapes:
        compare(*(int(x) for x in shape.split("x")), args)


def compare(S: int, H: int, D: int, args):
    """One shape: the three systems in interleaved rounds, FA4 dense first."""
    old_scores, old_select = compile_before(args.scores, args.select, D, S)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = baselines.random_qkv(S, H, D, gen)
    dense = median_ms(baselines.fa4_dense(q, k, v), args.reps)
    T = math.ceil(S / 128)
    cap = T * 128
    words = torch.zeros(math.ceil(S / 32), dtype=torch.int32, device="cuda")
    scale = D**-0.5

    def before():
        split = run_tile_means_split_sm90(q, 128)
        logits = torch.empty(1, H, T, S, device="cuda")
        old_scores(split, k, logits)
        indices = torch.empty(H * T, cap, dtype=torch.int32, device="cuda")
        counts = torch.empty(H * T, dtype=torch.int32, device="cuda")
        old_select(logits.view(-1, S), words, indices, counts, scale, 0.9)
        return indices, counts

    def kernels():
        split = run_tile_means_split_sm90(q, 128)
        logits, stats = run_pooled_scores_sm90(split, k, scale)
        return run_top_p_select_sm90(logits.view(-1, S), words, 0.9, None, cap,
                                     stats=stats.flatten(0, 2))

    systems = {"before": before, "kernels": kernels,
               "pooled_top_p": lambda: fg.predict.pooled_top_p(q, k, 128, 0.9)}
    (old_idx, old_cnt), index = before(), systems["pooled_top_p"]()
    differ = ((old_idx.view(index.indices.shape) != index.indices).any(-1)
              | (old_cnt.view(index.counts.shape) != index.counts)).sum().item()
    times = {name: [] for name in systems}
    for r in range(args.rounds):
        names = list(systems)[r % len(systems):] + list(systems)[:r % len(systems)]
        for name in names:
            times[name].append(median_ms(systems[name], args.reps))
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    line = "  ".join(f"{name} {ms:.3f} ms ({ms / dense:.3f}x)" for name, ms in medians.items())
    print(f"S={S} H={H} D={D} FA4 dense {dense:.3f} ms | {line} | rows differing {differ}",
          flush=True)


if __name__ == "__main__":
    main()
