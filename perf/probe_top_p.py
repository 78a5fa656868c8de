"""The pooled top-p selection kernel alone on score rows of a Wan 480p layer (S = 32,760,
H x 256 query tiles), and the whole pooled_top_p, next to FA4 dense, one process.

    python perf/probe_top_p.py [--heads 24] [--variant before=dev/variants/top_p_before.py]

--logits pooled selects from the scores pooled_top_p computes (near-uniform rows on random
inputs) instead of 3 x standard normal logits; --logits video from those of
`fgattn_cute.testing.video_like_qkv` on a (frames, 30, 52) grid (perf/bench_predict.py's
video-like inputs; seqlen a multiple of 1,560); --logits flat from rows of equal logits.

--variant name=path (repeatable) also times the selection kernel of a module file that defines
`TopPSelectSm90` (a copy before or after a change; for rows longer than 40,960 keys its
`TopPStreamSm90` where it has one) on the same rows, in interleaved rounds with the package's
kernel, and checks that it selects the same keys; it gets the configuration of "current" (row
placement, short rows, persistent CTAs) where its constructor takes it.
name=path:option=int,... sets constructor options (e.g. max_ctas=0).

Rows longer than 40,960 keys (--seqlen 75600, Wan 720p): kernels before top-p session 26 worked
on them in place in global memory, so every timed call first restores them from a pristine
copy, and the median time of that copy alone is subtracted.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from sweep import card_info, median_ms  # noqa: E402

import fgattn_cute as fg  # noqa: E402
from fgattn_cute.host.compile import TopPConfig, compile_fwd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--logits", choices=("randn", "pooled", "video", "flat"), default="randn",
                   help="rows for the selection alone: 3 x standard normal logits, the "
                        "pooled scores that pooled_top_p itself selects from (random or "
                        "video-like q, k), or rows of equal logits (uniform probabilities: "
                        "every key a tie)")
    args = p.parse_args(argv)
    S, H = args.seqlen, args.heads
    if args.logits == "video" and S % 1560:
        p.error(f"--logits video: --seqlen must be a multiple of 1,560 (30 x 52), got {S}")
    rows = H * math.ceil(S / 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = baselines.random_qkv(S, H, 128, gen)
    dense = median_ms(baselines.fa4_dense(q, k, v), args.reps)
    print(f"{card_info()[0]}  S={S} H={H}  FA4 dense {dense:.3f} ms")
    whole = median_ms(lambda: fg.predict.pooled_top_p(q, k, 128, 0.9), args.reps)
    print(f"pooled_top_p (auto)     {whole:8.3f} ms  {whole / dense:6.3f} x dense")
    from fgattn_cute.predict import pooled

    means = pooled.tile_means(q, 128)
    from fgattn_cute.host.launch import run_pooled_scores_sm90, run_tile_means_split_sm90

    split = run_tile_means_split_sm90(q, 128)

    steps = {
        "tile_means (torch)": lambda: pooled.tile_means(q, 128),
        "split_in_three (torch)": lambda: pooled._split_in_three(means[0], torch.bfloat16),
        "means + split kernel": lambda: run_tile_means_split_sm90(q, 128),
        "scores kernel": lambda: run_pooled_scores_sm90(split, k, 128**-0.5),
        "k3 copy": lambda: torch.cat([k[0]] * 3, dim=-1),
    }
    for name, fn in steps.items():
        ms = median_ms(fn, args.reps)
        print(f"  {name:21s} {ms:8.3f} ms")
    from fgattn_cute.host.launch import logit_stats

    scale = 128**-0.5
    if args.logits in ("pooled", "video"):
        k_rows = k
        if args.logits == "video":
            from fgattn_cute.testing import video_like_qkv

            q_video, k_rows, _ = video_like_qkv(S // 1560, 30, 52, H, 128, seed=0,
                                                dtype=torch.bfloat16, device="cuda")
            split = run_tile_means_split_sm90(q_video, 128)
        # raw logits (scale 1: the scores exactly) for kernels that scale them themselves, and
        # the scaled logits with their per-part statistics, as pooled_top_p hands them over
        logits = run_pooled_scores_sm90(split, k_rows)[0].view(rows, S)
        scaled, stats = run_pooled_scores_sm90(split, k_rows, scale)
        scaled, stats = scaled.view(rows, S), stats.flatten(0, 2)
    else:
        if args.logits == "flat":
            logits = torch.full((rows, S), 0.25, device="cuda")
        else:
            logits = torch.randn(rows, S, generator=gen, device="cuda") * 3
        scaled = logits * scale
        stats = logit_stats(scaled)
    inputs = Inputs(logits, scaled, stats, scale,
                    torch.zeros(math.ceil(S / 32), dtype=torch.int32, device="cuda"),
                    torch.empty(rows, math.ceil(S / 128) * 128, dtype=torch.int32,
                                device="cuda"),
                    torch.empty(rows, dtype=torch.int32, device="cuda"))
    config = TopPConfig.for_rows(S)
    fn = compile_fwd(config)
    ms = select_ms(fn, True, inputs, args.reps)
    where = "global memory, streamed"
    if config.row_in_smem:
        where = "shared memory, two CTAs per SM" if config.short_rows else "shared memory"
    print(f"select kernel alone     {ms:8.3f} ms  {ms / dense:6.3f} x dense "
          f"({rows} rows, in {where})")
    if args.variant:
        compare_variants(args.variant, fn, inputs, args.reps, dense)
    # The GEMM that makes the scores: tile means split in three bf16 parts against [k; k; k].
    a = torch.randn(H, rows // H, 384, generator=gen, device="cuda").bfloat16()
    kt = k[0].permute(1, 2, 0)
    b = torch.cat([kt, kt, kt], dim=1)
    ms = median_ms(lambda: torch.bmm(a, b, out_dtype=torch.float32), args.reps)
    print(f"scores GEMM (3 x bf16)  {ms:8.3f} ms  {ms / dense:6.3f} x dense")


@dataclass
class Inputs:
    """The same rows for both calling conventions: raw logits (kernels that take a scale) and
    scaled logits with their statistics (kernels that take `stats`)."""

    logits: torch.Tensor
    scaled: torch.Tensor
    stats: torch.Tensor
    scale: float
    words: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor


def select_call(fn, takes_stats: bool, inputs: Inputs):
    """(the rows the kernel reads, f(rows) running it on them)."""
    i = inputs
    if takes_stats:
        return i.scaled, lambda x: fn(x, i.stats, i.words, i.indices, i.counts, 0.9)
    return i.logits, lambda x: fn(x, i.words, i.indices, i.counts, i.scale, 0.9)


def select_ms(fn, takes_stats: bool, inputs: Inputs, reps):
    """Median time of one selection (its rows left unchanged: rows longer than shared memory,
    which kernels before session 26 worked on in place, are restored from a copy before each
    call, and the copy's own time is subtracted)."""
    rows, run = select_call(fn, takes_stats, inputs)
    if TopPConfig.for_rows(rows.shape[1]).row_in_smem:
        return median_ms(lambda: run(rows), reps)
    work = rows.clone()

    def restore_and_select():
        work.copy_(rows)
        run(work)

    total = median_ms(restore_and_select, reps)
    return total - median_ms(lambda: work.copy_(rows), reps)


def compare_variants(specs, fn, inputs: Inputs, reps, dense, rounds=5):
    import cutlass.cute as cute
    from ab_kernel import load_variant, variant_options

    config = TopPConfig.for_rows(inputs.logits.shape[1])
    fns = {"current": (fn, True)}
    for spec in specs:
        name, path = spec.split("=", 1)
        path, _, extra = path.partition(":")
        options = dict(item.split("=") for item in extra.split(",") if item)
        module = load_variant(path)
        cls = module.TopPSelectSm90
        if not config.row_in_smem:
            cls = getattr(module, "TopPStreamSm90", cls)
        # the same configuration as "current" where the variant has it (older ones lack
        # short_rows and run their one configuration for rows in shared memory)
        # (max_ctas too, unless the spec sets it: the persistent launch of rows in global
        # memory is part of "current")
        # (by name: older variants take row_in_smem, the package's classes do not)
        kwargs = variant_options(cls, row_in_smem=config.row_in_smem,
                                 short_rows=config.short_rows, max_ctas=config.max_ctas)
        kwargs.update({key: int(value) for key, value in options.items()})
        selector = cls(False, **kwargs)
        # kernels before session 15 take raw logits and a scale, not statistics
        takes_stats = "mStats" in inspect.signature(cls.__call__).parameters
        args = list(config.fake_args())
        if not takes_stats:
            from cutlass import Float32

            args = [args[0], *args[2:5], Float32(1.0), *args[5:]]
        fns[name] = (cute.compile(selector, *args, options="--enable-tvm-ffi"), takes_stats)
    rows, run = select_call(fn, True, inputs)
    run(rows.clone())
    want = (inputs.indices.clone(), inputs.counts.clone())
    times = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for name in order:
            times[name].append(select_ms(*fns[name], inputs, reps))
    for name, (f, takes_stats) in fns.items():
        inputs.indices.fill_(-7)
        inputs.counts.fill_(-7)
        rows, run = select_call(f, takes_stats, inputs)
        run(rows.clone())
        # Rows whose lists differ (kernels that sum a row in another order may round a boundary
        # probability the other way).
        differ = ((inputs.indices != want[0]).any(-1) | (inputs.counts != want[1])).sum().item()
        same = "same keys" if differ == 0 else f"DIFFERENT keys in {differ} rows"
        ms = sorted(times[name])[rounds // 2]
        print(f"  select {name:12s} {ms:8.3f} ms  {ms / dense:6.3f} x dense  {same}  rounds "
              + " ".join(f"{t:.3f}" for t in times[name]))


if __name__ == "__main__":
    main()
