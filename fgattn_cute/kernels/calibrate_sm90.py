"""The exact predictor (``fg.predict.calibrate``) as one Hopper (sm_90a) kernel.

Tile t keeps key j when max over the tile's real queries i of softmax(scale * Q K^T)[i, j] >=
threshold / seqlen_k. One CTA per (pair of query tiles, head, batch); each consumer warpgroup
owns one query tile (all its rows: the column test needs every row of the tile) and makes two
passes over all keys:

1. log-sum-exp: S = Q K^T by wgmma, tile by tile, into a row sum of exp2 (base 2, scale folded
   in) as the attention forward's online softmax does minus P V, but against each thread's
   row max so far, refreshed only for a tile whose sum would overflow (see lazy_max): three
   instructions per score. Each row's natural-log LSE stays in registers.
2. keep bits: S = Q K^T again; key j is kept when any row i has s[i, j] >= thr[i] with
   thr[i] = (log(threshold / seqlen_k) + lse[i]) / scale (the same test, rearranged so that
   each score costs one compare). A thread ORs its rows, packs its 32 columns into one word,
   the 8 lanes sharing those columns OR their words by shuffles, and lanes 0-3 OR the result,
   in key order, into the tile's bitmap of all keys in shared memory (atomics: the four warps
   of the warpgroup contribute to every word).

Finally the consumers turn the bitmap (seeded with the always-keep bits) into the sorted key
list: a block-wide prefix sum of the words' popcounts gives each thread its first slot, and the
slots past the count are zero-filled, which is the ``KeyIndex`` row format.

Warp specialised like the attention kernel: warp 0 of the producer warpgroup loads the two Q
tiles once and streams the K tiles by TMA (twice: once per pass) through a ring of
128B-swizzled stages that both consumer warpgroups read; each consumer warpgroup holds its Q
tile in registers (the wgmmas' A operand), so the wgmmas read only K from shared memory. Two
query tiles per K tile halve the L2 -> SM traffic, which bounded the one-tile-per-CTA version
(perf/NOTES.md). Nothing S x S touches global memory: the traffic is Q, K twice (mostly from
L2) and the lists.
"""

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import cpasync, warpgroup

from fgattn_cute.kernels.layout import (
    acc_rows_cols,
    permute_modes,
    swizzled_tile_layout,
    tma_tile_partition,
)
from fgattn_cute.kernels.pipeline import StageRing
from fgattn_cute.kernels.softmax import OnlineSoftmax, exp2_fma, mask_columns
from fgattn_cute.kernels.warp_scan import warp_inclusive_sum

LOG2_E = math.log2(math.e)
LN2 = math.log(2.0)
WARPGROUP = 128
TILE_N = 128
WORDS_PER_TILE = TILE_N // 32
TILES_PER_CTA = 2  # query tiles per CTA, one per consumer warpgroup
BARRIER_WG = 1  # named barriers 1 and 2: one per consumer warpgroup (0 is __syncthreads)
BARRIER_SCHED = 3  # and 4: the warpgroups' turns at issuing wgmmas (ping-pong)
MAX_SEQLEN_K = 1 << 17  # each tile's shared-memory bitmap holds this many keys (16 KiB)
# lazy_max: a tile's partial row sum above this (a score 64 or more, in log2 units, over the
# thread's max so far) makes the row redo that tile against its new max; far below overflow.
LAZY_SUM_LIMIT = float(2**64)


