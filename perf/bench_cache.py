"""What a ``SparsityCache`` step costs next to the attention it serves, on video-DiT shapes.

    python perf/bench_cache.py --shapes wan480-h12,wan480-h24 --keeps 0.3,0.1 --out $OUT

At every reuse step a compact cache (the default) unpacks its bitmap into a ``KeyIndex``, and at
every predict step it packs the new index. Both run per layer and step, so they add to every
sparse attention call. Times (CUDA events, warm-up, median), on random M x 1 lists at each keep:
FA4 dense, fgattn sparse attention, ``KeyIndex.pack`` and ``PackedKeyIndex.unpack`` (and
``KeyIndex.from_mask``) for each backend asked for, and prints each as a fraction of the sparse
attention it serves. Checks that
every unpack backend gives back the lists it was packed from. Timings are never asserted.
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


def random_index(seqlen, heads, keep, q_tile, gen):
    n_tiles = -(-seqlen // q_tile)
    mask = torch.rand(1, heads, n_tiles, seqlen, generator=gen, device="cuda") < keep
    return fg.KeyIndex.from_mask(mask, q_tile=q_tile, seqlen_q=seqlen)


def time_keep(q, k, v, index, backends, reps):
    """(record fields, printed line) for one index: the sparse attention, then pack and unpack
    by each backend, with a check that the round trip gives the same lists back."""
    sparse = median_ms(lambda: fg.sparse_attention(q, k, v, index), reps)
    row = {"sparse_ms": sparse}
    line = f"sparse {sparse:.3f}"
    mask = index.to_mask()
    # The write ceiling: a memset of as many bytes as the lists (unpack writes every slot).
    lists = torch.empty_like(index.indices)
    memset = median_ms(lists.zero_, reps)
    row["memset_lists_ms"] = memset
    line += f" | memset of the lists {memset:.3f}"
    for backend in backends:
        from_mask = median_ms(lambda b=backend: fg.KeyIndex.from_mask(
            mask, index.q_tile, index.seqlen_q, capacity=index.capacity, backend=b), reps)
        row[f"from_mask_{backend}_ms"] = from_mask
        line += f" | from_mask {backend} {from_mask:.3f}"
    for backend in backends:
        packed = index.pack(backend=backend)
        back = packed.unpack(capacity=index.capacity, backend=backend)
        same = torch.equal(back.counts, index.counts) and torch.equal(back.indices, index.indices)
        pack = median_ms(lambda b=backend: index.pack(backend=b), reps)
        unpack = median_ms(lambda b=backend, bits=packed: bits.unpack(capacity=index.capacity,
                                                                        backend=b), reps)
        row.update({f"pack_{backend}_ms": pack, f"unpack_{backend}_ms": unpack,
                    f"roundtrip_{backend}_exact": same})
        line += (f" | {backend}: pack {pack:.3f} ({pack / sparse:.3f}x)"
                 f" unpack {unpack:.3f} ({unpack / sparse:.3f}x)"
                 f"{'' if same else ' ROUNDTRIP DIFFERS'}")
    return row, line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="wan480-h12,wan480-h24")
    p.add_argument("--keeps", default="0.3,0.1")
    p.add_argument("--backends", default="cute,torch", help="unpack/pack backends to time")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    meta = run_meta()
    backends = args.backends.split(",")
    records = []
    print(f"{meta['card_name']}  (ms; x = fraction of the sparse attention at that keep)")
    for shape in args.shapes.split(","):
        seqlen, heads, head_dim = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = baselines.random_qkv(seqlen, heads, head_dim, gen)
        dense = median_ms(baselines.fa4_dense(q, k, v), args.reps)
        print(f"{shape}: FA4 dense {dense:.3f}")
        for keep in (float(x) for x in args.keeps.split(",")):
            index = random_index(seqlen, heads, keep, 128, gen)
            row, line = time_keep(q, k, v, index, backends, args.reps)
            print(f"  keep {keep}: {line}", flush=True)
            records.append(dict(meta, shape=shape, seqlen=seqlen, heads=heads, keep=keep,
                                fa4_dense_ms=dense, **row))
    write_records(records, args.out, "bench-cache", meta)


if __name__ == "__main__":
    main()
