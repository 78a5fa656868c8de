"""One launch of a predictor kernel for Nsight Compute: the calibrate kernel (or a probe of
it) or the pooled top-p selection kernel.

    ncu --kernel-name regex:'(?i)calibrate|topp' -c 1 --section SpeedOfLight ... \\
        python perf/ncu_predict.py calibrate --probe one_pass
    ncu ... python perf/ncu_predict.py top_p --rows 264
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgattn_cute.host.compile import CalibrateConfig, TopPConfig, compile_fwd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("which", choices=("calibrate", "top_p"))
    p.add_argument("--rows", type=int, default=264, help="top_p: rows of scores")
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--probe", default="")
    p.add_argument("--logits", choices=("randn", "pooled"), default="randn",
                   help="top_p: 3 x standard normal rows, or pooled_top_p's own scores")
    args = p.parse_args(argv)
    S, H, D = args.seqlen, args.heads, 128
    if args.which == "top_p":
        if args.logits == "pooled":  # every row of H heads' pooled scores (--rows ignored)
            from fgattn_cute.host.launch import run_pooled_scores_sm90, run_tile_means_split_sm90

            q, k = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            logits, stats = run_pooled_scores_sm90(run_tile_means_split_sm90(q, 128), k,
                                                   D**-0.5)
            logits, stats = logits.view(-1, S), stats.flatten(0, 2)
            args.rows = logits.shape[0]
        else:
            from fgattn_cute.host.launch import logit_stats

            logits = torch.randn(args.rows, S, device="cuda") * 3 * D**-0.5
            stats = logit_stats(logits)
        words = torch.zeros(math.ceil(S / 32), dtype=torch.int32, device="cuda")
        indices = torch.empty(args.rows, math.ceil(S / 128) * 128, dtype=torch.int32,
                              device="cuda")
        counts = torch.empty(args.rows, dtype=torch.int32, device="cuda")
        fn = compile_fwd(TopPConfig.for_rows(S))  # the configuration pooled_top_p uses
        fn(logits, stats, words, indices, counts, 0.9)
        torch.cuda.synchronize()
        return
    q, k = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    T = math.ceil(S / 128)
    words = torch.zeros(math.ceil(S / 32), dtype=torch.int32, device="cuda")
    indices = torch.empty(1, H, T, T * 128, dtype=torch.int32, device="cuda")
    counts = torch.empty(1, H, T, dtype=torch.int32, device="cuda")
    fn = compile_fwd(CalibrateConfig(D, "bfloat16", 128, probe=args.probe))  # as shipped
    fn(q, k, words, indices, counts, D**-0.5, math.log(1.0 / S))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
