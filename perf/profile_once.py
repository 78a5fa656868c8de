"""One warm launch of the kernel on a random 128x1 list, for `ncu` (no timing here).

    ncu -k regex:FgAttention --launch-skip 1 --launch-count 1 python perf/profile_once.py
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402

import fgattn_cute as fg  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--seqlen", type=int, default=32760)
p.add_argument("--heads", type=int, default=24)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--keep", type=float, default=0.3)
p.add_argument("--engine", default="cpasync")
args = p.parse_args()
q, k, v = (torch.randn(1, args.seqlen, args.heads, args.head_dim, device="cuda",
                       dtype=torch.bfloat16) for _ in range(3))
index = baselines.random_lists(1, args.heads, args.seqlen, args.seqlen, 128, args.keep, "cuda")
for _ in range(2):
    fg.sparse_attention(q, k, v, index, engine=args.engine)
torch.cuda.synchronize()
