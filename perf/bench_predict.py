"""The predictors' cost next to the dense attention they feed, on video-DiT shapes.

    python perf/bench_predict.py --shapes wan480-h12,wan480-h24 --out $OUT

Times (CUDA events, warm-up, median) FA4 dense, fg.predict.calibrate (the fused kernel, and
optionally the torch path with the kernel's LSE) and fg.predict.pooled_top_p, on the same random
bf16 inputs and on video-like ones (fgattn_cute.testing.video_like_qkv, where keeps are
realistic), and prints each as a fraction of FA4 dense: the issue's bounds are calibrate <= 1x
and pooled top-p <= 5%. Writes bench-predict-<card>-<date>.json. Timings are never asserted.

Two figures per predictor: `ms`, one call timed alone after a sync (so it includes the host
time before the call's first launch, while the GPU idles), and `ms_back_to_back`, the time per
call of 10 consecutive calls, the cost in a denoising loop where the host enqueues ahead of the
GPU. They differ by the host latency (~0.1 ms for pooled_top_p, perf/NOTES.md, session 16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from sweep import SHAPES, median_ms, run_meta, write_records  # noqa: E402

import fgattn_cute as fg  # noqa: E402

SHAPES = dict(SHAPES, **{"wan480-h24": (32760, 24, 128)})


def back_to_back_ms(fn, calls=10, reps=3):
    """Median over reps of (CUDA-event time of `calls` consecutive calls of fn) / calls."""
    return median_ms(fn, reps, warmup=1, batch=calls)


def video_like(seqlen, heads, head_dim):
    """Video-like q, k, v with about seqlen tokens on a (frames, 30, 52)-ish grid (480p
    latents)."""
    from fgattn_cute.testing import video_like_qkv

    h, w = 30, 52
    frames = max(1, round(seqlen / (h * w)))
    return video_like_qkv(frames, h, w, heads, head_dim, seed=0, dtype=torch.bfloat16,
                          device="cuda")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="wan480-h12,wan480-h24")
    # 20: with 5, one burst after calibrate read CogVideoX at 0.209x, not 0.173x (H100, session 15)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--torch-path", action="store_true",
                   help="also time the torch paths of both predictors (slow)")
    p.add_argument("--video-like", action="store_true", help="also time on video-like inputs")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    meta = run_meta()
    records = []
    pred = fg.predict
    for shape in args.shapes.split(","):
        seqlen, heads, head_dim = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = baselines.random_qkv(seqlen, heads, head_dim, gen)
        inputs = [("random", q, k, v)]
        if args.video_like:
            inputs.append(("video_like", *video_like(seqlen, heads, head_dim)))
        for label, qq, kk, vv in inputs:
            # FA4 dense on the same q, k, v: video-like inputs have whole latent frames (Wan
            # 720p: 74,880 tokens, not 75,600), and a kernel's time on one shape can depend
            # on the data it reads.
            dense = median_ms(baselines.fa4_dense(qq, kk, vv), args.reps)
            systems = [
                ("calibrate", lambda qq=qq, kk=kk: pred.calibrate(qq, kk, 128, 1.0)),
                ("pooled_top_p", lambda qq=qq, kk=kk: pred.pooled_top_p(qq, kk, 128, 0.9)),
            ]
            if args.torch_path:
                systems.append(("calibrate_torch", lambda qq=qq, kk=kk: pred.calibrate(
                    qq, kk, 128, 1.0, backend="torch", lse_fn=pred.kernel_lse)))
                systems.append(("pooled_top_p_torch", lambda qq=qq, kk=kk: pred.pooled_top_p(
                    qq, kk, 128, 0.9, backend="torch")))
            for system, fn in systems:
                ms = median_ms(fn, args.reps, warmup=1)
                ms_b2b = back_to_back_ms(fn)
                keep = fn().density().item()
                rec = dict(meta, shape=shape, seqlen=qq.shape[1], heads=heads, head_dim=head_dim,
                           inputs=label, system=system, ms=ms, fa4_dense_ms=dense,
                           of_dense=ms / dense, ms_back_to_back=ms_b2b,
                           of_dense_back_to_back=ms_b2b / dense, keep=keep)
                records.append(rec)
                print(f"{shape:11s} {label:10s} {system:16s} {ms:9.3f} ms = {ms / dense:6.3f} x "
                      f"FA4 dense ({dense:.3f} ms), back to back {ms_b2b:.3f} ms = "
                      f"{ms_b2b / dense:.3f} x, keep {keep:.3f}", flush=True)
            del systems
        del q, k, v, inputs
        torch.cuda.empty_cache()
    write_records(records, args.out, "bench-predict", meta)


if __name__ == "__main__":
    main()
