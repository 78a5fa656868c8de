"""Summaries of a sweep: a markdown table per shape (with the performance bar checked) and PNG
plots of time and speedup against the kept fraction."""

from __future__ import annotations

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
    lines = [f"# Sweep on {meta['card_name']} ({meta['date']}, commit {meta['commit'][:10]})", "",
             f"Clocks (sm, max sm, mem, power limit): {meta['clocks']}. Measured ceilings: "
             f"bf16 matmul {ceil.get('matmul_tflops', 0):.0f} TF/s, device copy "
             f"{ceil.get('copy_tbps', 0):.2f} TB/s. Times are medians in ms; `x ideal` is "
             f"time / (keep x FA4 dense time).", ""]
    for shape, rs in by_shape.items():
        dense = next((r["ms"] for r in rs if r["system"] == "fa4_dense"), None)
        d = rs[0]["head_dim"]
        lines += [f"## {shape}: S={rs[0]['seqlen']}, H={rs[0]['heads']}, D={d}", ""]
        if dense:
            tflops = 4 * rs[0]["seqlen"] ** 2 * d * rs[0]["heads"] / dense / 1e9
            lines.append(f"FA4 dense: {dense:.2f} ms ({tflops:.0f} TF/s).")
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
    text = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(text)
    _plots(by_shape, stem)
    return text


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
        dense = next((r["ms"] for r in rs if r["system"] == "fa4_dense"), None)
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
