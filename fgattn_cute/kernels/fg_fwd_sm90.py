"""Fine-grained (M x 1) sparse attention forward for Hopper (sm_90a).

One CTA per (query tile, head, batch). Warp specialised, FlashAttention-3 style:

- warpgroup 0, the producer (registers given back with setmaxnreg): loads the Q tile by TMA
  once, then for every group of `tile_n` kept keys gathers those K rows, then the same V rows,
  into the next stage of a ring of 128B-swizzled smem tiles (one mbarrier ring for K, one for V).
- warpgroups 1.. (one per 64 query rows), the consumers: S = Q K^T by wgmma from smem, padding
  slots of the last stage masked to -inf, online softmax in registers (exp2, scale folded in),
  P converted to 16 bits and fed from registers to wgmma O += P V; then O / rowsum goes to
  smem (over Q) and out by one TMA store, and the LSE straight to global memory.

A query tile whose list is empty writes O = 0 and LSE = -inf.
"""

import math
from typing import Literal

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.utils import LayoutEnum

from fgattn_cute.kernels.gather import CpAsyncGather, TmaRowGather
from fgattn_cute.kernels.layout import (
    acc_as_operand_a,
    acc_rows_cols,
    permute_modes,
    transpose_mn,
)
from fgattn_cute.kernels.pipeline import StageRing
from fgattn_cute.kernels.softmax import OnlineSoftmax, scale_rows

LOG2_E = math.log2(math.e)
WARPGROUP = 128
# Named hardware barriers (0 is __syncthreads).
BARRIER_EPILOGUE = 1

Engine = Literal["tma", "cpasync"]


