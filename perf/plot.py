"""Summaries of a sweep: a markdown table per shape (with the performance bar checked), the
speed of light of each case, and PNG plots of time and speedup against the kept fraction.

    python perf/plot.py perf/results/sweep-H200-2026-11-27.json   # rewrite its .md and .png
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

BAR = {128: 1.1, 64: 1.2}  # time <= BAR * keep * FA4 dense time
PREDICTORS = ("pooled_top_p", "pooled_top_p_compiled", "calibrate")


def _label(r):
    if r["system"] == "fgattn":
        return f"fgattn {r['engine']}"
    if r["system"] == "fa4_block":
        return f"fa4_block {r['granularity']}"
    return r["system"]


def summarize(meta, records, stem) -> str:
    by_shape = defaultdict(list)
    for r in records:
        by_shape[r["shape"]].append(r)
    ceil = meta.get("ceilings", {})
    # Sweeps from session 21 on time back-to-back batches and keep the synced figure beside.
    timing = ("Times are medians in ms per call over back-to-back batches (the GPU kept busy; "
              "the JSON's `ms_synced` has single calls after a sync, host latency included)"
              if any("ms_synced" in r for r in records) else
              "Times are medians in ms of single calls, each after a sync")
    lines = [f"# Sweep on {meta['card_name']} ({meta['date']}, commit {meta['commit'][:10]})", "",
             f"Clocks (sm, max sm, mem, power limit): {meta['clocks']}. Measured ceilings: "
             f"bf16 matmul {ceil.get('matmul_tflops', 0):.0f} TF/s, device copy "
             f"{ceil.get('copy_tbps', 0):.2f} TB/s. {timing}; `x ideal` is time / (keep x FA4 "
             f"dense time).", ""]
    for shape, rs in by_shape.items():
        dense = dense_ms(rs)
        d = rs[0]["head_dim"]
        lines += [f"## {shape}: S={rs[0]['seqlen']}, H={rs[0]['heads']}, D={d}", ""]
        if dense:
            tflops = 4 * rs[0]["seqlen"] ** 2 * d * rs[0]["heads"] / dense / 1e9
            spread = [r["ms"] for r in rs if r["system"] == "fa4_dense"]
            between = (f", the median of {len(spread)} timings through the shape's run: "
                       f"{min(spread):.2f}-{max(spread):.2f}" if len(spread) > 1 else "")
            lines.append(f"FA4 dense: {dense:.2f} ms ({tflops:.0f} TF/s{between}).")
        cud = next((r["ms"] for r in rs if r["system"] == "cudnn"), None)
        if cud:
            lines.append(f"cuDNN SDPA dense: {cud:.2f} ms.")
        for r in rs:
            if r["system"] in PREDICTORS:
                share = f" ({100 * r['ms'] / dense:.1f}% of FA4 dense)" if dense else ""
                lines.append(f"Predictor {r['system']}: {r['ms']:.2f} ms{share}.")
        lines += ["", "| system | granularity | keep | ms | TF/s (kept work) | x ideal |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rs, key=lambda r: (-r["keep"], _label(r))):
            if r["system"] in ("fa4_dense", "cudnn") or r["system"] in PREDICTORS:
                continue
            ideal = f"{r['ms'] / (r['keep'] * dense):.2f}" if dense else "-"
            lines.append(f"| {_label(r)} | {r['granularity']} | {r['keep']:.3f} | "
                         f"{r['ms']:.3f} | {r['tflops']:.0f} | {ideal} |")
        if dense:
            lines += ["", _bar(rs, dense, d), ""]
        if ceil:
            lines += _speed_of_light(rs, ceil)
    text = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(text)
    _plots(by_shape, stem)
    return text


def _speed_of_light(rs, ceil):
    """Per kept fraction: the work, the two floors at the card's measured ceilings, the bytes
    the M x 1 gather moves out of L2, and how close the best fgattn engine and the best FA4
    system doing the same kept work come to the matmul ceiling."""
    r0 = rs[0]
    S, H, D = r0["seqlen"], r0["heads"], r0["head_dim"]
    n_tiles = -(-S // 128)
    hbm_gb = 8 * S * H * D / 1e9  # Q, K, V read once and O written once, 16-bit
    hbm_ms = hbm_gb / ceil["copy_tbps"]
    lines = ["Speed of light (B=1; FLOPs 4 S^2 D H keep; HBM bytes 8 S H D; L2 -> SM bytes: each "
             "query tile reads its kept K and V rows, n_tiles x keep S x D x 2 B x 2 x H; "
             f"ceilings measured in this run: {ceil['matmul_tflops']:.0f} TF/s, "
             f"{ceil['copy_tbps']:.2f} TB/s):", "",
             "| keep | TFLOP | compute floor ms | HBM GB (floor ms) | L2->SM GB | best fgattn ms "
             "(% of matmul ceiling, L2->SM TB/s) | best FA4 ms (% of ceiling) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    # (3 places, as _bar: a sweep's keeps include 0.05, which one place would make 0.1)
    keeps = sorted({round(r["keep"], 3) for r in rs if r["system"] == "fgattn"}, reverse=True)
    for keep in keeps:
        tflop = 4 * S * S * D * H * keep / 1e12
        floor_ms = tflop / ceil["matmul_tflops"] * 1e3
        gather_gb = n_tiles * keep * S * D * 2 * 2 * H / 1e9
        ours = [r["ms"] for r in rs if r["system"] == "fgattn" and abs(r["keep"] - keep) < 0.02]
        fa4 = [r["ms"] for r in rs if r["system"].startswith("fa4")
               and abs(r["keep"] - keep) < 0.02]
        best = min(ours) if ours else None
        best_fa4 = min(fa4) if fa4 else None
        ours_txt = (f"{best:.3f} ({100 * floor_ms / best:.0f}%, {gather_gb / best:.1f})"
                    if best else "-")
        fa4_txt = f"{best_fa4:.3f} ({100 * floor_ms / best_fa4:.0f}%)" if best_fa4 else "-"
        label = f"{keep:.1f}" if round(keep, 1) == keep else f"{keep:.2f}"
        lines.append(f"| {label} | {tflop:.2f} | {floor_ms:.3f} | {hbm_gb:.2f} ({hbm_ms:.3f}) "
                     f"| {gather_gb:.1f} | {ours_txt} | {fa4_txt} |")
    return lines + [""]


def dense_ms(rs):
    """FA4 dense's time for a shape's records: the median of its timings (sweeps from session
    21 re-time it after each keep, so that it shares the GPU's state with the systems it
    divides), or None."""
    times = sorted(r["ms"] for r in rs if r["system"] == "fa4_dense")
    return times[len(times) // 2] if times else None


def _bar(rs, dense, head_dim):
    """Whether the performance bar of DESIGN.md holds for this shape."""
    out = []
    best = defaultdict(lambda: float("inf"))
    for r in rs:
        if r["system"] == "fgattn":
            best[round(r["keep"], 3)] = min(best[round(r["keep"], 3)], r["ms"])
    for keep, ms in sorted(best.items(), reverse=True):
        limit = (1.05 if keep >= 0.999 else BAR[head_dim] * keep) * dense
        rivals = [r["ms"] for r in rs if r["system"] in ("fa4_block", "fa4_paged")
                  and abs(r["keep"] - keep) < 0.02]
        beats = all(ms < x for x in rivals) if rivals else None
        out.append(f"keep {keep:.3f}: best fgattn {ms:.3f} ms vs bar {limit:.3f} ms -> "
                   f"{'meets' if ms <= limit else 'MISSES'} the bar"
                   + ("" if beats is None else
                      f"; {'faster' if beats else 'NOT faster'} than every FA4 variant at "
                      f"this keep ({min(rivals):.3f} ms best)"))
    return "Bar: " + "; ".join(out) if len(out) < 2 else "Bar:\n\n- " + "\n- ".join(out)


def _plots(by_shape, stem):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plots written")
        return
    for shape, rs in by_shape.items():
        dense = dense_ms(rs)
        series = defaultdict(list)
        for r in rs:
            if r["system"] not in ("fa4_dense", "cudnn") + PREDICTORS:
                series[_label(r)].append((r["keep"], r["ms"]))
        fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, pts in sorted(series.items()):
            pts.sort()
            keeps, ms = zip(*pts, strict=True)
            style = "-o" if label.startswith("fgattn") else "--."
            ax_t.plot(keeps, ms, style, label=label, markersize=4)
            if dense:
                ax_s.plot(keeps, [dense / m for m in ms], style, label=label, markersize=4)
        if dense:
            ks = sorted({r["keep"] for r in rs})
            ax_t.axhline(dense, color="k", lw=1, label="fa4 dense")
            ax_s.plot(ks, [1 / k for k in ks], "k:", lw=1, label="ideal 1/keep")
        for ax, title in ((ax_t, "time (ms)"), (ax_s, "speedup over FA4 dense")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("kept fraction")
            ax.set_title(f"{shape}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        ax_s.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(f"{stem}-{shape}.png", dpi=80)
        plt.close(fig)


def main(argv=None):
    """Rewrite the markdown summary and plots of a sweep JSON (the records carry the card,
    clocks, commit, versions and ceilings; the date comes from the file name)."""
    path = Path((argv or sys.argv[1:])[0])
    records = json.loads(path.read_text())
    r0 = records[0]
    date = re.search(r"\d{4}-\d{2}-\d{2}", path.stem)
    meta = {k: r0[k] for k in ("card", "card_name", "clocks", "commit", "versions", "ceilings")}
    meta["date"] = date.group(0) if date else "unknown date"
    print(summarize(meta, records, str(path.with_suffix(""))))


if __name__ == "__main__":
    main()
