"""KeyIndex builders, views and packed form against brute-force constructions."""

import math

import pytest
import torch
from brute import (
    assert_index_matches,
    block_to_key_mask,
    density,
    lists_from_mask,
    random_mask,
)

import fgattn_cute as fg
from fgattn_cute.host import key_index as key_index_mod

# (B, H, seqlen_q, seqlen_k, q_tile): odd lengths, Sq != Sk, partial last tiles, Sk > 128.
SHAPES = [
    (1, 1, 1, 1, 64),
    (2, 3, 100, 77, 32),
    (1, 2, 129, 300, 64),
    (2, 1, 257, 129, 128),
    (1, 2, 97, 255, 48),
    (2, 2, 50, 513, 7),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tiles(seqlen_q, q_tile):
    return math.ceil(seqlen_q / q_tile)


@pytest.fixture(params=[False, True], ids=["one_chunk", "many_chunks"])
def chunked(request, monkeypatch):
    """Run each builder test both in one chunk and in many small row chunks."""
    if request.param:
        monkeypatch.setattr(key_index_mod, "_CHUNK_ELEMS", 700)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_from_mask_matches_brute_force(shape, keep, chunked):
    B, H, Sq, Sk, M = shape
    mask = random_mask(_gen(1), B, H, _tiles(Sq, M), Sk, keep)
    index = fg.KeyIndex.from_mask(mask, M, Sq)
    assert index.trusted
    assert (index.q_tile, index.seqlen_q, index.seqlen_k) == (M, Sq, Sk)
    assert (index.batch, index.heads, index.n_q_tiles) == (B, H, _tiles(Sq, M))
    assert_index_matches(index, lists_from_mask(mask), capacity=math.ceil(Sk / 128) * 128)


@pytest.mark.parametrize("capacity, expected", [(1, 128), (128, 128), (129, 256), (1000, 1024)])
def test_from_mask_capacity_rounds_up_to_128(capacity, expected):
    mask = random_mask(_gen(2), 1, 2, 3, 90, 0.5)
    index = fg.KeyIndex.from_mask(mask, 64, 150, capacity=capacity)
    assert_index_matches(index, lists_from_mask(mask), capacity=expected)


def test_from_mask_capacity_just_fits():
    mask = torch.zeros(1, 1, 2, 400, dtype=torch.bool)
    mask[0, 0, 0, :128] = True
    mask[0, 0, 1, 200:328] = True
    index = fg.KeyIndex.from_mask(mask, 64, 100, capacity=128)
    assert_index_matches(index, lists_from_mask(mask), capacity=128)


def test_from_mask_capacity_too_small_raises_on_cpu(chunked):
    mask = torch.zeros(1, 2, 3, 400, dtype=torch.bool)
    mask[0, 1, 2, :129] = True
    with pytest.raises(ValueError, match=r"capacity.*counts\[0, 1, 2\] = 129"):
        fg.KeyIndex.from_mask(mask, 64, 150, capacity=100)


def test_from_block_mask_capacity_too_small_raises():
    block_mask = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="capacity"):
        fg.KeyIndex.from_block_mask(block_mask, 64, 10, 64, 256, capacity=128)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k_block", [1, 16, 64, 128, 1000])
def test_from_block_mask_matches_brute_force(shape, k_block, chunked):
    B, H, Sq, Sk, M = shape
    n_blocks = math.ceil(Sk / k_block)
    block_mask = random_mask(_gen(3), B, H, _tiles(Sq, M), n_blocks, 0.4)
    index = fg.KeyIndex.from_block_mask(block_mask, M, Sq, k_block, Sk)
    assert index.trusted
    key_mask = block_to_key_mask(block_mask, k_block, Sk)
    assert_index_matches(index, lists_from_mask(key_mask))


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_keeps_every_key(shape):
    B, H, Sq, Sk, M = shape
    index = fg.KeyIndex.dense(B, H, Sq, Sk, M, "cpu")
    assert index.trusted
    mask = torch.ones(B, H, _tiles(Sq, M), Sk, dtype=torch.bool)
    assert_index_matches(index, lists_from_mask(mask))
    assert float(index.density()) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_from_indices_adopts_and_pads(shape, dtype):
    B, H, Sq, Sk, M = shape
    mask = random_mask(_gen(4), B, H, _tiles(Sq, M), Sk, 0.3)
    lists = lists_from_mask(mask)
    width = max(len(v) for v in lists.values()) + 3  # not a multiple of 128
    indices = torch.full((B, H, _tiles(Sq, M), width), 7, dtype=dtype)  # garbage padding
    counts = torch.zeros(B, H, _tiles(Sq, M), dtype=dtype)
    for (b, h, t), keys in lists.items():
        indices[b, h, t, : len(keys)] = torch.tensor(keys, dtype=dtype)
        counts[b, h, t] = len(keys)
    for validate in (True, False):
        index = fg.KeyIndex.from_indices(indices, counts, M, Sq, Sk, validate=validate)
        assert index.trusted
        assert_index_matches(index, lists, capacity=math.ceil(width / 128) * 128)


def test_from_indices_zero_width_gives_capacity_128():
    indices = torch.zeros(1, 1, 2, 0, dtype=torch.int64)
    counts = torch.zeros(1, 1, 2, dtype=torch.int64)
    index = fg.KeyIndex.from_indices(indices, counts, 64, 100, 50)
    assert index.capacity == 128 and int(index.counts.sum()) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_to_mask_round_trip(shape, chunked):
    B, H, Sq, Sk, M = shape
    mask = random_mask(_gen(5), B, H, _tiles(Sq, M), Sk, 0.3)
    assert torch.equal(fg.KeyIndex.from_mask(mask, M, Sq).to_mask(), mask)
    assert torch.equal(fg.KeyIndex.from_mask(mask, M, Sq, capacity=Sk).to_mask(), mask)


