"""The exact predictor (``fg.predict.calibrate``) as one Hopper (sm_90a) kernel.

Tile t keeps key j when max over the tile's real queries i of softmax(scale * Q K^T)[i, j] >=
threshold / seqlen_k. One CTA per (query tile, head, batch) makes two passes over all keys:

1. log-sum-exp: S = Q K^T by wgmma, tile by tile, into an online row max and row sum (base 2,
   scale folded in), exactly as the attention forward does minus P V. Each row's natural-log
   LSE stays in registers.
2. keep bits: S = Q K^T again; key j is kept when any row i has s[i, j] >= thr[i] with
   thr[i] = (log(threshold / seqlen_k) + lse[i]) / scale (the same test, rearranged so that
   each score costs one compare). A thread ORs its two rows, packs its 32 columns into one
   word, the 8 lanes sharing those columns OR their words by shuffles, and lanes 0-3 OR the
   result, in key order, into a per-CTA bitmap of all keys in shared memory (atomics: every
   consumer warp contributes to every word).

Finally the consumers turn the bitmap (seeded with the always-keep bits) into the sorted key
list: a block-wide prefix sum of the words' popcounts gives each thread its first slot, and the
slots past the count are zero-filled, which is the ``KeyIndex`` row format.

Warp specialised like the attention kernel: warp 0 of the producer warpgroup loads Q once and
streams the K tiles by TMA (twice: once per pass) through a ring of 128B-swizzled stages; the
consumer warpgroups (one per 64 query rows) do the math. Nothing S x S touches global memory:
the traffic is Q, K twice (mostly from L2) and the lists.
"""

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum

from fgattn_cute.kernels.layout import acc_rows_cols, permute_modes
from fgattn_cute.kernels.pipeline import StageRing
from fgattn_cute.kernels.softmax import OnlineSoftmax, mask_columns

LOG2_E = math.log2(math.e)
WARPGROUP = 128
TILE_N = 128
WORDS_PER_TILE = TILE_N // 32
BARRIER_CONSUMERS = 1  # named barrier over the consumer warpgroups (0 is __syncthreads)
MAX_SEQLEN_K = 1 << 17  # the shared-memory bitmap holds this many keys (16 KiB)


