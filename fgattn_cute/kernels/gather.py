"""Gather engines: copy the K/V rows named by a key list into packed, 128B-swizzled smem tiles.

Both engines fill one stage of `tile_n` rows x `head_dim` columns per call, row r of the stage
holding key `indices[base + r]`, in the K-major layout that wgmma reads (8 x 64-element
swizzle atoms, 64-column chunks one after another). Slots past the list's count are padding.

- TmaRowGather: one bulk tensor copy per (row, 64-column chunk), from a TMA descriptor whose box
  is a single row. The hardware applies the 128B swizzle from the absolute shared-memory
  address, so each row may land at any 128-byte aligned offset of a 1024-byte aligned tile.
  Padding rows use coordinate -1: out of range, zero-filled, and still counted in the bytes.
- CpAsyncGather: 16 bytes per thread, 8 threads per 128-byte chunk of a row, all 128 producer
  threads; row addresses formed in 64 bits. Padding slots read row 0 (any valid row would do:
  the consumer masks them to -inf before the softmax).

Each lane loads the index of one row (a warp's 32 within 512 bytes) and hands it to the lanes
that copy that row with a warp shuffle, so no copy waits on its own global load.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Uint32, Uint64
from cutlass.cute.nvgpu import cpasync

from fgattn_cute.kernels.layout import tma_tile_partition

WARP = 32
CHUNK = 64  # elements per 128-byte row chunk for 16-bit types
# shfl.sync's c operand for 8-lane segments: a source lane is read within the caller's segment
SEGMENT_8 = ((WARP - 8) << 8) | 0x1F


class TmaRowGather:
    """Row gather with one-row TMA boxes, issued by the lanes of `num_warps` producer warps."""

    def __init__(self, tile_n: int, head_dim: int, dtype, num_warps: int = 4):
        assert tile_n % (num_warps * WARP) == 0 or tile_n == num_warps * WARP // 2
        self.tile_n = tile_n
        self.head_dim = head_dim
        self.num_chunks = head_dim // CHUNK
        self.num_warps = num_warps
        self.rows_per_warp = tile_n // num_warps
        self.stage_bytes = tile_n * head_dim * dtype.width // 8

    @staticmethod
    def make_atom(mX: cute.Tensor, swizzle):
        """TMA atom and coordinate tensor for one-row boxes of 64 columns over (S, D, H, B)."""
        row_box = cute.make_composed_layout(
            swizzle, 0, cute.make_layout((1, CHUNK), stride=(CHUNK, 1))
        )
        return cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mX, row_box, (1, CHUNK)
        )

    def partition(self, atom, gX: cute.Tensor, sX: cute.Tensor):
        """Per-(row, chunk) views: gmem coordinates (box, S, D/64) and smem
        (box, tile_n, D/64, stage). gX: (S, D) coordinates of one (head, batch);
        sX: (tile_n, D, stages) swizzled tile.
        """
        g_rows = cute.flat_divide(gX, (1, CHUNK))  # (1, 64, S, D/64)
        # Rebuild the stage tile as (1, 64, row, chunk, stage) on the swizzled pointer: row r,
        # chunk c starts at element r * 64 + c * tile_n * 64 of the stage (8 x 64 atoms, rows
        # first), which is exactly where the swizzle-by-address of the hardware expects it.
        stage_elems = self.tile_n * self.head_dim
        s_rows_layout = cute.make_layout(
            (1, CHUNK, self.tile_n, self.num_chunks, cute.size(sX, mode=[2])),
            stride=(CHUNK, 1, CHUNK, self.tile_n * CHUNK, stage_elems),
        )
        s_rows = cute.make_tensor(sX.iterator, s_rows_layout)
        s_part, g_part = tma_tile_partition(atom, s_rows, g_rows)
        return g_part, s_part

    @cute.jit
    def fetch_key(
        self, indices: cute.Tensor, first_slot: Int32, count: Int32, warp: Int32, lane: Int32
    ) -> Int32:
        """This lane's key for the stage starting at first_slot (lane l of warp w: row 32 w + l).

        Padding gets row -1: out of range for TMA, so zero-filled at no memory cost.
        """
        slot = first_slot + warp * self.rows_per_warp + lane
        key = Int32(-1)
        if lane < self.rows_per_warp and slot < count:
            key = indices[slot]
        return key

    @cute.jit
    def load_stage(
        self,
        atom: cute.CopyAtom,
        g_part: cute.Tensor,
        s_part: cute.Tensor,
        lane_key: Int32,
        stage: Int32,
        full_barrier: cute.Pointer,
        warp: Int32,
    ):
        """Issue the copies of this warp's rows of one stage onto `full_barrier`."""
        for r in cutlass.range_constexpr(self.rows_per_warp):
            key = cute.arch.shuffle_sync(lane_key, r)
            for c in cutlass.range_constexpr(self.num_chunks):
                cute.copy(
                    atom,
                    g_part[None, key, c],
                    s_part[None, warp * self.rows_per_warp + r, c, stage],
                    tma_bar_ptr=full_barrier,
                )


