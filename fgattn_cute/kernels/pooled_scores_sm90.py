"""The scores of ``fg.predict.pooled_top_p`` as one Hopper (sm_90a) kernel: float32-accurate dot
products of each query tile's mean with every key, from 16-bit tensor-core products.

The tile means come split in three 16-bit parts (hi | mid | lo, ``kernels/tile_means_sm90.py``)
whose sum is the float32 mean; the scores are sum over the parts of part . k, so each K tile is
multiplied by the three parts into one float32 accumulator: the products are exact and the sums
float32, with K read once (a torch GEMM needs a [k; k; k] copy to do the same in one call).

One CTA per (128 query tiles, head, batch, range of BLOCKS_PER_CTA key blocks): warp 0 loads the
three 128 x D parts of A once and streams the K tiles by TMA through a ring of 128B-swizzled
stages; two consumer warpgroups (64 query tiles each) run the wgmmas and store their float32
accumulators straight to the [B, H, n_q_tiles, Sk] scores, a thread's two adjacent columns
with one 8-byte store when the rows allow it (a warp's store then fills one 32-byte sector in
each of 8 rows; 4-byte stores, half sectors, took twice as long: perf/NOTES.md). With
``tma_store``, each warpgroup's block goes through shared memory to one TMA store instead.

Each stored score is the scaled logit RN(score x scale), and each CTA also writes, per row,
the max, the min and sum(exp(v - max)) of the values v it stored (its BLOCKS_PER_CTA x 128
keys), so that the selection (``kernels/top_p_sm90.py``) starts from the row's softmax
statistics instead of two passes over the row.
"""

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Boolean, Float32, Int32, Int64, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup

from fgattn_cute.kernels.layout import (
    acc_rows_cols,
    permute_modes,
    swizzled_tile_layout,
    tma_tile_partition,
)
from fgattn_cute.kernels.pipeline import StageRing
from fgattn_cute.kernels.softmax import finite_max

WARPGROUP = 128
PARTS = 3  # hi, mid, lo
TILE_M = 128  # query tiles (rows of A) per CTA: 64 per consumer warpgroup
TILE_N = 128  # keys per stage
BLOCKS_PER_CTA = 16  # key blocks per CTA: A is loaded once for this many
STATS = 3  # per row and CTA: max, min, sum of exp(v - max) of the scaled logits v it stored
LOG2_E = math.log2(math.e)
BARRIER_STAGING = 1  # named barriers 1 and 2: each consumer warpgroup's staging tile (0: CTA)


