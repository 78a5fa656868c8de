"""Where the calibrate kernel's time goes: the full kernel against its benchmark probes (pass 1
without exponentials; pass 2 alone) and against stage counts, next to FA4 dense, one process.

    python perf/probe_calibrate.py [--seqlen 32760 --heads 12] [--fma-exp 0,6,4,3]

--fma-exp times the full kernel with one of every N of pass 1's exponentials on the FMA pipe
(`CalibrateConfig.fma_exp_every`; 0 = all on MUFU; a trailing L, as in 4L, also sets
`lazy_max`) in interleaved rounds, and says whether each level's lists equal the first's.
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
from sweep import card_info, median_ms  # noqa: E402

from fgattn_cute.host.compile import CalibrateConfig, compile_fwd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--fma-exp", default="", help="comma-separated fma_exp_every levels")
    p.add_argument("--skip-probes", action="store_true", help="only the --fma-exp comparison")
    args = p.parse_args(argv)
    S, H, D = args.seqlen, args.heads, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = baselines.random_qkv(S, H, D, gen)
    dense = median_ms(baselines.fa4_dense(q, k, v), args.reps)
    T = math.ceil(S / 128)
    cap = math.ceil(S / 128) * 128
    words = torch.zeros(math.ceil(S / 32), dtype=torch.int32, device="cuda")
    indices = torch.empty(1, H, T, cap, dtype=torch.int32, device="cuda")
    counts = torch.empty(1, H, T, dtype=torch.int32, device="cuda")
    print(f"{card_info()[0]}  S={S} H={H} D={D}  FA4 dense {dense:.3f} ms")
    variants = (("", 3, ("bits",)), ("", 3, ("lse", "bits")), ("", 3, ()), ("", 4, ("bits",)),
                ("no_exp", 3, ("bits",)), ("one_pass", 3, ("bits",)), ("one_pass", 3, ()))
    if args.fma_exp:
        levels = args.fma_exp.split(",")
        compare_fma_exp(levels, D, q, k, words, indices, counts, S, dense, args.reps)
    if args.skip_probes:
        return
    for probe, stages, pingpong in variants:
        fn = compile_fwd(CalibrateConfig(D, "bfloat16", 128, stages, probe, pingpong))
        ms = median_ms(lambda fn=fn: fn(q, k, words, indices, counts, D**-0.5,
                                        math.log(1.0 / S)), args.reps)
        label = probe or "none"
        turns = "+".join(pingpong) or "-"
        print(f"probe={label:9s} stages={stages} pingpong={turns:8s} {ms:8.3f} ms  "
              f"{ms / dense:6.3f} x dense")


def compare_fma_exp(levels, D, q, k, words, indices, counts, S, dense, reps, rounds=5):
    fns = {e: compile_fwd(CalibrateConfig(D, "bfloat16", 128, fma_exp_every=int(e.rstrip("L")),
                                          lazy_max=e.endswith("L")))
           for e in levels}
    args = (q, k, words, indices, counts, D**-0.5, math.log(1.0 / S))
    kept = {}
    for e, fn in fns.items():
        indices.fill_(-7)
        counts.fill_(-7)
        fn(*args)
        kept[e] = (indices.clone(), counts.clone())
    times = {e: [] for e in fns}
    for r in range(rounds):
        order = levels[r % len(levels):] + levels[:r % len(levels)]
        for e in order:
            times[e].append(median_ms(lambda fn=fns[e]: fn(*args), reps))
    base_idx, base_cnt = kept[levels[0]]
    for e in levels:
        idx, cnt = kept[e]
        # keep decisions compared as masks: a flip moves every later slot of its list
        n_diff = int((cnt != base_cnt).sum())
        same = torch.equal(idx, base_idx) and torch.equal(cnt, base_cnt)
        ms = sorted(times[e])[rounds // 2]
        print(f"fma_exp_every={e:3s} {ms:8.3f} ms  {ms / dense:6.3f} x dense  "
              f"{'same lists' if same else f'lists differ ({n_diff} counts differ)'}  rounds "
              + " ".join(f"{t:.3f}" for t in times[e]))


if __name__ == "__main__":
    main()