class CpAsyncGather:
    """Row gather with 16-byte cp.async copies from all 128 producer threads."""

    def __init__(self, tile_n: int, head_dim: int, dtype, num_threads: int = 128):
        self.tile_n = tile_n
        self.head_dim = head_dim
        self.dtype = dtype
        self.num_threads = num_threads
        self.elems_per_copy = 128 // dtype.width
        self.threads_per_chunk = CHUNK // self.elems_per_copy  # 8
        self.rows_per_pass = num_threads // self.threads_per_chunk  # 16
        self.passes = tile_n // self.rows_per_pass
        # The index hand-off below gives each warp 4 rows per pass and one index per lane.
        assert num_threads == 128 and self.threads_per_chunk == 8 and self.passes <= 8

    def tiled_copy(self) -> cute.TiledCopy:
        """(16 rows x 8 threads) of 16-byte cp.async copies; built inside the jit trace."""
        atom = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
            self.dtype,
            num_bits_per_copy=128,
        )
        thread_layout = cute.make_ordered_layout(
            (self.rows_per_pass, self.threads_per_chunk), order=(1, 0)
        )
        return cute.make_tiled_copy_tv(
            atom, thread_layout, cute.make_layout((1, self.elems_per_copy))
        )

    @cute.jit
    def fetch_key(
        self, indices: cute.Tensor, first_slot: Int32, count: Int32, warp: Int32, lane: Int32
    ) -> Int32:
        """This lane's key for the stage starting at first_slot.

        Thread t copies row 16 p + t // 8 in pass p, so lanes 8 j .. 8 j + 7 of warp w copy row
        16 p + 4 w + j: lane 8 j + p loads that row's index, and in pass p each of those lanes
        reads lane p of its own 8-lane segment (an immediate source lane, so no per-pass lane
        arithmetic). Padding reads row 0 (cp.async has no out-of-range guard; any valid row
        will do, it is masked).
        """
        row_in_tile = self.rows_per_pass * (lane % 8) + 4 * warp + lane // 8
        slot = first_slot + row_in_tile
        key = Int32(0)
        if row_in_tile < self.tile_n and slot < count:
            key = indices[slot]
        return key

    @cute.jit
    def load_stage(self, mX: cute.Tensor, sX_stage: cute.Tensor, lane_key: Int32, tidx: Int32):
        """Issue this thread's copies of one stage. mX: (S, D) of one (head, batch)."""
        tiled_copy = self.tiled_copy()
        thr_copy = tiled_copy.get_slice(tidx)
        tXsX = thr_copy.partition_D(sX_stage)  # (CPY, passes, chunks)
        tXcX = thr_copy.partition_S(cute.make_identity_tensor((self.tile_n, self.head_dim)))
        col_bytes = tXcX[0, 0, 0][1] * (self.dtype.width // 8)
        base_addr = Uint64(mX.iterator.toint()) + Uint64(col_bytes)
        # Keys are >= 0 and the launcher rejects rows 4 GiB or more apart, so the byte offset
        # is one 32 x 32 -> 64-bit unsigned multiply-add (a signed 64-bit product costs five;
        # a 64-bit product of zero-extended values still costs ptxas an extra add per row).
        row_bytes = Uint32(mX.layout.stride[0] * (self.dtype.width // 8))
        for p in cutlass.range_constexpr(self.passes):
            key = cute.arch.shuffle_sync(lane_key, p, mask_and_clamp=SEGMENT_8)
            row_addr = base_addr + cute.arch.mul_wide(Uint32(key), row_bytes)
            for c in cutlass.range_constexpr(cute.size(tXsX, mode=[2])):
                src_ptr = cute.make_ptr(
                    self.dtype,
                    row_addr + c * CHUNK * (self.dtype.width // 8),
                    cute.AddressSpace.gmem,
                    assumed_align=16,
                )
                src = cute.make_tensor(src_ptr, tXsX[None, p, c].layout)
                cute.copy(tiled_copy, src, tXsX[None, p, c])