class PooledScoresSm90:
    """Static configuration of one compiled kernel; launch through `__call__`."""

    def __init__(self, dtype, head_dim: int, num_stages: int | None = None,
                 tma_store: bool = False):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise TypeError(f"dtype must be BFloat16 or Float16, got {dtype}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        self.dtype = dtype
        self.head_dim = head_dim
        # True: each warpgroup's 64 x 128 block goes registers -> shared memory -> one TMA
        # store, so the warps never wait to issue their stores (7-38% faster than the register
        # stores on an H200, perf/NOTES.md, sessions 17-18; the launch default where it
        # applies, host/launch.py's SCORES_TMA_STORE). Needs a row stride of a multiple of 4
        # (16 bytes), and may write a row's last 16 bytes whole, past Sk; at head dim 128 its
        # 64 KiB staging leaves room for 2 K stages, not 3 (at 64, 3 stages still fit).
        self.tma_store = tma_store
        if num_stages is None:
            num_stages = 2 if tma_store and head_dim == 128 else 3
        self.num_stages = num_stages
        self.num_mma_threads = 2 * WARPGROUP
        self.num_threads = self.num_mma_threads + WARPGROUP
        self.producer_regs, self.mma_regs = 24, 240
        self.a_bytes = PARTS * TILE_M * head_dim * dtype.width // 8
        self.stage_bytes = TILE_N * head_dim * dtype.width // 8

    @cute.jit
    def __call__(
        self,
        mA: cute.Tensor,  # [B, H, n_q_tiles, 3 D] 16-bit: hi | mid | lo of each tile's mean
        mK: cute.Tensor,  # [B, Sk, H, D] 16-bit
        mOut: cute.Tensor,  # [B, H, n_q_tiles, Sk] float32: scaled logits
        mStats: cute.Tensor,  # [B, H, n_q_tiles, ceil(Sk / 2048), STATS] float32
        scale: Float32,  # multiplies every score (rounded once) before it is stored
        stream: cuda.CUstream,
    ):
        # A as (tile, D, part, H, B); K as (S, D, H, B).
        b, h, t, _ = mA.shape
        mA = cute.make_tensor(
            mA.iterator,
            cute.make_layout(
                (t, self.head_dim, PARTS, h, b),
                stride=(mA.stride[2], 1, self.head_dim, mA.stride[1], mA.stride[0]),
            ),
        )
        mK = permute_modes(mK, [1, 3, 2, 0])
        # (the staging tile of both warpgroups, and the TMA store of one warpgroup's half;
        # without tma_store the kernel takes mOut and K's atom in their places, unused)
        sOut_layout = swizzled_tile_layout(Float32, TILE_N, TILE_M)
        out_cosize = 0
        tma_out = mOut
        tma_atom_out = None
        if const_expr(self.tma_store):
            tma_atom_out, tma_out = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileS2GOp(), permute_modes(mOut, [2, 3, 1, 0]),
                swizzled_tile_layout(Float32, TILE_N, TILE_M // 2), (TILE_M // 2, TILE_N),
            )
            out_cosize = cute.cosize(sOut_layout)
        sA_layout = swizzled_tile_layout(self.dtype, self.head_dim, TILE_M, PARTS)
        sK_layout = swizzled_tile_layout(self.dtype, self.head_dim, TILE_N, self.num_stages)
        tma_atom_A, tma_A = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mA, cute.select(sA_layout, mode=[0, 1]),
            (TILE_M, self.head_dim),
        )
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mK, cute.select(sK_layout, mode=[0, 1]),
            (TILE_N, self.head_dim),
        )
        if const_expr(not self.tma_store):
            tma_atom_out = tma_atom_K
        mma = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            cute.nvgpu.OperandMajorMode.K,
            cute.nvgpu.OperandMajorMode.K,
            Float32,
            atom_layout_mnk=(2, 1, 1),
            tiler_mn=(64, TILE_N),
        )
        stages = self.num_stages

        @cute.struct
        class SharedStorage:
            bar_a: cute.struct.MemRange[cutlass.Int64, 1]
            bar_k: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sA: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sA_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            # (empty without tma_store)
            sOut: cute.struct.Align[cute.struct.MemRange[Float32, out_cosize], 1024]

        n_blocks = cute.ceil_div(cute.size(mK.shape[0]), TILE_N)
        n_splits = cute.ceil_div(n_blocks, BLOCKS_PER_CTA)
        grid = (cute.ceil_div(cute.size(t), TILE_M), cute.size(h), cute.size(b) * n_splits)
        self.kernel(
            tma_A, tma_K, mOut, mStats, scale, tma_atom_A, tma_atom_K, n_blocks, n_splits,
            sA_layout, sK_layout, mma, SharedStorage, tma_out, tma_atom_out, sOut_layout,
        ).launch(
            grid=grid,
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
            min_blocks_per_mp=1,
        )

    @cute.kernel
    def kernel(
        self,
        mA: cute.Tensor,
        mK: cute.Tensor,
        mOut: cute.Tensor,
        mStats: cute.Tensor,
        scale: Float32,
        tma_atom_A: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        n_blocks: Int32,
        n_splits: Int32,
        sA_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        mma: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
        tma_out: cute.Tensor,
        tma_atom_out: cute.CopyAtom,
        sOut_layout: cute.ComposedLayout,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        m_block, head, z = cute.arch.block_idx()
        batch = z // n_splits
        first_block = (z % n_splits) * BLOCKS_PER_CTA
        num_local = cutlass.min(BLOCKS_PER_CTA, n_blocks - first_block)
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_A)
            cpasync.prefetch_descriptor(tma_atom_K)
            if const_expr(self.tma_store):
                cpasync.prefetch_descriptor(tma_atom_out)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        bar_a = storage.bar_a.data_ptr()
        ring = StageRing(storage.bar_k.data_ptr(), self.num_stages)
        if warp_idx == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_init(bar_a, 1)
                ring.init(1, self.num_mma_threads // 32)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        sA = storage.sA.get_tensor(sA_layout.outer, swizzle=sA_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sOut = sK  # (unused without tma_store)
        if const_expr(self.tma_store):
            sOut = storage.sOut.get_tensor(sOut_layout.outer, swizzle=sOut_layout.inner)
        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                self.produce(mA, mK, sA, sK, tma_atom_A, tma_atom_K, bar_a, ring, first_block,
                             num_local, m_block, head, batch)
        else:
            cute.arch.setmaxregister_increase(self.mma_regs)
            self.consume(mOut, mStats, scale, sA, sK, mma, bar_a, ring, first_block,
                         num_local, m_block, head, batch, z % n_splits, tma_out, tma_atom_out,
                         sOut)

    @cute.jit
    def produce(self, mA: cute.Tensor, mK: cute.Tensor, sA: cute.Tensor, sK: cute.Tensor,
                tma_atom_A: cute.CopyAtom, tma_atom_K: cute.CopyAtom, bar_a: cute.Pointer,
                ring: StageRing, first_block: Int32, num_local: Int32, m_block: Int32,
                head: Int32, batch: Int32):
        """One warp: the three parts of A (rows past the last tile zero-filled), then this
        CTA's K tiles (keys past the end zero-filled, still counted in bytes)."""
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(bar_a, self.a_bytes)
        for part in cutlass.range_constexpr(PARTS):
            gA = cute.local_tile(mA[None, None, part, head, batch], (TILE_M, self.head_dim),
                                 (m_block, 0))
            tAsA, tAgA = tma_tile_partition(tma_atom_A, sA[None, None, part], gA)
            cute.copy(tma_atom_A, tAgA, tAsA, tma_bar_ptr=bar_a)

        gK = cute.local_tile(mK[None, None, head, batch], (TILE_N, self.head_dim), (None, 0))
        tKsK, tKgK = tma_tile_partition(tma_atom_K, sK, gK)
        for i in cutlass.range(num_local, unroll=1):
            stage, phase = ring.stage_phase(i)
            ring.wait_empty(stage, phase)
            with cute.arch.elect_one():
                ring.expect_bytes(stage, self.stage_bytes)
            cute.copy(tma_atom_K, tKgK[None, first_block + i], tKsK[None, stage],
                      tma_bar_ptr=ring.full + stage)

    @cute.jit
    def consume(self, mOut: cute.Tensor, mStats: cute.Tensor, scale: Float32, sA: cute.Tensor,
                sK: cute.Tensor, mma: cute.TiledMma, bar_a: cute.Pointer, ring: StageRing,
                first_block: Int32, num_local: Int32, m_block: Int32, head: Int32,
                batch: Int32, split: Int32, tma_out: cute.Tensor, tma_atom_out: cute.CopyAtom,
                sOut: cute.Tensor):
        tidx = cute.arch.thread_idx()[0] - WARPGROUP
        wg = cute.arch.make_warp_uniform(tidx // WARPGROUP)
        lane = tidx % 32
        thr_mma = mma.get_slice(tidx)
        wg_mma = mma.get_slice(wg * WARPGROUP)
        tSrA = wg_mma.make_fragment_A(wg_mma.partition_A(sA))  # (MMA, M, K, part)
        tSrK = wg_mma.make_fragment_B(wg_mma.partition_B(sK))  # (MMA, N, K, stage)
        acc = cute.make_rmem_tensor(mma.partition_shape_C((TILE_M, TILE_N)), Float32)
        # (row, column) of each accumulator element within the CTA's tile
        tScS = acc_rows_cols(thr_mma.partition_C(cute.make_identity_tensor((TILE_M, TILE_N))))
        acc_rc = acc_rows_cols(acc)
        out = mOut[batch, head, None, None]  # (n_q_tiles, Sk)
        n_tiles = cute.size(out.shape[0])
        seqlen_k = cute.size(out.shape[1])
        # An even row stride (and an 8-byte aligned base) makes every column pair 8-byte
        # aligned; an even row length keeps the last pair inside the row.
        row_stride = Int64(out.layout.stride[0])
        pairs = ((row_stride % 2 == 0) & (seqlen_k % 2 == 0)
                 & (out.iterator.toint() % 8 == 0))
        pair = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        n_rows = cute.size(tScS, mode=[0])
        # Per row of this thread: max, min and sum of exp(v - max) over its stored columns.
        row_max = cute.make_rmem_tensor(cute.make_layout(n_rows), Float32)
        row_min = cute.make_rmem_tensor(cute.make_layout(n_rows), Float32)
        row_sum = cute.make_rmem_tensor(cute.make_layout(n_rows), Float32)
        row_max.fill(-Float32.inf)
        row_min.fill(Float32.inf)
        row_sum.fill(0.0)
        cute.arch.mbarrier_wait(bar_a, 0)
        atom = cute.make_mma_atom(mma.op)
        for i in cutlass.range(num_local, unroll=1):
            stage, phase = ring.stage_phase(i)
            ring.wait_full(stage, phase)
            warpgroup.fence()
            atom.set(warpgroup.Field.ACCUMULATE, False)
            for part in cutlass.range_constexpr(PARTS):
                for k in cutlass.range_constexpr(cute.size(tSrA.shape[2])):
                    cute.gemm(atom, acc, tSrA[None, None, k, part],
                              tSrK[None, None, k, stage], acc)
                    atom.set(warpgroup.Field.ACCUMULATE, True)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            if lane == 0:
                ring.release(stage)
            key0 = (first_block + i) * TILE_N
            # Scaled in place, so that the statistics are of exactly the stored values; only
            # the last block has keys past the row (their K rows are zero-filled).
            if key0 + TILE_N <= seqlen_k:
                self.add_block_stats(acc_rc, tScS, scale, key0, seqlen_k, row_max, row_min,
                                     row_sum, False)
            else:
                self.add_block_stats(acc_rc, tScS, scale, key0, seqlen_k, row_max, row_min,
                                     row_sum, True)
            if const_expr(self.tma_store):
                self.store_block_tma(acc, thr_mma, sOut, tma_out, tma_atom_out, tidx, wg,
                                     m_block, first_block + i, head, batch)
            else:
                self.store_block(acc_rc, tScS, out, pairs, pair, row_stride, key0, n_tiles,
                                 seqlen_k, m_block)
        if const_expr(self.tma_store):
            if tidx % WARPGROUP == 0:  # (the last store has read shared memory before exit)
                cute.arch.cp_async_bulk_wait_group(0, read=True)
        # The 4 lanes that share a row combine their statistics; the first writes them.
        stats = mStats[batch, head, None, split, None]  # (n_q_tiles, STATS)
        for r in cutlass.range_constexpr(n_rows):
            for offset in (1, 2):
                other_max = cute.arch.shuffle_sync_bfly(row_max[r], offset)
                other_sum = cute.arch.shuffle_sync_bfly(row_sum[r], offset)
                row_min[r] = cute.arch.fmin(row_min[r],
                                            cute.arch.shuffle_sync_bfly(row_min[r], offset))
                new_max = cute.arch.fmax(row_max[r], other_max)
                row_sum[r] = (row_sum[r] * self.exp_below(row_max[r], new_max)
                              + other_sum * self.exp_below(other_max, new_max))
                row_max[r] = new_max
            tile = m_block * TILE_M + tScS[r, 0][0]
            if lane % 4 == 0 and tile < n_tiles:
                stats[tile, 0] = row_max[r]
                stats[tile, 1] = row_min[r]
                stats[tile, 2] = row_sum[r]

    @cute.jit
    def store_block(self, acc_rc: cute.Tensor, tScS: cute.Tensor, out: cute.Tensor,
                    pairs: Boolean, pair: cute.Tensor, row_stride: Int64, key0: Int32,
                    n_tiles: Int32, seqlen_k: Int32, m_block: Int32):
        """Stores this thread's part of a block straight from registers (tiles past the last
        and keys past the row skipped)."""
        for r in cutlass.range_constexpr(cute.size(tScS, mode=[0])):
            tile = m_block * TILE_M + tScS[r, 0][0]
            if tile < n_tiles:
                if pairs:
                    # Columns 2j, 2j + 1 of a thread are adjacent: one 8-byte store.
                    for j in cutlass.range_constexpr(cute.size(tScS, mode=[1]) // 2):
                        key = key0 + tScS[r, 2 * j][1]
                        if key < seqlen_k:
                            pair[0] = acc_rc[r, 2 * j]
                            pair[1] = acc_rc[r, 2 * j + 1]
                            dst = cute.make_tensor(
                                cute.make_ptr(Float32, (out.iterator + (
                                    Int64(tile) * row_stride + key)).toint(),
                                    cute.AddressSpace.gmem, assumed_align=8),
                                cute.make_layout(2))
                            cute.autovec_copy(pair, dst)
                else:
                    for c in cutlass.range_constexpr(cute.size(tScS, mode=[1])):
                        key = key0 + tScS[r, c][1]
                        if key < seqlen_k:
                            out[tile, key] = acc_rc[r, c]

    @cute.jit
    def store_block_tma(self, acc: cute.Tensor, thr_mma: cute.ThrMma, sOut: cute.Tensor,
                        tma_out: cute.Tensor, tma_atom_out: cute.CopyAtom, tidx: Int32,
                        wg: Int32, m_block: Int32, n_block: Int32, head: Int32, batch: Int32):
        """This warpgroup's 64 x 128 block: registers -> its half of sOut (once the previous
        store has read it) -> one TMA store, issued by the warpgroup's first thread, which
        skips tiles past the last and keys past the row's next 16-byte boundary (keys past Sk
        before that boundary are written as zeros: the row's padding)."""
        first = tidx % WARPGROUP == 0
        barrier_id = BARRIER_STAGING + wg
        if first:
            cute.arch.cp_async_bulk_wait_group(0, read=True)
        cute.arch.barrier(barrier_id=barrier_id, number_of_threads=WARPGROUP)
        cute.autovec_copy(acc, thr_mma.partition_C(sOut))
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=barrier_id, number_of_threads=WARPGROUP)
        if first:
            box = (TILE_M // 2, TILE_N)
            gOut = cute.local_tile(tma_out[None, None, head, batch], box,
                                   (m_block * 2 + wg, n_block))
            tOsO, tOgO = tma_tile_partition(tma_atom_out, cute.local_tile(sOut, box, (wg, 0)),
                                            gOut)
            cute.copy(tma_atom_out, tOsO, tOgO)
            cute.arch.cp_async_bulk_commit_group()

    @cute.jit
    def exp_below(self, x: Float32, row_max: Float32) -> Float32:
        """exp(x - row_max) for x <= row_max (approximate: the sums only divide), and 0 when
        x is -inf (also when row_max is: no value seen yet)."""
        return cute.math.exp2((x - finite_max(row_max)) * LOG2_E, fastmath=True)

    @cute.jit
    def add_block_stats(self, acc_rc: cute.Tensor, tScS: cute.Tensor, scale: Float32,
                        key0: Int32, seqlen_k: Int32, row_max: cute.Tensor, row_min: cute.Tensor,
                        row_sum: cute.Tensor, partial: cutlass.Constexpr[bool]):
        """Scales this thread's accumulator of the block at key0 (each value rounded once)
        and adds its values to the rows' running max, min and sum of exp(v - max); with
        `partial`, only the columns before seqlen_k."""
        for r in cutlass.range_constexpr(cute.size(tScS, mode=[0])):
            block_max = row_max[r]
            block_min = row_min[r]
            for c in cutlass.range_constexpr(cute.size(tScS, mode=[1])):
                v = acc_rc[r, c] * scale
                acc_rc[r, c] = v
                if const_expr(partial):
                    if key0 + tScS[r, c][1] < seqlen_k:
                        block_max = cute.arch.fmax(block_max, v)
                        block_min = cute.arch.fmin(block_min, v)
                else:
                    block_max = cute.arch.fmax(block_max, v)
                    block_min = cute.arch.fmin(block_min, v)
            total = row_sum[r] * self.exp_below(row_max[r], block_max)
            base = finite_max(block_max)
            for c in cutlass.range_constexpr(cute.size(tScS, mode=[1])):
                e = cute.math.exp2(acc_rc[r, c] * LOG2_E - base * LOG2_E, fastmath=True)
                if const_expr(partial):
                    if key0 + tScS[r, c][1] >= seqlen_k:
                        e = Float32(0.0)
                total += e
            row_sum[r] = total
            row_max[r] = block_max
            row_min[r] = block_min
