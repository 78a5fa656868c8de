"""One denoising step of Wan 2.1 T2V 1.3B, end to end: dense attention against fgattn-cute.

    python perf/e2e_wan.py                     # 480p and 720p; SDPA, FA4, fgattn keep 0.3 / 0.1
    python perf/e2e_wan.py --sizes 480p --keeps 0.3 --reps 5
    python perf/e2e_wan.py --quick             # a tiny model and video: checks the script logic
                                               # (on CPU with fg's float32 reference backend)

The transformer is diffusers' ``WanTransformer3DModel`` at the published Wan2.1-T2V-1.3B config
(30 layers, 12 heads of 128, model width 1536, FFN 8960, text_dim 4096, patch (1, 2, 2)) with
random weights, built on the GPU in bf16 (the modules diffusers keeps in float32 stay float32);
nothing is downloaded. One step is one transformer forward on an 81-frame video (21 latent
frames) with a 512-token prompt embedding:

    480p  832 x 480   latent 21 x 60 x 104  -> 21 x 30 x 52 = 32,760 tokens
    720p  1280 x 720  latent 21 x 90 x 160  -> 21 x 45 x 80 = 75,600 tokens

Systems (self-attention only; the cross-attention to the 512 text tokens is always diffusers'):
    sdpa        diffusers' default processors (torch scaled_dot_product_attention)
    fa4         a processor calling flash_attn.cute.flash_attn_func (skipped if not importable)
    fgattn-K    fg.sparse_attention with a random M x 1 KeyIndex per layer keeping exactly
                round(K * seqlen) keys per 128-query tile (built once, outside the timing)

Timing: CUDA events around the forward, warm-up, median of --reps (time.perf_counter on CPU).
Attention share: one more forward with CUDA events around every self-attention call (through
the fgattn processors' timer hook: for sdpa they run diffusers' own attention call), summed and
divided by that forward's time. Writes perf/results/e2e-wan-<card>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import random_lists  # noqa: E402  (perf/baselines.py)

import fgattn_cute as fg  # noqa: E402

WAN_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024,
)
TINY = dict(  # --quick: same structure, toy sizes
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4,
    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=64,
)
SIZES = {  # name: latent (frames, height, width)
    "480p": (21, 60, 104),
    "720p": (21, 90, 160),
    "quick": (3, 16, 16),
}
TEXT_TOKENS = 512
Q_TILE = 128


# ----------------------------------------------------------------------------- environment


def card_slug(device):
    if device.type != "cuda":
        return "cpu", platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device)
    slug = next((c for c in ("H200", "H100", "H800", "H20") if c in name), name.replace(" ", "_"))
    return slug, name


def versions():
    out = {"torch": torch.__version__, "fgattn_cute": fg.__version__}
    import importlib.metadata as md

    for dist in ("diffusers", "nvidia-cutlass-dsl", "flash-attn-4"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit():
    if os.environ.get("FGATTN_COMMIT"):
        return os.environ["FGATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- timing


class Clock:
    """Elapsed milliseconds of a region: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start):
        """A callable giving the elapsed ms (after a sync, for CUDA)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: start.elapsed_time(end)
        elapsed = (time.perf_counter() - start) * 1e3
        return lambda: elapsed

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class AttentionTimer:
    """The handle's ``timer``: a context manager factory that records every attention call."""

    def __init__(self, clock):
        self.clock = clock
        self.pending = []

    def __call__(self):
        timer = self

        class _Region:
            def __enter__(self):
                self.t0 = timer.clock.start()

            def __exit__(self, *exc):
                timer.pending.append(timer.clock.stop(self.t0))
                return False

        return _Region()

    def collect(self):
        self.clock.sync()
        times = [f() for f in self.pending]
        self.pending = []
        return times


def time_steps(step, clock, warmup, reps):
    for _ in range(warmup):
        step()
    clock.sync()
    times = []
    for _ in range(reps):
        t0 = clock.start()
        step()
        elapsed = clock.stop(t0)
        clock.sync()
        times.append(elapsed())
    return times


# ----------------------------------------------------------------------------- model, inputs