@pytest.mark.parametrize("shape", SHAPES)
def test_density_matches_brute_force(shape):
    B, H, Sq, Sk, M = shape
    mask = random_mask(_gen(6), B, H, _tiles(Sq, M), Sk, 0.3)
    index = fg.KeyIndex.from_mask(mask, M, Sq)
    d = index.density()
    assert d.dim() == 0 and d.dtype == torch.float32
    assert float(d) == pytest.approx(density(lists_from_mask(mask), M, Sq, Sk, B, H), rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip(shape, chunked):
    B, H, Sq, Sk, M = shape
    mask = random_mask(_gen(7), B, H, _tiles(Sq, M), Sk, 0.3)
    index = fg.KeyIndex.from_mask(mask, M, Sq)
    packed = index.pack()
    assert isinstance(packed, fg.PackedKeyIndex)
    assert packed.bitmap.dtype == torch.uint8
    assert tuple(packed.bitmap.shape) == (B, H, _tiles(Sq, M), math.ceil(Sk / 8))
    assert (packed.q_tile, packed.seqlen_q, packed.seqlen_k) == (M, Sq, Sk)
    assert packed.nbytes == B * H * _tiles(Sq, M) * math.ceil(Sk / 8)
    # bit j % 8 of byte j // 8, by loops
    bitmap, bits = packed.bitmap.tolist(), mask.tolist()
    for b in range(B):
        for h in range(H):
            for t in range(_tiles(Sq, M)):
                for j in range(Sk):
                    assert (bitmap[b][h][t][j // 8] >> (j % 8)) & 1 == bits[b][h][t][j]
    back = packed.unpack()
    assert back.trusted
    assert torch.equal(back.indices, index.indices)
    assert torch.equal(back.counts, index.counts)
    assert packed.unpack(capacity=Sk).capacity == math.ceil(Sk / 128) * 128


def test_nbytes():
    index = fg.KeyIndex.dense(2, 3, 100, 77, 32, "cpu")
    assert index.nbytes == 2 * 3 * 4 * 128 * 4 + 2 * 3 * 4 * 4


def test_unpack_capacity_too_small_raises():
    mask = torch.ones(1, 1, 1, 300, dtype=torch.bool)
    packed = fg.KeyIndex.from_mask(mask, 64, 64).pack()
    with pytest.raises(ValueError, match="capacity"):
        packed.unpack(capacity=128)


def test_untrusted_constructor_and_validate():
    index = fg.KeyIndex.dense(1, 2, 100, 77, 64, "cpu")
    plain = fg.KeyIndex(index.indices.clone(), index.counts.clone(), 64, 100, 77)
    assert not plain.trusted
    assert plain.validate() is plain and plain.trusted
    bad = fg.KeyIndex(index.indices.clone(), index.counts.clone() + 200, 64, 100, 77)
    with pytest.raises(ValueError, match=r"counts\[0, 0, 0\] = 277"):
        bad.to_mask()  # an untrusted index is validated before use
    assert not bad.trusted


def test_to_device_keeps_trust():
    index = fg.KeyIndex.dense(1, 1, 10, 10, 64, "cpu")
    assert index.to("cpu").trusted
    packed = index.pack().to("cpu")
    assert torch.equal(packed.unpack().indices, index.indices)


def test_repr_mentions_shapes():
    text = repr(fg.KeyIndex.dense(1, 2, 100, 77, 64, "cpu"))
    assert "heads=2" in text and "capacity=128" in text and "trusted=True" in text


def test_conversion_backends_on_cpu():
    """"auto" and "torch" agree on the CPU (the torch path); "cute" needs a Hopper GPU and says
    so; an unknown backend names the argument."""
    mask = random_mask(_gen(3), 1, 2, 2, 77, 0.4)
    index = fg.KeyIndex.from_mask(mask, 64, 100, backend="torch")
    auto = fg.KeyIndex.from_mask(mask, 64, 100)
    assert torch.equal(auto.indices, index.indices) and torch.equal(auto.counts, index.counts)
    packed = index.pack(backend="torch")
    assert torch.equal(index.pack().bitmap, packed.bitmap)
    assert torch.equal(index.to_mask(backend="torch"), mask)
    assert torch.equal(packed.unpack(backend="torch").indices, index.indices)
    calls = [
        lambda b: fg.KeyIndex.from_mask(mask, 64, 100, backend=b),
        lambda b: index.to_mask(backend=b),
        lambda b: index.pack(backend=b),
        lambda b: packed.unpack(backend=b),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="Hopper GPU"):
            call("cute")
        with pytest.raises(ValueError, match="backend: expected one of"):
            call("triton")


def test_conversion_launchers_check_row_widths():
    """The launch helpers refuse rows of the wrong width before any kernel runs."""
    from fgattn_cute.host.launch import run_keep_bits_to_lists_sm90, run_lists_to_keep_bits_sm90

    with pytest.raises(ValueError, match=r"bits: expected \[rows, 38\]"):
        run_keep_bits_to_lists_sm90(torch.zeros(2, 37, dtype=torch.uint8), 300, 384, True)
    with pytest.raises(ValueError, match=r"bits: expected \[rows, 300\]"):
        run_keep_bits_to_lists_sm90(torch.zeros(2, 38, dtype=torch.uint8), 300, 384, False)
    lists = torch.zeros(2, 384, dtype=torch.int32)
    counts = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"out: expected \[2, 38\]"):
        run_lists_to_keep_bits_sm90(lists, counts, 300, True, out=torch.zeros(2, 37,
                                                                            dtype=torch.uint8))
