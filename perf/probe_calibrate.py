"""Where the calibrate kernel's time goes: the full kernel against its benchmark probes (pass 1
without exponentials; pass 2 alone) and against stage counts, next to FA4 dense, one process.

    python perf/probe_calibrate.py [--seqlen 32760 --heads 12]
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
    for probe, stages, pingpong in variants:
        fn = compile_fwd(CalibrateConfig(D, "bfloat16", 128, stages, probe, pingpong))
        ms = median_ms(lambda fn=fn: fn(q, k, words, indices, counts, D**-0.5,
                                        math.log(1.0 / S)), args.reps)
        label = probe or "none"
        turns = "+".join(pingpong) or "-"
        print(f"probe={label:9s} stages={stages} pingpong={turns:8s} {ms:8.3f} ms  "
              f"{ms / dense:6.3f} x dense")


if __name__ == "__main__":
    main()
