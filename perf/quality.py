"""Quality of the predicted sparsity: output error against kept fraction, per granularity.

    python perf/quality.py                       # --size small: CPU, a few minutes
    python -m perf.quality --size 480p           # GPU: 21 x 30 x 52 = 32,760 tokens, 24 heads
    python perf/quality.py --size 480p --heads 12 --backend reference

Inputs: ``fgattn_cute.testing.video_like_qkv`` (synthetic, video-DiT-like, bf16; see its
docstring). For two selection rules and a sweep of their parameter:

    threshold   calibrate's rule: keep (query tile, key) when the tile's largest softmax
                probability for the key is >= threshold / seqlen_k
    top-p       pooled_top_p's rule: the tile's mean query, softmax over keys, the smallest set
                of keys holding mass p

and four granularities:

    Mx1 q128    fgattn's fine-grained lists, 128-query tiles
    Mx1 q64     the same with 64-query tiles
    block 128   128 x 128 blocks: 128-query tiles, 128-key blocks
    block 64    64 x 64 blocks

block masks are chosen by the same rule on blocks: threshold keeps a (query block, key block)
pair when the largest probability inside the block passes the cut (the block maximum); top-p
ranks key blocks by their pooled mass (the sum of the pooled probabilities over the block) and
keeps the smallest set of blocks holding mass p. They run as M x 1 lists
(``KeyIndex.from_block_mask``).

For every point: the kept fraction (``index.density()``) and the relative L2 error
||O_sparse - O_dense|| / ||O_dense|| over the whole output, where O_dense is a float32 dense
attention (torch SDPA on float32 copies). O_sparse comes from ``fg.reference.sparse_attention``
(float32; pure sparsification error) or, with ``--backend cute`` (the default on a Hopper GPU),
from ``fg.sparse_attention`` in bf16; the error of the dense list through the same backend is
recorded as the floor.

With ``--backend cute`` each point is also timed, so that error can be read against time and
not only against kept fraction: the point's own index through the systems that can run it, with
the sweep's timing (``perf/sweep.py``'s ``median_ms``: CUDA events, warm-up, median) and its
baselines (``perf/baselines.py``), in units of FA4 dense attention on the same inputs in the same
process (torch SDPA bf16 when FlashAttention-4 is not installed):

    fgattn      every granularity, as M x 1 lists (``fg.sparse_attention``)
    fa4_block   128 x 128 blocks only: FA4's block-sparse forward on the block mask (FA4 on
                Hopper has 128-query blocks, so 64 x 64 blocks run on fgattn alone); its output
                error is recorded too, as a check that it does the same kept work

Writes perf/results/quality-<size>-<device>.json, .png (error vs kept fraction, log axes, one
curve per granularity, one panel per rule; with timings a second row of panels: error vs time)
and .md (the kept fraction, and with timings the time, each granularity needs for an error of
1e-2 and 3e-2, interpolated on the curve in log-log), and prints the tables. The plot needs
matplotlib (not a dependency of the package): the script stops with a message if it is missing,
unless --no-plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fgattn_cute as fg  # noqa: E402
from fgattn_cute.testing import video_like_qkv  # noqa: E402

SIZES = {
    # frames, latent height, latent width, heads, head_dim
    "small": dict(frames=8, height=24, width=32, heads=6, head_dim=128),
    "480p": dict(frames=21, height=30, width=52, heads=24, head_dim=128),
}
THRESHOLDS = [0.01, 0.03, 0.1, 0.2, 0.35, 0.6, 1.0, 1.6, 2.5, 4.0, 6.5, 10.0, 30.0, 100.0]
TOP_PS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
GRANULARITIES = [
    # name, q_tile, key block (None: M x 1)
    ("Mx1 q128", 128, None),
    ("Mx1 q64", 64, None),
    ("block 128", 128, 128),
    ("block 64", 64, 64),
]
TARGETS = [1e-2, 3e-2]
RESULTS = Path(__file__).resolve().parent / "results"


def _device_name(device):
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, reps):
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _dense_f32(q, k, v, scale):
    """float32 dense attention [B, S, H, D] (SDPA on float32 copies, head by head)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h in range(q.shape[2]):
        qh, kh, vh = (x[:, :, h:h + 1].transpose(1, 2).float() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        out[:, :, h:h + 1] = o.transpose(1, 2)
    return out


def _rel_l2(out, ref):
    return float(torch.linalg.vector_norm((out.float() - ref).double())
                 / torch.linalg.vector_norm(ref.double()))


def _block_max(x, block):
    """x [..., n] -> [..., ceil(n / block)]: max over consecutive blocks (x >= 0)."""
    n = x.shape[-1]
    pad = -n % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*x.shape[:-1], -1, block).amax(-1)


