"""One warm launch of the attention forward (ours on random M x 1 lists, or FA4 dense) for
Nsight Compute; no timing here. The first launch compiles and warms up, the second is the one
to profile:

    ncu -k regex:'FgAttention|flash' --launch-skip 1 --launch-count 1 --set full \\
        --import-source no -o $OUT/attn python perf/ncu_attention.py --keep 0.3
    ncu -i $OUT/attn.ncu-rep --page source --csv --print-source sass > $OUT/attn_sass.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--system", choices=("fgattn", "fa4_dense"), default="fgattn")
    p.add_argument("--variant", default=None, help="module file defining FgAttentionForwardSm90")
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--engine", default="cpasync", help="gather engine (fgattn)")
    args = p.parse_args(argv)
    S, H, D = args.seqlen, args.heads, args.head_dim
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if args.system == "fa4_dense":
        run = baselines.fa4_dense(q, k, v)
    else:
        from ab_kernel import compile_variant, load_kernel_class

        from fgattn_cute.host.compile import default_config

        config = default_config(D, "bfloat16", 128, args.engine,
                                num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
        fn = compile_variant(load_kernel_class(args.variant), config)
        index = baselines.random_lists(1, H, S, S, 128, args.keep, "cuda")
        out = torch.empty_like(q)
        lse = torch.empty(1, H, S, device="cuda")

        def run():
            fn(q, k, v, out, lse, index.indices, index.counts, D**-0.5)

    for _ in range(2):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
