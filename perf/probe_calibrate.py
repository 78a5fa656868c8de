"""Where the calibrate kernel's time goes: the full kernel against its benchmark probes (pass 1
without exponentials; pass 2 alone) and against stage counts, next to FA4 dense, one process.

    python perf/probe_calibrate.py [--seqlen 32760 --heads 12] [--fma-exp 0,6,4,3]

--fma-exp times the full kernel with one of every N of pass 1's exponentials on the FMA pipe
(`CalibrateConfig.fma_exp_every`; 0 = all on MUFU) in interleaved rounds, and says whether each
level's lists equal the first's. Levels keep the package's row max (`lazy_max`, on by default);
a trailing E, as in 0E, turns it off (an exact row max per tile: ~10% slower at Wan 480p), and a
trailing L turns it on.

--variant name=path (repeatable) does the same for copies of the kernel module (a file that
defines `CalibrateSm90`, e.g. the module before a change) against the package's kernel
("current"), all compiled for the same configuration, at each of --thresholds (threshold t
keeps key j for a tile where some query gives it probability >= t / seqlen).

    python perf/probe_calibrate.py --skip-probes --variant before=dev/variants/cal.py \
        --thresholds 64,3,1
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from ab_kernel import load_variant, variant_options  # noqa: E402
from sweep import card_info, median_ms  # noqa: E402

from fgattn_cute.host.compile import CalibrateConfig, compile_fwd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--fma-exp", default="", help="comma-separated fma_exp_every levels")
    p.add_argument("--variant", action="append", default=[],
                   help="name=path of a module defining CalibrateSm90 (A/B against current)")
    p.add_argument("--thresholds", default="1", help="--variant: comma-separated thresholds")
    p.add_argument("--skip-probes", action="store_true",
                   help="only the --fma-exp and --variant comparisons")
    args = p.parse_args(argv)
    S, H, D = args.seqlen, args.heads, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = baselines.random_qkv(S, H, D, gen)
    fa4 = baselines.fa4_dense(q, k, v)
    dense = median_ms(fa4, args.reps)
    T = math.ceil(S / 128)
    cap = math.ceil(S / 128) * 128
    words = torch.zeros(math.ceil(S / 32), dtype=torch.int32, device="cuda")
    indices = torch.empty(1, H, T, cap, dtype=torch.int32, device="cuda")
    counts = torch.empty(1, H, T, dtype=torch.int32, device="cuda")
    print(f"{card_info()[0]}  S={S} H={H} D={D}  FA4 dense {dense:.3f} ms")
    variants = (("", 3, ("bits",)), ("", 3, ("lse", "bits")), ("", 3, ()), ("", 4, ("bits",)),
                ("no_exp", 3, ("bits",)), ("one_pass", 3, ("bits",)), ("one_pass", 3, ()))
    if args.fma_exp:
        levels = args.fma_exp.split(",")
        lazy_default = CalibrateConfig(D, "bfloat16", 128).lazy_max
        fns = {e: compile_fwd(CalibrateConfig(D, "bfloat16", 128,
                                              fma_exp_every=int(e.rstrip("LE")),
                                              lazy_max=(lazy_default and not e.endswith("E"))
                                              or e.endswith("L")))
               for e in levels}
        compare("fma_exp_every", fns, (q, k, words, indices, counts, D**-0.5,
                                       math.log(1.0 / S)), fa4, args.reps)
    if args.variant:
        fns = compile_variants(args.variant, D)
        for t in args.thresholds.split(","):
            print(f"threshold {t}")
            compare("variant", fns, (q, k, words, indices, counts, D**-0.5,
                                     math.log(float(t) / S)), fa4, args.reps)
    if args.skip_probes:
        return
    for probe, stages, pingpong in variants:
        fn = compile_fwd(CalibrateConfig(D, "bfloat16", 128, stages, probe, pingpong))
        ms = median_ms(lambda fn=fn: fn(q, k, words, indices, counts, D**-0.5,
                                        math.log(1.0 / S)), args.reps)
        label = probe or "none"
        turns = "+".join(pingpong) or "-"
        print(f"probe={label:9s} stages={stages} pingpong={turns:8s} {ms:8.3f} ms  "
              f"{ms / dense:6.3f} x dense")


def compile_variants(specs, D):
    """{name: f(q, k, words, indices, counts, scale, log_cut)} for "name=path" module copies,
    then the package's kernel as "current", all for CalibrateConfig(D, "bfloat16", 128)."""
    import cutlass
    import cutlass.cute as cute

    config = CalibrateConfig(D, "bfloat16", 128)
    kernels = {}
    for spec in specs:
        name, path = spec.split("=", 1)
        # (the configuration's own Q operand only where the module has the option)
        cls = load_variant(path).CalibrateSm90
        kernels[name] = cls(
            cutlass.BFloat16, D, config.q_tile, config.num_stages, config.probe,
            config.pingpong, config.fma_exp_every, config.lazy_max,
            **variant_options(cls, q_in_regs=config.q_in_regs))
    kernels["current"] = config.kernel()
    return {name: cute.compile(kernel, *config.fake_args(), options="--enable-tvm-ffi")
            for name, kernel in kernels.items()}


def compare(label, fns, args, fa4, reps, rounds=5):
    """Time each of `fns` on `args` and FA4 dense (`fa4()`) in interleaved rounds, each against
    FA4's median over the same rounds (a card's clocks drift under sustained load); say whether
    each one's lists (outputs poisoned first) equal the first one's."""
    k, indices, counts = args[1], args[3], args[4]
    names = list(fns)
    kept = {}
    for name, fn in fns.items():
        indices.fill_(-7)
        counts.fill_(-7)
        fn(*args)
        kept[name] = (indices.clone(), counts.clone())
    runs = {name: (lambda fn=fn: fn(*args)) for name, fn in fns.items()}
    runs["fa4_dense"] = fa4
    order = list(runs)
    times = {name: [] for name in runs}
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            times[name].append(median_ms(runs[name], reps))
    dense = sorted(times["fa4_dense"])[rounds // 2]
    print(f"FA4 dense {dense:8.3f} ms (median of the rounds)  rounds "
          + " ".join(f"{t:.3f}" for t in times["fa4_dense"]))
    base_idx, base_cnt = kept[names[0]]
    keep = base_cnt.double().mean().item() / k.shape[1]
    for name in names:
        idx, cnt = kept[name]
        # keep decisions compared as counts: a flip moves every later slot of its list
        n_diff = int((cnt != base_cnt).sum())
        same = torch.equal(idx, base_idx) and torch.equal(cnt, base_cnt)
        ms = sorted(times[name])[rounds // 2]
        print(f"{label}={name:8s} {ms:8.3f} ms  {ms / dense:6.3f} x dense  keep {keep:.3f}  "
              f"{'same lists' if same else f'lists differ ({n_diff} counts differ)'}  rounds "
              + " ".join(f"{t:.3f}" for t in times[name]))


if __name__ == "__main__":
    main()
