"""A small launch of each gather engine, of both predictors' kernels and of the KeyIndex
conversions, for compute-sanitizer (memcheck, racecheck).

    python perf/sanitize.py                      # compiles (and fills the disk cache)
    compute-sanitizer --tool memcheck python perf/sanitize.py
    compute-sanitizer --tool racecheck python perf/sanitize.py

Three query tiles with an empty list, a dense list and a random partial one, B=1, H=2, so
every code path (gather, contiguous tile, padding, empty tile, partial last tile) runs once.
Persistent CTAs (two to four for six tiles) with O in its own buffer and over Q. The
predictors: calibrate (two query tiles per CTA, the second absent for the last pair),
pooled top-p from short rows (two CTAs per SM), longer shared-memory rows and rows kept in
global memory (one CTA per row, and two persistent CTAs for six rows).
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fgattn_cute as fg  # noqa: E402

failures = []


def report(line, ok):
    print(line, "ok" if ok else "FAIL")
    if not ok:
        failures.append(line)


S, H, D = 300, 2, 128
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, S, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
           for _ in range(3))
mask = torch.rand(1, H, math.ceil(S / 128), S, generator=gen, device="cuda") < 0.4
mask[0, 0, 0] = False
mask[0, 0, 1] = True
index = fg.KeyIndex.from_mask(mask, q_tile=128, seqlen_q=S)
ref = fg.reference.sparse_attention(q, k, v, index)
for engine in ("cpasync", "tma", "hybrid"):
    out = fg.sparse_attention(q, k, v, index, engine=engine)
    torch.cuda.synchronize()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    report(f"{engine}: relative error {err:.2e}", err < 1e-2)

# Persistent CTAs, fewer than the tiles, so that CTAs take further tiles from the counter: O in
# its own buffer (2 stages) and O over Q (3 stages), and hdim 64 as shipped.
from fgattn_cute.host.compile import KernelConfig  # noqa: E402
from fgattn_cute.host.launch import run_fwd_sm90  # noqa: E402

q64, k64, v64 = (t[..., :64].contiguous() for t in (q, k, v))
ref64 = fg.reference.sparse_attention(q64, k64, v64, index)
for config, inputs, want in (
    (KernelConfig(128, "bfloat16", 128, "cpasync", 128, 2, max_ctas=2), (q, k, v), ref),
    (KernelConfig(128, "bfloat16", 128, "cpasync", 128, 3, max_ctas=2), (q, k, v), ref),
    (KernelConfig(64, "bfloat16", 128, "cpasync", 128, 3, max_ctas=4), (q64, k64, v64), ref64),
):
    out, _ = run_fwd_sm90(*inputs, index.indices, index.counts, 128, inputs[0].shape[-1] ** -0.5,
                          config=config)
    torch.cuda.synchronize()
    err = ((out.float() - want).norm() / want.norm()).item()
    report(f"persistent {config.head_dim}/{config.num_stages} stages: relative error {err:.2e}",
           err < 1e-2)

# The predictor kernels, checked against their torch paths on the same inputs.
for threshold in (1.0, 8.0):
    got = fg.predict.calibrate(q, k, 128, threshold, always_keep=[0], backend="cute")
    want = fg.predict.calibrate(q, k, 128, threshold, always_keep=[0], backend="torch")
    torch.cuda.synchronize()
    differ = (got.to_mask() != want.to_mask()).float().mean().item()
    report(f"calibrate threshold {threshold}: {differ:.1e} of keys differ", differ < 1e-3)
# 50,000 keys: a row in global memory with ~46K keys of it in shared memory and the rest in L2;
# 20,001: scores rows padded to 16 bytes (TMA stores), selected from strided rows
k_mid, k_odd, k_long = (torch.randn(1, n, H, D, generator=gen, device="cuda",
                                    dtype=torch.bfloat16) for n in (20000, 20001, 50000))
for keys in (k, k_mid, k_odd, k_long):
    got = fg.predict.pooled_top_p(q, keys, 128, 0.9, always_keep=[1], backend="cute")
    want = fg.predict.pooled_top_p(q, keys, 128, 0.9, always_keep=[1], backend="torch")
    torch.cuda.synchronize()
    differ = (got.to_mask() != want.to_mask()).float().mean().item()
    report(f"pooled_top_p Sk={keys.shape[1]}: {differ:.1e} of keys differ", differ < 1e-3)
# Heads in chunks that share one scores buffer (a logits budget of 2 heads for 3: the last
# chunk's TMA stores go into a view of part of it), against the same call in one chunk.
from fgattn_cute.predict import pooled  # noqa: E402

q3, k3 = (torch.randn(1, n, 3, D, generator=gen, device="cuda", dtype=torch.bfloat16)
          for n in (S, 20001))
whole = fg.predict.pooled_top_p(q3, k3, 128, 0.9, backend="cute")
budget = pooled._CUTE_LOGIT_BYTES
pooled._CUTE_LOGIT_BYTES = 2 * math.ceil(S / 128) * math.ceil(20001 / 4) * 16
try:
    chunked = fg.predict.pooled_top_p(q3, k3, 128, 0.9, backend="cute")
finally:
    pooled._CUTE_LOGIT_BYTES = budget
torch.cuda.synchronize()
report("pooled_top_p in chunks of 2 heads and 1 sharing a buffer: lists equal to one chunk's",
       torch.equal(whole.indices, chunked.indices) and torch.equal(whole.counts, chunked.counts))
# The streaming selection (rows longer than shared memory) with 2 persistent CTAs for 6 rows,
# against one CTA per row.
from fgattn_cute.host.compile import TopPConfig, compile_fwd  # noqa: E402
from fgattn_cute.host.launch import logit_stats  # noqa: E402

rows = torch.randn(6, 75600, generator=gen, device="cuda") * 0.3
words = torch.zeros(math.ceil(75600 / 32), dtype=torch.int32, device="cuda")
lists = []
for max_ctas in (0, 2):
    config = TopPConfig(False, row_in_smem=False, max_ctas=max_ctas)
    out = (torch.full((6, 75648), -1, dtype=torch.int32, device="cuda"),
           torch.full((6,), -1, dtype=torch.int32, device="cuda"))
    compile_fwd(config)(rows.clone(), logit_stats(rows), words, *out, 0.9)
    lists.append(out)
torch.cuda.synchronize()
same = all(torch.equal(a, b) for a, b in zip(*lists, strict=True))
report("pooled top-p selection, 2 persistent CTAs for 6 rows: same lists as one per row", same)
# Rows in shared memory whose first digit leaves more than 12 bits (probabilities spread over
# ~2**26): the keys of the first round's bin gathered, the rounds below over them.
from fgattn_cute.host.launch import run_top_p_select_sm90  # noqa: E402

probs = torch.softmax(torch.randn(6, 32760, generator=gen, device="cuda") * 3, -1)
words = torch.zeros(math.ceil(32760 / 32), dtype=torch.int32, device="cuda")
indices, counts = run_top_p_select_sm90(probs, words, 0.9, None, 32768, from_probs=True)
want = pooled.top_p_select(probs, torch.tensor(0.9, dtype=torch.float64, device="cuda"))
got = torch.zeros_like(want)
for r in range(6):
    got[r, indices[r, :counts[r]].long()] = True
report("pooled top-p selection, rows of three rounds: the torch rule's keys",
       torch.equal(got, want))
# The KeyIndex conversion kernels (from_mask and to_mask above ran them too): a round trip
# through the bitmap, with a row length that leaves the last byte partly past the row.
sk = 301
bits = torch.rand(1, H, 3, sk, generator=gen, device="cuda") < 0.3
lists = fg.KeyIndex.from_mask(bits, 128, 300, backend="cute")
back = lists.pack(backend="cute").unpack(backend="cute")
torch.cuda.synchronize()
same = torch.equal(back.indices, lists.indices) and torch.equal(back.to_mask(backend="cute"), bits)
report("KeyIndex pack / unpack round trip", same)
sys.exit(1 if failures else 0)  # a failed check fails the run
