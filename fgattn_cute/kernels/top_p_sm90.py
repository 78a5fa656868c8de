"""The selection of ``fg.predict.pooled_top_p`` as one kernel: one CTA per row of scores.

Each row (one query tile's pooled scores against every key) is loaded into shared memory once
and everything after that runs on chip (rows longer than 40,960 keys are worked on in place in
global memory instead, where the 132 rows in flight stay in L2):

1. softmax: x = scale * logit, p = exp(x - max) / sum (float32, accurate exp), in place; or, in
   ``from_probs`` mode, the row is already probabilities (the selection alone, for tests that
   compare it bit for bit with ``top_p_select`` on the same input).
2. the exact rule of ``fgattn_cute.predict.pooled`` (its module docstring): key j weighs
   floor(p_j * 2**52) (int64), the target is ceil(p * total) in float64, and three radix rounds
   over the probabilities' float32 bit patterns (10, 10 and 9 bits, the same digits as the torch
   code) find the boundary value tau and the weight above it; each round is a 1,024-bin int64
   histogram built with shared-memory atomics, scanned by one warp (the first round's is built
   by the pass that sums the weights).
3. the keys above tau, plus the first ``take`` keys equal to tau in index order (ranked only
   when some keys equal to tau are left out), plus the always-keep bits, are written as the
   sorted key list (``KeyIndex`` row format: zeros after
   the count). Index order comes from warp-contiguous segments of 32-key chunks: a ballot per
   chunk, popcounts within the warp, one prefix sum across the warps.

Same integer arithmetic as the torch selection, so on the same probabilities the kept sets are
identical; from logits, the probabilities themselves may differ from torch.softmax's in the last
bits (summation order).
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Float64, Int32, Int64, Uint32, const_expr

MASS_BITS = 52
MASS_SCALE = float(2**MASS_BITS)
LOW_BITS = (127 - MASS_BITS) << 23  # float32 bits of 2**-52, the smallest weighted probability
ROUNDS = ((19, 10), (9, 10), (0, 9))  # (shift, bits), most significant digit first
HIST_BINS = 1 << 10
MAX_SEQLEN_K_SMEM = 40960  # rows up to this long live in shared memory (160 KiB of float32)
MAX_SEQLEN_K = 1 << 17  # longer rows stay in global memory (L2), in place; bound of the bitmap


def _add(a, b):
    return a + b


class TopPSelectSm90:
    """Static configuration of one compiled selection kernel; launch through `__call__`."""

    def __init__(self, from_probs: bool = False, row_in_smem: bool = True,
                 num_threads: int = 512):
        self.from_probs = from_probs
        # False: the row is overwritten in place in global memory (its caller's scratch) and
        # every pass after the first reads it back, mostly from L2.
        self.row_in_smem = row_in_smem
        self.num_threads = num_threads
        self.num_warps = num_threads // 32
        self.max_n = MAX_SEQLEN_K_SMEM if row_in_smem else MAX_SEQLEN_K
        # Bit offsets of the slices a weight is split into for the 32-bit histogram atomics
        # (see hist_add): fewer, wider slices when rows are short.
        self.slices = (0, 16, 32) if row_in_smem else (0, 14, 28, 42)
        self.smem_row = MAX_SEQLEN_K_SMEM if row_in_smem else 4

    @cute.jit
    def __call__(
        self,
        mX: cute.Tensor,  # [R, N] float32: logits (or probabilities in from_probs mode)
        mKeepWords: cute.Tensor,  # [ceil(N / 32)] int32: always-keep bits, key j at bit j % 32
        mIndices: cute.Tensor,  # [R, capacity] int32
        mCounts: cute.Tensor,  # [R] int32
        scale: Float32,  # multiplies the logits before the softmax (ignored for probabilities)
        p_top: Float64,  # mass to keep, in (0, 1)
        stream: cuda.CUstream,
    ):
        num_warps = self.num_warps

        @cute.struct
        class SharedStorage:
            row: cute.struct.Align[cute.struct.MemRange[Float32, self.smem_row], 16]
            words: cute.struct.Align[cute.struct.MemRange[Uint32, self.max_n // 32], 16]
            hist: cute.struct.Align[
                cute.struct.MemRange[Uint32, len(self.slices) * HIST_BINS], 16
            ]
            red_i: cute.struct.MemRange[Int64, num_warps]
            red_f: cute.struct.MemRange[Float32, num_warps]
            bcast: cute.struct.MemRange[Int64, 4]

        self.kernel(mX, mKeepWords, mIndices, mCounts, scale, p_top, SharedStorage).launch(
            grid=[cute.size(mX.shape[0]), 1, 1],
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )

    @cute.kernel
    def kernel(
        self,
        mX: cute.Tensor,
        mKeepWords: cute.Tensor,
        mIndices: cute.Tensor,
        mCounts: cute.Tensor,
        scale: Float32,
        p_top: Float64,
        SharedStorage: cutlass.Constexpr,
    ):
        tidx = cute.arch.thread_idx()[0]
        warp = cute.arch.make_warp_uniform(tidx // 32)
        lane = tidx % 32
        row_idx = cute.arch.block_idx()[0]
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        x_row = mX[row_idx, None]
        if const_expr(self.row_in_smem):
            sP = storage.row.get_tensor(cute.make_layout(self.max_n))
        else:
            sP = x_row
        # The same bytes as int32: non-negative floats order like their bit patterns.
        sBitsP = cute.make_tensor(cute.recast_ptr(sP.iterator, dtype=Int32), sP.layout)
        sWords = storage.words.get_tensor(cute.make_layout(self.max_n // 32))
        sHist = storage.hist.get_tensor(cute.make_layout((HIST_BINS, len(self.slices))))
        red_i = storage.red_i.get_tensor(cute.make_layout(self.num_warps))
        red_f = storage.red_f.get_tensor(cute.make_layout(self.num_warps))
        bcast = storage.bcast.get_tensor(cute.make_layout(4))
        n = cute.size(mX.shape[1])
        n_chunks = cute.ceil_div(n, 32)
        T = self.num_threads

        for c in cutlass.range(tidx, n_chunks, T, unroll=1):
            sWords[c] = Uint32(mKeepWords[c])

        # The first radix round's histogram (every key with a non-zero weight takes part) is
        # built in the same pass that sums the weights, so that round needs no pass of its own.
        self.clear_hist(sHist, HIST_BINS, tidx)
        cute.arch.barrier()

        # 1. Probabilities in shared memory, their weights and the first round's histogram.
        # Global loads unrolled by 8: one CTA per SM, so each thread needs several in flight.
        local_total = Int64(0)
        if const_expr(self.from_probs):
            for j in cutlass.range(tidx, n, T, unroll=8):
                v = x_row[j]
                sP[j] = v
                local_total += self.weigh_first_digit(sHist, v)
        else:
            local_max = -Float32.inf
            for j in cutlass.range(tidx, n, T, unroll=8):
                v = x_row[j] * scale
                sP[j] = v
                local_max = cute.arch.fmax(local_max, v)
            row_max = self.block_reduce(local_max, cute.arch.fmax, red_f, warp, lane)
            local_sum = Float32(0.0)
            for j in cutlass.range(tidx, n, T, unroll=1):
                e = cute.math.exp(sP[j] - row_max)
                sP[j] = e
                local_sum += e
            row_sum = self.block_reduce(local_sum, _add, red_f, warp, lane)
            for j in cutlass.range(tidx, n, T, unroll=1):
                prob = sP[j] / row_sum
                sP[j] = prob
                local_total += self.weigh_first_digit(sHist, prob)

        # 2. Integer weights, the target, then the boundary value tau by radix rounds.
        total = self.block_reduce(local_total, _add, red_i, warp, lane)
        target_f = Float64(total) * p_top
        target = Int64(target_f)
        if Float64(target) < target_f:
            target += 1

        prefix = Int32(0)
        above = Int64(0)
        tau_bin_weight = Int64(0)
        for i, (shift, bits) in enumerate(ROUNDS):
            prefix, above, tau_bin_weight = self.radix_round(
                sP, sBitsP, sHist, bcast, n, prefix, above, target, shift, bits, i == 0,
                tidx, warp, lane,
            )
        tau = prefix
        # Weight of one key equal to tau: float32 bits tau + LOW_BITS, read back as a float.
        if tidx == 0:
            bcast[2] = Int64(tau + LOW_BITS)
        cute.arch.barrier()
        tau_bits = cute.make_tensor(cute.recast_ptr(bcast.iterator + 2, dtype=Int32),
                                    cute.make_layout(1))
        tau_float = cute.make_tensor(cute.recast_ptr(tau_bits.iterator, dtype=Float32),
                                     cute.make_layout(1))
        tau_weight = Int64(tau_float[0] * MASS_SCALE)
        if tau_weight < 1:
            tau_weight = Int64(1)
        take = (target - above + tau_weight - 1) // tau_weight
        any_mass = total > 0
        # The last round's bin is the single value tau, so it weighs (keys equal to tau) x
        # tau_weight. When all of them are taken (the usual case: one key), no tie needs a rank.
        ties_total = tau_bin_weight // tau_weight
        rank_ties = take < ties_total

        # 3. Keep bits in index order, then the list.
        chunks_per_warp = cute.ceil_div(n_chunks, self.num_warps)
        c_begin = cutlass.min(warp * chunks_per_warp, n_chunks)
        c_end = cutlass.min(c_begin + chunks_per_warp, n_chunks)
        lower_lanes = (Uint32(1) << Uint32(lane)) - Uint32(1)

        tie_rank = Int64(0)
        if rank_ties:
            ties = Int32(0)
            for c in cutlass.range(c_begin, c_end, unroll=1):
                j = c * 32 + lane
                tie = Boolean(False)
                if j < n:
                    tie = sBitsP[j] - LOW_BITS == tau
                ties += Int32(cute.arch.popc(Uint32(cute.arch.vote_ballot_sync(tie))))
            tie_rank, _ = self.exclusive_warp_prefix(Int64(ties), red_i, warp, lane)

        kept = Int32(0)
        for c in cutlass.range(c_begin, c_end, unroll=1):
            j = c * 32 + lane
            greater = Boolean(False)
            tie = Boolean(False)
            if j < n:
                rb = sBitsP[j] - LOW_BITS
                greater = rb > tau
                tie = rb == tau
            tie_ballot = Uint32(cute.arch.vote_ballot_sync(tie))
            rank = tie_rank + Int64(cute.arch.popc(tie_ballot & lower_lanes)) + 1
            keep = any_mass & (greater | (tie & (rank <= take)))
            word = Uint32(cute.arch.vote_ballot_sync(keep)) | sWords[c]
            cute.arch.sync_warp()  # every lane has read the word before lane 0 replaces it
            if lane == 0:
                sWords[c] = word
            kept += Int32(cute.arch.popc(word))
            tie_rank += Int64(cute.arch.popc(tie_ballot))
        slot_base, kept_total = self.exclusive_warp_prefix(Int64(kept), red_i, warp, lane)
        count = Int32(kept_total)

        indices = mIndices[row_idx, None]
        capacity = cute.size(indices)
        slot = Int32(slot_base)
        for c in cutlass.range(c_begin, c_end, unroll=1):
            word = sWords[c]
            if ((word >> Uint32(lane)) & Uint32(1)) != Uint32(0):
                mine = slot + Int32(cute.arch.popc(word & lower_lanes))
                if mine < capacity:
                    indices[mine] = c * 32 + lane
            slot += Int32(cute.arch.popc(word))
        for s in cutlass.range(count + tidx, capacity, T, unroll=1):
            indices[s] = 0
        if tidx == 0:
            mCounts[row_idx] = count

    # ------------------------------------------------------------------ helpers
    @cute.jit
    def radix_round(self, sP, sBitsP, sHist, bcast, n: Int32, prefix: Int32, above: Int64,
                    target: Int64, shift: cutlass.Constexpr[int], bits: cutlass.Constexpr[int],
                    hist_ready: cutlass.Constexpr[bool], tidx: Int32, warp: Int32, lane: Int32):
        """One digit: the weight histogram of the keys whose higher digits equal `prefix`, and
        the digit at which the cumulative weight from the top reaches target - above (clamped
        to the lowest digit, as the torch code does). Returns the extended prefix, the weight
        of the keys above it and the weight of the keys in its bin. With hist_ready (the first
        round) the histogram was built by the pass that summed the weights."""
        nb = 1 << bits
        if const_expr(not hist_ready):
            self.clear_hist(sHist, nb, tidx)
            cute.arch.barrier()
            for j in cutlass.range(tidx, n, self.num_threads, unroll=1):
                rb = sBitsP[j] - LOW_BITS  # < 0 exactly where the weight is 0
                if rb >> (shift + bits) == prefix:
                    weight = Int64(sP[j] * MASS_SCALE)
                    if weight != 0:
                        self.hist_add(sHist, (rb >> shift) & (nb - 1), weight)
        cute.arch.barrier()
        if warp == 0:
            # Lane l scans bins nb - 1 - (l * per .. l * per + per - 1): descending digits.
            per = nb // 32
            lane_sum = Int64(0)
            for i in cutlass.range(per, unroll=1):
                lane_sum += self.hist_get(sHist, nb - 1 - (lane * per + i))
            incl = lane_sum
            for offset in (1, 2, 4, 8, 16):
                up = cute.arch.shuffle_sync_up(incl, offset)
                if lane >= offset:
                    incl += up
            need = target - above
            reached = Uint32(cute.arch.vote_ballot_sync(incl >= need))
            first = Int32(31)
            if reached != Uint32(0):
                first = Int32(cute.arch.popc((reached & (~reached + Uint32(1))) - Uint32(1)))
            if lane == first:
                running = incl - lane_sum
                pos = Int32(nb - 1)
                found = Boolean(False)
                for i in cutlass.range(per, unroll=1):
                    if not found:
                        b = self.hist_get(sHist, nb - 1 - (lane * per + i))
                        if running + b >= need or lane * per + i == nb - 1:
                            pos = lane * per + i
                            found = Boolean(True)
                        else:
                            running += b
                bcast[0] = Int64((prefix << bits) | (nb - 1 - pos))
                bcast[1] = above + running
                bcast[3] = self.hist_get(sHist, nb - 1 - pos)
        cute.arch.barrier()
        return Int32(bcast[0]), bcast[1], bcast[3]

    @cute.jit
    def clear_hist(self, sHist, nb: cutlass.Constexpr[int], tidx: Int32):
        for b in cutlass.range(tidx, nb, self.num_threads, unroll=1):
            for part in cutlass.range_constexpr(len(self.slices)):
                sHist[b, part] = Uint32(0)

    @cute.jit
    def weigh_first_digit(self, sHist, prob: Float32) -> Int64:
        """The key's integer weight, added to the first round's bin of its probability."""
        weight = Int64(prob * MASS_SCALE)
        if weight != 0:
            shift, bits = ROUNDS[0]
            rb = prob.bitcast(Int32) - LOW_BITS
            self.hist_add(sHist, (rb >> shift) & ((1 << bits) - 1), weight)
        return weight

    # A bin's weight is kept as 32-bit sums of slices of each key's weight (bits 0-15, 16-31
    # and 32-51 for rows in shared memory; 0-13, 14-27, 28-41 and 42-51 for longer rows):
    # 32-bit shared-memory atomics are native, 64-bit ones compile to a CAS loop. None
    # overflows for rows of up to 2**16 (resp. 2**18) keys whose weights sum to at most 2**52
    # (a row summing to 1).
    @cute.jit
    def hist_add(self, sHist, b: Int32, weight: Int64):
        ends = self.slices[1:] + (MASS_BITS,)
        widths = [hi - lo for lo, hi in zip(self.slices, ends, strict=True)]
        cute.arch.atomic_add(sHist.iterator + b, Uint32(weight & ((1 << widths[0]) - 1)))
        for part in cutlass.range_constexpr(1, len(self.slices)):
            piece = Uint32((weight >> self.slices[part]) & ((1 << widths[part]) - 1))
            if piece != Uint32(0):
                cute.arch.atomic_add(sHist.iterator + part * HIST_BINS + b, piece)

    @cute.jit
    def hist_get(self, sHist, b: Int32) -> Int64:
        out = Int64(sHist[b, 0])
        for part in cutlass.range_constexpr(1, len(self.slices)):
            out += Int64(sHist[b, part]) << self.slices[part]
        return out

    @cute.jit
    def exclusive_warp_prefix(self, value: Int64, red_i, warp: Int32, lane: Int32):
        """(sum of the warp-uniform `value` over the warps before this one, sum over all)."""
        if lane == 0:
            red_i[warp] = value
        cute.arch.barrier()
        before = Int64(0)
        total = Int64(0)
        for w in cutlass.range_constexpr(self.num_warps):
            t = red_i[w]
            total += t
            if w < warp:
                before += t
        cute.arch.barrier()
        return before, total

    @cute.jit
    def block_reduce(self, value, op, red, warp: Int32, lane: Int32):
        """op-reduce one value per thread over the CTA (warp butterflies, then the warps'
        results through `red`, a shared buffer of value's type); every thread gets the result."""
        for offset in (16, 8, 4, 2, 1):
            value = op(value, cute.arch.shuffle_sync_bfly(value, offset))
        if lane == 0:
            red[warp] = value
        cute.arch.barrier()
        out = red[0]
        for w in cutlass.range_constexpr(1, self.num_warps):
            out = op(out, red[w])
        cute.arch.barrier()
        return out
