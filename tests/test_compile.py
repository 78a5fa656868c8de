"""The builders trace under torch.compile(fullgraph=True) with no graph break (no host sync)."""

import pytest
import torch
from brute import lists_from_mask, random_mask

import fgattn_cute as fg

B, H, SQ, SK, M = 2, 2, 100, 150, 32
T = (SQ + M - 1) // M


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)


def _mask(seed=0):
    return random_mask(torch.Generator().manual_seed(seed), B, H, T, SK, 0.3)


def _same(a, b):
    assert torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)
    assert (a.q_tile, a.seqlen_q, a.seqlen_k) == (b.q_tile, b.seqlen_q, b.seqlen_k)


def test_from_mask_compiles():
    mask = _mask()
    index = _compile(lambda m: fg.KeyIndex.from_mask(m, M, SQ))(mask)
    assert isinstance(index, fg.KeyIndex) and index.trusted
    _same(index, fg.KeyIndex.from_mask(mask, M, SQ))


def test_from_mask_with_capacity_compiles():
    mask = random_mask(torch.Generator().manual_seed(3), B, H, T, SK, 0.3, empty_and_full=False)
    assert int(mask.sum(-1).max()) <= 128
    fn = _compile(lambda m: fg.KeyIndex.from_mask(m, M, SQ, capacity=128))
    _same(fn(mask), fg.KeyIndex.from_mask(mask, M, SQ, capacity=128))


def test_from_mask_capacity_overflow_is_a_device_assert_when_compiled():
    mask = torch.ones(B, H, T, SK, dtype=torch.bool)
    fn = _compile(lambda m: fg.KeyIndex.from_mask(m, M, SQ, capacity=128))
    with pytest.raises(RuntimeError, match="capacity"):
        fn(mask)


def test_from_block_mask_compiles():
    block_mask = random_mask(torch.Generator().manual_seed(1), B, H, T, 10, 0.4)
    fn = _compile(lambda bm: fg.KeyIndex.from_block_mask(bm, M, SQ, 16, SK))
    _same(fn(block_mask), fg.KeyIndex.from_block_mask(block_mask, M, SQ, 16, SK))


def test_dense_compiles():
    fn = _compile(lambda: fg.KeyIndex.dense(B, H, SQ, SK, M, "cpu"))
    _same(fn(), fg.KeyIndex.dense(B, H, SQ, SK, M, "cpu"))


def test_to_mask_and_density_compile():
    mask = _mask()
    index = fg.KeyIndex.from_mask(mask, M, SQ)
    out_mask, d = _compile(lambda ix: (ix.to_mask(), ix.density()))(index)
    assert torch.equal(out_mask, mask)
    assert torch.equal(d, index.density())


def test_pack_unpack_compile():
    mask = _mask()
    index = fg.KeyIndex.from_mask(mask, M, SQ)
    packed = _compile(lambda ix: ix.pack())(index)
    assert torch.equal(packed.bitmap, index.pack().bitmap)
    back = _compile(lambda p: p.unpack())(packed)
    _same(back, index)
    assert back.trusted


def test_whole_pipeline_compiles():
    """mask -> index -> packed -> index -> mask in one graph."""
    mask = _mask(2)

    def pipeline(m):
        return fg.KeyIndex.from_mask(m, M, SQ).pack().unpack(capacity=SK).to_mask()

    assert torch.equal(_compile(pipeline)(mask), mask)
    assert len(lists_from_mask(mask)) == B * H * T


def test_from_mask_compiles_with_dynamic_shapes():
    fn = torch.compile(lambda m, sq: fg.KeyIndex.from_mask(m, M, sq), fullgraph=True,
                       backend="aot_eager", dynamic=True)
    for seed, (sq, sk) in enumerate([(100, 150), (130, 170), (200, 300)]):
        t = (sq + M - 1) // M
        mask = random_mask(torch.Generator().manual_seed(seed), B, H, t, sk, 0.3)
        _same(fn(mask, sq), fg.KeyIndex.from_mask(mask, M, sq))