class CalibrateSm90:
    """Static configuration of one compiled calibrate kernel; launch through `__call__`."""

    def __init__(self, dtype, head_dim: int, q_tile: int = 128, num_stages: int = 4):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise TypeError(f"dtype must be BFloat16 or Float16, got {dtype}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        if q_tile not in (64, 128):
            raise ValueError(f"q_tile must be 64 or 128, got {q_tile}")
        self.dtype = dtype
        self.head_dim = head_dim
        self.tile_m = q_tile
        self.tile_n = TILE_N
        self.num_stages = num_stages
        self.num_mma_wg = q_tile // 64
        self.num_mma_threads = self.num_mma_wg * WARPGROUP
        self.num_mma_warps = self.num_mma_threads // 32
        self.num_threads = self.num_mma_threads + WARPGROUP
        # The producer only issues TMA: it keeps the minimum and the consumers take the rest.
        self.producer_regs, self.mma_regs = 24, 240
        self.stage_bytes = TILE_N * head_dim * dtype.width // 8
        self.q_bytes = q_tile * head_dim * dtype.width // 8
        self.max_words = MAX_SEQLEN_K // 32
        smem = self.q_bytes + num_stages * self.stage_bytes + 4 * self.max_words + 1024
        if smem > 232448:
            raise ValueError(f"{num_stages} stages need {smem} bytes of shared memory (> 227 KiB)")

    # ---------------------------------------------------------------- host side
    def _smem_layout(self, rows: int, stages: int | None = None):
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, self.dtype, self.head_dim),
            self.dtype,
        )
        shape = (rows, self.head_dim) if stages is None else (rows, self.head_dim, stages)
        order = (0, 1) if stages is None else (0, 1, 2)
        return cute.tile_to_shape(atom, shape, order=order)

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # [B, Sq, H, D]
        mK: cute.Tensor,  # [B, Sk, H, D]
        mKeepWords: cute.Tensor,  # [ceil(Sk / 32)] int32: always-keep bits, key j at bit j % 32
        mIndices: cute.Tensor,  # [B, H, n_q_tiles, capacity] int32
        mCounts: cute.Tensor,  # [B, H, n_q_tiles] int32
        softmax_scale: Float32,
        log_cut: Float32,  # log(threshold / seqlen_k); -inf keeps every key
        stream: cuda.CUstream,
    ):
        mQ, mK = [permute_modes(t, [1, 3, 2, 0]) for t in (mQ, mK)]  # (S, D, H, B)
        sQ_layout = self._smem_layout(self.tile_m)
        sK_layout = self._smem_layout(self.tile_n, self.num_stages)
        mma_qk = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            cute.nvgpu.OperandMajorMode.K,
            cute.nvgpu.OperandMajorMode.K,
            Float32,
            atom_layout_mnk=(self.num_mma_wg, 1, 1),
            tiler_mn=(64, self.tile_n),
        )
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mQ, sQ_layout, (self.tile_m, self.head_dim)
        )
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(),
            mK,
            cute.select(sK_layout, mode=[0, 1]),
            (self.tile_n, self.head_dim),
        )
        stages = self.num_stages

        @cute.struct
        class SharedStorage:
            bar_q: cute.struct.MemRange[cutlass.Int64, 1]
            bar_k: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            warp_totals: cute.struct.MemRange[Int32, self.num_mma_warps]
            bits: cute.struct.Align[cute.struct.MemRange[Uint32, self.max_words], 16]
            sQ: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024
            ]
            sK: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024
            ]

        n_q_tiles = cute.size(mCounts.shape[2])
        grid = (n_q_tiles, cute.size(mQ.shape[2]), cute.size(mQ.shape[3]))
        self.kernel(
            tma_Q,
            tma_K,
            mKeepWords,
            mIndices,
            mCounts,
            tma_atom_Q,
            tma_atom_K,
            Float32(softmax_scale * LOG2_E),
            log_cut,
            Float32(1.0) / softmax_scale,
            cute.size(mQ.shape[0]),
            cute.size(mK.shape[0]),
            sQ_layout,
            sK_layout,
            mma_qk,
            SharedStorage,
        ).launch(
            grid=grid,
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
            min_blocks_per_mp=1,
        )

    # ---------------------------------------------------------------- device side
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mKeepWords: cute.Tensor,
        mIndices: cute.Tensor,
        mCounts: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        scale_log2: Float32,
        log_cut: Float32,
        inv_scale: Float32,
        seqlen_q: Int32,
        seqlen_k: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        mma_qk: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        m_block, head, batch = cute.arch.block_idx()
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_Q)
            cpasync.prefetch_descriptor(tma_atom_K)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        bar_q = storage.bar_q.data_ptr()
        ring = StageRing(storage.bar_k.data_ptr(), self.num_stages)
        if warp_idx == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_init(bar_q, 1)
                ring.init(1, self.num_mma_warps)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sBits = storage.bits.get_tensor(cute.make_layout(self.max_words))
        sWarpTotals = storage.warp_totals.get_tensor(cute.make_layout(self.num_mma_warps))
        n_blocks = cute.ceil_div(seqlen_k, self.tile_n)

        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                self.produce(mQ, mK, sQ, sK, tma_atom_Q, tma_atom_K, bar_q, ring, n_blocks,
                             m_block, head, batch)
        else:
            cute.arch.setmaxregister_increase(self.mma_regs)
            self.consume(
                mKeepWords, mIndices[batch, head, m_block, None], mCounts, sQ, sK, sBits,
                sWarpTotals, mma_qk, bar_q, ring, n_blocks, scale_log2, log_cut, inv_scale,
                seqlen_q, seqlen_k, m_block, head, batch,
            )

    @cute.jit
    def produce(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        bar_q: cute.Pointer,
        ring: StageRing,
        n_blocks: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        """One warp: the Q tile, then every K tile twice (rows past seqlen zero-filled)."""
        gQ = cute.local_tile(mQ[None, None, head, batch], (self.tile_m, self.head_dim),
                             (m_block, 0))
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_atom_Q, 0, cute.make_layout(1),
            cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2),
        )
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(bar_q, self.q_bytes)
        cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=bar_q)

        gK = cute.local_tile(mK[None, None, head, batch], (self.tile_n, self.head_dim),
                             (None, 0))
        tKsK, tKgK = cpasync.tma_partition(
            tma_atom_K, 0, cute.make_layout(1),
            cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2),
        )
        for i in cutlass.range(2 * n_blocks, unroll=1):
            n = i
            if i >= n_blocks:
                n = i - n_blocks
            stage, phase = ring.stage_phase(i)
            ring.wait_empty(stage, phase)
            with cute.arch.elect_one():
                ring.expect_bytes(stage, self.stage_bytes)
            cute.copy(tma_atom_K, tKgK[None, n], tKsK[None, stage], tma_bar_ptr=ring.full + stage)

    @cute.jit
    def consume(
        self,
        mKeepWords: cute.Tensor,
        indices: cute.Tensor,
        mCounts: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sBits: cute.Tensor,
        sWarpTotals: cute.Tensor,
        mma_qk: cute.TiledMma,
        bar_q: cute.Pointer,
        ring: StageRing,
        n_blocks: Int32,
        scale_log2: Float32,
        log_cut: Float32,
        inv_scale: Float32,
        seqlen_q: Int32,
        seqlen_k: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        tidx = cute.arch.thread_idx()[0] - WARPGROUP
        wg = cute.arch.make_warp_uniform(tidx // WARPGROUP)
        lane = tidx % 32
        thr_qk = mma_qk.get_slice(tidx)
        wg_qk = mma_qk.get_slice(wg * WARPGROUP)
        tSrQ = wg_qk.make_fragment_A(wg_qk.partition_A(sQ))
        tSrK = wg_qk.make_fragment_B(wg_qk.partition_B(sK))
        s_shape = mma_qk.partition_shape_C((self.tile_m, self.tile_n))
        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS = acc_rows_cols(thr_qk.partition_C(cS))
        num_rows = cute.size(tScS, mode=[0])
        last_valid = seqlen_k - (n_blocks - 1) * self.tile_n

        # Seed the bitmap with the always-keep bits; pass 1 is long, so the barrier that
        # publishes them before the first atomic of pass 2 costs nothing.
        n_words = cute.ceil_div(seqlen_k, 32)
        for w in cutlass.range(tidx, n_words, self.num_mma_threads, unroll=1):
            sBits[w] = Uint32(mKeepWords[w])

        # Pass 1: each row's log-sum-exp.
        softmax = OnlineSoftmax(scale_log2, num_rows)
        thr = cute.make_rmem_tensor(num_rows, Float32)
        cute.arch.mbarrier_wait(bar_q, 0)
        self.sweep("lse", mma_qk, ring, tSrQ, tSrK, s_shape, tScS, softmax, thr, sBits,
                   n_blocks, last_valid, lane)
        softmax.finish()  # row_sum now holds the natural-log LSE
        for r in cutlass.range_constexpr(num_rows):
            # Padding rows of the last tile never keep a key.
            thr[r] = Float32.inf
            if m_block * self.tile_m + tScS[r, 0][0] < seqlen_q:
                thr[r] = (log_cut + softmax.row_sum[r]) * inv_scale
        cute.arch.barrier(barrier_id=BARRIER_CONSUMERS, number_of_threads=self.num_mma_threads)

        # Pass 2: keep bits.
        self.sweep("bits", mma_qk, ring, tSrQ, tSrK, s_shape, tScS, softmax, thr, sBits,
                   n_blocks, last_valid, lane)
        cute.arch.barrier(barrier_id=BARRIER_CONSUMERS, number_of_threads=self.num_mma_threads)

        count = self.compact(sBits, sWarpTotals, n_words, indices, tidx, lane)
        if tidx == 0:
            mCounts[batch, head, m_block] = count

    @cute.jit
    def sweep(
        self,
        mode: cutlass.Constexpr[str],
        mma_qk: cute.TiledMma,
        ring: StageRing,
        tSrQ: cute.Tensor,
        tSrK: cute.Tensor,
        s_shape: cutlass.Constexpr,
        tScS: cute.Tensor,
        softmax: OnlineSoftmax,
        thr: cute.Tensor,
        sBits: cute.Tensor,
        n_blocks: Int32,
        last_valid: Int32,
        lane: Int32,
    ):
        """One pass over every key tile: S = Q K^T, then `mode` "lse" (online softmax) or "bits"
        (keep bits into the bitmap). The next tile's wgmma is issued before the current tile's
        math, so the exponentials or compares of tile n run while the tensor cores compute
        tile n + 1."""
        first_fill = 0 if const_expr(mode == "lse") else n_blocks
        acc_S = cute.make_rmem_tensor(s_shape, Float32)
        acc_next = cute.make_rmem_tensor(s_shape, Float32)
        stage = self.issue_scores(mma_qk, ring, tSrQ, tSrK, acc_S, first_fill)
        warpgroup.wait_group(0)
        if lane == 0:
            ring.release(stage)
        for n in cutlass.range(1, n_blocks, unroll=1):
            stage = self.issue_scores(mma_qk, ring, tSrQ, tSrK, acc_next, first_fill + n)
            self.tile_math(mode, acc_S, tScS, softmax, thr, sBits, n - 1, self.tile_n, lane)
            warpgroup.wait_group(0)
            if lane == 0:
                ring.release(stage)
            acc_S.store(acc_next.load())
        self.tile_math(mode, acc_S, tScS, softmax, thr, sBits, n_blocks - 1, last_valid, lane)

    @cute.jit
    def issue_scores(self, mma_qk, ring: StageRing, tSrQ, tSrK, acc_S, i: Int32) -> Int32:
        """Wait for the i-th fill of the ring and issue S = Q K^T on it (not waited for);
        return the stage to release once the wgmma is done."""
        stage, phase = ring.stage_phase(i)
        ring.wait_full(stage, phase)
        warpgroup.fence()
        atom = cute.make_mma_atom(mma_qk.op)
        atom.set(warpgroup.Field.ACCUMULATE, False)
        for k in cutlass.range_constexpr(cute.size(tSrQ.shape[2])):
            cute.gemm(atom, acc_S, tSrQ[None, None, k], tSrK[None, None, k, stage], acc_S)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        return stage

    @cute.jit
    def tile_math(
        self,
        mode: cutlass.Constexpr[str],
        acc_S: cute.Tensor,
        tScS: cute.Tensor,
        softmax: OnlineSoftmax,
        thr: cute.Tensor,
        sBits: cute.Tensor,
        n: Int32,
        valid: Int32,
        lane: Int32,
    ):
        """The math of key tile n, whose first `valid` columns are real keys."""
        if const_expr(mode == "lse"):
            mask_columns(acc_S, tScS, valid, self.tile_n)
            softmax.step(acc_S)
        else:
            bits = self.clear_columns(self.row_hits(acc_S, thr), tScS, valid)
            self.or_into_bitmap(bits, sBits, n, lane)

    @cute.jit
    def row_hits(self, acc_S: cute.Tensor, thr: cute.Tensor) -> Uint32:
        """Bit c set where any of this thread's rows r has score >= thr[r] in its column c."""
        s_rc = acc_rows_cols(acc_S)
        bits = Uint32(0)
        for c in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
            hit = s_rc[0, c] >= thr[0]
            for r in cutlass.range_constexpr(1, cute.size(thr)):
                hit = hit | (s_rc[r, c] >= thr[r])
            bits = bits | (Uint32(hit) << c)
        return bits

    @cute.jit
    def clear_columns(self, bits: Uint32, tScS: cute.Tensor, valid: Int32) -> Uint32:
        """Drop the bits of columns at or past `valid` (keys past seqlen_k)."""
        out = bits
        if valid < self.tile_n:
            for c in cutlass.range_constexpr(cute.size(tScS, mode=[1])):
                if tScS[0, c][1] >= valid:
                    out = out & ~Uint32(1 << c)
        return out

    @cute.jit
    def or_into_bitmap(self, bits: Uint32, sBits: cute.Tensor, n: Int32, lane: Int32):
        """OR one warp's column bits of key tile n into the bitmap, in key order.

        A wgmma accumulator gives lane l the columns 8 g + 2 (l % 4) + p (g < 16, p < 2): bit
        2 g + p of its word. The 8 lanes with the same l % 4 hold the same columns for other
        rows, so three butterflies OR them. Byte w of quad q's word covers keys 32 w .. 32 w + 31
        of the tile, at positions 8 gg + 2 q + p (g = 4 w + gg): lane w < 4 assembles word w
        from the four quads and ORs it into shared memory.
        """
        for offset in (4, 8, 16):
            bits = bits | cute.arch.shuffle_sync_bfly(bits, offset)
        word = Uint32(0)
        byte_shift = (lane % 4) * 8
        for q in cutlass.range_constexpr(4):
            byte = (cute.arch.shuffle_sync(bits, q) >> byte_shift) & Uint32(0xFF)
            spread = (
                (byte & Uint32(0x3))
                | ((byte & Uint32(0xC)) << 6)
                | ((byte & Uint32(0x30)) << 12)
                | ((byte & Uint32(0xC0)) << 18)
            )
            word = word | (spread << (2 * q))
        if lane < WORDS_PER_TILE and word != Uint32(0):
            cute.arch.atomic_or(sBits.iterator + n * WORDS_PER_TILE + lane, word)

    @cute.jit
    def compact(
        self,
        sBits: cute.Tensor,
        sWarpTotals: cute.Tensor,
        n_words: Int32,
        indices: cute.Tensor,
        tidx: Int32,
        lane: Int32,
    ) -> Int32:
        """Write the set bits' key ids, ascending, to indices[0 .. count), zeros after; return
        the count. Thread t takes a contiguous run of words; its first slot is the prefix sum
        of the popcounts before it."""
        capacity = cute.size(indices)
        per_thread = cute.ceil_div(n_words, self.num_mma_threads)
        w_begin = cutlass.min(tidx * per_thread, n_words)
        w_end = cutlass.min(w_begin + per_thread, n_words)
        mine = Int32(0)
        for w in cutlass.range(w_begin, w_end, unroll=1):
            mine += Int32(cute.arch.popc(sBits[w]))

        # Inclusive scan within the warp, then across the warps through shared memory.
        incl = mine
        for offset in (1, 2, 4, 8, 16):
            up = cute.arch.shuffle_sync_up(incl, offset)
            if lane >= offset:
                incl += up
        warp = tidx // 32
        if lane == 31:
            sWarpTotals[warp] = incl
        cute.arch.barrier(barrier_id=BARRIER_CONSUMERS, number_of_threads=self.num_mma_threads)
        before = Int32(0)
        total = Int32(0)
        for i in cutlass.range_constexpr(self.num_mma_warps):
            t = sWarpTotals[i]
            total += t
            if i < warp:
                before += t

        slot = before + incl - mine
        for w in cutlass.range(w_begin, w_end, unroll=1):
            word = sBits[w]
            while word != Uint32(0):
                low = word & (~word + Uint32(1))
                if slot < capacity:
                    indices[slot] = w * 32 + Int32(cute.arch.popc(low - Uint32(1)))
                slot += 1
                word = word ^ low
        for s in cutlass.range(total + tidx, capacity, self.num_mma_threads, unroll=1):
            indices[s] = 0
        return total
