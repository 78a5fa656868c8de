"""GPU timeline of fg.predict.pooled_top_p at Wan 480p H=24 (torch.profiler's CUDA kernel
records): each kernel's duration and the idle gap before it, for the kernels called by hand,
for pooled_top_p called on an idle GPU, and for pooled_top_p after a spin kernel (the host
enqueues ahead). The gaps that remain only on an idle GPU are host latency.

    python perf/timeline_pooled.py [--seqlen 32760 --heads 24]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402

import fgattn_cute as fg  # noqa: E402
from fgattn_cute.host.launch import (  # noqa: E402
    run_pooled_scores_sm90,
    run_tile_means_split_sm90,
    run_top_p_select_sm90,
)


def kernel_calls(prof, new_call_gap_us=5000.0):
    """The profile's GPU kernels as calls: lists of (name, duration us, gap before it us), a new
    call wherever the GPU idled more than new_call_gap_us."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.time_range.start)
    calls, current, prev_end = [], [], None
    for e in events:
        gap = 0.0 if prev_end is None else e.time_range.start - prev_end
        if gap > new_call_gap_us:
            calls.append(current)
            current, gap = [], 0.0
        current.append((e.name, e.time_range.end - e.time_range.start, gap))
        prev_end = e.time_range.end
    calls.append(current)
    return calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=24)
    args = p.parse_args(argv)
    S, H, D = args.seqlen, args.heads, 128
    q, k, _ = baselines.random_qkv(S, H, D, torch.Generator(device="cuda").manual_seed(0))
    T = (S + 127) // 128
    cap = T * 128
    words = torch.zeros((S + 31) // 32, dtype=torch.int32, device="cuda")
    indices = torch.empty(H * T, cap, dtype=torch.int32, device="cuda")
    counts = torch.empty(H * T, dtype=torch.int32, device="cuda")
    logits = torch.empty(1, H, T, S, dtype=torch.float32, device="cuda")
    stats = torch.empty(1, H, T, (S + 2047) // 2048, 3, dtype=torch.float32, device="cuda")
    split = torch.empty(1, H, T, 3 * D, dtype=q.dtype, device="cuda")

    def by_hand():
        run_tile_means_split_sm90(q, 128, out=split)
        run_pooled_scores_sm90(split, k, D**-0.5, out=logits, stats=stats)
        run_top_p_select_sm90(logits.view(-1, S), words, 0.9, None, cap,
                              stats=stats.flatten(0, 2), indices=indices, counts=counts)

    def api():
        fg.predict.pooled_top_p(q, k, 128, 0.9)

    def api_host_ahead():
        torch.cuda._sleep(20_000_000)  # the GPU spins while the host enqueues the call
        api()

    for fn in (by_hand, api):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for name, fn in (("by hand", by_hand), ("pooled_top_p, idle GPU", api),
                     ("pooled_top_p, host ahead", api_host_ahead)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                fn()
                torch.cuda.synchronize()
        calls = kernel_calls(prof)
        print(f"== {name}: last call of {len(calls)}")
        for kernel, dur, gap in calls[-1]:
            if "spin_kernel" not in kernel:
                print(f"  {dur:9.1f} us  (GPU idle {gap:6.1f} us before)  {kernel[:70]}")


if __name__ == "__main__":
    main()