class FgAttentionForwardSm90:
    """Static configuration of one compiled kernel; launch through `__call__`."""

    def __init__(
        self,
        dtype,
        head_dim: int,
        q_tile: int = 128,
        tile_n: int = 128,
        num_stages: int = 2,
        engine: Engine = "cpasync",
    ):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise TypeError(f"dtype must be BFloat16 or Float16, got {dtype}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        if q_tile not in (64, 128):
            raise ValueError(f"q_tile must be 64 or 128, got {q_tile}")
        if tile_n not in (64, 128):
            raise ValueError(f"tile_n must be 64 or 128, got {tile_n}")
        if engine not in ("tma", "cpasync"):
            raise ValueError(f"engine must be 'tma' or 'cpasync', got {engine!r}")
        self.dtype = dtype
        self.head_dim = head_dim
        self.tile_m = q_tile
        self.tile_n = tile_n
        self.num_stages = num_stages
        self.engine = engine
        self.num_mma_wg = q_tile // 64
        self.num_mma_threads = self.num_mma_wg * WARPGROUP
        self.num_threads = self.num_mma_threads + WARPGROUP
        # Producer registers go to the consumers. The gather keeps a warp's row indices live
        # (one per lane, shuffled per copy), so it gets 40 rather than FA3's 24.
        if self.num_mma_wg == 1:
            self.producer_regs, self.mma_regs = 56, 256
        else:
            self.producer_regs, self.mma_regs = 40, 232
        self.tma_gather = TmaRowGather(tile_n, head_dim, dtype) if engine == "tma" else None
        self.cp_gather = CpAsyncGather(tile_n, head_dim, dtype) if engine == "cpasync" else None
        self.stage_bytes = tile_n * head_dim * dtype.width // 8
        self.q_bytes = q_tile * head_dim * dtype.width // 8
        smem = self.q_bytes + 2 * num_stages * self.stage_bytes + 1024
        if smem > 227 * 1024:
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

    def _tiled_mmas(self):
        mma_qk = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            warpgroup.OperandMajorMode.K,
            warpgroup.OperandMajorMode.K,
            Float32,
            atom_layout_mnk=(self.num_mma_wg, 1, 1),
            tiler_mn=(64, self.tile_n),
        )
        mma_pv = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            warpgroup.OperandMajorMode.K,
            warpgroup.OperandMajorMode.MN,
            Float32,
            atom_layout_mnk=(self.num_mma_wg, 1, 1),
            tiler_mn=(64, self.head_dim),
            a_source=warpgroup.OperandSource.RMEM,
        )
        return mma_qk, mma_pv

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # [B, Sq, H, D]
        mK: cute.Tensor,  # [B, Sk, H, D]
        mV: cute.Tensor,  # [B, Sk, H, D]
        mO: cute.Tensor,  # [B, Sq, H, D]
        mLSE: cute.Tensor,  # [B, H, Sq] float32
        mIndices: cute.Tensor,  # [B, H, n_q_tiles, capacity] int32
        mCounts: cute.Tensor,  # [B, H, n_q_tiles] int32
        softmax_scale: Float32,
        stream: cuda.CUstream,
    ):
        # CuTe order: (S, D, H, B) for the token tensors, (S, H, B) for the LSE.
        mQ, mK, mV, mO = [permute_modes(t, [1, 3, 2, 0]) for t in (mQ, mK, mV, mO)]
        mLSE = permute_modes(mLSE, [2, 1, 0])

        sQ_layout = self._smem_layout(self.tile_m)
        sKV_layout = self._smem_layout(self.tile_n, self.num_stages)
        mma_qk, mma_pv = self._tiled_mmas()

        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mQ, sQ_layout, (self.tile_m, self.head_dim)
        )
        tma_atom_O, tma_O = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), mO, sQ_layout, (self.tile_m, self.head_dim)
        )
        tma_atom_K, tma_K, tma_atom_V, tma_V = None, None, None, None
        if const_expr(self.engine == "tma"):
            tma_atom_K, tma_K = TmaRowGather.make_atom(mK, sKV_layout.inner)
            tma_atom_V, tma_V = TmaRowGather.make_atom(mV, sKV_layout.inner)

        stages = self.num_stages

        @cute.struct
        class SharedStorage:
            bar_q: cute.struct.MemRange[cutlass.Int64, 1]
            bar_k: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            bar_v: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sQ: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024
            ]
            sK: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sKV_layout)], 1024
            ]
            sV: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sKV_layout)], 1024
            ]

        n_q_tiles = cute.size(mCounts.shape[2])
        grid = (n_q_tiles, cute.size(mQ.shape[2]), cute.size(mQ.shape[3]))
        self.kernel(
            tma_Q,
            mK if const_expr(self.engine == "cpasync") else tma_K,
            mV if const_expr(self.engine == "cpasync") else tma_V,
            tma_O,
            mLSE,
            mIndices,
            mCounts,
            tma_atom_Q,
            tma_atom_K,
            tma_atom_V,
            tma_atom_O,
            Float32(softmax_scale * LOG2_E),
            cute.size(mQ.shape[0]),
            sQ_layout,
            sKV_layout,
            mma_qk,
            mma_pv,
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
        mV: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        mIndices: cute.Tensor,
        mCounts: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom | None,
        tma_atom_V: cute.CopyAtom | None,
        tma_atom_O: cute.CopyAtom,
        scale_log2: Float32,
        seqlen_q: Int32,
        sQ_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        m_block, head, batch = cute.arch.block_idx()
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_Q)
            cpasync.prefetch_descriptor(tma_atom_O)
            if const_expr(self.engine == "tma"):
                cpasync.prefetch_descriptor(tma_atom_K)
                cpasync.prefetch_descriptor(tma_atom_V)

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        bar_q = storage.bar_q.data_ptr()
        ring_k = StageRing(storage.bar_k.data_ptr(), self.num_stages)
        ring_v = StageRing(storage.bar_v.data_ptr(), self.num_stages)
        if warp_idx == 0:
            with cute.arch.elect_one():
                # TMA: one expect-tx arrival per fill; cp.async: one arrival per producer thread.
                full_arrivals = 1 if const_expr(self.engine == "tma") else WARPGROUP
                empty_arrivals = self.num_mma_threads // 32
                cute.arch.mbarrier_init(bar_q, 1)
                ring_k.init(full_arrivals, empty_arrivals)
                ring_v.init(full_arrivals, empty_arrivals)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sV = storage.sV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        indices = mIndices[batch, head, m_block, None]
        count = mCounts[batch, head, m_block]

        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            self.produce(
                mQ, mK, mV, sQ, sK, sV, tma_atom_Q, tma_atom_K, tma_atom_V,
                bar_q, ring_k, ring_v, indices, count, m_block, head, batch,
            )
        else:
            cute.arch.setmaxregister_increase(self.mma_regs)
            self.consume(
                mO, mLSE, sQ, sK, sV, tma_atom_O, mma_qk, mma_pv, bar_q, ring_k, ring_v,
                count, scale_log2, seqlen_q, m_block, head, batch,
            )

    @cute.jit
    def produce(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom | None,
        tma_atom_V: cute.CopyAtom | None,
        bar_q: cute.Pointer,
        ring_k: StageRing,
        ring_v: StageRing,
        indices: cute.Tensor,
        count: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        tidx = cute.arch.thread_idx()[0]
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = tidx % 32

        # Q: one TMA copy of the whole tile (rows past seqlen_q are zero-filled).
        if warp == 0:
            gQ = cute.local_tile(
                mQ[None, None, head, batch], (self.tile_m, self.head_dim), (m_block, 0)
            )
            tQsQ, tQgQ = cpasync.tma_partition(
                tma_atom_Q, 0, cute.make_layout(1),
                cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2),
            )
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(bar_q, self.q_bytes)
            cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=bar_q)

        n_blocks = cute.ceil_div(count, self.tile_n)
        if const_expr(self.engine == "tma"):
            gK_part, sK_part = self.tma_gather.partition(tma_atom_K, mK[None, None, head, batch], sK)
            gV_part, sV_part = self.tma_gather.partition(tma_atom_V, mV[None, None, head, batch], sV)
            for n in cutlass.range(n_blocks, unroll=1):
                stage, phase = ring_k.stage_phase(n)
                first_slot = n * self.tile_n
                ring_k.wait_empty(stage, phase)
                if warp == 0:
                    with cute.arch.elect_one():
                        ring_k.expect_bytes(stage, self.stage_bytes)
                self.tma_gather.load_stage(
                    tma_atom_K, gK_part, sK_part, indices, first_slot, count, stage,
                    ring_k.full + stage, warp, lane,
                )
                ring_v.wait_empty(stage, phase)
                if warp == 0:
                    with cute.arch.elect_one():
                        ring_v.expect_bytes(stage, self.stage_bytes)
                self.tma_gather.load_stage(
                    tma_atom_V, gV_part, sV_part, indices, first_slot, count, stage,
                    ring_v.full + stage, warp, lane,
                )
        else:
            mK_bh = mK[None, None, head, batch]
            mV_bh = mV[None, None, head, batch]
            for n in cutlass.range(n_blocks, unroll=1):
                stage, phase = ring_k.stage_phase(n)
                first_slot = n * self.tile_n
                ring_k.wait_empty(stage, phase)
                self.cp_gather.load_stage(mK_bh, sK[None, None, stage], indices, first_slot, count, tidx)
                ring_k.arrive_cp_async(stage)
                ring_v.wait_empty(stage, phase)
                self.cp_gather.load_stage(mV_bh, sV[None, None, stage], indices, first_slot, count, tidx)
                ring_v.arrive_cp_async(stage)

    @cute.jit
    def consume(
        self,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_O: cute.CopyAtom,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        bar_q: cute.Pointer,
        ring_k: StageRing,
        ring_v: StageRing,
        count: Int32,
        scale_log2: Float32,
        seqlen_q: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        tidx = cute.arch.thread_idx()[0] - WARPGROUP
        wg = cute.arch.make_warp_uniform(tidx // WARPGROUP)
        lane = tidx % 32
        thr_qk = mma_qk.get_slice(tidx)
        thr_pv = mma_pv.get_slice(tidx)
        wg_qk = mma_qk.get_slice(wg * WARPGROUP)
        wg_pv = mma_pv.get_slice(wg * WARPGROUP)

        # wgmma operands: Q and K descriptors from smem, P from registers, V^T from smem.
        tSrQ = wg_qk.make_fragment_A(wg_qk.partition_A(sQ))
        tSrK = wg_qk.make_fragment_B(wg_qk.partition_B(sK))
        sVt = transpose_mn(sV)
        tOrVt = wg_pv.make_fragment_B(wg_pv.partition_B(sVt))
        tOrP = wg_pv.make_fragment_A(wg_pv.partition_shape_A((self.tile_m, self.tile_n)))
        acc_O = cute.make_rmem_tensor(mma_pv.partition_shape_C((self.tile_m, self.head_dim)), Float32)
        acc_O.fill(0.0)
        s_shape = mma_qk.partition_shape_C((self.tile_m, self.tile_n))

        # Column of each score element within the stage, to mask the padding slots.
        tScS = acc_rows_cols(thr_qk.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n))))
        softmax = OnlineSoftmax(scale_log2, cute.size(tScS, mode=[0]))

        cute.arch.mbarrier_wait(bar_q, 0)
        n_blocks = cute.ceil_div(count, self.tile_n)
        for n in cutlass.range(n_blocks, unroll=1):
            stage, phase = ring_k.stage_phase(n)
            ring_k.wait_full(stage, phase)
            if const_expr(self.engine == "cpasync"):
                # cp.async writes through the generic proxy; wgmma reads through the async one.
                cute.arch.fence_view_async_shared()
            acc_S = cute.make_rmem_tensor(s_shape, Float32)
            self.gemm(mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], zero_init=True)
            if lane == 0:
                ring_k.release(stage)

            valid = count - n * self.tile_n
            if valid < self.tile_n:
                s_rc = acc_rows_cols(acc_S)
                for c in cutlass.range_constexpr(cute.size(tScS, mode=[1])):
                    if tScS[0, c][1] >= valid:
                        for r in cutlass.range_constexpr(cute.size(tScS, mode=[0])):
                            s_rc[r, c] = -Float32.inf

            rescale = softmax.step(acc_S)
            scale_rows(acc_O, rescale)
            tOrP.store(acc_as_operand_a(acc_S).load().to(self.dtype))

            ring_v.wait_full(stage, phase)
            if const_expr(self.engine == "cpasync"):
                cute.arch.fence_view_async_shared()
            self.gemm(mma_pv, acc_O, tOrP, tOrVt[None, None, None, stage], zero_init=False)
            if lane == 0:
                ring_v.release(stage)

        inv_sum = softmax.finish()
        scale_rows(acc_O, inv_sum)
        self.epilogue(
            acc_O, softmax.row_sum, mO, mLSE, sQ, tma_atom_O, mma_pv, thr_pv, tidx,
            seqlen_q, m_block, head, batch,
        )

    @cute.jit
    def gemm(
        self,
        tiled_mma: cute.TiledMma,
        acc: cute.Tensor,
        tCrA: cute.Tensor,
        tCrB: cute.Tensor,
        zero_init: cutlass.Constexpr[bool],
    ):
        """acc (+)= A @ B over all k-blocks, then wait for the warpgroup's wgmmas."""
        warpgroup.fence()
        atom = cute.make_mma_atom(tiled_mma.op)
        atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
        for k in cutlass.range_constexpr(cute.size(tCrA.shape[2])):
            cute.gemm(atom, acc, tCrA[None, None, k], tCrB[None, None, k], acc)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    @cute.jit
    def epilogue(
        self,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        sO: cute.Tensor,
        tma_atom_O: cute.CopyAtom,
        mma_pv: cute.TiledMma,
        thr_pv: cute.ThrMma,
        tidx: Int32,
        seqlen_q: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        # O: registers -> smem (over Q: each warpgroup overwrites only the 64 rows it read,
        # after its last wgmma completed) -> one TMA store, which clips rows past seqlen_q.
        rO = cute.make_rmem_tensor_like(acc_O, self.dtype)
        rO.store(acc_O.load().to(self.dtype))
        store_atom = cute.make_copy_atom(
            cute.nvgpu.warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), self.dtype
        )
        thr_store = cute.make_tiled_copy_C(store_atom, mma_pv).get_slice(tidx)
        cute.copy(thr_store, thr_store.retile(rO), thr_store.partition_D(sO))

        # LSE: the thread holding column 0 of a row writes it.
        cO = acc_rows_cols(thr_pv.partition_C(cute.make_identity_tensor((self.tile_m, self.head_dim))))
        if cO[0, 0][1] == 0:
            for r in cutlass.range_constexpr(cute.size(lse)):
                row = m_block * self.tile_m + cO[r, 0][0]
                if row < seqlen_q:
                    mLSE[row, head, batch] = lse[r]

        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=BARRIER_EPILOGUE, number_of_threads=self.num_mma_threads)
        if tidx == 0:
            gO = cute.local_tile(
                mO[None, None, head, batch], (self.tile_m, self.head_dim), (m_block, 0)
            )
            tOsO, tOgO = cpasync.tma_partition(
                tma_atom_O, 0, cute.make_layout(1),
                cute.group_modes(sO, 0, 2), cute.group_modes(gO, 0, 2),
            )
            cute.copy(tma_atom_O, tOsO, tOgO)
            cute.arch.cp_async_bulk_commit_group()
            cute.arch.cp_async_bulk_wait_group(0, read=True)
