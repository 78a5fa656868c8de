"""The query side of ``fg.predict.pooled_top_p`` as one kernel: each query tile's mean, split in
three 16-bit parts.

One CTA per (query tile, head, batch), the heads fastest in the grid so that the CTAs in flight
read whole [H, D] rows of q rather than one head's slice of many rows (4-9% faster on an H200;
perf/NOTES.md, session 25; the tiles are the grid's y, so at most 65,535 of them). Each CTA
sums its tile's real queries in float32 (16-byte loads, ``row_groups`` rows at a time, then the
row groups' partial sums added in a fixed order), divides by the number of real queries, and
writes hi | mid | lo with hi + mid + lo = mean to about
2**-24 relative: the A operand of the one 16-bit GEMM against [k; k; k] that gives
float32-accurate scores (``fgattn_cute.predict.pooled._split_in_three`` is the torch version).
It replaces a float32 reduction, a division and six small elementwise kernels.
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32

VECTOR = 8  # 16-bit elements per 16-byte load


class TileMeansSplitSm90:
    """Static configuration of one compiled kernel; launch through `__call__`."""

    def __init__(self, dtype, head_dim: int, q_tile: int, num_threads: int = 128):
        if head_dim % VECTOR != 0 or num_threads % (head_dim // VECTOR) != 0:
            raise ValueError(f"head_dim {head_dim} does not tile {num_threads} threads")
        self.dtype = dtype
        self.head_dim = head_dim
        self.q_tile = q_tile
        self.num_threads = num_threads
        self.col_groups = head_dim // VECTOR  # threads across one query row
        self.row_groups = num_threads // self.col_groups  # query rows summed at once

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # [B, Sq, H, D] 16-bit
        mOut: cute.Tensor,  # [B, H, n_q_tiles, 3 D] 16-bit: hi | mid | lo
        stream: cuda.CUstream,
    ):
        @cute.struct
        class SharedStorage:
            partial: cute.struct.MemRange[Float32, self.row_groups * self.head_dim]

        n_tiles = cute.size(mOut.shape[2])
        self.kernel(mQ, mOut, SharedStorage).launch(
            grid=[cute.size(mQ.shape[2]), n_tiles, cute.size(mQ.shape[0])],
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mOut: cute.Tensor, SharedStorage: cutlass.Constexpr):
        tidx = cute.arch.thread_idx()[0]
        head, tile, batch = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sPartial = storage.partial.get_tensor(cute.make_layout((self.head_dim, self.row_groups)))

        seqlen = cute.size(mQ.shape[1])
        first = tile * self.q_tile
        rows = cutlass.min(self.q_tile, seqlen - first)
        col_group = tidx % self.col_groups
        row_group = tidx // self.col_groups

        # gQ[None, (row, col_group)]: VECTOR columns of one query row of this head. A thread
        # sums its columns over rows row_group, row_group + row_groups, ... of the tile.
        gQ = cute.zipped_divide(mQ[batch, None, head, None], (1, VECTOR))
        acc = cute.make_rmem_tensor(gQ[None, (0, 0)].shape, Float32)
        acc.fill(0.0)
        for r in cutlass.range(row_group, rows, self.row_groups, unroll=4):
            acc.store(acc.load() + gQ[None, (first + r, col_group)].load().to(Float32))
        for i in cutlass.range_constexpr(VECTOR):
            sPartial[col_group * VECTOR + i, row_group] = acc[i]
        cute.arch.barrier()

        out = mOut[batch, head, tile, None]
        for d in cutlass.range(tidx, self.head_dim, self.num_threads, unroll=1):
            total = Float32(0.0)
            for g in cutlass.range_constexpr(self.row_groups):
                total += sPartial[d, g]
            mean = total / Float32(rows)
            hi = mean.to(self.dtype)
            rest = mean - hi.to(Float32)
            mid = rest.to(self.dtype)
            lo = (rest - mid.to(Float32)).to(self.dtype)
            out[d] = hi
            out[self.head_dim + d] = mid
            out[2 * self.head_dim + d] = lo
