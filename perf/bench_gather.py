"""Gather throughput of each engine inside the real kernel pipeline, and the whole kernel.

    python perf/bench_gather.py [--seqlen 32760] [--heads 24] [--engines cpasync,tma,hybrid]
        [--head-dims 128,64] [--keeps 1.0,0.3]

`gather_only` compiles the kernel with consumers that only wait for and release the stages, so
the time is the producer's: gathered K + V bytes / time is the engine's rate from L2 (the K/V
of the heads in flight fit in L2) in the 2-3 stage ring. The whole kernel is timed on the same
lists, next to FlashAttention-4 dense for scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import baselines  # noqa: E402
from sweep import card_info, median_ms  # noqa: E402

from fgattn_cute.host.compile import default_config  # noqa: E402
from fgattn_cute.host.launch import run_fwd_sm90  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--keeps", default="1.0,0.3")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--engines", default="cpasync,tma,hybrid")
    p.add_argument("--head-dims", default="128,64")
    args = p.parse_args(argv)
    name, slug, clocks = card_info()
    print(f"{name} ({clocks})")
    S, H = args.seqlen, args.heads
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for D in map(int, args.head_dims.split(",")):
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        dense = median_ms(baselines.fa4_dense(q, k, v), args.reps)
        for keep in map(float, args.keeps.split(",")):
            index = baselines.random_lists(1, H, S, S, 128, keep, "cuda", seed=1)
            gathered = index.counts.sum().item() * D * 2 * 2  # K and V rows, bf16
            for engine in args.engines.split(","):
                cfg = default_config(D, "bfloat16", 128, engine, num_sms=num_sms)
                only = cfg.__class__(**{**vars(cfg), "gather_only": True})

                def call(c, q=q, k=k, v=v, index=index, D=D):
                    return lambda: run_fwd_sm90(q, k, v, index.indices, index.counts, 128,
                                                D**-0.5, config=c)

                t_gather = median_ms(call(only), args.reps)
                t_full = median_ms(call(cfg), args.reps)
                rows.append((D, keep, engine, gathered / t_gather / 1e9, t_gather, t_full,
                             t_full / (keep * dense), dense))
                # As it goes, so that a run cut off by a time limit still shows its rows.
                print(f"D={D} keep={keep} {engine}: gather only {t_gather:.2f} ms, kernel "
                      f"{t_full:.2f} ms, FA4 dense {dense:.2f} ms", flush=True)
    print(f"\n{slug}: S={S} H={H} B=1 bf16, random 128x1 lists ('keep 1.0' = dense list: "
          "whole-tile TMA boxes)")
    print("| D | keep | engine | gather-only TB/s | gather-only ms | kernel ms | x ideal "
          "| FA4 dense ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for D, keep, engine, tbps, tg, tf, ratio, dense in rows:
        print(f"| {D} | {keep} | {engine} | {tbps:.2f} | {tg:.2f} | {tf:.2f} | {ratio:.2f} "
              f"| {dense:.2f} |")


if __name__ == "__main__":
    main()
