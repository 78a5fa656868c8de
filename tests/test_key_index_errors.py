"""Every error path of the KeyIndex constructor, builders and PackedKeyIndex: the exception type,
and a message that starts with the argument's name."""

import pytest
import torch

import fgattn_cute as fg


def _lists(B=1, H=2, T=2, cap=128, dtype=torch.int32):
    return torch.zeros(B, H, T, cap, dtype=dtype), torch.zeros(B, H, T, dtype=dtype)


# ------------------------------------------------------------------------- constructor


@pytest.mark.parametrize("name, value, exc", [
    ("q_tile", 0, ValueError),
    ("q_tile", -64, ValueError),
    ("q_tile", 64.0, TypeError),
    ("q_tile", True, TypeError),
    ("q_tile", torch.tensor(64), TypeError),
    ("seqlen_q", 0, ValueError),
    ("seqlen_k", 0, ValueError),
    ("seqlen_k", "77", TypeError),
])
def test_constructor_bad_ints(name, value, exc):
    indices, counts = _lists()
    args = dict(q_tile=64, seqlen_q=100, seqlen_k=77)
    args[name] = value
    with pytest.raises(exc, match=rf"^{name}: expected"):
        fg.KeyIndex(indices, counts, **args)


def test_constructor_indices_not_tensor():
    _, counts = _lists()
    with pytest.raises(TypeError, match=r"^indices: expected a torch.Tensor"):
        fg.KeyIndex([[0]], counts, 64, 100, 77)


def test_constructor_counts_not_tensor():
    indices, _ = _lists()
    with pytest.raises(TypeError, match=r"^counts: expected a torch.Tensor"):
        fg.KeyIndex(indices, [0, 0], 64, 100, 77)


@pytest.mark.parametrize("field", ["indices", "counts"])
def test_constructor_dtype(field):
    indices, counts = _lists()
    args = {"indices": indices, "counts": counts}
    args[field] = args[field].long()
    with pytest.raises(TypeError, match=rf"^{field}: expected dtype torch.int32, got torch.int64"):
        fg.KeyIndex(args["indices"], args["counts"], 64, 100, 77)


def test_constructor_indices_ndim():
    indices, counts = _lists()
    with pytest.raises(ValueError, match=r"^indices: expected a 4-D tensor"):
        fg.KeyIndex(indices[0], counts, 64, 100, 77)


def test_constructor_counts_ndim():
    indices, counts = _lists()
    with pytest.raises(ValueError, match=r"^counts: expected a 3-D tensor"):
        fg.KeyIndex(indices, counts[0], 64, 100, 77)


def test_constructor_n_q_tiles():
    indices, counts = _lists(T=3)
    with pytest.raises(ValueError, match=r"^indices: expected n_q_tiles = .* = 2 in dim 2"):
        fg.KeyIndex(indices, counts, 64, 100, 77)


@pytest.mark.parametrize("cap", [100, 129])
def test_constructor_capacity(cap):
    indices, counts = _lists(cap=cap)
    with pytest.raises(ValueError, match=rf"^indices: expected capacity .* got {cap}"):
        fg.KeyIndex(indices, counts, 64, 100, 77)


def test_constructor_counts_shape():
    indices, _ = _lists()
    with pytest.raises(ValueError, match=r"^counts: expected shape \(1, 2, 2\)"):
        fg.KeyIndex(indices, torch.zeros(1, 1, 2, dtype=torch.int32), 64, 100, 77)


def test_constructor_device_mismatch():
    indices, counts = _lists()
    with pytest.raises(ValueError, match=r"^counts: expected the device of indices"):
        fg.KeyIndex(indices, counts.to("meta"), 64, 100, 77)


def test_constructor_is_untrusted_and_validate_names_first_bad_slot():
    indices, counts = _lists()
    counts[0, 1, 1] = 3
    indices[0, 1, 1, :3] = torch.tensor([4, 9, 9])
    index = fg.KeyIndex(indices, counts, 64, 100, 77)
    assert not index.trusted
    with pytest.raises(ValueError, match=r"^indices: .*strictly ascending.*indices\[0, 1, 1, 1\]"
                       r" = 9 followed by indices\[0, 1, 1, 2\] = 9"):
        index.validate()
    assert not index.trusted