def build_model(config, device, dtype):
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not keep.intersection(name.split(".")):  # as diffusers loads it with torch_dtype
            param.data = param.data.to(dtype)
    return model.eval()


def make_inputs(config, latent, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    frames, height, width = latent
    hidden = torch.randn(1, config["in_channels"], frames, height, width, generator=g,
                         device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, config["text_dim"], generator=g, device=device,
                       dtype=dtype)
    timestep = torch.tensor([999.0], device=device)
    return dict(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text)


def n_tokens(config, latent):
    p_t, p_h, p_w = config["patch_size"]
    return (latent[0] // p_t) * (latent[1] // p_h) * (latent[2] // p_w)


class FixedCache:
    """A SparsityCache-like object handing out one prebuilt index per layer."""

    def __init__(self, indexes):
        self.indexes = indexes

    def get(self, layer_id, step, q, k):
        return self.indexes[layer_id]


def fa4_dense_fn():
    """flash_attn.cute's dense forward as a processor's dense_fn, or None if not importable."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # not installed, or no GPU support in this build
        return None

    def fa4(q, k, v):
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    return fa4


# ----------------------------------------------------------------------------- one size


def run_size(size, args, model, config, device, dtype, backend, progress):
    from fgattn_cute.integrations import diffusers as fgd

    latent = SIZES[size]
    seqlen = n_tokens(config, latent)
    heads, layers = config["num_attention_heads"], config["num_layers"]
    q_tile = args.q_tile
    inputs = make_inputs(config, latent, device, dtype)
    clock = Clock(device)
    records = []
    outputs = {}

    @torch.inference_mode()
    def step():
        return model(**inputs, return_dict=False)[0]

    def measure(system, setup, teardown, extra):
        """setup() -> handle or None (None: diffusers' own processors)."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        handle = setup()
        try:
            times = time_steps(step, clock, args.warmup, args.reps)
            out = step()
            outputs[system] = out.float()
            # the attention share: one forward with every self-attention call timed; for the
            # diffusers baseline the fgattn processors run its own attention call, dense
            timed_handle = handle
            if timed_handle is None:
                timed_handle = fgd.enable(model, backend=backend)
            timer = AttentionTimer(clock)
            timed_handle.timer = timer
            t0 = clock.start()
            step()
            total = clock.stop(t0)
            attn = timer.collect()
            total_ms = total()
            timed_handle.timer = None
            if handle is None:
                fgd.disable(model)
        finally:
            teardown()
        rec = dict(
            size=size, tokens=seqlen, latent=list(latent), heads=heads, layers=layers,
            system=system, step_ms=statistics.median(times), step_ms_all=times,
            attention_ms=sum(attn), attention_calls=len(attn),
            attention_share=sum(attn) / total_ms if total_ms > 0 else None,
            timed_step_ms=total_ms, finite=bool(torch.isfinite(outputs[system]).all()),
            peak_gb=(torch.cuda.max_memory_allocated(device) / 1e9
                     if device.type == "cuda" else None),
            **extra,
        )
        if "sdpa" in outputs and system != "sdpa":
            ref = outputs["sdpa"]
            rec["rel_err_vs_sdpa"] = float((outputs[system] - ref).norm() / ref.norm())
        records.append(rec)
        progress(f"{size} {system}: step {rec['step_ms']:.1f} ms, attention "
                 f"{rec['attention_ms']:.1f} ms ({100 * (rec['attention_share'] or 0):.0f}%)")
        return rec

    def nothing():
        return None

    measure("sdpa", nothing, nothing, {})

    fa4 = fa4_dense_fn() if device.type == "cuda" and "fa4" in args.systems else None
    if fa4 is not None:
        try:
            measure("fa4", lambda: fgd.enable(model, backend=backend, dense_fn=fa4),
                    lambda: fgd.disable(model), {})
        except Exception as exc:  # keep the other systems' numbers
            fgd.disable(model)
            progress(f"{size} fa4 failed: {type(exc).__name__}: {exc}")
            records.append(dict(size=size, tokens=seqlen, system="fa4", error=repr(exc)))
    elif "fa4" in args.systems:
        progress(f"{size} fa4: flash_attn.cute not importable here, skipped")

    for keep in args.keeps:
        t0 = time.perf_counter()
        indexes = [random_lists(1, heads, seqlen, seqlen, q_tile, keep, device, seed=layer)
                   for layer in range(layers)]
        clock.sync()
        build_s = time.perf_counter() - t0
        density = float(indexes[0].density())
        index_gb = sum(ix.nbytes for ix in indexes) / 1e9
        measure(
            f"fgattn-{keep:g}",
            functools.partial(fgd.enable, model, cache=FixedCache(indexes), q_tile=q_tile,
                              backend=backend),
            lambda: fgd.disable(model),
            dict(keep=keep, density=density, index_gb=index_gb, index_build_s=build_s,
                 q_tile=q_tile, backend=backend),
        )
        del indexes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------- report


def summarize(meta, records):
    lines = [f"# Wan 2.1 1.3B, one denoising step ({meta['card_name']}, {meta['date']})", "",
             f"commit {meta['commit']}, dtype {meta['dtype']}, backend {meta['backend']}, "
             f"q_tile {meta['q_tile']}, warm-up {meta['warmup']}, median of {meta['reps']}.", ""]
    for size in dict.fromkeys(r["size"] for r in records):
        rows = [r for r in records if r["size"] == size]
        base = next((r for r in rows if r["system"] == "sdpa" and "step_ms" in r), None)
        lines += [f"## {size}: {rows[0]['tokens']:,} tokens", "",
                  "| system | step ms | self-attention ms | share | step speed-up vs sdpa | "
                  "attention speed-up vs sdpa |", "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['system']} | failed: {r['error'][:60]} | | | | |")
                continue
            step_x = base["step_ms"] / r["step_ms"] if base else float("nan")
            attn_x = (base["attention_ms"] / r["attention_ms"]
                      if base and r["attention_ms"] else float("nan"))
            lines.append(
                f"| {r['system']} | {r['step_ms']:.1f} | {r['attention_ms']:.1f} | "
                f"{100 * r['attention_share']:.0f}% | {step_x:.2f}x | {attn_x:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="480p,720p", help="comma list of 480p, 720p")
    p.add_argument("--keeps", default="0.3,0.1", help="fgattn keep fractions")
    p.add_argument("--systems", default="sdpa,fa4,fgattn", help="fa4 may be left out")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--q-tile", type=int, default=Q_TILE)
    p.add_argument("--quick", action="store_true",
                   help="a 2-layer toy model on a 3 x 16 x 16 latent: checks the script logic")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.keeps = [float(x) for x in args.keeps.split(",") if x] if "fgattn" in args.systems \
        else []
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        config, sizes = TINY, ["quick"]
        args.q_tile = 64 if args.q_tile == Q_TILE else args.q_tile
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
    else:
        config, sizes = WAN_1_3B, args.sizes.split(",")
        if device.type != "cuda":
            sys.exit("perf/e2e_wan.py: the full sizes need a GPU; use --quick on CPU")
    # bf16 on the GPU; float32 on CPU, where fg runs its float32 reference
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "auto" if device.type == "cuda" else "reference"

    slug, name = card_slug(device)
    date = datetime.date.today().isoformat()
    meta = dict(card=slug, card_name=name, date=date, commit=git_commit(), versions=versions(),
                config=config, dtype=str(dtype), backend=backend, q_tile=args.q_tile,
                reps=args.reps, warmup=args.warmup, quick=args.quick, text_tokens=TEXT_TOKENS)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"e2e-wan-{slug}-{date}{'-quick' if args.quick else ''}"
    started = time.time()

    def progress(line):
        print(f"[{time.time() - started:6.0f}s] {line}", flush=True)

    progress(f"building the model ({config['num_layers']} layers) on {device} in {dtype}")
    model = build_model(config, device, dtype)
    records = []
    for size in sizes:
        records += run_size(size, args, model, config, device, dtype, backend, progress)
        # written as we go, so a run stopped by a time limit keeps what it measured
        Path(f"{stem}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    summary = summarize(meta, records)
    Path(f"{stem}.md").write_text(summary + "\n")
    print(summary)
    progress(f"wrote {stem}.json and {stem}.md")
    return meta, records


if __name__ == "__main__":
    main()
