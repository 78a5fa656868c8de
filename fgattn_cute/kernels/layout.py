"""Shared-memory tile layouts, and layout views of wgmma accumulators and smem tiles.

A Hopper wgmma accumulator fragment of a 64 x N tile has the per-thread shape
((2, 2, N / 8), MMA_M, MMA_N): mode 0 holds two adjacent columns, the row pair (r, r + 8) and
the N / 8 column groups. These helpers re-index the same registers, without moving data.
"""

import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum


def tma_tile_partition(atom: cute.CopyAtom, sX: cute.Tensor, gX: cute.Tensor):
    """(smem, gmem) views of a TMA copy of one box per CTA (no multicast): the box is the
    first two modes of sX and gX; the remaining modes index boxes (stages, tiles, rows)."""
    return cpasync.tma_partition(
        atom, 0, cute.make_layout(1), cute.group_modes(sX, 0, 2), cute.group_modes(gX, 0, 2)
    )


def swizzled_tile_layout(dtype, head_dim: int, rows: int, stages: int | None = None):
    """Shared-memory layout of a (rows, head_dim) K-major tile, or of `stages` of them, in the
    widest swizzle wgmma reads for this head dim (128B for 64 16-bit elements or more)."""
    atom = warpgroup.make_smem_layout_atom(
        sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, head_dim), dtype
    )
    shape = (rows, head_dim) if stages is None else (rows, head_dim, stages)
    order = (0, 1) if stages is None else (0, 1, 2)
    return cute.tile_to_shape(atom, shape, order=order)


def acc_rows_cols(acc: cute.Tensor) -> cute.Tensor:
    """View an accumulator as (rows, cols) of this thread: ((2, MMA_M), (2, N / 8, MMA_N))."""
    flat = cute.make_layout(acc.layout.shape)
    shape = (
        (flat.shape[0][1], flat.shape[1]),
        (flat.shape[0][0], flat.shape[0][2], flat.shape[2]),
    )
    stride = (
        (flat.stride[0][1], flat.stride[1]),
        (flat.stride[0][0], flat.stride[0][2], flat.stride[2]),
    )
    view = cute.composition(acc.layout, cute.make_layout(shape, stride=stride))
    return cute.make_tensor(acc.iterator, view)


def acc_as_operand_a(acc: cute.Tensor) -> cute.Tensor:
    """View the S accumulator as the register A operand of the next wgmma (P @ V).

    The accumulator of a 64 x N tile, ((2, 2, N / 8), M, N), is read as
    ((2, 2, 2), M, (N / 16, N)): each k-block of 16 columns takes two 8-column groups, which is
    the register layout a 64 x 16 A fragment expects for 16-bit types.
    """
    layout = acc.layout
    assert layout.shape[0][2] % 2 == 0, "tile_n must be a multiple of 16"
    split = cute.logical_divide(layout, ((None, None, 2), None, None))
    view = cute.make_layout(
        (
            (split.shape[0][0], split.shape[0][1], split.shape[0][2][0]),
            split.shape[1],
            (split.shape[0][2][1], split.shape[2]),
        ),
        stride=(
            (split.stride[0][0], split.stride[0][1], split.stride[0][2][0]),
            split.stride[1],
            (split.stride[0][2][1], split.stride[2]),
        ),
    )
    return cute.make_tensor(acc.iterator, view)


def transpose_mn(tile: cute.Tensor) -> cute.Tensor:
    """Swap the first two modes of a (possibly swizzled) shared-memory tile, keeping the rest."""
    rank = cute.rank(tile)
    shape = (tile.shape[1], tile.shape[0], *tile.shape[2:])
    order = (1, 0, *range(2, rank))
    return cute.composition(tile, cute.make_ordered_layout(shape, order=order))


def permute_modes(tensor: cute.Tensor, modes: list) -> cute.Tensor:
    """Reorder the modes of a tensor (e.g. torch's [B, S, H, D] into CuTe's (S, D, H, B))."""
    return cute.make_tensor(tensor.iterator, cute.select(tensor.layout, mode=modes))
