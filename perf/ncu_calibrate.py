"""One launch of the calibrate kernel (or a probe of it) for Nsight Compute:

    ncu --kernel-name regex:'(?i)calibrate' -c 1 --section SpeedOfLight ... \\
        python perf/ncu_calibrate.py --probe one_pass
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgattn_cute.host.compile import CalibrateConfig, compile_fwd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--probe", default="")
    args = p.parse_args(argv)
    S, H, D = args.seqlen, args.heads, 128
    q, k = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    T = math.ceil(S / 128)
    words = torch.zeros(math.ceil(S / 32), dtype=torch.int32, device="cuda")
    indices = torch.empty(1, H, T, T * 128, dtype=torch.int32, device="cuda")
    counts = torch.empty(1, H, T, dtype=torch.int32, device="cuda")
    fn = compile_fwd(CalibrateConfig(D, "bfloat16", 128, 4, args.probe))
    fn(q, k, words, indices, counts, D**-0.5, math.log(1.0 / S))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