# ------------------------------------------------------------------------- from_mask


def test_from_mask_not_bool():
    with pytest.raises(TypeError, match=r"^mask: expected dtype torch.bool, got torch.uint8"):
        fg.KeyIndex.from_mask(torch.ones(1, 1, 2, 10, dtype=torch.uint8), 64, 100)


def test_from_mask_not_tensor():
    with pytest.raises(TypeError, match=r"^mask: expected a torch.Tensor"):
        fg.KeyIndex.from_mask([[True]], 64, 100)


def test_from_mask_ndim():
    with pytest.raises(ValueError, match=r"^mask: expected a 4-D tensor"):
        fg.KeyIndex.from_mask(torch.ones(2, 10, dtype=torch.bool), 64, 100)


def test_from_mask_n_q_tiles():
    with pytest.raises(ValueError, match=r"^mask: expected n_q_tiles = .* = 2 in dim 2, got shape"):
        fg.KeyIndex.from_mask(torch.ones(1, 1, 3, 10, dtype=torch.bool), 64, 100)


def test_from_mask_empty_keys():
    with pytest.raises(ValueError, match=r"^mask: expected seqlen_k \(dim 3\) >= 1"):
        fg.KeyIndex.from_mask(torch.ones(1, 1, 2, 0, dtype=torch.bool), 64, 100)


@pytest.mark.parametrize("capacity, exc", [(0, ValueError), (-5, ValueError),
                                           (1.5, TypeError), (True, TypeError)])
def test_from_mask_bad_capacity(capacity, exc):
    with pytest.raises(exc, match=r"^capacity: expected"):
        fg.KeyIndex.from_mask(torch.ones(1, 1, 2, 10, dtype=torch.bool), 64, 100, capacity)


def test_from_mask_bad_q_tile():
    with pytest.raises(ValueError, match=r"^q_tile: expected an int >= 1, got 0"):
        fg.KeyIndex.from_mask(torch.ones(1, 1, 2, 10, dtype=torch.bool), 0, 100)


# ------------------------------------------------------------------------- from_block_mask


def test_from_block_mask_not_bool():
    with pytest.raises(TypeError, match=r"^block_mask: expected dtype torch.bool"):
        fg.KeyIndex.from_block_mask(torch.ones(1, 1, 2, 2), 64, 100, 64, 100)


def test_from_block_mask_ndim():
    with pytest.raises(ValueError, match=r"^block_mask: expected a 4-D tensor"):
        fg.KeyIndex.from_block_mask(torch.ones(1, 2, 2, dtype=torch.bool), 64, 100, 64, 100)


def test_from_block_mask_n_blocks():
    with pytest.raises(ValueError, match=r"^block_mask: expected ceil\(seqlen_k / k_block\) = "
                       r"ceil\(100 / 64\) = 2 blocks in dim 3"):
        fg.KeyIndex.from_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), 64, 100, 64, 100)


def test_from_block_mask_n_q_tiles():
    with pytest.raises(ValueError, match=r"^block_mask: expected n_q_tiles"):
        fg.KeyIndex.from_block_mask(torch.ones(1, 1, 1, 2, dtype=torch.bool), 64, 100, 64, 100)


@pytest.mark.parametrize("name", ["k_block", "seqlen_k"])
def test_from_block_mask_bad_ints(name):
    args = dict(k_block=64, seqlen_k=100)
    args[name] = 0
    with pytest.raises(ValueError, match=rf"^{name}: expected an int >= 1"):
        fg.KeyIndex.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, 100, **args)


# ------------------------------------------------------------------------- from_indices


@pytest.mark.parametrize("field", ["indices", "counts"])
def test_from_indices_float_dtype(field):
    indices, counts = _lists()
    args = {"indices": indices, "counts": counts}
    args[field] = args[field].float()
    with pytest.raises(TypeError, match=rf"^{field}: expected an integer dtype, got torch.float32"):
        fg.KeyIndex.from_indices(args["indices"], args["counts"], 64, 100, 77)


def test_from_indices_not_tensor():
    _, counts = _lists()
    with pytest.raises(TypeError, match=r"^indices: expected a torch.Tensor"):
        fg.KeyIndex.from_indices([[[[0]]]], counts, 64, 100, 77)