def _block_sum(x, block):
    n = x.shape[-1]
    pad = -n % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*x.shape[:-1], -1, block).sum(-1)


def _tiles_128_from_64(colmax64):
    """Column maxima of 128-query tiles from those of 64-query tiles."""
    t64 = colmax64.shape[2]
    if t64 % 2:
        colmax64 = torch.nn.functional.pad(colmax64, (0, 0, 0, 1))
    b, h, t, n = colmax64.shape
    return colmax64.view(b, h, t // 2, 2, n).amax(3)


def _interp(points, target):
    """The kept fraction at which the error first falls to ``target`` along the curve (points:
    (kept, error), any order), interpolated linearly in log-log; a string when the curve does
    not cross ``target``."""
    pts = sorted((kf, err) for kf, err in points if kf > 0)
    if not pts:
        return None, "n/a"
    for i, (kf, err) in enumerate(pts):
        if err <= target:
            if i == 0:
                return None, f"< {kf:.3g}"
            k0, e0 = pts[i - 1]
            if err <= 0 or e0 <= 0 or e0 == err:
                return kf, f"{kf:.3g}"
            w = (math.log(target) - math.log(e0)) / (math.log(err) - math.log(e0))
            val = math.exp(math.log(k0) + w * (math.log(kf) - math.log(k0)))
            return val, f"{val:.3g}"
    return None, f"> {pts[-1][0]:.3g}"


def _needs_table(results, label_header, quantity, curves):
    """Markdown rows of what each curve needs (its x, interpolated) for the target errors, and
    the values by "rule|label|target". curves: (label, granularity, x field) triples; points
    without that field are left out, curves without points too."""
    lines = [f"| rule | {label_header} | {quantity} for err 1e-2 | {quantity} for err 3e-2 |",
             "| --- | --- | --- | --- |"]
    summary = {}
    for rule in ("threshold", "top-p"):
        for label, gran, field in curves:
            pts = _points(results, rule, gran, field)
            if not pts:
                continue
            cells = []
            for t in TARGETS:
                val, text = _interp(pts, t)
                summary[f"{rule}|{label}|{t:g}"] = val
                cells.append(text)
            lines.append(f"| {rule} | {label} | {cells[0]} | {cells[1]} |")
    return lines, summary


def _points(results, rule, gran, field):
    return [(r[field], r["rel_l2"]) for r in results if r["rule"] == rule
            and r["granularity"] == gran and r.get(field) is not None]


def _table(results, floor):
    lines, summary = _needs_table(results, "granularity", "kept",
                                  [(name, name, "kept") for name, _, _ in GRANULARITIES])
    lines.append("")
    lines.append(f"Error floor of the backend (dense list vs float32 dense): {floor:.2e}.")
    return "\n".join(lines), summary


# One colour per granularity in every panel.
COLOURS = {"Mx1 q128": "C0", "Mx1 q64": "C1", "block 128": "C2", "block 64": "C3"}
# (label, granularity, time field) of the timed curves: the system that runs each granularity.
TIMED = [
    ("Mx1 q128 (fgattn)", "Mx1 q128", "x_dense_fgattn"),
    ("Mx1 q64 (fgattn)", "Mx1 q64", "x_dense_fgattn"),
    ("block 128 (FA4 block-sparse)", "block 128", "x_dense_fa4_block"),
    ("block 128 (fgattn)", "block 128", "x_dense_fgattn"),
    ("block 64 (fgattn)", "block 64", "x_dense_fgattn"),
]


def _time_table(results):
    """Time (x dense) each timed curve needs for the target errors, interpolated like kept."""
    lines, summary = _needs_table(results, "granularity (system)", "time", TIMED)
    return "\n".join(lines), summary


def _plot(results, floor, title, path, dense_label=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = dense_label is not None
    fig, grid = plt.subplots(2 if timed else 1, 2, figsize=(10, 8.4 if timed else 4.2),
                             sharey=True, squeeze=False)
    axes = grid[0]
    for ax, rule in zip(axes, ("threshold", "top-p"), strict=True):
        for name, _, _ in GRANULARITIES:
            pts = sorted((r["kept"], r["rel_l2"]) for r in results
                         if r["rule"] == rule and r["granularity"] == name and r["rel_l2"] > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name,
                        color=COLOURS[name])
        for t in TARGETS:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        if floor > 0:
            ax.axhline(floor, color="black", lw=0.6, ls="--", label="backend floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("kept fraction (index.density())")
        ax.set_title(f"{rule} rule")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0].set_ylabel("relative L2 error vs dense")
    axes[0].legend(fontsize=8)
    if timed:
        for ax, rule in zip(grid[1], ("threshold", "top-p"), strict=True):
            for label, gran, field in TIMED:
                pts = sorted(p for p in _points(results, rule, gran, field) if p[1] > 0)
                if pts:
                    style = "--" if label.startswith("block 128 (FA4") else "-"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                            label=label, color=COLOURS[gran])
            for t in TARGETS:
                ax.axhline(t, color="grey", lw=0.6, ls=":")
            ax.axvline(1.0, color="black", lw=0.6, ls="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"time / {dense_label} time (same inputs, same process)")
            ax.set_title(f"{rule} rule: error vs time")
            ax.grid(True, which="both", lw=0.3, alpha=0.5)
        grid[1][0].set_ylabel("relative L2 error vs dense")
        grid[1][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class _Timer:
    """Times a point's index on the systems that run it, in units of dense attention."""

    def __init__(self, q, k, v, scale, reps):
        perf = str(Path(__file__).resolve().parent)
        if perf not in sys.path:
            sys.path.insert(0, perf)
        import baselines
        from sweep import median_ms

        self.q, self.k, self.v, self.scale, self.reps = q, k, v, scale, reps
        self.baselines, self.median_ms = baselines, median_ms
        try:
            dense = baselines.fa4_dense(q, k, v)
            dense()
            self.dense_label, self.fa4 = "FA4", True
        except ImportError:  # no FlashAttention-4: SDPA is the unit, FA4 points are skipped
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

            def dense():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)

            self.dense_label, self.fa4 = "torch SDPA bf16", False
        self.dense_ms = median_ms(dense, reps)

    def time(self, index, block_mask, truth):
        q, k, v = self.q, self.k, self.v
        ms = self.median_ms(
            lambda: fg.sparse_attention(q, k, v, index, self.scale, backend="cute"), self.reps)
        row = dict(ms_fgattn=ms, x_dense_fgattn=ms / self.dense_ms)
        if block_mask is not None and self.fa4:
            run = self.baselines.fa4_block_from_mask(q, k, v, block_mask, 128)
            out = run()
            ms = self.median_ms(run, self.reps)
            row.update(ms_fa4_block=ms, x_dense_fa4_block=ms / self.dense_ms,
                       rel_l2_fa4_block=_rel_l2(out[0] if isinstance(out, tuple) else out, truth))
        return row


def _fa4_check(results):
    """Largest |error(FA4 block) / error(fgattn) - 1| over the block-128 points."""
    ratios = [abs(r["rel_l2_fa4_block"] / r["rel_l2"] - 1) for r in results
              if r.get("rel_l2_fa4_block") is not None and r["rel_l2"] > 0]
    return f"{max(ratios):.2g}" if ratios else "n/a"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--heads", type=int, default=None, help="override the size's head count")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--backend", choices=["auto", "reference", "cute"], default="auto",
                    help="sparse attention: auto = cute on a Hopper GPU, else reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3, help="timing repetitions (best of)")
    ap.add_argument("--timing-reps", type=int, default=10,
                    help="CUDA-event timings per point (median), with --backend cute")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    args = ap.parse_args(argv)

    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("perf/quality.py: the plot needs matplotlib, which is not installed: "
                     "`python -m pip install matplotlib`, or pass --no-plot")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.backend
    if backend == "auto":
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        backend = "cute" if hopper else "reference"
    cfg = dict(SIZES[args.size])
    if args.heads:
        cfg["heads"] = args.heads
    dev_name = _device_name(device)
    stem = args.out / f"quality-{args.size}-{dev_name}"
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    q, k, v = video_like_qkv(seed=args.seed, device=device, dtype=torch.bfloat16, **cfg)
    B, S, H, D = q.shape
    scale = D**-0.5
    log(f"video_like_qkv {cfg}: q {tuple(q.shape)} bf16 on {device}; backend {backend}")

    def sparse(index):
        if backend == "reference":
            return fg.reference.sparse_attention(q, k, v, index, scale)
        return fg.sparse_attention(q, k, v, index, scale, backend="cute")

    truth = _dense_f32(q, k, v, scale)
    floor = _rel_l2(sparse(fg.KeyIndex.dense(B, H, S, S, 128, device)), truth)
    log(f"float32 dense done; backend floor (dense list) {floor:.2e}")

    # Column maxima of the probabilities per 64- and 128-query tile: the threshold rule for
    # every granularity, from one exact pass (calibrate's own building blocks).
    lse = fg.predict.query_lse(q, k, scale)
    colmax = {64: fg.predict.tile_column_max_probs(q, k, lse, 64, scale)}
    colmax[128] = _tiles_128_from_64(colmax[64])
    # Same rule through calibrate itself. On a GPU its kernel sums the scores in another order
    # (tensor-core float32 accumulation, 128-row tiles), so entries close to the cut may flip:
    # on these inputs, whose scores run large, up to 1.4e-4 (relative) from it (H200). A flip
    # further than 1e-3 from the cut would be a wrong kept set, not rounding.
    check = fg.predict.calibrate(q, k, 128, threshold=1.0)
    differ = check.to_mask() != (colmax[128] >= 1.0 / S)
    distance = (colmax[128] * S - 1.0).abs()[differ]
    worst = float(distance.max()) if distance.numel() else 0.0
    assert worst <= 1e-3, f"calibrate != rule: an entry {worst:.2e} from the cut differs"
    log(f"column maxima done; fg.predict.calibrate at threshold 1 agrees except for "
        f"{distance.numel()} of {differ.numel()} entries, all within {worst:.1e} of the cut")

    timer = _Timer(q, k, v, scale, args.timing_reps) if backend == "cute" else None
    if timer is not None:
        log(f"timing on: {timer.dense_label} dense {timer.dense_ms:.3f} ms "
            f"(median of {args.timing_reps})")

    results = []

    def record(rule, gran, param, index, block_mask=None):
        err = _rel_l2(sparse(index), truth)
        kept = float(index.density())
        row = dict(rule=rule, granularity=gran, param=param, kept=kept, rel_l2=err)
        note = ""
        if timer is not None:
            row.update(timer.time(index, block_mask if gran == "block 128" else None, truth))
            note = f"  {row['x_dense_fgattn']:.3f} x dense (fgattn)"
            if row.get("x_dense_fa4_block") is not None:
                note += f", {row['x_dense_fa4_block']:.3f} (FA4 block)"
        results.append(row)
        log(f"{rule:9s} {gran:9s} {param:<7g} kept {kept:.4f} rel_l2 {err:.3e}{note}")

    for name, q_tile, block in GRANULARITIES:
        cm = colmax[q_tile] if block is None else _block_max(colmax[q_tile], block)
        for thr in THRESHOLDS:
            mask = cm >= thr / S
            if block is None:
                index = fg.KeyIndex.from_mask(mask, q_tile, S)
            else:
                index = fg.KeyIndex.from_block_mask(mask, q_tile, S, block, S)
            record("threshold", name, thr, index, mask)
    del colmax

    for name, q_tile, block in GRANULARITIES:
        if block is not None:
            block_mass = _block_sum(fg.predict.pooled_probs(q, k, q_tile, scale), block)
        for p in TOP_PS:
            if block is None:
                index = fg.predict.pooled_top_p(q, k, q_tile, p, scale)
            else:
                mask = fg.predict.top_p_mask(block_mass, p)
                index = fg.KeyIndex.from_block_mask(mask, q_tile, S, block, S)
            record("top-p", name, p, index, None if block is None else mask)

    def dense_attn():
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)

    timings = {
        "calibrate(q_tile=128, threshold=1)": _best_time(
            lambda: fg.predict.calibrate(q, k, 128, 1.0), device, args.reps),
        "pooled_top_p(q_tile=128, p=0.9)": _best_time(
            lambda: fg.predict.pooled_top_p(q, k, 128, 0.9), device, args.reps),
        "dense SDPA bf16": _best_time(dense_attn, device, args.reps),
    }
    for what, sec in timings.items():
        log(f"time {what}: {sec * 1e3:.1f} ms")

    table, summary = _table(results, floor)
    time_table, time_summary = _time_table(results) if timer is not None else ("", {})
    title = (f"quality-{args.size}-{dev_name}: video_like_qkv B={B} S={S} "
             f"({cfg['frames']}x{cfg['height']}x{cfg['width']}) H={H} D={D}, backend {backend}")
    meta = dict(
        size=args.size, config=cfg, seed=args.seed, shape=[B, S, H, D], dtype="bfloat16",
        device=str(device), device_name=dev_name, backend=backend,
        torch=torch.__version__, python=platform.python_version(),
        date=datetime.date.today().isoformat(), thresholds=THRESHOLDS, top_ps=TOP_PS,
    )
    if timer is not None:
        meta.update(dense_unit=timer.dense_label, dense_ms=timer.dense_ms,
                    timing_reps=args.timing_reps)
    payload = dict(meta=meta, floor_rel_l2=floor, results=results, needed_kept=summary,
                   needed_time=time_summary, timings_s=timings)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    md = [f"# {title}", "", "Kept fraction (index.density()) needed for a relative L2 error of "
          "1e-2 and 3e-2 against float32 dense attention, interpolated on the measured curve "
          "(log-log). `< x`: every measured point is below the error; `> x`: none reaches it.",
          "", table, ""]
    if timer is not None:
        md += [f"Time each curve needs for the same errors, in units of {timer.dense_label} "
               f"dense attention on the same inputs ({timer.dense_ms:.3f} ms; every point timed "
               f"with its own index, median of {args.timing_reps} CUDA-event timings after "
               f"warm-up, {dev_name}). FA4 runs 128 x 128 blocks only; on the same blocks its "
               f"output error and fgattn's differ by at most a factor 1 +- "
               f"{_fa4_check(results)}.", "", time_table, ""]
    md += [f"Timings (best of {args.reps}, {dev_name}):", ""]
    md += [f"- {what}: {sec * 1e3:.1f} ms" for what, sec in timings.items()]
    md.append("")
    stem.with_suffix(".md").write_text("\n".join(md))
    if not args.no_plot:
        _plot(results, floor, title, stem.with_suffix(".png"),
              timer.dense_label if timer is not None else None)
    print()
    print(table)
    if time_table:
        print()
        print(time_table)
    log(f"wrote {stem}.json, .md" + ("" if args.no_plot else ", .png"))
    return payload


if __name__ == "__main__":
    main()