def _tree(values: list, op):
    """op-reduce a Python list of DSL scalars pairwise (depth log2(n) instead of n)."""
    while len(values) > 1:
        paired = [op(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]
        values = paired + values[len(values) - len(values) % 2:]
    return values[0]


def _bit_if_any_at_least(scores: list, cuts: list, bit: int) -> Uint32:
    """`bit` if any scores[r] >= cuts[r] (ordered: NaN never passes), else 0.

    One predicate chain (setp, then setp.or) and one select per column. From the same test
    written as Boolean ORs, ptxas emits a select after every compare (twice the
    instructions of pass 2's compares; perf/NOTES.md, calibrate step 12)."""
    n = len(scores)
    asm = ["{", ".reg .pred p;", f"setp.ge.f32 p, $1, ${n + 1};"]
    asm += [f"setp.ge.or.f32 p, ${r + 1}, ${n + r + 1}, p;" for r in range(1, n)]
    asm += [f"selp.b32 $0, {bit:#x}, 0, p;", "}"]
    return Uint32(llvm.inline_asm(
        Uint32.mlir_type,
        [Float32(x).ir_value() for x in list(scores) + list(cuts)],
        "\n".join(asm),
        "=r," + ",".join(["f"] * (2 * n)),
        has_side_effects=False,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


class CalibrateSm90:
    """Static configuration of one compiled calibrate kernel; launch through `__call__`."""

    def __init__(self, dtype, head_dim: int, q_tile: int = 128, num_stages: int = 3,
                 probe: str = "", pingpong: tuple = ("bits",), fma_exp_every: int = 0,
                 lazy_max: bool = True, q_in_regs: bool = True):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise TypeError(f"dtype must be BFloat16 or Float16, got {dtype}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        if q_tile not in (64, 128):
            raise ValueError(f"q_tile must be 64 or 128, got {q_tile}")
        # Which passes take turns at issuing (see sweep); measured per pass in perf/NOTES.md.
        self.pingpong = pingpong
        if probe not in ("", "no_exp", "one_pass"):
            raise ValueError(f"probe must be '', 'no_exp' or 'one_pass', got {probe!r}")
        # Benchmark probes (wrong results, timing only): "no_exp" drops the exponentials of
        # pass 1 (row max only), "one_pass" skips pass 1 altogether.
        self.probe = probe
        # Pass 1 computes one of every `fma_exp_every` exponentials on the FMA pipe
        # (softmax.exp2_fma) rather than MUFU (0: all on MUFU). With the row max of every
        # tile, one in 4 was 2-5% faster; with lazy_max, issue slots bind first at head dim
        # 128 and none is fastest, while at 64 (MUFU at twice the tensor time) one in 8 is
        # 4-6% faster (perf/NOTES.md, calibrate steps 10, 15 and 16; CalibrateConfig picks).
        if fma_exp_every < 0:
            raise ValueError(f"fma_exp_every must be >= 0, got {fma_exp_every}")
        self.fma_exp_every = fma_exp_every
        # Pass 1 without a row max per tile: each thread sums exp2(s - m) against its rows'
        # max so far, and only when a tile's sum comes out above LAZY_SUM_LIMIT (or inf: a
        # score far above m, or the first tile, where m = -inf) redoes that row of the tile
        # with the max updated. Saves the max's compare per score and the quad's shuffles;
        # the quad's four maxima are reconciled once, at the end. 7-8% faster at head dim
        # 128, 3% at 64 (H200).
        self.lazy_max = lazy_max
        # Q as the wgmmas' register operand (loaded from shared memory once per tile), so
        # that their shared-memory reads are K's alone: a third less per Q K^T; 1-3% faster
        # at head dim 128, 4-7% at 64 (H200, perf/NOTES.md, calibrate step 14).
        self.q_in_regs = q_in_regs
        self.dtype = dtype
        self.head_dim = head_dim
        self.tile_m = q_tile
        self.tile_n = TILE_N
        self.num_stages = num_stages
        self.num_mma_wg = TILES_PER_CTA
        self.num_mma_threads = self.num_mma_wg * WARPGROUP
        self.num_mma_warps = self.num_mma_threads // 32
        # Issuing tile n + 1's wgmma before tile n's math needs a second accumulator: room for
        # it with 64-row tiles only.
        self.overlap = q_tile == 64
        self.num_threads = self.num_mma_threads + WARPGROUP
        # The producer only issues TMA: it keeps the minimum and the consumers take the rest.
        self.producer_regs, self.mma_regs = 24, 240
        self.stage_bytes = TILE_N * head_dim * dtype.width // 8
        self.q_bytes = q_tile * head_dim * dtype.width // 8
        self.max_words = MAX_SEQLEN_K // 32
        smem = TILES_PER_CTA * (self.q_bytes + 4 * self.max_words) + num_stages * self.stage_bytes
        if smem + 1024 > 232448:
            raise ValueError(f"{num_stages} stages need {smem} bytes of shared memory (> 227 KiB)")

    # ---------------------------------------------------------------- host side
    def _smem_layout(self, rows: int, stages: int | None = None):
        return swizzled_tile_layout(self.dtype, self.head_dim, rows, stages)

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
        sQ_layout = self._smem_layout(self.tile_m, TILES_PER_CTA)
        sK_layout = self._smem_layout(self.tile_n, self.num_stages)
        # One warpgroup per query tile: its 64-row wgmma atom repeats down the tile's rows.
        mma_qk = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            cute.nvgpu.OperandMajorMode.K,
            cute.nvgpu.OperandMajorMode.K,
            Float32,
            atom_layout_mnk=(1, 1, 1),
            tiler_mn=(64, self.tile_n),
            a_source=(warpgroup.OperandSource.RMEM if self.q_in_regs
                      else warpgroup.OperandSource.SMEM),
        )
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(),
            mQ,
            cute.select(sQ_layout, mode=[0, 1]),
            (self.tile_m, self.head_dim),
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
            bits: cute.struct.Align[
                cute.struct.MemRange[Uint32, TILES_PER_CTA * self.max_words], 16
            ]
            sQ: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024
            ]
            sK: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024
            ]

        n_q_tiles = cute.size(mCounts.shape[2])
        grid = (
            cute.ceil_div(n_q_tiles, TILES_PER_CTA), cute.size(mQ.shape[2]),
            cute.size(mQ.shape[3]),
        )
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
            n_q_tiles,
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
        n_q_tiles: Int32,
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
        sBits = storage.bits.get_tensor(cute.make_layout((self.max_words, TILES_PER_CTA)))
        sWarpTotals = storage.warp_totals.get_tensor(cute.make_layout((4, TILES_PER_CTA)))
        n_blocks = cute.ceil_div(seqlen_k, self.tile_n)

        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                self.produce(mQ, mK, sQ, sK, tma_atom_Q, tma_atom_K, bar_q, ring, n_blocks,
                             m_block, head, batch)
        else:
            cute.arch.setmaxregister_increase(self.mma_regs)
            self.consume(
                mKeepWords, mIndices, mCounts, sQ, sK, sBits, sWarpTotals, mma_qk, bar_q, ring,
                n_blocks, scale_log2, log_cut, inv_scale, seqlen_q, seqlen_k, n_q_tiles,
                m_block, head, batch,
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
        """One warp: the two Q tiles, then every K tile twice (rows past the end, and the whole
        second Q tile when there is none, are zero-filled and still counted in bytes)."""
        gQ = cute.local_tile(mQ[None, None, head, batch], (self.tile_m, self.head_dim),
                             (None, 0))
        tQsQ, tQgQ = tma_tile_partition(tma_atom_Q, sQ, gQ)
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(bar_q, TILES_PER_CTA * self.q_bytes)
        for t in cutlass.range_constexpr(TILES_PER_CTA):
            cute.copy(tma_atom_Q, tQgQ[None, TILES_PER_CTA * m_block + t], tQsQ[None, t],
                      tma_bar_ptr=bar_q)

        gK = cute.local_tile(mK[None, None, head, batch], (self.tile_n, self.head_dim),
                             (None, 0))
        tKsK, tKgK = tma_tile_partition(tma_atom_K, sK, gK)
        first_fill = n_blocks if const_expr(self.probe == "one_pass") else 0
        for i in cutlass.range(first_fill, 2 * n_blocks, unroll=1):
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
        mIndices: cute.Tensor,
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
        n_q_tiles: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        """One consumer warpgroup: query tile TILES_PER_CTA * m_block + wg, all its rows."""
        wg = cute.arch.make_warp_uniform((cute.arch.thread_idx()[0] - WARPGROUP) // WARPGROUP)
        tidx = cute.arch.thread_idx()[0] % WARPGROUP  # within the warpgroup
        lane = tidx % 32
        q_tile_idx = TILES_PER_CTA * m_block + wg
        barrier_id = BARRIER_WG + wg
        thr_qk = mma_qk.get_slice(tidx)
        if const_expr(self.q_in_regs):
            tSrQ = thr_qk.make_fragment_A(thr_qk.partition_shape_A((self.tile_m, self.head_dim)))
        else:
            tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ[None, None, wg]))
        tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK))
        s_shape = mma_qk.partition_shape_C((self.tile_m, self.tile_n))
        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS = acc_rows_cols(thr_qk.partition_C(cS))
        num_rows = cute.size(tScS, mode=[0])
        last_valid = seqlen_k - (n_blocks - 1) * self.tile_n
        bits_wg = sBits[None, wg]

        # Seed the bitmap with the always-keep bits; pass 1 is long, so the barrier that
        # publishes them before the first atomic of pass 2 costs nothing.
        n_words = cute.ceil_div(seqlen_k, 32)
        for w in cutlass.range(tidx, n_words, WARPGROUP, unroll=1):
            bits_wg[w] = Uint32(mKeepWords[w])

        if const_expr(not self.overlap and len(self.pingpong) > 0):
            if wg == 0:  # warpgroup 0 issues first (see sweep)
                cute.arch.barrier_arrive(barrier_id=BARRIER_SCHED, number_of_threads=2 * WARPGROUP)

        # Pass 1: each row's log-sum-exp.
        softmax = OnlineSoftmax(scale_log2, num_rows)
        thr = cute.make_rmem_tensor(num_rows, Float32)
        cute.arch.mbarrier_wait(bar_q, 0)
        if const_expr(self.q_in_regs):
            cute.autovec_copy(thr_qk.partition_A(sQ[None, None, wg]), tSrQ)
        if const_expr(self.probe != "one_pass"):
            self.sweep("lse", mma_qk, ring, tSrQ, tSrK, s_shape, tScS, softmax, thr, bits_wg,
                       n_blocks, last_valid, lane)
        if const_expr(self.lazy_max and self.probe != "no_exp"):
            self.finish_lazy(softmax)
        else:
            softmax.finish()  # row_sum now holds the natural-log LSE
        for r in cutlass.range_constexpr(num_rows):
            # Padding rows of a partial (or absent) tile never keep a key.
            thr[r] = Float32.inf
            if q_tile_idx * self.tile_m + tScS[r, 0][0] < seqlen_q:
                thr[r] = (log_cut + softmax.row_sum[r]) * inv_scale
        cute.arch.barrier(barrier_id=barrier_id, number_of_threads=WARPGROUP)

        # Pass 2: keep bits.
        self.sweep("bits", mma_qk, ring, tSrQ, tSrK, s_shape, tScS, softmax, thr, bits_wg,
                   n_blocks, last_valid, lane)
        cute.arch.barrier(barrier_id=barrier_id, number_of_threads=WARPGROUP)

        if q_tile_idx < n_q_tiles:
            indices = mIndices[batch, head, q_tile_idx, None]
            count = self.compact(bits_wg, sWarpTotals[None, wg], n_words, indices, tidx, lane,
                                 barrier_id)
            if tidx == 0:
                mCounts[batch, head, q_tile_idx] = count

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
        (keep bits into the bitmap). With `overlap`, the next tile's wgmma is issued before the
        current tile's math, so the exponentials or compares of tile n run while the tensor
        cores compute tile n + 1; otherwise the other warpgroup's wgmmas fill that time."""
        first_fill = 0 if const_expr(mode == "lse") else n_blocks
        acc_S = cute.make_rmem_tensor(s_shape, Float32)
        # The last tile's real columns as a word, once: a column test per tile (if-converted
        # by ptxas, ~60 instructions) would be paid on every tile.
        all_keys = Uint32(0xFFFFFFFF)
        last_mask = all_keys
        if const_expr(mode == "bits"):
            last_mask = self.column_mask(tScS, last_valid)
        if const_expr(self.overlap):
            acc_next = cute.make_rmem_tensor(s_shape, Float32)
            stage = self.issue_scores(mma_qk, ring, tSrQ, tSrK, acc_S, first_fill)
            warpgroup.wait_group(0)
            if lane == 0:
                ring.release(stage)
            for n in cutlass.range(1, n_blocks, unroll=1):
                stage = self.issue_scores(mma_qk, ring, tSrQ, tSrK, acc_next, first_fill + n)
                self.tile_math(mode, acc_S, tScS, softmax, thr, sBits, n - 1, self.tile_n,
                               all_keys, lane)
                warpgroup.wait_group(0)
                if lane == 0:
                    ring.release(stage)
                acc_S.store(acc_next.load())
            self.tile_math(mode, acc_S, tScS, softmax, thr, sBits, n_blocks - 1, last_valid,
                           last_mask, lane)
        else:
            # Ping-pong: the warpgroups take turns at issuing, so one's math runs while the
            # tensor cores work through the other's wgmmas (left alone, both tend to issue
            # together and then do their math together, with the tensor cores idle).
            wg = cute.arch.make_warp_uniform((cute.arch.thread_idx()[0] - WARPGROUP) // WARPGROUP)
            for n in cutlass.range(n_blocks, unroll=1):
                if const_expr(mode in self.pingpong):
                    cute.arch.barrier(barrier_id=BARRIER_SCHED + wg,
                                      number_of_threads=2 * WARPGROUP)
                stage = self.issue_scores(mma_qk, ring, tSrQ, tSrK, acc_S, first_fill + n)
                if const_expr(mode in self.pingpong):
                    cute.arch.barrier_arrive(barrier_id=BARRIER_SCHED + 1 - wg,
                                             number_of_threads=2 * WARPGROUP)
                warpgroup.wait_group(0)
                if lane == 0:
                    ring.release(stage)
                valid = self.tile_n
                key_mask = all_keys
                if n == n_blocks - 1:
                    valid = last_valid
                    key_mask = last_mask
                self.tile_math(mode, acc_S, tScS, softmax, thr, sBits, n, valid, key_mask, lane)

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
        key_mask: Uint32,
        lane: Int32,
    ):
        """The math of key tile n, whose first `valid` columns are real keys ("lse" mode masks
        them) and whose real columns among this thread's are the set bits of key_mask (bit c
        for its column c; "bits" mode ANDs it in)."""
        if const_expr(mode == "lse"):
            mask_columns(acc_S, tScS, valid, self.tile_n)
            if const_expr(self.lazy_max and self.probe != "no_exp"):
                self.lse_step_lazy(acc_S, softmax)
            else:
                self.lse_step(acc_S, softmax)
        else:
            bits = self.row_hits(acc_S, thr) & key_mask
            self.or_into_bitmap(bits, sBits, n, lane)

    @cute.jit
    def lse_step(self, acc_S: cute.Tensor, softmax: OnlineSoftmax):
        """Fold one tile of scores into the running row max and row sum (base 2, scale folded
        in). Only the sums are needed, not the probabilities, so every reduction is a tree: one
        warp per SM sub-partition does this math while the other warpgroup's wgmmas run, and
        linear chains would leave it waiting on latencies."""
        s_rc = acc_rows_cols(acc_S)
        scale_log2 = softmax.scale_log2
        for r in cutlass.range_constexpr(cute.size(softmax.row_max)):
            vals = [s_rc[r, c] for c in range(cute.size(s_rc, mode=[1]))]
            new_max = _tree(vals + [softmax.row_max[r]], cute.arch.fmax)
            for offset in (1, 2):  # the quad shares the row
                new_max = cute.arch.fmax(new_max, cute.arch.shuffle_sync_bfly(new_max, offset))
            if const_expr(self.probe == "no_exp"):
                softmax.row_sum[r] = Float32(1.0)
            else:
                max_scaled = new_max * scale_log2
                probs = self.exps(vals, scale_log2, max_scaled, False)
                rescale = cute.math.exp2(softmax.row_max[r] * scale_log2 - max_scaled,
                                         fastmath=True)
                softmax.row_sum[r] = _tree(probs + [softmax.row_sum[r] * rescale],
                                           lambda a, b: a + b)
            softmax.row_max[r] = new_max

    @cute.jit
    def exps(self, vals: list, scale_log2: Float32, ref_scaled: Float32,
             clamp_high: cutlass.Constexpr[bool]) -> list:
        """exp2(v * scale_log2 - ref_scaled) for each v, one in `fma_exp_every` on the FMA
        pipe."""
        every = self.fma_exp_every
        return [exp2_fma(v * scale_log2 - ref_scaled, clamp_high)
                if every > 0 and c % every == every - 1
                else cute.math.exp2(v * scale_log2 - ref_scaled, fastmath=True)
                for c, v in enumerate(vals)]

    @cute.jit
    def lse_step_lazy(self, acc_S: cute.Tensor, softmax: OnlineSoftmax):
        """lse_step without the per-tile row max (see lazy_max): three instructions per score
        (scale, exp, add) instead of four, no shuffles, and the max only where it moved."""
        s_rc = acc_rows_cols(acc_S)
        scale_log2 = softmax.scale_log2
        num_rows = cute.size(softmax.row_max)
        n_cols = cute.size(s_rc, mode=[1])
        # Every row's sum first, one branch after: no branch between the rows' exponentials.
        tile_sums = [
            _tree(self.exps([s_rc[r, c] for c in range(n_cols)], scale_log2,
                            softmax.row_max[r] * scale_log2, True), lambda a, b: a + b)
            for r in range(num_rows)
        ]
        fits = _tree([t <= LAZY_SUM_LIMIT for t in tile_sums], lambda a, b: a & b)  # NaN: no
        if fits:
            for r in cutlass.range_constexpr(num_rows):
                softmax.row_sum[r] = softmax.row_sum[r] + tile_sums[r]
        else:
            self.lse_rows_redo(s_rc, softmax, tile_sums)

    @cute.jit
    def lse_rows_redo(self, s_rc: cute.Tensor, softmax: OnlineSoftmax, tile_sums: list):
        """lse_step_lazy's slow path: rows whose sum does not fit take the tile again against
        their updated max; the others add their sum."""
        scale_log2 = softmax.scale_log2
        for r in cutlass.range_constexpr(cute.size(softmax.row_max)):
            vals = [s_rc[r, c] for c in range(cute.size(s_rc, mode=[1]))]
            ref_scaled = softmax.row_max[r] * scale_log2
            if tile_sums[r] <= LAZY_SUM_LIMIT:
                softmax.row_sum[r] = softmax.row_sum[r] + tile_sums[r]
            else:
                new_max = _tree(vals + [softmax.row_max[r]], cute.arch.fmax)
                # A thread whose columns so far are all padding keeps max -inf and sum 0
                # (a finite stand-in reference: no -inf - -inf).
                max_scaled = Float32(0.0)
                if new_max != -Float32.inf:
                    max_scaled = new_max * scale_log2
                rescale = cute.math.exp2(ref_scaled - max_scaled, fastmath=True)
                softmax.row_sum[r] = _tree(self.exps(vals, scale_log2, max_scaled, False)
                                           + [softmax.row_sum[r] * rescale],
                                           lambda a, b: a + b)
                softmax.row_max[r] = new_max

    @cute.jit
    def finish_lazy(self, softmax: OnlineSoftmax):
        """The quad's partial sums, each against its own max, into each row's natural-log
        LSE in row_sum (as OnlineSoftmax.finish leaves it)."""
        for r in cutlass.range_constexpr(cute.size(softmax.row_max)):
            m = softmax.row_max[r]
            for offset in (1, 2):
                m = cute.arch.fmax(m, cute.arch.shuffle_sync_bfly(m, offset))
            part = softmax.row_sum[r] * cute.math.exp2(
                (softmax.row_max[r] - m) * softmax.scale_log2, fastmath=True)
            if softmax.row_sum[r] == 0.0:
                part = Float32(0.0)  # a thread whose columns were all padding (m = -inf)
            total = cute.arch.warp_reduction_sum(part, threads_in_group=4)
            lse = (m * softmax.scale_log2 + cute.math.log2(total, fastmath=True)) * LN2
            softmax.row_sum[r] = -Float32.inf if total == 0.0 or total != total else lse

    @cute.jit
    def row_hits(self, acc_S: cute.Tensor, thr: cute.Tensor) -> Uint32:
        """Bit c set where any of this thread's rows r has score >= thr[r] in its column c
        (the column words OR-ed as a tree, for the same reason as in lse_step)."""
        s_rc = acc_rows_cols(acc_S)
        num_rows = cute.size(thr)
        cuts = [thr[r] for r in range(num_rows)]
        words = [
            _bit_if_any_at_least([s_rc[r, c] for r in range(num_rows)], cuts, 1 << c)
            for c in range(cute.size(s_rc, mode=[1]))
        ]
        return _tree(words, lambda a, b: a | b)

    @cute.jit
    def column_mask(self, tScS: cute.Tensor, valid: Int32) -> Uint32:
        """Bit c set where this thread's column c is a real key (below `valid`)."""
        mask = Uint32(0)
        for c in cutlass.range_constexpr(cute.size(tScS, mode=[1])):
            if tScS[0, c][1] < valid:
                mask = mask | Uint32(1 << c)
        return mask

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
        barrier_id: Int32,
    ) -> Int32:
        """Write the set bits' key ids, ascending, to indices[0 .. count), zeros after; return
        the count. Warp w of the warpgroup takes a contiguous run of words and writes them one
        word at a time, lane l the key of bit l, so each store of the warp is one coalesced
        run of slots (thread-serial bits with scattered stores cost 6% of the kernel at keep 1);
        its first slot is the sum of the popcounts of the warps before it."""
        capacity = cute.size(indices)
        warp = tidx // 32
        per_warp = cute.ceil_div(n_words, WARPGROUP // 32)
        w_begin = cutlass.min(warp * per_warp, n_words)
        w_end = cutlass.min(w_begin + per_warp, n_words)
        mine = Int32(0)
        for w in cutlass.range(w_begin + lane, w_end, 32, unroll=1):
            mine += Int32(cute.arch.popc(sBits[w]))
        warp_total = cute.arch.warp_reduction_sum(mine)
        if lane == 0:
            sWarpTotals[warp] = warp_total
        cute.arch.barrier(barrier_id=barrier_id, number_of_threads=WARPGROUP)
        slot = Int32(0)
        total = Int32(0)
        for i in cutlass.range_constexpr(WARPGROUP // 32):
            t = sWarpTotals[i]
            total += t
            if i < warp:
                slot += t

        # 32 words at a time: lane l loads word l of the batch and the warp scans the
        # popcounts, so an empty batch costs one load and a scan; then word j of the batch
        # (broadcast by shuffles) is written by the lanes whose bit is set, at consecutive slots.
        lower_lanes = (Uint32(1) << Uint32(lane)) - Uint32(1)
        for b in cutlass.range(w_begin, w_end, 32, unroll=1):
            my_word = Uint32(0)
            if b + lane < w_end:
                my_word = sBits[b + lane]
            count = Int32(cute.arch.popc(my_word))
            incl = warp_inclusive_sum(count, lane)
            batch_total = cute.arch.shuffle_sync(incl, 31)
            if batch_total != 0:
                excl = incl - count
                for j in cutlass.range(32, unroll=4):
                    word = cute.arch.shuffle_sync(my_word, j)
                    s = slot + cute.arch.shuffle_sync(excl, j) + Int32(
                        cute.arch.popc(word & lower_lanes))
                    if ((word >> Uint32(lane)) & Uint32(1)) != Uint32(0) and s < capacity:
                        indices[s] = (b + j) * 32 + lane
            slot += batch_total
        for s in cutlass.range(total + tidx, capacity, WARPGROUP, unroll=1):
            indices[s] = 0
        return total
