"""The selection of ``fg.predict.pooled_top_p`` for rows longer than shared memory holds
(40,961 to 131,072 keys: Wan 720p's 75,600), with nothing of the row kept on chip, so that two
CTAs of 512 threads share an SM and each hides the other's passes and barriers.

The rule, the digit plan, the weights and the scans are ``top_p_sm90``'s (inherited); only the
row's passes differ. Per row, two passes stream it from global memory (16-byte loads), and
nothing is written back to it:

1. each key's probability (from the logits and the row's statistics, or read as it is in
   ``from_probs`` mode) and its weight into the first round's 4,096-bin histogram; the
   fallbacks of ``top_p_sm90`` (a key outside the planned bins: the fixed first digit; a
   whole-units bin that wrapped its word: slices) each cost a pass of their own when they
   happen. The CTA-wide scan gives tau's first-round bin b0, the target and the weight
   above b0.
2. each key again: a bit in ``above`` (its first digit above b0) or in ``in_bin`` (equal), a
   byte per 8 keys; each warp owns a contiguous run of 32-key chunks and compacts its in-bin
   keys' probability bits, in index order, into its own region of ``cand``.

Then the rounds below b0 run over the candidates (8-bit digits, each 256-bin histogram scanned
by one warp). A warp whose region overflows (rows of many ties) sends the row down the slow
path: 12-bit rounds as passes over the in-bin chunks, each key's bits computed again from
global memory. ``settle`` turns each warp's bitmaps into keep words a chunk a lane, and the
list is written from them as ``top_p_sm90`` writes it.

Measured on an H200 at 75,600 keys, H=8 (4,728 rows): 1.30 ms against 1.69 for the kernel it
replaced (first ~44K keys in shared memory, the rest overwritten in place), the same lists
(perf/NOTES.md, top-p session 26).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Float64, Int32, Int64, Uint8, Uint32, const_expr

from fgattn_cute.kernels.top_p_sm90 import (
    DIGIT_BITS,
    EXACT_EXP,
    FIRST_DIGIT,
    HIST_BINS,
    LOW_BITS,
    TopPSelectSm90,
    _add,
)
from fgattn_cute.kernels.warp_scan import warp_allreduce, warp_inclusive_sum

MAX_SEQLEN_K = 1 << 17  # bound of the two bitmaps (16 KiB each)
THREADS = 512
WARPS = THREADS // 32
# Candidates (keys in b0's bin) a warp keeps in shared memory: ~2% of a pooled row's keys
# share that bin, ~95 a warp at 75,600 keys; more sends the row down the overflow path.
CAND_PER_WARP = 256


class TopPStreamSm90(TopPSelectSm90):
    """Static configuration of one compiled streaming selection kernel; launch through
    `__call__` (the arguments of ``TopPSelectSm90``)."""

    def __init__(self, from_probs: bool = False, max_ctas: int = 0):
        # (what the inherited helpers read: from_probs, num_threads, num_warps, whole_units)
        self.from_probs = from_probs
        # > 0: at most this many CTAs, each selecting rows r, r + grid, ... (level with one
        # CTA a row at 75,600 keys; the tests compare the two)
        if max_ctas < 0:
            raise ValueError(f"max_ctas must be >= 0, got {max_ctas}")
        self.max_ctas = max_ctas
        self.num_threads = THREADS
        self.num_warps = WARPS
        self.whole_units = not from_probs

    @cute.jit
    def __call__(self, mX, mStats, mKeepWords, mIndices, mCounts, p_top: Float64, stream):
        @cute.struct
        class SharedStorage:
            above: cute.struct.Align[cute.struct.MemRange[Uint32, MAX_SEQLEN_K // 32], 16]
            in_bin: cute.struct.Align[cute.struct.MemRange[Uint32, MAX_SEQLEN_K // 32], 16]
            hist: cute.struct.Align[cute.struct.MemRange[Uint32, 2 * HIST_BINS], 16]
            cand: cute.struct.Align[cute.struct.MemRange[Int32, WARPS * CAND_PER_WARP],
                                    16]
            red_i: cute.struct.MemRange[Int64, WARPS]
            red_f: cute.struct.MemRange[Float32, 2 * WARPS]
            red_mass: cute.struct.MemRange[Float64, WARPS]
            bcast: cute.struct.MemRange[Int64, 8]
            stats: cute.struct.MemRange[Float32, 3]

        grid = cute.size(mX.shape[0])
        if const_expr(self.max_ctas > 0):
            grid = cutlass.min(grid, self.max_ctas)
        self.kernel(mX, mStats, mKeepWords, mIndices, mCounts, p_top, SharedStorage).launch(
            grid=[grid, 1, 1],
            block=[THREADS, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
            min_blocks_per_mp=2,
            preferred_smem_carveout=100,
        )

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mStats: cute.Tensor, mKeepWords: cute.Tensor,
               mIndices: cute.Tensor, mCounts: cute.Tensor, p_top: Float64,
               SharedStorage: cutlass.Constexpr):
        tidx = cute.arch.thread_idx()[0]
        warp = cute.arch.make_warp_uniform(tidx // 32)
        lane = tidx % 32
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sAbove = storage.above.get_tensor(cute.make_layout(MAX_SEQLEN_K // 32))
        sInBin = storage.in_bin.get_tensor(cute.make_layout(MAX_SEQLEN_K // 32))
        shared = (
            sAbove,
            cute.make_tensor(cute.recast_ptr(sAbove.iterator, dtype=Uint8),
                             cute.make_layout(MAX_SEQLEN_K // 8)),
            sInBin,
            cute.make_tensor(cute.recast_ptr(sInBin.iterator, dtype=Uint8),
                             cute.make_layout(MAX_SEQLEN_K // 8)),
            storage.hist.get_tensor(cute.make_layout((HIST_BINS, 2))),
            storage.cand.get_tensor(cute.make_layout(WARPS * CAND_PER_WARP)),
            storage.red_i.get_tensor(cute.make_layout(WARPS)),
            storage.red_f.get_tensor(cute.make_layout((WARPS, 2))),
            storage.red_mass.get_tensor(cute.make_layout(WARPS)),
            storage.bcast.get_tensor(cute.make_layout(8)),
            storage.stats.get_tensor(cute.make_layout(3)),
        )
        # Cleared once: every scan leaves the bins it read clear.
        self.clear_hist(shared[4], HIST_BINS, tidx)
        n_rows = cute.size(mX.shape[0])
        stride = cute.arch.grid_dim()[0]
        for row_idx in cutlass.range(cute.arch.block_idx()[0], n_rows, stride, unroll=1):
            self.stream_row(mX, mStats, mKeepWords, mIndices, mCounts, p_top, shared, row_idx,
                            tidx, warp, lane)
            cute.arch.barrier()  # the next row's setup rewrites what this one's list read

    # ------------------------------------------------------------------ one row
    @cute.jit
    def stream_row(self, mX: cute.Tensor, mStats: cute.Tensor, mKeepWords: cute.Tensor,
                   mIndices: cute.Tensor, mCounts: cute.Tensor, p_top: Float64, shared,
                   row_idx: Int32, tidx: Int32, warp: Int32, lane: Int32):
        (sAbove, sAboveB, sInBin, sInBinB, sHist, sCand, red_i, red_f, red_mass, bcast,
         sStats) = shared
        n = cute.size(mX.shape[1])
        x_row = mX[row_idx, None]
        aligned = x_row.iterator.toint() % 16 == 0
        n_chunks = cute.ceil_div(n, 32)
        n_groups = cute.ceil_div(n, 8)
        if tidx == 0:
            bcast[2] = Int64(0)
            bcast[5] = Int64(0)  # a weighted key outside the planned bins
            bcast[7] = Int64(0)  # a warp's candidates overflowed its region
        if const_expr(not self.from_probs):
            if warp == 0:
                self.combine_stats(mStats[row_idx, None, None], sStats, lane)
        if lane == 0:
            red_mass[warp] = Float64(0.0)
        cute.arch.barrier()

        offset, p_hi, p_lo = self.probability_range(x_row, n, sStats, red_f, tidx, warp, lane, 4)
        shift1, base1 = self.digit_plan(p_lo, p_hi)
        exact = p_lo.bitcast(Int32) >= Int32(EXACT_EXP << 23)
        whole = Boolean(False)
        if const_expr(self.whole_units):
            whole = exact & (shift1 > 0)

        # 1. the first histogram
        outside = Int32(0)
        mass = Float64(0.0)
        if whole:
            outside, mass = self.first_pass(x_row, n, n_groups, aligned, offset, sHist, shift1,
                                            base1, tidx, True)
        else:
            outside, mass = self.first_pass(x_row, n, n_groups, aligned, offset, sHist, shift1,
                                            base1, tidx, False)
        if outside != 0:
            bcast[5] = Int64(1)
        mass = warp_allreduce(mass, _add)
        if lane == 0:
            red_mass[warp] = mass
        cute.arch.barrier()
        if bcast[5] != 0:
            # a key outside the planned bins: the fixed first digit, in slices
            self.clear_hist(sHist, HIST_BINS, tidx)
            cute.arch.barrier()
            shift1 = Int32(FIRST_DIGIT[0])
            base1 = Int32(0)
            whole = Boolean(False)
            self.rebuild_first(x_row, n, n_groups, aligned, offset, sHist, shift1, base1, bcast,
                               tidx)
        value0, above, tau_bin_weight, target, total = self.find_digit(
            sHist, red_i, bcast, base1, Int64(0), Int64(0), Int64(0), p_top, shift1,
            Int32(DIGIT_BITS), True, tidx, warp, lane, red_mass, whole)
        if const_expr(self.whole_units):
            if bcast[2] != 0:
                # a whole-units bin wrapped its word: the first histogram again, in slices
                self.rebuild_first(x_row, n, n_groups, aligned, offset, sHist, shift1, base1,
                                   bcast, tidx)
                value0, above, tau_bin_weight, target, total = self.find_digit(
                    sHist, red_i, bcast, base1, Int64(0), Int64(0), Int64(0), p_top, shift1,
                    Int32(DIGIT_BITS), True, tidx, warp, lane, red_mass, Boolean(False))

        # 2. above / in-bin bits, and each warp's candidates in index order
        chunks_per_warp = cute.ceil_div(n_chunks, WARPS)
        c_begin = cutlass.min(warp * chunks_per_warp, n_chunks)
        c_end = cutlass.min(c_begin + chunks_per_warp, n_chunks)
        wbase = warp * CAND_PER_WARP
        n_cand = self.second_pass(x_row, n, aligned, offset, sAboveB, sInBinB, sCand, wbase,
                                  shift1, value0, c_begin, c_end, lane)
        stored = n_cand <= CAND_PER_WARP
        if not stored:
            if lane == 0:
                bcast[7] = Int64(1)
        cute.arch.barrier()
        stored = bcast[7] == 0

        # 3. the rounds below b0
        value = value0
        if stored:
            value, above = self.rounds_over_keys(sHist, bcast, sCand, wbase, lane, n_cand, 32,
                                                 value, above, target, shift1, warp, lane)
        else:
            bits2 = cutlass.min(shift1, DIGIT_BITS)
            shift2 = shift1 - bits2
            plan = ((shift2, bits2), (Int32(0), shift2))
            for shift_r, bits_r in plan:
                if bits_r > 0:
                    self.weigh_in_bin(x_row, n, offset, sInBin, sHist, value << bits_r, shift_r,
                                      bits_r, c_begin, c_end, lane)
                    cute.arch.barrier()
                    value, above, tau_bin_weight, target, total = self.find_digit(
                        sHist, red_i, bcast, value << bits_r, above, target, total, p_top,
                        shift_r, bits_r, False, tidx, warp, lane, red_mass, Boolean(False))
        tau = value
        any_mass = total > 0
        rank_ties = bcast[6] != 0
        take = bcast[4]

        # 4. ties before each warp, the count, the list
        lower_lanes = (Uint32(1) << Uint32(lane)) - Uint32(1)
        ties_before = Int64(0)
        if rank_ties:
            ties = Int32(0)
            if stored:
                for i in cutlass.range(lane, n_cand, 32, unroll=1):
                    ties += Int32(sCand[wbase + i] - LOW_BITS == tau)
                ties = warp_allreduce(ties, _add)
            else:
                ties = self.count_ties(x_row, n, offset, sInBin, tau, c_begin, c_end, lane)
            ties_before, _ = self.exclusive_warp_prefix(Int64(ties), red_i, warp, lane)
        indices = mIndices[row_idx, None]
        kept = Int32(0)
        settle_args = (x_row, offset, sAbove, sInBin, sCand, wbase, mKeepWords, tau, any_mass,
                       rank_ties, take, ties_before, c_begin, c_end, lane)
        if stored:
            kept = self.settle(*settle_args, True)
        else:
            kept = self.settle(*settle_args, False)
        slot_base, kept_total = self.exclusive_warp_prefix(Int64(kept), red_i, warp, lane)
        self.list_from_words(sAbove, c_begin, c_end, Int32(slot_base), lane, lower_lanes,
                             indices)
        self.close_list(indices, mCounts, row_idx, Int32(kept_total), tidx)

    # ------------------------------------------------------------------ passes
    @cute.jit
    def load_probs(self, x_row: cute.Tensor, g: Int32, n: Int32, aligned: Boolean,
                   offset: Float32, ps):
        """The probabilities of keys 8 g .. 8 g + 7 (0 past the row) into ps: two 16-byte
        loads when the row allows, else one key at a time."""
        j0 = 8 * g
        fill = Float32(0.0) if const_expr(self.from_probs) else -Float32.inf
        if aligned & (j0 + 8 <= n):
            for h in cutlass.range_constexpr(2):
                v = cute.make_rmem_tensor(4, Float32)
                addr = (x_row.iterator + (j0 + 4 * h)).toint()
                src = cute.make_tensor(cute.make_ptr(Float32, addr, cute.AddressSpace.gmem,
                                                     assumed_align=16), cute.make_layout(4))
                cute.autovec_copy(src, v)
                for k in cutlass.range_constexpr(4):
                    ps[4 * h + k] = v[k]
        else:
            for k in cutlass.range_constexpr(8):
                ps[k] = self.load_or(x_row, j0 + k, n, fill)
        if const_expr(not self.from_probs):
            for k in cutlass.range_constexpr(8):
                ps[k] = self.probability(ps[k], offset)

    @cute.jit
    def key_bits(self, x_row: cute.Tensor, j: Int32, offset: Float32) -> Int32:
        """Key j's probability bits, computed again from global memory."""
        prob = x_row[j]
        if const_expr(not self.from_probs):
            prob = self.probability(prob, offset)
        return prob.bitcast(Int32)

    @cute.jit
    def first_pass(self, x_row: cute.Tensor, n: Int32, n_groups: Int32, aligned: Boolean,
                   offset: Float32, sHist, shift1: Int32, base1: Int32, tidx: Int32,
                   whole: cutlass.Constexpr[bool]):
        """Every key into the first histogram (whole units or slices); returns the flag of a
        weighted key outside the planned bins and (whole) the thread's float64 mass."""
        outside = Int32(0)
        mass = Float64(0.0)
        ps = cute.make_rmem_tensor(8, Float32)
        for g in cutlass.range(tidx, n_groups, THREADS, unroll=1):
            self.load_probs(x_row, g, n, aligned, offset, ps)
            for k in cutlass.range_constexpr(8):
                bits = ps[k].bitcast(Int32)
                rb = bits - LOW_BITS
                digit = (rb >> shift1) - base1
                in_range = Uint32(digit) < Uint32(HIST_BINS)
                if in_range:
                    units = self.exact_units(bits) if const_expr(whole) else self.bin_units(bits)
                    self.hist_add(sHist, digit, units, whole)
                outside |= Int32((rb >= 0) & (~in_range))
                if const_expr(whole):
                    mass += Float64(ps[k])
        return outside, mass

    @cute.jit
    def rebuild_first(self, x_row: cute.Tensor, n: Int32, n_groups: Int32, aligned: Boolean,
                      offset: Float32, sHist, shift1: Int32, base1: Int32, bcast, tidx: Int32):
        """The first histogram again, in slices (the histogram is clear), then the barrier."""
        ps = cute.make_rmem_tensor(8, Float32)
        for g in cutlass.range(tidx, n_groups, THREADS, unroll=1):
            self.load_probs(x_row, g, n, aligned, offset, ps)
            for k in cutlass.range_constexpr(8):
                self.weigh_first_digit(sHist, ps[k], shift1, base1, bcast)
        cute.arch.barrier()

    @cute.jit
    def second_pass(self, x_row: cute.Tensor, n: Int32, aligned: Boolean, offset: Float32,
                    sAboveB, sInBinB, sCand, wbase: Int32, shift1: Int32, value0: Int32,
                    c_begin: Int32, c_end: Int32, lane: Int32) -> Int32:
        """This warp's chunks: a byte of above bits and one of in-bin bits per 8 keys, and the
        in-bin keys' bits in index order into the warp's region (as many as fit). Returns the
        warp's number of in-bin keys (more than the region holds: overflow)."""
        n_cand = Int32(0)
        ps = cute.make_rmem_tensor(8, Float32)
        for g0 in cutlass.range(c_begin * 4, c_end * 4, 32, unroll=1):
            g = g0 + lane
            above_mask = Uint32(0)
            in_mask = Uint32(0)
            cnt = Int32(0)
            if g < c_end * 4:
                self.load_probs(x_row, g, n, aligned, offset, ps)
                for k in cutlass.range_constexpr(8):
                    high = (ps[k].bitcast(Int32) - LOW_BITS) >> shift1
                    above_mask |= Uint32(high > value0) << Uint32(k)
                    is_in = high == value0
                    in_mask |= Uint32(is_in) << Uint32(k)
                    cnt += Int32(is_in)
                sAboveB[g] = Uint8(above_mask)
                sInBinB[g] = Uint8(in_mask)
            if Uint32(cute.arch.vote_ballot_sync(cnt > 0)) != Uint32(0):
                incl = warp_inclusive_sum(cnt, lane)
                pos = n_cand + incl - cnt
                if cnt > 0:
                    for k in cutlass.range_constexpr(8):
                        if ((in_mask >> Uint32(k)) & Uint32(1)) != Uint32(0):
                            if pos < CAND_PER_WARP:
                                sCand[wbase + pos] = ps[k].bitcast(Int32)
                            pos += 1
                n_cand += cute.arch.shuffle_sync(incl, 31)
        cute.arch.sync_warp()
        return n_cand

    @cute.jit
    def weigh_in_bin(self, x_row: cute.Tensor, n: Int32, offset: Float32, sInBin, sHist,
                     base: Int32, shift: Int32, bits: Int32, c_begin: Int32, c_end: Int32,
                     lane: Int32):
        """(overflow) A round's histogram over this warp's in-bin keys, their bits computed
        again from global memory; chunks without one are skipped."""
        for c in cutlass.range(c_begin, c_end, unroll=1):
            in_w = sInBin[c]
            if in_w != Uint32(0):
                if ((in_w >> Uint32(lane)) & Uint32(1)) != Uint32(0):
                    self.weigh_digits(sHist, [self.key_bits(x_row, c * 32 + lane, offset)],
                                      base, shift, bits)

    @cute.jit
    def count_ties(self, x_row: cute.Tensor, n: Int32, offset: Float32, sInBin, tau: Int32,
                   c_begin: Int32, c_end: Int32, lane: Int32) -> Int32:
        """(overflow) This warp's keys equal to tau."""
        ties = Int32(0)
        for c in cutlass.range(c_begin, c_end, unroll=1):
            in_w = sInBin[c]
            if in_w != Uint32(0):
                tie = Boolean(False)
                if ((in_w >> Uint32(lane)) & Uint32(1)) != Uint32(0):
                    tie = self.key_bits(x_row, c * 32 + lane, offset) - LOW_BITS == tau
                ties += Int32(cute.arch.popc(Uint32(cute.arch.vote_ballot_sync(tie))))
        return ties

    @cute.jit
    def settle(self, x_row: cute.Tensor, offset: Float32, sAbove, sInBin, sCand, wbase: Int32,
               mKeepWords: cute.Tensor, tau: Int32, any_mass: Boolean, rank_ties: Boolean,
               take: Int64, ties_before: Int64, c_begin: Int32, c_end: Int32, lane: Int32,
               stored: cutlass.Constexpr[bool]) -> Int32:
        """This warp's keep words, written over its above words, a chunk a lane: a key is kept
        when it is above b0's bin, in the bin and above tau or among the first `take` ties in
        index order, or always-keep (only always-keep keys when the row weighs nothing).
        Returns the warp's number of kept keys. A lane's in-bin keys are its chunk's
        candidates (their place from a warp scan of the in-bin counts) or, after an overflow,
        their bits computed again from global memory; ties get their ranks from a second
        scan."""
        kept = Int32(0)
        cand_before = Int32(0)  # in-bin keys of this warp's earlier groups of 32 chunks
        tie_rank = ties_before
        for c0 in cutlass.range(c_begin, c_end, 32, unroll=1):
            c = c0 + lane
            live = c < c_end
            above_w = Uint32(0)
            in_w = Uint32(0)
            always_w = Uint32(0)
            if live:
                above_w = sAbove[c]
                in_w = sInBin[c]
                always_w = Uint32(mKeepWords[c])
            n_in = Int32(cute.arch.popc(in_w))
            in_incl = warp_inclusive_sum(n_in, lane)
            first = cand_before + in_incl - n_in
            cand_before += cute.arch.shuffle_sync(in_incl, 31)
            chosen = Uint32(0)
            tie_w = Uint32(0)
            rest = in_w
            for i in cutlass.range(n_in, unroll=1):
                bit = rest & (~rest + Uint32(1))
                rest = rest ^ bit
                rb = Int32(0)
                if const_expr(stored):
                    rb = sCand[wbase + first + i]
                else:
                    rb = self.key_bits(x_row, c * 32 + Int32(cute.arch.popc(bit - Uint32(1))),
                                       offset)
                rb = rb - LOW_BITS
                if rb > tau:
                    chosen = chosen | bit
                if rb == tau:
                    tie_w = tie_w | bit
            if rank_ties:
                n_ties = Int32(cute.arch.popc(tie_w))
                tie_incl = warp_inclusive_sum(n_ties, lane)
                rank_base = tie_rank + Int64(tie_incl - n_ties)  # ties before this chunk
                tie_rank += Int64(cute.arch.shuffle_sync(tie_incl, 31))
                wanted = take - rank_base
                if wanted >= Int64(n_ties):
                    chosen = chosen | tie_w
                elif wanted > Int64(0):
                    for _ in cutlass.range(Int32(wanted), unroll=1):  # its lowest `wanted` ties
                        bit = tie_w & (~tie_w + Uint32(1))
                        tie_w = tie_w ^ bit
                        chosen = chosen | bit
            else:
                chosen = chosen | tie_w
            word = always_w
            if any_mass:
                word = word | above_w | chosen
            if live:
                sAbove[c] = word
            kept += Int32(cute.arch.popc(word))
        cute.arch.sync_warp()  # the list pass reads other lanes' words
        return warp_allreduce(kept, _add)
