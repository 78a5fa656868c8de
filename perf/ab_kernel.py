"""A/B timing of attention-kernel variants in one process, side by side with FA4 dense.

A variant is a Python file that defines `FgAttentionForwardSm90` (a copy of
fgattn_cute/kernels/fg_fwd_sm90.py before or after a change); "current" is the package's own.
Each variant is compiled for the same KernelConfig and run on the same random M x 1 lists; the
first variant's output is checked against fg.reference (head 0) and every other variant's
against the first, so a faster variant that is wrong shows up in the table. The variants and
FA4 dense are timed in interleaved rounds (drift falls on all alike); "x ideal" is the time
over keep x the FA4 dense time of the same rounds.

    python perf/ab_kernel.py --variant before=dev/variants/before.py --variant stages3=@3 \\
        --shapes wan480-h12,cogvideox --keeps 1,0.5,0.3,0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from sweep import card_info, commit, median_ms, rel_err  # noqa: E402

from fgattn_cute.host.compile import KernelConfig, default_config  # noqa: E402

SHAPES = {
    "wan480-h12": (32760, 12, 128),
    "wan480-h24": (32760, 24, 128),
    "wan720-h12": (75600, 12, 128),
    "cogvideox": (17550, 48, 64),
}


def load_variant(path: str):
    """The module in file `path` (a copy of a kernel module before or after a change)."""
    spec = importlib.util.spec_from_file_location(f"variant_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_options(cls, **options) -> dict:
    """The keyword options that the kernel class `cls` (a variant, perhaps older than an
    option) takes in its constructor; the others are dropped."""
    taken = inspect.signature(cls.__init__).parameters
    return {name: value for name, value in options.items() if name in taken}


def load_kernel_class(path: str | None):
    if path is None:
        from fgattn_cute.kernels.fg_fwd_sm90 import FgAttentionForwardSm90

        return FgAttentionForwardSm90
    return load_variant(path).FgAttentionForwardSm90


def compile_variant(cls, config: KernelConfig):
    """The variant compiled for `config`, as f(q, k, v, out, lse, indices, counts, scale)."""
    import cutlass
    import cutlass.cute as cute

    dtype = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}[config.dtype]
    # max_ctas only to kernels that take it (older variants lack it; wrappers set their own)
    extra = variant_options(cls, max_ctas=config.max_ctas) if config.max_ctas else {}
    kernel = cls(dtype, config.head_dim, q_tile=config.q_tile, tile_n=config.tile_n,
                 num_stages=config.num_stages, engine=config.engine, **extra)
    args = list(config.fake_args())
    # Variants from before the persistent scheduler take no tile counter.
    has_counter = "mTileCounter" in inspect.signature(cls.__call__).parameters
    if not has_counter:
        del args[7]
    fn = cute.compile(kernel, *args, options="--enable-tvm-ffi")
    persistent = bool(getattr(kernel, "max_ctas", 0))

    def run(q, k, v, out, lse, indices, counts, scale):
        if not has_counter:
            return fn(q, k, v, out, lse, indices, counts, scale)
        # a persistent kernel's tile counter must be zero at each launch
        counter = (torch.zeros if persistent else torch.empty)(1, dtype=torch.int32,
                                                                device=q.device)
        return fn(q, k, v, out, lse, indices, counts, counter, scale)

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variant", action="append", default=[],
                   help="name=path[@stages] of a module defining FgAttentionForwardSm90")
    p.add_argument("--shapes", default="wan480-h12,cogvideox")
    p.add_argument("--keeps", default="1,0.5,0.3,0.1")
    p.add_argument("--engine", default=None)
    p.add_argument("--q-tile", type=int, default=128)
    p.add_argument("--spread", type=float, default=0.0,
                   help="list lengths keep x U[1 - spread, 1 + spread] per query tile")
    p.add_argument("--reps", type=int, default=5, help="timed runs per round (median)")
    p.add_argument("--rounds", type=int, default=5, help="rounds over all variants")
    args = p.parse_args(argv)
    # name=path, name=path@stages or name=@stages (the package's kernel with other stages)
    variants = [tuple(v.split("=", 1)) for v in args.variant] + [("current", "")]
    classes, stages = {}, {}
    for vname, spec in variants:
        path, _, n = spec.partition("@")
        classes[vname] = load_kernel_class(path or None)
        stages[vname] = int(n) if n else None
    name, _, clocks = card_info()
    print(f"card: {name} ({clocks}); commit {commit()}", flush=True)

    rows = []
    for shape in args.shapes.split(","):
        S, H, D = SHAPES[shape]
        # The card's own SM count, as the library's launcher uses (one persistent CTA per SM).
        config = default_config(D, "bfloat16", args.q_tile, args.engine,
                                num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
        fns = {
            v: compile_variant(cls, dataclasses.replace(config, num_stages=stages[v] or
                                                        config.num_stages))
            for v, cls in classes.items()
        }
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        dense = baselines.fa4_dense(q, k, v)
        for keep in (float(x) for x in args.keeps.split(",")):
            index = baselines.random_lists(1, H, S, S, args.q_tile, keep, "cuda",
                                           spread=args.spread)
            runs, checks, first = {}, {}, None
            for vname, fn in fns.items():
                out = torch.full_like(q, float("nan"))
                lse = torch.full((1, H, S), float("nan"), device="cuda")
                run = functools.partial(fn, q, k, v, out, lse, index.indices, index.counts,
                                        D**-0.5)
                run()
                torch.cuda.synchronize()
                if first is None:
                    first = out.clone()
                    checks[vname] = f"ref {reference_error(q, k, v, index, out):.1e}"
                else:
                    same = torch.equal(out, first)
                    checks[vname] = "bitwise" if same else (
                        f"diff {rel_err(out, first):.1e}, "
                        f"ref {reference_error(q, k, v, index, out):.1e}")
                runs[vname] = run
            # Rounds of every variant in turn, so that clock or thermal drift during the run
            # falls on all of them alike; the figure is the median over rounds (in round order).
            runs["fa4_dense"], checks["fa4_dense"] = dense, ""
            # Each round starts one place further along the list: whichever system runs right
            # after FA4 dense (the hottest kernel, which can lower the clock for a while) is a
            # different one each round.
            times = {vname: [] for vname in runs}
            order = list(runs)
            for r in range(args.rounds):
                for vname in order[r % len(order):] + order[:r % len(order)]:
                    times[vname].append(median_ms(runs[vname], args.reps, warmup=1))
            dense_ms = sorted(times["fa4_dense"])[args.rounds // 2]
            for vname, ts in times.items():
                ms = sorted(ts)[len(ts) // 2]
                ratio = ms / ((1.0 if vname == "fa4_dense" else keep) * dense_ms)
                rows.append((shape, vname, keep, ms, ratio, checks[vname]))
                print(f"{shape:12s} {vname:12s} keep {keep:4.2f} {ms:8.3f} ms "
                      f"x ideal {ratio:5.2f}  {checks[vname]}  rounds "
                      + " ".join(f"{t:.3f}" for t in ts), flush=True)
    print(f"\n| shape | system | keep | ms | x ideal | check |  ({name})")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, vname, keep, ms, ratio, diff in rows:
        print(f"| {shape} | {vname} | {keep} | {ms:.3f} | {ratio:.2f} | {diff} |")


def reference_error(q, k, v, index, out):
    """Relative error of head 0 of `out` against the float32 fg.reference."""
    import fgattn_cute as fg

    S, D = q.shape[1], q.shape[3]
    head0 = fg.KeyIndex.from_indices(index.indices[:, :1].contiguous(),
                                     index.counts[:, :1].contiguous(), index.q_tile, S, S,
                                     validate=False)
    ref = fg.reference.sparse_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], head0,
                                        softmax_scale=D**-0.5)
    return rel_err(out[:, :, :1], ref)


if __name__ == "__main__":
    main()
