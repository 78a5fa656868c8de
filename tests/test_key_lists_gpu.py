"""The KeyIndex conversion kernels (fgattn_cute/kernels/key_lists_sm90.py) against the torch
paths they replace: ``KeyIndex.from_mask``, ``to_mask``, ``pack`` and
``PackedKeyIndex.unpack`` must give identical tensors with either backend. Kernel outputs are
poisoned before each launch-level run. Skipped without a Hopper GPU.
"""

import math

import pytest
import torch

import fgattn_cute as fg
from fgattn_cute.host.launch import run_keep_bits_to_lists_sm90, run_lists_to_keep_bits_sm90

pytestmark = pytest.mark.gpu

SEQLENS = [1, 7, 8, 31, 33, 300, 4097, 32760, 75600, 131072]


def _mask(seed, b, h, n_tiles, sk, keep):
    """Random rows at density `keep`, plus an empty row and a full row."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(b, h, n_tiles, sk, generator=gen, device="cuda") < keep
    mask[0, 0, 0] = False
    mask[-1, -1, -1] = True
    return mask


def _same(a, b):
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.indices, b.indices)
    assert (a.q_tile, a.seqlen_q, a.seqlen_k) == (b.q_tile, b.seqlen_q, b.seqlen_k)


@pytest.mark.parametrize("sk", SEQLENS)
@pytest.mark.parametrize("keep", [0.003, 0.3, 0.97])
def test_from_mask_and_back(sk, keep):
    mask = _mask(sk, 1, 2, 3, sk, keep)
    ref = fg.KeyIndex.from_mask(mask, q_tile=128, seqlen_q=300, backend="torch")
    got = fg.KeyIndex.from_mask(mask, q_tile=128, seqlen_q=300, backend="cute")
    _same(got, ref)
    assert torch.equal(got.to_mask(backend="cute"), mask)
    packed = got.pack(backend="cute")
    assert torch.equal(packed.bitmap, ref.pack(backend="torch").bitmap)
    _same(packed.unpack(backend="cute"), ref)


@pytest.mark.parametrize("sk", [300, 32760])
def test_tight_capacity_and_strided_mask(sk):
    full = _mask(1, 2, 3, 4, 2 * sk, 0.1)
    full[-1, -1, -1] = False  # (no full row: the capacity can be below seqlen_k)
    mask = full[..., ::2]  # not contiguous
    cap = 128 * math.ceil(int(mask.sum(-1).max()) / 128)
    assert cap < sk
    ref = fg.KeyIndex.from_mask(mask, 128, 500, capacity=cap, backend="torch")
    got = fg.KeyIndex.from_mask(mask, 128, 500, capacity=cap, backend="cute")
    assert got.capacity == cap
    _same(got, ref)
    _same(got.pack(backend="cute").unpack(capacity=cap, backend="cute"), ref)


def test_strided_counts_of_an_untrusted_index():
    ref = fg.KeyIndex.from_mask(_mask(4, 1, 2, 3, 500, 0.2), 128, 300)
    counts = torch.stack([ref.counts, ref.counts], dim=-1)[..., 0]  # stride 2
    index = fg.KeyIndex(ref.indices, counts, 128, 300, 500)
    assert torch.equal(index.to_mask(backend="cute"), ref.to_mask(backend="torch"))
    assert torch.equal(index.pack(backend="cute").bitmap, ref.pack(backend="torch").bitmap)


def test_auto_runs_the_kernels_and_compile_traces_torch(monkeypatch):
    from fgattn_cute.host import launch

    calls = []
    for name in ("run_keep_bits_to_lists_sm90", "run_lists_to_keep_bits_sm90"):
        real = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, real=real, name=name, **kw: (
            calls.append(name), real(*a, **kw))[1])
    mask = _mask(6, 1, 2, 2, 700, 0.3)
    index = fg.KeyIndex.from_mask(mask, 128, 256)
    index.pack().unpack()
    index.to_mask()
    assert sorted(set(calls)) == ["run_keep_bits_to_lists_sm90", "run_lists_to_keep_bits_sm90"]
    assert len(calls) == 4
    # While torch.compile traces, "auto" takes the torch ops (the kernels are opaque to it).
    calls.clear()
    torch._dynamo.reset()
    fn = torch.compile(lambda m: fg.KeyIndex.from_mask(m, 128, 256).pack().unpack().to_mask(),
                       fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(mask), mask)
    assert calls == []
    torch._dynamo.reset()


def test_unpack_ignores_bits_past_seqlen_k():
    sk = 300  # 37.5 bytes: the last byte's top 4 bits lie past the row
    bitmap = torch.randint(0, 256, (1, 2, 3, math.ceil(sk / 8)), dtype=torch.uint8,
                           device="cuda")
    packed = fg.PackedKeyIndex(bitmap, 128, 300, sk)
    got = packed.unpack(backend="cute")
    _same(got, packed.unpack(backend="torch"))
    assert int(got.indices.max()) < sk
    # Packing again clears those bits.
    clean = bitmap.clone()
    clean[..., -1] &= 0x0F
    assert torch.equal(got.pack(backend="cute").bitmap, clean)


def test_launch_outputs_poisoned_and_counts_past_capacity():
    sk, cap = 1001, 128  # the last byte holds one key
    mask = _mask(5, 1, 1, 6, sk, 0.5).reshape(6, sk)
    indices = torch.full((6, cap), -7, dtype=torch.int32, device="cuda")
    counts = torch.full((6,), -7, dtype=torch.int32, device="cuda")
    run_keep_bits_to_lists_sm90(mask.view(torch.uint8), sk, cap, packed=False,
                                indices=indices, counts=counts)
    # Counts are exact even past the capacity (the caller's check sees them); only the first
    # `cap` keys are written, and rows that fit get zeros after their count.
    assert torch.equal(counts, mask.sum(-1).int())
    for r in range(6):
        keys = mask[r].nonzero().squeeze(-1).int()
        n = min(len(keys), cap)
        assert torch.equal(indices[r, :n], keys[:n])
        assert (indices[r, n:] == 0).all()
    # Lists -> bits: entries past each count are ignored, every output byte is written.
    lists = torch.full((6, cap), 999, dtype=torch.int32, device="cuda")
    short = torch.tensor([0, 1, 5, 17, 128, 3], dtype=torch.int32, device="cuda")
    for r in range(6):
        lists[r, : short[r]] = torch.arange(int(short[r]), device="cuda", dtype=torch.int32) * 7
    for packed in (True, False):
        width = math.ceil(sk / 8) if packed else sk
        out = torch.full((6, width), 0xAB, dtype=torch.uint8, device="cuda")
        run_lists_to_keep_bits_sm90(lists, short, sk, packed, out=out)
        want = torch.zeros(6, sk, dtype=torch.bool, device="cuda")
        for r in range(6):
            want[r, lists[r, : short[r]].long()] = True
        if packed:
            got = ((out.unsqueeze(-1) >> torch.arange(8, device="cuda", dtype=torch.uint8)) & 1)
            got = got.reshape(6, -1)[:, :sk].bool()
            assert (out.reshape(6, -1)[:, -1] >> (sk % 8) == 0).all()  # bits past the row
        else:
            got = out.bool()
            assert ((out == 0) | (out == 1)).all()
        assert torch.equal(got, want)


def test_limits_of_the_lists_to_bits_kernel():
    mask = _mask(3, 1, 1, 2, 200, 0.5)
    index = fg.KeyIndex.from_mask(mask, 128, 200)
    long = fg.KeyIndex.dense(1, 1, 128, 131073, 128, "cuda")
    with pytest.raises(RuntimeError, match="131072"):
        long.pack(backend="cute")
    assert torch.equal(long.pack().bitmap, long.pack(backend="torch").bitmap)  # auto: torch
    # Bits -> lists has no such bound.
    _same(long.pack().unpack(backend="cute"), long)
    with pytest.raises(ValueError, match="backend"):
        index.pack(backend="cuda")


def test_unpack_in_a_cuda_graph():
    sk = 4097
    mask = _mask(9, 1, 2, 2, sk, 0.2)
    packed = fg.KeyIndex.from_mask(mask, 128, 256).pack()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        packed.unpack()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = packed.unpack()
    other = _mask(10, 1, 2, 2, sk, 0.6)
    packed.bitmap.copy_(fg.KeyIndex.from_mask(other, 128, 256).pack().bitmap)
    graph.replay()
    _same(out, fg.KeyIndex.from_mask(other, 128, 256, backend="torch"))


def test_cache_reuse_returns_the_predicted_index():
    q = torch.randn(1, 640, 2, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 700, 2, 64, device="cuda", dtype=torch.bfloat16)
    cache = fg.predict.SparsityCache(lambda q, k: fg.predict.pooled_top_p(q, k, 128, 0.8))
    first = cache.get(0, 0, q, k)
    again = cache.get(0, 1, q, k)
    assert cache.stats["reused"] == 1
    _same(again, first)