def test_from_indices_counts_shape():
    indices, _ = _lists()
    with pytest.raises(ValueError, match=r"^counts: expected shape \(1, 2, 2\)"):
        fg.KeyIndex.from_indices(indices, torch.zeros(2, 2, 2, dtype=torch.int32), 64, 100, 77)


def test_from_indices_n_q_tiles():
    indices, counts = _lists(T=1)
    with pytest.raises(ValueError, match=r"^indices: expected n_q_tiles"):
        fg.KeyIndex.from_indices(indices, counts, 64, 100, 77)


def test_from_indices_device_mismatch():
    indices, counts = _lists()
    with pytest.raises(ValueError, match=r"^counts: expected the device of indices"):
        fg.KeyIndex.from_indices(indices, counts.to("meta"), 64, 100, 77)


@pytest.mark.parametrize("count", [11, -1])
def test_from_indices_counts_out_of_range(count):
    indices, counts = _lists(cap=10, dtype=torch.int64)
    counts[0, 1, 0] = count
    with pytest.raises(ValueError, match=rf"^counts: expected every count in \[0, capacity=10\], "
                       rf"got counts\[0, 1, 0\] = {count}"):
        fg.KeyIndex.from_indices(indices, counts, 64, 100, 77)


@pytest.mark.parametrize("value", [77, -3, 2**40])
def test_from_indices_entry_out_of_range(value):
    indices, counts = _lists(cap=10, dtype=torch.int64)
    counts[0, 0, 1] = 3
    indices[0, 0, 1, :3] = torch.tensor([1, 2, value])
    with pytest.raises(ValueError, match=rf"^indices: expected .* \[0, seqlen_k=77\), got "
                       rf"indices\[0, 0, 1, 2\] = {value}"):
        fg.KeyIndex.from_indices(indices, counts, 64, 100, 77)


@pytest.mark.parametrize("row", [[5, 3], [5, 5]], ids=["unsorted", "duplicate"])
def test_from_indices_not_strictly_ascending(row):
    indices, counts = _lists(cap=10, dtype=torch.int16)
    counts[0, 1, 1] = 2
    indices[0, 1, 1, :2] = torch.tensor(row)
    with pytest.raises(ValueError, match=r"^indices: expected each row's valid entries strictly "
                       r"ascending .*indices\[0, 1, 1, 0\] = 5 followed by indices\[0, 1, 1, 1\]"):
        fg.KeyIndex.from_indices(indices, counts, 64, 100, 77)


def test_from_indices_validate_false_skips_content_checks():
    indices, counts = _lists(cap=10, dtype=torch.int64)
    counts[0, 1, 1] = 2
    indices[0, 1, 1, :2] = torch.tensor([5, 3])
    index = fg.KeyIndex.from_indices(indices, counts, 64, 100, 77, validate=False)
    assert index.trusted  # the caller vouched for it


# ------------------------------------------------------------------------- dense, packed


def test_dense_bad_sizes():
    with pytest.raises(ValueError, match=r"^H: expected an int >= 1, got 0"):
        fg.KeyIndex.dense(1, 0, 10, 10, 64, "cpu")


def test_packed_dtype():
    with pytest.raises(TypeError, match=r"^bitmap: expected dtype torch.uint8"):
        fg.PackedKeyIndex(torch.zeros(1, 1, 2, 10, dtype=torch.int32), 64, 100, 77)


def test_packed_shape():
    with pytest.raises(ValueError, match=r"^bitmap: expected \[B, H, ceil\(seqlen_q / q_tile\), "
                       r"ceil\(seqlen_k / 8\)\] = \[B, H, 2, 10\]"):
        fg.PackedKeyIndex(torch.zeros(1, 1, 2, 9, dtype=torch.uint8), 64, 100, 77)


def test_packed_ndim():
    with pytest.raises(ValueError, match=r"^bitmap: expected a 4-D tensor"):
        fg.PackedKeyIndex(torch.zeros(2, 10, dtype=torch.uint8), 64, 100, 77)


def test_unpack_bad_capacity():
    packed = fg.KeyIndex.dense(1, 1, 10, 10, 64, "cpu").pack()
    with pytest.raises(ValueError, match=r"^capacity: expected an int >= 1"):
        packed.unpack(capacity=0)
