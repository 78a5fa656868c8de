"""Side-by-side timing of fgattn-cute and its baselines over video-DiT attention shapes.

    python perf/sweep.py                          # every shape, every keep fraction
    python perf/sweep.py --shapes wan480-h12,wan720-h12 --keeps 1,0.3,0.1

One process, one GPU: FlashAttention-4 dense, FA4 block-sparse (128 x 128/64/32/16), FA4
paged KV with page_size=1 (a fine-grained baseline), cuDNN SDPA dense, and fgattn-cute with
each gather engine, all on the same random inputs. Timing: CUDA events, warm-up, the median of
repeats, each repeat a batch of back-to-back calls (the GPU kept busy, as in a model's forward
pass, so a wrapper's host time between calls is hidden); each record also carries `ms_synced`,
the median of single calls each after a sync (what the sweeps before session 21 reported: it
adds a call's host latency, ~0.06 ms for fgattn-cute and ~0.15 ms for FA4). Inputs are not
rotated: at every shape here q, k and v (100 MB and more each) are several times the 50 MB L2,
so no repeat finds them there (`median_ms` can rotate copies of smaller inputs). FA4 dense is
timed at the start of a shape and again after each keep; `x ideal` divides by the median. Each
baseline's output is checked once per shape against fgattn-cute on the same kept keys, so that
"same kept work" holds. Writes perf/results/sweep-<card>-<date>.json (a list of records), a
markdown summary and PNG plots (see perf/plot.py). Timings are never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import baselines  # noqa: E402  (perf/baselines.py)

import fgattn_cute as fg  # noqa: E402

SHAPES = {  # name: (seqlen, heads, head_dim)
    "wan480-h12": (32760, 12, 128),
    "wan480-h40": (32760, 40, 128),
    "wan720-h12": (75600, 12, 128),
    "wan720-h40": (75600, 40, 128),
    "hunyuan720": (75856, 24, 128),
    "cogvideox": (17550, 48, 64),
}
KEEPS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
ENGINES = ("cpasync", "tma", "hybrid")
BLOCKS = (128, 64, 32, 16)


def median_ms(fn, reps, warmup=3, rotate=None, batch=1):
    """Median of `reps` CUDA-event timings of fn() (fn(i) with `rotate` input copies), each
    over `batch` calls back to back, divided by `batch`; a sync between repeats."""
    call = (lambda i: fn()) if rotate is None else fn
    for i in range(warmup):
        call(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(batch):
            call(i * batch + j)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    times.sort()
    return times[len(times) // 2]


BATCH_MS = 10.0  # a back-to-back batch covers at least this much GPU time (at most 20 calls)


def timings(fn, reps, warmup=3):
    """{"ms": median per-call time over back-to-back batches, "ms_synced": median of single
    calls each after a sync}: the first is what a pipeline that keeps the GPU busy sees, the
    second adds the call's host latency."""
    synced = median_ms(fn, max(3, reps // 2), warmup)
    batch = min(20, max(2, math.ceil(BATCH_MS / max(synced, 1e-3))))
    return {"ms": median_ms(fn, reps, 1, batch=batch), "ms_synced": synced, "batch": batch}


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def card_info():
    name = torch.cuda.get_device_name()
    slug = next((c for c in ("H200", "H100", "H800", "H20") if c in name), name.replace(" ", "_"))
    clocks = ""
    try:
        clocks = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return name, slug, clocks


def versions():
    out = {"torch": torch.__version__, "fgattn_cute": fg.__version__}
    for dist in ("nvidia-cutlass-dsl", "flash-attn-4", "quack-kernels"):
        try:
            import importlib.metadata as md

            out[dist] = md.version(dist)
        except Exception:  # a package read from PYTHONPATH has no metadata
            out[dist] = "unknown"
    try:
        import cutlass

        out["cutlass"] = getattr(cutlass, "__version__", "unknown")
    except ImportError:
        pass
    return out


def commit():
    if os.environ.get("FGATTN_COMMIT"):
        return os.environ["FGATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_meta():
    """The fields every perf record carries: card (short name), card_name, clocks, commit,
    versions and date."""
    name, slug, clocks = card_info()
    return {"card": slug, "card_name": name, "clocks": clocks, "commit": commit(),
            "versions": versions(), "date": datetime.date.today().isoformat()}


def write_records(records, out_dir, kind, meta):
    """records as JSON in out_dir/<kind>-<card>-<date>.json (the folder made if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{meta['card']}-{meta['date']}.json"
    path.write_text(json.dumps(records, indent=1))
    print(f"wrote {path}")
    return path


def ceilings():
    """The card's measured bf16 matmul and device-copy ceilings (TF/s, TB/s)."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm = median_ms(lambda: a @ b, 20)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    cp = median_ms(lambda: y.copy_(x), 20)
    return {"matmul_tflops": 2 * n**3 / mm / 1e9, "copy_tbps": 2 * x.numel() / cp / 1e9}


def run_shape(name, keeps, systems, reps, record, progress):
    seqlen, heads, head_dim = SHAPES[name]
    B, dev = 1, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, seqlen, heads, head_dim, generator=gen, device=dev,
                           dtype=torch.bfloat16) for _ in range(3))
    flops_dense = 4 * B * heads * seqlen * seqlen * head_dim
    base = {"seqlen": seqlen, "heads": heads, "head_dim": head_dim, "shape": name}

    def add(system, engine, granularity, keep, times, **extra):
        ms = times["ms"]
        record(dict(base, system=system, engine=engine, granularity=granularity, keep=keep,
                    tflops=flops_dense * keep / ms / 1e9, **times, **extra))
        progress(f"{name} {system:10s} {engine or '':8s} {granularity:7s} keep={keep:.3f} "
                 f"{ms:8.3f} ms (synced {times['ms_synced']:.3f})")

    if "fa4_dense" in systems:
        add("fa4_dense", None, "dense", 1.0, timings(baselines.fa4_dense(q, k, v), reps))
    if "cudnn" in systems:
        try:
            add("cudnn", None, "dense", 1.0, timings(baselines.cudnn(q, k, v), reps))
        except RuntimeError as e:  # no cuDNN attention for this shape / build
            progress(f"{name} cudnn skipped: {e}")

    if "predict" in systems:
        # The predictors' cost next to the attention they feed (issue: pooled top-p must stay
        # under 5% of FA4 dense; calibrate under one dense attention).
        pred = fg.predict
        select = pred.compiled_top_p_select()
        for label, fn in (
            ("pooled_top_p", lambda: pred.pooled_top_p(q, k, 128, 0.9)),
            ("pooled_top_p_compiled",
             lambda: pred.pooled_top_p(q, k, 128, 0.9, select_fn=select)),
            ("calibrate", lambda: pred.calibrate(q, k, 128, 1.0)),
        ):
            try:
                times = timings(fn, max(3, reps // 2), warmup=1)
                record(dict(base, system=label, engine=None, granularity="128x1", keep=1.0,
                            tflops=0.0, **times))
                progress(f"{name} {label:22s} {times['ms']:8.3f} ms "
                         f"(synced {times['ms_synced']:.3f})")
            except Exception as e:
                progress(f"{name} {label} failed: {type(e).__name__}: {e}")

    for keep in keeps:
        index = baselines.random_lists(B, heads, seqlen, seqlen, 128, keep, dev, seed=1)
        kept = index.density().item()
        reference = None
        if "fgattn" in systems:
            for engine in ENGINES:
                fn = baselines.fgattn(q, k, v, index, engine)
                out = fn()
                reference = out if reference is None else reference
                err = rel_err(out, reference)
                add("fgattn", engine, "128x1", kept, timings(fn, reps), check_vs_cpasync=err)
        if "fa4_paged" in systems and keep < 1.0:
            try:
                run, unpack = baselines.fa4_paged(q, k, v, index)
                err = rel_err(unpack(run()), reference) if reference is not None else None
                add("fa4_paged", None, "128x1", kept, timings(run, reps),
                    check_vs_fgattn=err)
            except Exception as e:  # record why a baseline could not run, and go on
                progress(f"{name} fa4_paged keep={keep} failed: {type(e).__name__}: {e}")
        del index
        if "fa4_block" in systems and keep < 1.0:
            for kb in BLOCKS:
                block_idx, n = baselines.random_block_lists(B, heads, seqlen, seqlen, kb, keep,
                                                            dev, seed=2)
                kept_b = min(1.0, n * kb / seqlen)
                try:
                    fn = baselines.fa4_block(q, k, v, block_idx, n, kb)
                    err = None
                    if kb == 128 and keep == keeps[-1] and "fgattn" in systems:
                        err = check_block(q, k, v, block_idx, n, kb, fn())
                    add("fa4_block", None, f"128x{kb}", kept_b, timings(fn, reps),
                        check_vs_fgattn=err)
                except Exception as e:
                    progress(f"{name} fa4_block 128x{kb} failed: {type(e).__name__}: {e}")
        if "fa4_dense" in systems:
            # again after each keep: x ideal divides by the median of these, so that FA4 is
            # timed in the GPU's state (clocks, temperature) of the whole run, not its start
            add("fa4_dense", None, "dense", 1.0, timings(baselines.fa4_dense(q, k, v), reps),
                at_keep=keep)
        torch.cuda.empty_cache()


def check_block(q, k, v, block_idx, n, kb, out):
    """FA4 block-sparse output vs fgattn-cute given the same blocks as M x 1 lists."""
    B, H, T, _ = block_idx.shape
    n_blocks = math.ceil(k.shape[1] / kb)
    mask = torch.zeros(B, H, T, n_blocks, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, block_idx.long(), True)
    index = fg.KeyIndex.from_block_mask(mask, 128, q.shape[1], kb, k.shape[1])
    return rel_err(out[0] if isinstance(out, tuple) else out, fg.sparse_attention(q, k, v, index))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    p.add_argument("--systems", default="fgattn,fa4_dense,fa4_block,fa4_paged,cudnn,predict")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("perf/sweep.py needs a CUDA GPU (Hopper for fgattn-cute)")

    name, slug, clocks = card_info()
    date = datetime.date.today().isoformat()
    meta = {"card": slug, "card_name": name, "clocks": clocks, "commit": commit(),
            "versions": versions(), "date": date}
    meta["ceilings"] = ceilings()
    records = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"sweep-{slug}-{date}"
    started = time.time()

    def record(r):
        records.append(dict(r, card=slug, card_name=name, clocks=clocks, commit=meta["commit"],
                            versions=meta["versions"], ceilings=meta["ceilings"]))
        # written as we go, so a run stopped by a time limit keeps what it measured
        Path(f"{stem}.json").write_text(json.dumps(records, indent=1))

    def progress(line):
        print(f"[{time.time() - started:6.0f}s] {line}", flush=True)

    progress(f"{name} ({clocks}); ceilings {meta['ceilings']}")
    keeps = [float(x) for x in args.keeps.split(",")]
    systems = set(args.systems.split(","))
    for shape in args.shapes.split(","):
        run_shape(shape, keeps, systems, args.reps, record, progress)

    import plot

    summary = plot.summarize(meta, records, stem)
    print(summary)


if __name__ == "__main__":
    main()
