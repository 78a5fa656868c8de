"""Fine-grained (M x 1) sparse attention forward for Hopper (sm_90a).

One CTA per (query tile, head, batch), or with `max_ctas` persistent CTAs (one per SM) that
each work through query tiles block, block + grid, ... Warp specialised, FlashAttention-3
style:

- warpgroup 0, the producer (registers given back with setmaxnreg): for each query tile loads
  its Q by TMA, then for every group of `tile_n` kept keys gathers those K rows and the same V
  rows into the next stage of a ring of 128B-swizzled smem tiles (one mbarrier ring for K,
  one for V; the rings run on from one tile to the next); with the engines that use cp.async,
  K runs one stage ahead of V.
- warpgroups 1.. (one per 64 query rows), the consumers: S = Q K^T by wgmma from smem, padding
  slots of the last stage masked to -inf, online softmax in registers (exp2, scale folded in),
  P converted to 16 bits and fed from registers to wgmma O += P V; then O / rowsum goes to
  smem (its own buffer when persistent and it fits, else over Q) and out by one TMA store,
  and the LSE straight to global memory.

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

from fgattn_cute.kernels.gather import CpAsyncGather, TmaRowGather
from fgattn_cute.kernels.layout import (
    acc_as_operand_a,
    acc_rows_cols,
    permute_modes,
    swizzled_tile_layout,
    tma_tile_partition,
    transpose_mn,
)
from fgattn_cute.kernels.pipeline import StageRing
from fgattn_cute.kernels.softmax import OnlineSoftmax, mask_columns, scale_rows

LOG2_E = math.log2(math.e)
WARPGROUP = 128
# Named hardware barriers (0 is __syncthreads).
BARRIER_EPILOGUE = 1
BARRIER_SCHED = 2  # and 3: one per consumer warpgroup
BARRIER_PRODUCER = 4
SMEM_BYTES = 232448  # 227 KiB per CTA on sm_90

Engine = Literal["cpasync", "tma", "hybrid"]


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
        gather_only: bool = False,
        max_ctas: int = 0,
    ):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise TypeError(f"dtype must be BFloat16 or Float16, got {dtype}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        if q_tile not in (64, 128):
            raise ValueError(f"q_tile must be 64 or 128, got {q_tile}")
        if tile_n not in (64, 128):
            raise ValueError(f"tile_n must be 64 or 128, got {tile_n}")
        if engine not in ("cpasync", "tma", "hybrid"):
            raise ValueError(f"engine must be 'cpasync', 'tma' or 'hybrid', got {engine!r}")
        self.dtype = dtype
        self.head_dim = head_dim
        self.tile_m = q_tile
        self.tile_n = tile_n
        self.num_stages = num_stages
        self.engine = engine
        # Benchmark mode: consumers only wait for and release the stages (no math), so the
        # kernel measures how fast the producer gathers inside the real pipeline.
        self.gather_only = gather_only
        self.num_mma_wg = q_tile // 64
        self.num_mma_threads = self.num_mma_wg * WARPGROUP
        self.num_threads = self.num_mma_threads + WARPGROUP
        # Producer registers go to the consumers. The gather keeps a warp's row indices live
        # (one per lane, shuffled per copy), so it gets 40 rather than FA3's 24.
        # The hybrid engine keeps a key per lane for each of its two gathers: 56.
        if self.num_mma_wg == 1:
            self.producer_regs, self.mma_regs = 56, 256
        elif engine == "hybrid":
            self.producer_regs, self.mma_regs = 56, 224
        else:
            self.producer_regs, self.mma_regs = 40, 232
        # How each tensor's rows are gathered: "hybrid" takes K by TMA rows and V by cp.async,
        # two different hardware paths working side by side.
        self.k_method = "tma" if engine in ("tma", "hybrid") else "cpasync"
        self.v_method = "tma" if engine == "tma" else "cpasync"
        # Loading K one stage ahead of V helps the engines that use cp.async (5-10% on sparse
        # lists) and hurts the TMA-row engine, whose producer is bound by issuing copies
        # (perf/NOTES.md, H200 A/B).
        self.k_ahead = engine != "tma"
        self.tma_gather = TmaRowGather(tile_n, head_dim, dtype)
        self.cp_gather = CpAsyncGather(tile_n, head_dim, dtype)
        self.stage_bytes = tile_n * head_dim * dtype.width // 8
        self.q_bytes = q_tile * head_dim * dtype.width // 8
        smem = self.q_bytes + 2 * num_stages * self.stage_bytes + 1024
        if smem > SMEM_BYTES:
            raise ValueError(f"{num_stages} stages need {smem} bytes of shared memory (> 227 KiB)")
        # Persistent CTAs: max_ctas > 0 launches at most that many CTAs (one per SM), each
        # working through query tiles tile, tile + grid, ...; the producer then loads the next
        # tile's Q and first stages while the consumers finish the current one. 0: one CTA per
        # tile. O gets its own smem buffer where it fits, so the next Q need not wait for the
        # epilogue's store; otherwise O goes over Q and the next Q waits for that store.
        if max_ctas < 0:
            raise ValueError(f"max_ctas must be >= 0, got {max_ctas}")
        self.max_ctas = max_ctas
        self.separate_o = max_ctas > 0 and smem + self.q_bytes <= SMEM_BYTES

    # ---------------------------------------------------------------- host side
    def _smem_layout(self, rows: int, stages: int | None = None):
        return swizzled_tile_layout(self.dtype, self.head_dim, rows, stages)

    def _tiled_mmas(self):
        mma_qk = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            cute.nvgpu.OperandMajorMode.K,
            cute.nvgpu.OperandMajorMode.K,
            Float32,
            atom_layout_mnk=(self.num_mma_wg, 1, 1),
            tiler_mn=(64, self.tile_n),
        )
        mma_pv = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            cute.nvgpu.OperandMajorMode.K,
            cute.nvgpu.OperandMajorMode.MN,
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
        mTileCounter: cute.Tensor,  # [1] int32, zero at launch (persistent CTAs only)
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
        # Row boxes for gathering; whole (tile_n, D) boxes for stages whose keys are one
        # contiguous run (dense lists, block masks), which then cost one copy per stage.
        sKV_stage = cute.select(sKV_layout, mode=[0, 1])
        atom_K_row, tma_K_row = TmaRowGather.make_atom(mK, sKV_layout.inner)
        atom_V_row, tma_V_row = TmaRowGather.make_atom(mV, sKV_layout.inner)
        atom_K_tile, tma_K_tile = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mK, sKV_stage, (self.tile_n, self.head_dim)
        )
        atom_V_tile, tma_V_tile = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mV, sKV_stage, (self.tile_n, self.head_dim)
        )

        stages = self.num_stages

        o_elems = cute.cosize(sQ_layout) if const_expr(self.separate_o) else 0

        @cute.struct
        class SharedStorage:
            bar_q: cute.struct.MemRange[cutlass.Int64, 2]  # full, empty
            tile_ids: cute.struct.MemRange[Int32, 2]  # the next query tiles, for all warps
            bar_k: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            bar_v: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sQ: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024
            ]
            sO: cute.struct.Align[cute.struct.MemRange[self.dtype, o_elems], 1024]
            sK: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sKV_layout)], 1024
            ]
            sV: cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(sKV_layout)], 1024
            ]

        n_q_tiles = cute.size(mCounts.shape[2])
        grid = (n_q_tiles, cute.size(mQ.shape[2]), cute.size(mQ.shape[3]))
        if const_expr(self.max_ctas > 0):
            grid = (cutlass.min(n_q_tiles * grid[1] * grid[2], self.max_ctas), 1, 1)
        self.kernel(
            tma_Q,
            mK,
            mV,
            (tma_K_row, tma_K_tile, tma_V_row, tma_V_tile),
            tma_O,
            mLSE,
            mIndices,
            mCounts,
            mTileCounter,
            tma_atom_Q,
            (atom_K_row, atom_K_tile, atom_V_row, atom_V_tile),
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
        tma_KV: tuple,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        mIndices: cute.Tensor,
        mCounts: cute.Tensor,
        mTileCounter: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        atoms_KV: tuple,
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
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_Q)
            cpasync.prefetch_descriptor(tma_atom_O)
            for atom in atoms_KV:
                cpasync.prefetch_descriptor(atom)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        bar_q = storage.bar_q.data_ptr()  # bar_q + 1: Q may be overwritten
        ring_k = StageRing(storage.bar_k.data_ptr(), self.num_stages)
        ring_v = StageRing(storage.bar_v.data_ptr(), self.num_stages)
        if warp_idx == 0:
            with cute.arch.elect_one():
                # TMA rows: one expect-tx arrival per fill; cp.async: one per producer thread.
                empty_arrivals = self.num_mma_threads // 32
                cute.arch.mbarrier_init(bar_q, 1)
                cute.arch.mbarrier_init(bar_q + 1, self.q_release_arrivals())
                ring_k.init(self.full_arrivals(self.k_method), empty_arrivals)
                ring_v.init(self.full_arrivals(self.v_method), empty_arrivals)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sV = storage.sV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sO = sQ
        if const_expr(self.separate_o):
            sO = storage.sO.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)

        tile_ids = storage.tile_ids.get_tensor(cute.make_layout(2))

        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            self.produce(
                mQ, mK, mV, tma_KV, sQ, sK, sV, tma_atom_Q, atoms_KV,
                bar_q, ring_k, ring_v, mIndices, mCounts, mTileCounter, tile_ids,
            )
        else:
            cute.arch.setmaxregister_increase(self.mma_regs)
            self.consume(
                mO, mLSE, sQ, sO, sK, sV, tma_atom_O, mma_qk, mma_pv, bar_q, ring_k, ring_v,
                mCounts, tile_ids, scale_log2, seqlen_q,
            )

    def full_arrivals(self, method: str) -> int:
        return 1 if method == "tma" else WARPGROUP

    def q_release_arrivals(self) -> int:
        # With its own O buffer, each consumer warp releases Q after its last Q K^T; with O
        # over Q, the thread that stores O releases it once the store has read the smem.
        return self.num_mma_threads // 32 if self.separate_o else 1

    @cute.jit
    def tile_coords(self, tile: Int32, mCounts: cute.Tensor):
        """(m_block, head, batch) of a linear tile index, query tiles of a head adjacent so
        that the CTAs running at once share that head's K and V in L2."""
        n_q_tiles = cute.size(mCounts.shape[2])
        n_heads = cute.size(mCounts.shape[1])
        rest = tile // n_q_tiles
        return tile % n_q_tiles, rest % n_heads, rest // n_heads

    def num_tiles(self, mCounts: cute.Tensor):
        return cute.size(mCounts.shape[0]) * cute.size(mCounts.shape[1]) * cute.size(
            mCounts.shape[2]
        )

    @cute.jit
    def produce(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        tma_KV: tuple,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        atoms_KV: tuple,
        bar_q: cute.Pointer,
        ring_k: StageRing,
        ring_v: StageRing,
        mIndices: cute.Tensor,
        mCounts: cute.Tensor,
        mTileCounter: cute.Tensor,
        tile_ids: cute.Tensor,
    ):
        tidx = cute.arch.thread_idx()[0]
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = tidx % 32
        if const_expr(self.max_ctas == 0):
            m_block, head, batch = cute.arch.block_idx()
            if warp == 0:
                self.load_q(mQ, sQ, tma_atom_Q, bar_q, m_block, head, batch)
            self.produce_tile(
                mK, mV, tma_KV, sK, sV, atoms_KV, ring_k, ring_v,
                mIndices[batch, head, m_block, None], mCounts[batch, head, m_block], 0, head,
                batch, tidx, warp, lane,
            )
        else:
            num_tiles = self.num_tiles(mCounts)
            tile = Int32(cute.arch.block_idx()[0])
            fills = Int32(0)  # fills of each ring by earlier tiles: the rings run on across tiles
            t = Int32(0)
            while tile < num_tiles:
                m_block, head, batch = self.tile_coords(tile, mCounts)
                count = mCounts[batch, head, m_block]
                # CTAs take the next tile from a global counter (tiles 0 .. grid - 1 went one to
                # each CTA): a CTA whose lists were short takes more of them. The atomic is issued
                # now and its value used after this tile's copies.
                next_tile = num_tiles
                if tidx == 0:
                    next_tile = cute.arch.atomic_add(mTileCounter.iterator, Int32(1)) + Int32(
                        cute.arch.grid_dim()[0]
                    )
                # Q once the consumers no longer read the previous tile's (the first wait passes
                # at once).
                if warp == 0:
                    cute.arch.mbarrier_wait(bar_q + 1, (t % 2) ^ 1)
                    self.load_q(mQ, sQ, tma_atom_Q, bar_q, m_block, head, batch)
                self.produce_tile(
                    mK, mV, tma_KV, sK, sV, atoms_KV, ring_k, ring_v,
                    mIndices[batch, head, m_block, None], count, fills, head, batch, tidx, warp,
                    lane,
                )
                fills += cute.ceil_div(count, self.tile_n)
                t += 1
                # The next tile for the other producer warps and, with the next Q barrier phase,
                # for the consumers.
                if tidx == 0:
                    tile_ids[t % 2] = next_tile
                cute.arch.barrier(barrier_id=BARRIER_PRODUCER, number_of_threads=WARPGROUP)
                tile = tile_ids[t % 2]
            # No tile left: complete the Q phase the consumers wait on, without a copy, so that
            # they read the end marker. Only after they are done with the last Q, so that this
            # arrival cannot fall into the phase of the last copy.
            if warp == 0:
                cute.arch.mbarrier_wait(bar_q + 1, (t % 2) ^ 1)
                with cute.arch.elect_one():
                    cute.arch.mbarrier_arrive(bar_q)

    @cute.jit
    def load_q(
        self,
        mQ: cute.Tensor,
        sQ: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        bar_q: cute.Pointer,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        """One warp: Q by one TMA copy of the whole tile (rows past seqlen_q are zero-filled)."""
        gQ = cute.local_tile(
            mQ[None, None, head, batch], (self.tile_m, self.head_dim), (m_block, 0)
        )
        tQsQ, tQgQ = tma_tile_partition(tma_atom_Q, sQ, gQ)
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(bar_q, self.q_bytes)
        cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=bar_q)

    @cute.jit
    def produce_tile(
        self,
        mK: cute.Tensor,
        mV: cute.Tensor,
        tma_KV: tuple,
        sK: cute.Tensor,
        sV: cute.Tensor,
        atoms_KV: tuple,
        ring_k: StageRing,
        ring_v: StageRing,
        indices: cute.Tensor,
        count: Int32,
        fills: Int32,
        head: Int32,
        batch: Int32,
        tidx: Int32,
        warp: Int32,
        lane: Int32,
    ):
        """Fill the K and V stages of one query tile's key list; `fills` earlier fills."""
        tma_K_row, tma_K_tile, tma_V_row, tma_V_tile = tma_KV
        atom_K_row, atom_K_tile, atom_V_row, atom_V_tile = atoms_KV
        gK_rows, sK_rows = self.tma_gather.partition(
            atom_K_row, tma_K_row[None, None, head, batch], sK
        )
        gV_rows, sV_rows = self.tma_gather.partition(
            atom_V_row, tma_V_row[None, None, head, batch], sV
        )
        gK_tile = tma_K_tile[None, None, head, batch]
        gV_tile = tma_V_tile[None, None, head, batch]
        mK_bh = mK[None, None, head, batch]
        mV_bh = mV[None, None, head, batch]

        k_src = (ring_k, atom_K_tile, gK_tile, sK, atom_K_row, gK_rows, sK_rows, mK_bh)
        v_src = (ring_v, atom_V_tile, gV_tile, sV, atom_V_row, gV_rows, sV_rows, mV_bh)

        n_blocks = cute.ceil_div(count, self.tile_n)
        keys = self.fetch_stage_keys(indices, 0, count, warp, lane)
        if const_expr(self.k_ahead):
            # K runs one stage ahead of V: step n fills K_n, then V_{n-1}, so a V stage that the
            # consumers release late never holds back the next K (V_n is needed a whole
            # iteration after K_n). The keys of stage n + 1 are loaded during step n, so no
            # copy waits on a round trip for its index; one fill site each keeps the code small.
            prev_keys = keys
            for n in cutlass.range(n_blocks + 1, unroll=1):
                next_keys = keys
                if n + 1 < n_blocks:
                    next_keys = self.fetch_stage_keys(
                        indices, (n + 1) * self.tile_n, count, warp, lane
                    )
                if n < n_blocks:
                    self.fill(self.k_method, k_src, fills + n, keys, tidx, warp)
                if n > 0:
                    self.fill(self.v_method, v_src, fills + n - 1, prev_keys, tidx, warp)
                prev_keys = keys
                keys = next_keys
        else:
            # K_n, then V_n; the keys of stage n + 1 are loaded while stage n is issued.
            for n in cutlass.range(n_blocks, unroll=1):
                next_keys = keys
                if n + 1 < n_blocks:
                    next_keys = self.fetch_stage_keys(
                        indices, (n + 1) * self.tile_n, count, warp, lane
                    )
                self.fill(self.k_method, k_src, fills + n, keys, tidx, warp)
                self.fill(self.v_method, v_src, fills + n, keys, tidx, warp)
                keys = next_keys

    @cute.jit
    def fill(
        self,
        method: cutlass.Constexpr[str],
        src: tuple,
        n: Int32,
        keys: tuple,
        tidx: Int32,
        warp: Int32,
    ):
        """Wait until the n-th fill of K's or V's ring may be written, then issue its copies.
        src: (ring, tile atom, tile coordinates, smem, row atom, row coordinates, smem rows,
        global tensor of this head)."""
        ring, atom_tile, g_tile, sX, atom_row, g_rows, s_rows, mX = src
        first_key, last_key, tma_key, cp_key = keys
        # A full stage whose keys form one run (the lists are strictly ascending) loads as a
        # single (tile_n, D) box; last_key is -1 for a partial stage.
        contiguous = last_key - first_key == self.tile_n - 1
        stage, phase = ring.stage_phase(n)
        ring.wait_empty(stage, phase)
        self.load_stage(
            method, ring, stage, contiguous, first_key, atom_tile, g_tile, sX, atom_row,
            g_rows, s_rows, mX, tma_key, cp_key, tidx, warp,
        )

    @cute.jit
    def fetch_stage_keys(
        self, indices: cute.Tensor, first_slot: Int32, count: Int32, warp: Int32, lane: Int32
    ):
        """(first key, last key or -1 if the stage is partial, this lane's key for each engine
        in use). Loads only; the values are consumed one iteration later."""
        first_key = indices[first_slot]
        last_key = Int32(-1)
        if first_slot + self.tile_n <= count:
            last_key = indices[first_slot + self.tile_n - 1]
        tma_key = Int32(-1)
        cp_key = Int32(0)
        if const_expr("tma" in (self.k_method, self.v_method)):
            tma_key = self.tma_gather.fetch_key(indices, first_slot, count, warp, lane)
        if const_expr("cpasync" in (self.k_method, self.v_method)):
            cp_key = self.cp_gather.fetch_key(indices, first_slot, count, warp, lane)
        return first_key, last_key, tma_key, cp_key

    @cute.jit
    def load_stage(
        self,
        method: cutlass.Constexpr[str],
        ring: StageRing,
        stage: Int32,
        contiguous: cutlass.Boolean,
        first_key: Int32,
        atom_tile: cute.CopyAtom,
        g_tile: cute.Tensor,
        sX: cute.Tensor,
        atom_row: cute.CopyAtom,
        g_rows: cute.Tensor,
        s_rows: cute.Tensor,
        mX: cute.Tensor,
        tma_key: Int32,
        cp_key: Int32,
        tidx: Int32,
        warp: Int32,
    ):
        """Fill one stage of K or V and make its completion land on ring.full[stage]."""
        full = ring.full + stage
        if contiguous:
            if warp == 0:
                gX = cute.local_tile(
                    cute.domain_offset((first_key, 0), g_tile),
                    (self.tile_n, self.head_dim),
                    (0, 0),
                )
                tXsX, tXgX = tma_tile_partition(atom_tile, sX[None, None, stage], gX)
                with cute.arch.elect_one():
                    if const_expr(method == "tma"):
                        cute.arch.mbarrier_arrive_and_expect_tx(full, self.stage_bytes)
                    else:
                        cute.arch.mbarrier_expect_tx(full, self.stage_bytes)
                cute.copy(atom_tile, tXgX, tXsX, tma_bar_ptr=full)
            if const_expr(method == "cpasync"):
                # The barrier counts one arrival per producer thread; the bytes come by TMA.
                cute.arch.mbarrier_arrive(full)
        else:
            if const_expr(method == "tma"):
                if warp == 0:
                    with cute.arch.elect_one():
                        cute.arch.mbarrier_arrive_and_expect_tx(full, self.stage_bytes)
                self.tma_gather.load_stage(atom_row, g_rows, s_rows, tma_key, stage, full, warp)
            else:
                self.cp_gather.load_stage(mX, sX[None, None, stage], cp_key, tidx)
                cute.arch.cp_async_mbarrier_arrive_noinc(full)

    @cute.jit
    def consume(
        self,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        sQ: cute.Tensor,
        sO: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_O: cute.CopyAtom,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        bar_q: cute.Pointer,
        ring_k: StageRing,
        ring_v: StageRing,
        mCounts: cute.Tensor,
        tile_ids: cute.Tensor,
        scale_log2: Float32,
        seqlen_q: Int32,
    ):
        tidx = cute.arch.thread_idx()[0] - WARPGROUP
        wg = cute.arch.make_warp_uniform(tidx // WARPGROUP)
        self.scheduler_init(wg)
        cute.arch.mbarrier_wait(bar_q, 0)
        if const_expr(self.max_ctas == 0):
            m_block, head, batch = cute.arch.block_idx()
            self.consume_tile(
                mO, mLSE, sQ, sO, sK, sV, tma_atom_O, mma_qk, mma_pv, bar_q, ring_k, ring_v,
                mCounts[batch, head, m_block], 0, scale_log2, seqlen_q, m_block, head, batch,
                tidx, wg,
            )
        else:
            num_tiles = self.num_tiles(mCounts)
            tile = Int32(cute.arch.block_idx()[0])
            fills = Int32(0)
            t = Int32(0)
            while tile < num_tiles:
                m_block, head, batch = self.tile_coords(tile, mCounts)
                count = mCounts[batch, head, m_block]
                self.consume_tile(
                    mO, mLSE, sQ, sO, sK, sV, tma_atom_O, mma_qk, mma_pv, bar_q, ring_k,
                    ring_v, count, fills, scale_log2, seqlen_q, m_block, head, batch, tidx, wg,
                )
                fills += cute.ceil_div(count, self.tile_n)
                t += 1
                # The producer names the next tile (or one past the last) with its Q.
                cute.arch.mbarrier_wait(bar_q, t % 2)
                tile = tile_ids[t % 2]
            if tidx == 0:
                # The last O store must have read its smem before the CTA exits.
                cute.arch.cp_async_bulk_wait_group(0, read=True)

    @cute.jit
    def consume_tile(
        self,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        sQ: cute.Tensor,
        sO: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_O: cute.CopyAtom,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        bar_q: cute.Pointer,
        ring_k: StageRing,
        ring_v: StageRing,
        count: Int32,
        fills: Int32,
        scale_log2: Float32,
        seqlen_q: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
        tidx: Int32,
        wg: Int32,
    ):
        """One query tile: its Q is in smem; its stages are fills `fills`, `fills` + 1, ..."""
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
        acc_O = cute.make_rmem_tensor(
            mma_pv.partition_shape_C((self.tile_m, self.head_dim)), Float32
        )
        acc_O.fill(0.0)
        s_shape = mma_qk.partition_shape_C((self.tile_m, self.tile_n))

        # Column of each score element within the stage, to mask the padding slots.
        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS = acc_rows_cols(thr_qk.partition_C(cS))
        softmax = OnlineSoftmax(scale_log2, cute.size(tScS, mode=[0]))

        # Block 0 (S only), then blocks 1.. with intra-warpgroup overlap (consume_step).
        n_blocks = cute.ceil_div(count, self.tile_n)
        if const_expr(self.gather_only):
            for n in cutlass.range(n_blocks, unroll=1):
                stage, phase = ring_k.stage_phase(fills + n)
                self.wait_stage(ring_k, stage, phase, self.k_method)
                if lane == 0:
                    ring_k.release(stage)
                self.wait_stage(ring_v, stage, phase, self.v_method)
                if lane == 0:
                    ring_v.release(stage)
            n_blocks = 0
        if n_blocks > 0:
            stage, phase = ring_k.stage_phase(fills)
            self.wait_stage(ring_k, stage, phase, self.k_method)
            acc_S = cute.make_rmem_tensor(s_shape, Float32)
            self.gemm(mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], True, 0)
            if lane == 0:
                ring_k.release(stage)
            mask_columns(acc_S, tScS, count, self.tile_n)
            softmax.step(acc_S)  # O is still zero: its rescale factor is not needed
            tOrP.store(acc_as_operand_a(acc_S).load().to(self.dtype))

            # The last block is peeled off so that the steady-state loop has no mask branch:
            # ptxas moves a wgmma wait to the top of its basic block, and the branch's merge
            # point would put the wait for P V before the softmax that should hide it.
            for n in cutlass.range(1, n_blocks - 1, unroll=1):
                self.consume_step(
                    mma_qk, mma_pv, acc_O, tOrP, tSrQ, tSrK, tOrVt, tScS, softmax, ring_k,
                    ring_v, fills, n, count, wg, lane, False,
                )
            if n_blocks > 1:
                self.consume_step(
                    mma_qk, mma_pv, acc_O, tOrP, tSrQ, tSrK, tOrVt, tScS, softmax, ring_k,
                    ring_v, fills, n_blocks - 1, count, wg, lane, True,
                )

        if const_expr(self.separate_o):
            # Every Q K^T of this tile has completed: the producer may load the next Q.
            if lane == 0:
                cute.arch.mbarrier_arrive(bar_q + 1)
        if n_blocks > 0:
            stage, phase = ring_v.stage_phase(fills + n_blocks - 1)
            self.wait_stage(ring_v, stage, phase, self.v_method)
            self.gemm(mma_pv, acc_O, tOrP, tOrVt[None, None, None, stage], False, 0)
            if lane == 0:
                ring_v.release(stage)

        inv_sum = softmax.finish()
        scale_rows(acc_O, inv_sum)
        self.epilogue(
            acc_O, softmax.row_sum, mO, mLSE, sO, tma_atom_O, mma_pv, thr_pv, bar_q, tidx,
            seqlen_q, m_block, head, batch,
        )

    @cute.jit
    def consume_step(
        self,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        acc_O: cute.Tensor,
        tOrP: cute.Tensor,
        tSrQ: cute.Tensor,
        tSrK: cute.Tensor,
        tOrVt: cute.Tensor,
        tScS: cute.Tensor,
        softmax: OnlineSoftmax,
        ring_k: StageRing,
        ring_v: StageRing,
        fills: Int32,
        n: Int32,
        count: Int32,
        wg: Int32,
        lane: Int32,
        last: cutlass.Constexpr[bool],
    ):
        """Block n >= 1 of a tile: S_n = Q K_n is issued, then O += P_{n-1} V_{n-1}, and the
        softmax of S_n runs while the second wgmma is still in flight. With two consumer
        warpgroups a pair of named barriers makes them take turns at issuing their wgmmas,
        so one warpgroup's softmax hides behind the other's GEMMs. `last`: mask the padding
        slots of the tile's last block."""
        stage_prev, phase_prev = ring_v.stage_phase(fills + n - 1)
        stage, phase = ring_k.stage_phase(fills + n)
        self.wait_stage(ring_k, stage, phase, self.k_method)
        self.scheduler_wait(wg)
        acc_S = cute.make_rmem_tensor(
            mma_qk.partition_shape_C((self.tile_m, self.tile_n)), Float32
        )
        self.gemm(mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], True, -1)
        self.wait_stage(ring_v, stage_prev, phase_prev, self.v_method)
        self.gemm(mma_pv, acc_O, tOrP, tOrVt[None, None, None, stage_prev], False, -1)
        self.scheduler_signal(wg)
        warpgroup.wait_group(1)
        if lane == 0:
            ring_k.release(stage)
        if const_expr(last):
            mask_columns(acc_S, tScS, count - n * self.tile_n, self.tile_n)
        rescale = softmax.step(acc_S)
        warpgroup.wait_group(0)
        if lane == 0:
            ring_v.release(stage_prev)
        scale_rows(acc_O, rescale)
        tOrP.store(acc_as_operand_a(acc_S).load().to(self.dtype))

    @cute.jit
    def gemm(
        self,
        tiled_mma: cute.TiledMma,
        acc: cute.Tensor,
        tCrA: cute.Tensor,
        tCrB: cute.Tensor,
        zero_init: cutlass.Constexpr[bool],
        wait: cutlass.Constexpr[int],
    ):
        """Issue acc (+)= A @ B over all k-blocks as one wgmma group; wait for all but `wait`
        groups of this warpgroup (-1: do not wait)."""
        warpgroup.fence()
        atom = cute.make_mma_atom(tiled_mma.op)
        atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
        for k in cutlass.range_constexpr(cute.size(tCrA.shape[2])):
            cute.gemm(atom, acc, tCrA[None, None, k], tCrB[None, None, k], acc)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        if const_expr(wait >= 0):
            warpgroup.wait_group(wait)

    @cute.jit
    def wait_stage(
        self, ring: StageRing, stage: Int32, phase: Int32, method: cutlass.Constexpr[str]
    ):
        ring.wait_full(stage, phase)
        if const_expr(method == "cpasync"):
            # cp.async writes through the generic proxy; wgmma reads through the async one.
            cute.arch.fence_view_async_shared()

    # Warpgroup ping-pong: consumer w waits on barrier BARRIER_SCHED + w before issuing its
    # wgmmas and, once issued, arrives on the other's barrier (both counted over 256 threads).
    @cute.jit
    def scheduler_init(self, wg: Int32):
        if const_expr(self.num_mma_wg == 2):
            if wg == 0:
                cute.arch.barrier_arrive(
                    barrier_id=BARRIER_SCHED, number_of_threads=2 * WARPGROUP
                )

    def scheduler_wait(self, wg: Int32):
        if const_expr(self.num_mma_wg == 2):
            cute.arch.barrier(barrier_id=BARRIER_SCHED + wg, number_of_threads=2 * WARPGROUP)

    def scheduler_signal(self, wg: Int32):
        if const_expr(self.num_mma_wg == 2):
            cute.arch.barrier_arrive(
                barrier_id=BARRIER_SCHED + 1 - wg, number_of_threads=2 * WARPGROUP
            )

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
        bar_q: cute.Pointer,
        tidx: Int32,
        seqlen_q: Int32,
        m_block: Int32,
        head: Int32,
        batch: Int32,
    ):
        # O: registers -> smem (its own buffer, or over Q: each warpgroup overwrites only the
        # 64 rows it read, after its last wgmma completed) -> one TMA store, which clips rows
        # past seqlen_q.
        if const_expr(self.separate_o):
            # The previous tile's store must have read sO before it is overwritten.
            if tidx == 0:
                cute.arch.cp_async_bulk_wait_group(0, read=True)
            cute.arch.barrier(
                barrier_id=BARRIER_EPILOGUE, number_of_threads=self.num_mma_threads
            )
        rO = cute.make_rmem_tensor_like(acc_O, self.dtype)
        rO.store(acc_O.load().to(self.dtype))
        store_atom = cute.make_copy_atom(
            cute.nvgpu.warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), self.dtype
        )
        thr_store = cute.make_tiled_copy_C(store_atom, mma_pv).get_slice(tidx)
        cute.copy(thr_store, thr_store.retile(rO), thr_store.partition_D(sO))

        # LSE: the thread holding column 0 of a row writes it.
        cO = cute.make_identity_tensor((self.tile_m, self.head_dim))
        cO = acc_rows_cols(thr_pv.partition_C(cO))
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
            tOsO, tOgO = tma_tile_partition(tma_atom_O, sO, gO)
            cute.copy(tma_atom_O, tOsO, tOgO)
            cute.arch.cp_async_bulk_commit_group()
            if const_expr(not self.separate_o):
                # O went over Q: the next tile's Q may come once the store has read it.
                cute.arch.cp_async_bulk_wait_group(0, read=True)
                if const_expr(self.max_ctas > 0):
                    cute.arch.mbarrier_arrive(bar_q + 1)
