"""The selection of ``fg.predict.pooled_top_p`` as one kernel: one CTA per row of scores, for
rows of up to 40,960 keys (longer rows: ``top_p_stream_sm90``, which inherits the rule's
helpers from this class).

Each row (one query tile's pooled scores against every key) is loaded into shared memory once,
by four bulk copies (the TMA unit; the first pass starts on the first), and everything after
that runs on chip (rows of at most 18,432 keys get a smaller buffer and half the threads, so
that two CTAs share an SM).
Once its own row is in, a CTA prefetches into L2 the row that the CTA after it on the same SM
will most likely load (one row per SM further on), so that load comes from L2 (with short rows
that row has usually started already; see ``prefetch_row``):

1. softmax: p = exp(x - max) / sum of the scaled logits x (float32, as one FMA and one fast
   exp2: `probability`), in place, in one pass: the row's max, min and sum come with it (the
   scores kernel's per-part statistics, combined by one warp while the row lands); or, in
   ``from_probs`` mode, the row is already probabilities (the selection alone, for tests that
   compare it bit for bit with ``top_p_select`` on the same input).
2. the exact rule of ``fgattn_cute.predict.pooled`` (its module docstring): key j weighs
   floor(p_j * 2**52) (an integer, read off the float's exponent and significand), the target
   is ceil(p * total) in float64, and up to three radix rounds over the probabilities' float32
   bit patterns find the boundary value tau and the weight above it. The first round's 4,096
   bins cover the row's range of keys at the finest shift that fits (`digit_plan`, from the
   row's extreme probabilities), then up to 12 more bits, then the rest (the torch code's
   digits are 10, 10 and 9; the rule does not depend on them). Each round is a histogram
   (4,096 bins) of exact weights built with
   32-bit shared-memory atomics (see ``bin_units``) and scanned by the whole CTA; the first
   round's is built by the pass that computes the probabilities, and its scan gives the row's
   total weight (on pooled_top_p's rows with one atomic a key, checked against a float64 sum:
   ``whole_units``). The rounds below the first run over the few keys of its chosen bin,
   gathered by one pass (``gather_bin_keys``): up to 128 of them are ranked against each other
   directly (``resolve_over_keys``), more in 8-bit digits, each histogram scanned by one warp
   (``warp_find_digit``); a bin of over 1,024 keys takes the rounds as passes over the row.
3. the keys above tau, plus the first ``take`` keys equal to tau in index order (ranked only
   when some keys equal to tau are left out), plus the always-keep bits, are written as the
   sorted key list (``KeyIndex`` row format: zeros after the count). Index order comes from
   warp-contiguous segments of 32-key chunks: a ballot per chunk, popcounts within the warp,
   one prefix sum across the warps. Rows with no ties to rank and no always-keep bits
   (pooled_top_p's usual case) skip the keep bits: a warp counts its keys at or above
   tau by 16-byte loads and the list pass tests the keys themselves (``count_kept_vec``).

Same integer arithmetic as the torch selection, so on the same probabilities the kept sets are
identical; from logits, the probabilities themselves may differ from torch.softmax's in their
last bits (~2**-18 relative, up to a factor common to the row: `probability`; the row sum's
summation order), so a key at the boundary may be chosen differently.
"""

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Float64, Int32, Int64, Uint32, const_expr
from cutlass._mlir.dialects import llvm, nvvm

from fgattn_cute.kernels.warp_scan import warp_allreduce, warp_inclusive_sum

MASS_BITS = 52
MASS_SCALE = float(2**MASS_BITS)
LOG2_E = math.log2(math.e)
LOW_BITS = (127 - MASS_BITS) << 23  # float32 bits of 2**-52, the smallest weighted probability
# A probability with biased exponent E and 24-bit significand m weighs m << (E - EXACT_EXP)
# when E >= EXACT_EXP (P >= 2**-29, weight exact), else m >> (EXACT_EXP - E) (floored).
EXACT_EXP = 127 - MASS_BITS + 23
SLICE_BITS = 12  # a bin sums each key's significand in two 12-bit slices (32-bit atomics)
# The fixed first digit, (shift, bits): the exponent and 6 significand bits, used when a row's
# planned digit (`digit_plan`) would miss a key. A row's plan: 4,096 bins of rb >> shift1 from
# its lowest key's, then up to 12 more bits, then the rest (perf/NOTES.md, top-p session 12).
FIRST_DIGIT = (17, 12)
HIST_BINS = 1 << 12
# Keys of the first round's chosen bin gathered for the rounds below it (`gather_bin_keys`); a
# bin with more keys takes those rounds as passes over the row.
CAND_CAP = 1024
# Up to this many of them are ranked against each other (`resolve_over_keys`, a loop over them
# all per key) instead of by radix rounds; 128 keys' units still fit 32 bits.
RESOLVE_CAP = 128
DIGIT_BITS = 12  # every round's histogram has 4,096 bins; a round uses at most this many digits
# Ulps of slack around the row's extreme keys' probabilities when the first digit is placed per
# row. Only a guard: those probabilities are the extreme keys' own (the same FMA and
# ex2.approx, monotone in x), so every key lies within them; a key that did not would be
# caught by the fallback to the fixed first digit.
PLAN_MARGIN = 64
# A row in shared memory arrives in this many bulk copies, each with its own barrier, so that
# the first pass over the logits starts on the first part while the rest is still in flight.
LOAD_CHUNKS = 4
SHARED_CLUSTER = 7  # LLVM address space of shared::cluster (the bulk copy's destination)
MAX_SEQLEN_K_SMEM = 40960  # rows up to this long live in shared memory (160 KiB of float32)
# Rows up to this long (CogVideoX's 17,550) get a 72 KiB buffer and 512 threads, so that two
# CTAs share an SM and each hides the other's row load and barriers (27% faster there on an
# H100; perf/NOTES.md, top-p session 10).
MAX_SEQLEN_K_SHORT = 18432


def _add(a, b):
    return a + b


def _aligned_span(x_row: cute.Tensor, n: Int32):
    """(shift, head, body) of a float32 row of n elements: shift = its start address / 4 mod 4,
    element `head` the first at a 16-byte boundary, `body` the whole 16-byte chunks from there
    (what one bulk copy or prefetch can move)."""
    shift = Int32((x_row.iterator.toint() // 4) % 4)
    head = cutlass.min((4 - shift) % 4, n)
    return shift, head, (n - head) // 4 * 4


def _global_ptr(x: cute.Tensor, offset: Int32):
    """An LLVM pointer in the global address space to element `offset` of x."""
    return llvm.addrspacecast(llvm.PointerType.get(cute.AddressSpace.gmem.value),
                              (x.iterator + offset).llvm_ptr)


def _fma(a: Float32, b: Float32, c: Float32) -> Float32:
    """a * b + c with one rounding (never split, whatever the compiler's contraction flags)."""
    return Float32(llvm.intr_fma(a.ir_value(), b.ir_value(), c.ir_value()))


class TopPSelectSm90:
    """Static configuration of one compiled selection kernel; launch through `__call__`."""

    def __init__(self, from_probs: bool = False, short_rows: bool = False, max_ctas: int = 0):
        self.from_probs = from_probs
        # > 0: at most this many CTAs (as many as fit on the GPU at once), each selecting rows
        # r, r + grid, ... and loading its next row under the current one's list writing.
        if max_ctas < 0:
            raise ValueError(f"max_ctas must be >= 0, got {max_ctas}")
        self.max_ctas = max_ctas
        # Rows of at most MAX_SEQLEN_K_SHORT keys: two CTAs of 512 threads per SM (64
        # registers each). Otherwise one CTA of 1,024 threads (64 registers, no spills): 3%
        # faster than 512 (perf/NOTES.md, session 8).
        self.short_rows = short_rows
        self.num_threads = num_threads = 512 if short_rows else 1024
        self.num_warps = num_threads // 32
        self.max_n = MAX_SEQLEN_K_SHORT if short_rows else MAX_SEQLEN_K_SMEM
        # The scan of a round's histogram gives each thread a whole number of 16-byte groups
        # of bins.
        assert HIST_BINS % (4 * num_threads) == 0
        # Rows (from logits) whose every key weighs its whole significand (`exact_units`) and
        # that span at least 4,096 float values (shift1 > 0) add each key to the first
        # histogram with one 32-bit atomic of its whole units instead of two 12-bit slices
        # (-6% on the selection at Wan 480p, H200; perf/NOTES.md, top-p session 22). A bin of
        # 256 keys or more can wrap its word, so the pass also sums the probabilities in
        # float64 (exact for these keys) and the first scan compares that total with the
        # histogram's; on a mismatch the histogram is built again in slices. (From
        # probabilities, the tests' mode, every row keeps the slices.)
        self.whole_units = not from_probs
        # One CTA per row: rows without ties to rank or always-keep bits skip the keep words
        # (`count_kept_vec`). (A persistent CTA loads its next row over the keys before the
        # list pass, which this path reads.)
        self.count_by_vectors = max_ctas == 0

    @cute.jit
    def __call__(
        self,
        mX: cute.Tensor,  # [R, N] float32: scaled logits (or probabilities in from_probs mode)
        # [R, parts, 3] float32: max, min and sum of exp(x - max) of each part of a row
        # (ignored in from_probs mode)
        mStats: cute.Tensor,
        mKeepWords: cute.Tensor,  # [ceil(N / 32)] int32: always-keep bits, key j at bit j % 32
        mIndices: cute.Tensor,  # [R, capacity] int32
        mCounts: cute.Tensor,  # [R] int32
        p_top: Float64,  # mass to keep, in (0, 1)
        stream: cuda.CUstream,
    ):
        num_warps = self.num_warps

        @cute.struct
        class SharedStorage:
            row: cute.struct.Align[cute.struct.MemRange[Float32, self.max_n + 4], 16]
            load_bar: cute.struct.MemRange[Int64, LOAD_CHUNKS]
            words: cute.struct.Align[cute.struct.MemRange[Uint32, self.max_n // 32], 16]
            hist: cute.struct.Align[
                cute.struct.MemRange[Uint32, 2 * HIST_BINS], 16
            ]
            red_i: cute.struct.MemRange[Int64, num_warps]
            red_f: cute.struct.MemRange[Float32, 2 * num_warps]
            red_mass: cute.struct.MemRange[Float64, num_warps]  # per warp: its keys' mass
            bcast: cute.struct.MemRange[Int64, 8]
            stats: cute.struct.MemRange[Float32, 3]  # the row's max, sum and min (`combine_stats`)
            cand: cute.struct.Align[cute.struct.MemRange[Int32, CAND_CAP], 16]
            cand_count: cute.struct.MemRange[Int32, 4]

        # Short rows: registers capped for two CTAs per SM, and the largest shared-memory
        # carveout (given, so that compiling needs no device to ask for it). The other
        # configurations keep the driver's choice.
        two_per_sm = dict(min_blocks_per_mp=2, preferred_smem_carveout=100)
        grid = cute.size(mX.shape[0])
        if const_expr(self.max_ctas > 0):
            grid = cutlass.min(grid, self.max_ctas)
        self.kernel(mX, mStats, mKeepWords, mIndices, mCounts, p_top, SharedStorage).launch(
            grid=[grid, 1, 1],
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
            **(two_per_sm if self.short_rows else {}),
        )

    @cute.kernel
    def kernel(
        self,
        mX: cute.Tensor,
        mStats: cute.Tensor,
        mKeepWords: cute.Tensor,
        mIndices: cute.Tensor,
        mCounts: cute.Tensor,
        p_top: Float64,
        SharedStorage: cutlass.Constexpr,
    ):
        tidx = cute.arch.thread_idx()[0]
        warp = cute.arch.make_warp_uniform(tidx // 32)
        lane = tidx % 32
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        n_rows = cute.size(mX.shape[0])
        n = cute.size(mX.shape[1])
        sHist = storage.hist.get_tensor(cute.make_layout((HIST_BINS, 2)))
        bcast = storage.bcast.get_tensor(cute.make_layout(8))
        load_bar = storage.load_bar.data_ptr()
        shared = (
            storage.row.data_ptr(),
            load_bar,
            storage.words.get_tensor(cute.make_layout(self.max_n // 32)),
            sHist,
            storage.red_i.get_tensor(cute.make_layout(self.num_warps)),
            storage.red_f.get_tensor(cute.make_layout((self.num_warps, 2))),
            bcast,
            storage.stats.get_tensor(cute.make_layout(3)),
            storage.red_mass.get_tensor(cute.make_layout(self.num_warps)),
            storage.cand.get_tensor(cute.make_layout(CAND_CAP)),
            storage.cand_count.get_tensor(cute.make_layout(4)),
        )
        if tidx == 0:
            for c in cutlass.range_constexpr(LOAD_CHUNKS):
                cute.arch.mbarrier_init(load_bar + c, 1)
        cute.arch.mbarrier_init_fence()
        # Cleared once: every `find_digit` leaves the histogram clear behind it.
        self.clear_hist(sHist, HIST_BINS, tidx)
        if const_expr(self.count_by_vectors):
            if tidx == 0:
                bcast[7] = Int64(0)  # set by the row's setup when a keep word is non-zero
        cute.arch.barrier()
        row_first = cute.arch.block_idx()[0]
        self.load_row(mX, row_first, storage.row.data_ptr(), load_bar, n, tidx)
        if const_expr(self.max_ctas > 0):
            # Persistent: row r's successor on this CTA is r + (the grid), whose load starts as
            # soon as row r's last pass over its probabilities is done, under r's list writing.
            stride = cute.arch.grid_dim()[0]
            phase = Int32(0)
            for row_idx in cutlass.range(row_first, n_rows, stride, unroll=1):
                self.select_row(mX, mStats, mKeepWords, mIndices, mCounts, p_top, shared,
                                row_idx, row_idx + stride, phase, n, tidx, warp, lane)
                phase = phase ^ 1
        else:
            self.select_row(mX, mStats, mKeepWords, mIndices, mCounts, p_top, shared,
                            row_first, n_rows, Int32(0), n, tidx, warp, lane)

    @cute.jit
    def select_row(self, mX: cute.Tensor, mStats: cute.Tensor, mKeepWords: cute.Tensor,
                   mIndices: cute.Tensor, mCounts: cute.Tensor, p_top: Float64, shared,
                   row_idx: Int32, next_row: Int32, phase: Int32, n: Int32, tidx: Int32,
                   warp: Int32, lane: Int32):
        """Selects row row_idx, whose load (`load_row`, barrier phase `phase`) has been issued;
        issues next_row's once this row's probabilities are no longer read (none when
        next_row is past the rows)."""
        sRow, load_bar, sWords, sHist, red_i, red_f, bcast, sStats, red_mass, sCand, sCount = (
            shared)
        x_row, sP, head, body = self.row_view(mX, row_idx, sRow, n)
        chunk = self.load_chunk(body)
        if const_expr(self.from_probs):
            self.wait_row(load_bar, phase)
        # The same bytes as int32: non-negative floats order like their bit patterns.
        sBitsP = cute.make_tensor(cute.recast_ptr(sP.iterator, dtype=Int32), sP.layout)
        n_chunks = cute.ceil_div(n, 32)
        T = self.num_threads

        # The row's statistics first: with the row prefetched, their loads and the warp's
        # reductions are what the CTA waits for before its first pass (5% of the selection's
        # stall samples at this barrier, when combined after warp 0's other setup below).
        if const_expr(not self.from_probs):
            if warp == 0:
                self.combine_stats(mStats[row_idx, None, None], sStats, lane)
        for c in cutlass.range(tidx, n_chunks, T, unroll=1):
            word = Uint32(mKeepWords[c])
            sWords[c] = word
            if const_expr(self.count_by_vectors):
                if word != Uint32(0):
                    bcast[7] = Int64(1)

        # The first radix round's histogram (every key with a non-zero weight takes part) is
        # built in the pass that computes the probabilities, so that round needs no pass of its
        # own. (The histogram is clear: the previous row's scans cleared it.)
        if tidx == 0:
            bcast[5] = Int64(0)  # set when a key falls outside the first digit's planned range
            sCount[0] = Int32(0)  # keys of the first round's chosen bin (`gather_bin_keys`)
            sCount[1] = Int32(0)  # set when `resolve_over_keys` finds tau
        cute.arch.barrier()

        # 1. Probabilities in shared memory and the first round's histogram of their weights
        # (the row's total weight comes out of that round's scan).
        whole = Boolean(False)  # (whole_units) the first histogram's bins hold whole units
        offset, p_hi, p_lo = self.probability_range(sP, n, sStats, red_f, tidx, warp, lane, 8)
        shift1, base1 = self.digit_plan(p_lo, p_hi)
        if const_expr(self.from_probs):
            for j in cutlass.range(tidx, n, T, unroll=8):
                self.weigh_first_digit(sHist, sP[j], shift1, base1, bcast)
        else:
            # One pass: p = exp(x - max) / sum as 2 ** (x log2(e) - offset) (`probability`),
            # stored in place, and the first histogram; each bulk copy's part as soon as it has
            # landed (the few elements outside the copies are in shared memory already).
            outside = Int32(0)  # set where a weighted key missed the planned bins
            mass = Float64(0.0)  # (whole_units, exact rows) this thread's keys' probabilities
            # Every key's probability is at least p_lo (the same monotone operations), so when
            # p_lo's exponent is at least EXACT_EXP no key's weight is floored and a key's units
            # are its significand, read straight off its bits (`exact_units`): pooled_top_p's
            # near-uniform rows, where it saves a sixth of the pass's instructions (2.4% of the
            # selection at CogVideoX, level at Wan 480p; H200, perf/NOTES.md, session 21).
            # Other rows take the general weights.
            exact = p_lo.bitcast(Int32) >= Int32(EXACT_EXP << 23)
            parts = (sP, head, body, chunk, load_bar, phase, offset, sHist, shift1, base1, bcast,
                     tidx)
            # (`whole_units`: not for rows that span fewer than 4,096 float values, shift1 = 0:
            # rows of ties, whose bins would wrap)
            whole = exact & (shift1 > 0)
            if whole:
                outside, mass = self.probability_parts(*parts, True, True)
            elif exact:
                outside, mass = self.probability_parts(*parts, True, False)
            else:
                outside, mass = self.probability_parts(*parts, False, False)
            edge = tidx
            if tidx >= head:  # threads head.. take the elements after the copies
                edge = head + body + (tidx - head)
            if edge < n and tidx < head + 4:
                prob = self.probability(sP[edge], offset)
                sP[edge] = prob
                self.weigh_first_digit(sHist, prob, shift1, base1, bcast)
                mass += Float64(prob)
            if outside != 0:
                bcast[5] = Int64(1)
            mass = warp_allreduce(mass, _add)
            if lane == 0:
                red_mass[warp] = mass

        if tidx < 32:
            future = next_row
            if const_expr(self.max_ctas == 0):
                future = row_idx + Int32(nvvm.read_ptx_sreg_nsmid(Int32.mlir_type))
            if tidx == 0:
                self.prefetch_row(mX, future)
            if const_expr(not self.from_probs):
                self.prefetch_stats(mStats, future, tidx)

        # A weighted key outside the planned range left the first histogram incomplete: build
        # it again with the fixed first digit. Valid probabilities never do this (the plan
        # comes from the row's own extremes); a -0.0 or NaN entry does (the tests use -0.0).
        cute.arch.barrier()
        if bcast[5] != 0:
            self.clear_hist(sHist, HIST_BINS, tidx)
            cute.arch.barrier()
            shift1 = Int32(FIRST_DIGIT[0])
            base1 = Int32(0)
            self.weigh_row_first_digit(sP, n, sHist, shift1, base1, bcast, tidx)

        # 2. The target, then the boundary value tau by radix rounds: 12 bits at shift1, then
        # at most 12 more, then what is left (up to 5 bits; none when shift1 <= 12).
        bits2 = cutlass.min(shift1, DIGIT_BITS)
        shift2 = shift1 - bits2
        # `value` is the chosen bin's rb >> shift after each round (rb: a key's float bits less
        # LOW_BITS); a round's digit is a key's rb >> shift less its `base`.
        value, above, tau_bin_weight, target, total = self.radix_round(
            sBitsP, n, sHist, red_i, bcast, base1, Int64(0), Int64(0), Int64(0), Int64(0),
            p_top, shift1, Int32(DIGIT_BITS), True, tidx, warp, lane, red_mass, whole,
        )
        if const_expr(self.whole_units):
            if bcast[2] != 0:
                # A bin's 32-bit word wrapped: the first histogram again, in slices (the scan
                # left it clear), and its scan (from the first round's own inputs).
                self.weigh_row_first_digit(sP, n, sHist, shift1, base1, bcast, tidx)
                value, above, tau_bin_weight, target, total = self.radix_round(
                    sBitsP, n, sHist, red_i, bcast, base1, Int64(0), Int64(0), Int64(0),
                    Int64(0), p_top, shift1, Int32(DIGIT_BITS), True, tidx, warp, lane,
                    red_mass, Boolean(False),
                )
        # The first bin holds few keys (pooled_top_p's rows at Wan 480p: median 18 on random
        # inputs, 37 on video-like ones, whose first digit leaves 15-16 bits where random
        # rows' leaves 11-12): one pass gathers them, and up to RESOLVE_CAP of them are ranked
        # against each other, where radix rounds took a pass over the row and a CTA-wide scan
        # each (-9% on video-like rows, then -3% on both kinds; perf/NOTES.md, top-p sessions
        # 26-27). More keys take 8-bit rounds over them, and a bin of over CAND_CAP keys the
        # rounds as passes over the row. (shift1 = 0: the first digit was the last.)
        n_cand = Int32(CAND_CAP + 1)
        if shift1 > 0:
            self.gather_bin_keys(sBitsP, n, shift1, value, sCand, sCount, tidx)
            cute.arch.barrier()
            n_cand = sCount[0]
        resolved = Boolean(False)
        if n_cand <= RESOLVE_CAP:
            self.resolve_over_keys(bcast, sCand, sCount, n_cand, above, target, tidx)
            cute.arch.barrier()
            resolved = sCount[1] != 0
            if resolved:
                value = Int32(bcast[0])
                above = bcast[1]
        if not resolved:
            if n_cand <= CAND_CAP:
                value, above = self.rounds_over_keys(sHist, bcast, sCand, Int32(0), tidx,
                                                     n_cand, T, value, above, target, shift1,
                                                     warp, lane)
            else:
                for shift, bits in ((shift2, bits2), (Int32(0), shift2)):
                    value, above, tau_bin_weight, target, total = self.radix_round(
                        sBitsP, n, sHist, red_i, bcast, value << bits, above, tau_bin_weight,
                        target, total, p_top, shift, bits, False, tidx, warp, lane, red_mass,
                        Boolean(False),
                    )
        tau = value
        any_mass = total > 0

        # 3. Keep bits in index order, then the list.
        chunks_per_warp = cute.ceil_div(n_chunks, self.num_warps)
        c_begin = cutlass.min(warp * chunks_per_warp, n_chunks)
        c_end = cutlass.min(c_begin + chunks_per_warp, n_chunks)
        lower_lanes = (Uint32(1) << Uint32(lane)) - Uint32(1)

        # Without ties to rank or always-keep bits, a key is kept exactly when its bits are
        # at least tau's: a warp counts its keys by 16-byte loads, and the list pass reads the
        # keys themselves (`count_kept_vec`), no keep words written.
        from_keys = Boolean(False)
        if const_expr(self.count_by_vectors):
            from_keys = (bcast[6] == 0) & (bcast[7] == 0)
        kept = Int32(0)
        if from_keys:
            kept = self.count_kept_vec(sBitsP, n, tau, any_mass, c_begin, c_end)
        else:
            kept = self.keep_bits(sWords, sBitsP, n, tau, bcast, any_mass, c_begin, c_end,
                                  red_i, warp, lane, lower_lanes)
        slot_base, kept_total = self.exclusive_warp_prefix(Int64(kept), red_i, warp, lane)
        count = Int32(kept_total)
        # Past that prefix's barriers no thread reads this row's keys again: the next row's
        # load overwrites them while this one's list is written.
        if const_expr(self.max_ctas > 0):
            if next_row < cute.size(mX.shape[0]):
                self.load_row(mX, next_row, sRow, load_bar, n, tidx)

        indices = mIndices[row_idx, None]
        capacity = cute.size(indices)
        slot = Int32(slot_base)
        if from_keys:
            if any_mass:
                for c in cutlass.range(c_begin, c_end, unroll=4):
                    j = c * 32 + lane
                    keep = self.at_or_above_tau(sBitsP, j, n, tau)
                    word = Uint32(cute.arch.vote_ballot_sync(keep))
                    mine = slot + Int32(cute.arch.popc(word & lower_lanes))
                    if keep & (mine < capacity):
                        indices[mine] = j
                    slot += Int32(cute.arch.popc(word))
        else:
            self.list_from_words(sWords, c_begin, c_end, slot, lane, lower_lanes, indices)
        self.close_list(indices, mCounts, row_idx, count, tidx)
        if const_expr(self.max_ctas > 0):
            cute.arch.barrier()  # the list is written from sWords before the next row resets it

    @cute.jit
    def list_from_words(self, sWords, c_begin: Int32, c_end: Int32, slot: Int32, lane: Int32,
                        lower_lanes: Uint32, indices: cute.Tensor):
        """Writes the keys that this warp's keep words (chunks [c_begin, c_end)) keep to
        indices, in index order from `slot` on: a word a chunk, a popcount for each lane's
        place."""
        capacity = cute.size(indices)
        for c in cutlass.range(c_begin, c_end, unroll=4):
            word = sWords[c]
            # (one condition around the store alone, so that it is predicated, not branched)
            mine = slot + Int32(cute.arch.popc(word & lower_lanes))
            if (((word >> Uint32(lane)) & Uint32(1)) != Uint32(0)) & (mine < capacity):
                indices[mine] = c * 32 + lane
            slot += Int32(cute.arch.popc(word))

    @cute.jit
    def close_list(self, indices: cute.Tensor, mCounts: cute.Tensor, row_idx: Int32,
                   count: Int32, tidx: Int32):
        """The row's list past its count set to 0 (the KeyIndex row format), and its count."""
        for s in cutlass.range(count + tidx, cute.size(indices), self.num_threads, unroll=1):
            indices[s] = 0
        if tidx == 0:
            mCounts[row_idx] = count

    @cute.jit
    def combine_stats(self, stats: cute.Tensor, sStats: cute.Tensor, lane: Int32):
        """One warp: the row's max M, sum S = sum over its parts of sum_b * exp(max_b - M),
        and min, from its parts' (max_b, min_b, sum_b) (the scores kernel's, one per 2,048
        keys), into sStats as (M, S, min). Lanes take parts lane, lane + 32, ...; a part
        without keys (max -inf, sum 0) adds nothing."""
        n_parts = cute.size(stats.shape[0])
        # (a lane's first part loaded once, all three values together: rows of up to 65,536
        # keys have at most 32 parts, so one round of loads)
        first_max = -Float32.inf
        first_min = Float32.inf
        first_sum = Float32(0.0)
        if lane < n_parts:
            first_max = stats[lane, 0]
            first_min = stats[lane, 1]
            first_sum = stats[lane, 2]
        local_max = first_max
        local_min = first_min
        for b in cutlass.range(lane + 32, n_parts, 32, unroll=1):
            local_max = cute.arch.fmax(local_max, stats[b, 0])
            local_min = cute.arch.fmin(local_min, stats[b, 1])
        row_max = warp_allreduce(local_max, cute.arch.fmax)
        local_sum = first_sum * cute.math.exp(first_max - row_max)
        for b in cutlass.range(lane + 32, n_parts, 32, unroll=1):
            local_sum += stats[b, 2] * cute.math.exp(stats[b, 0] - row_max)
        row_sum = warp_allreduce(local_sum, _add)
        row_min = warp_allreduce(local_min, cute.arch.fmin)
        if lane == 0:
            sStats[0] = row_max
            sStats[1] = row_sum
            sStats[2] = row_min

    @cute.jit
    def probability(self, x: Float32, offset: Float32) -> Float32:
        """exp(x - row_max) / row_sum as 2 ** (x log2(e) - offset), offset = row_max log2(e) +
        log2(row_sum): one FMA and one `ex2.approx` (0 for x = -inf). For every key that weighs
        anything (p >= 2**-52, so the exponent lies in about [-52, 0]) that is within ~2**-18
        of the exact quotient (the FMA's half ulp at magnitudes below 64, and the
        approximations' few ulps), times one factor common to the whole row: offset's own
        rounding, ~|offset| * 2**-24 (2**-17 at |row_max| = 100), which scales every weight
        and the target alike, so the rule hardly sees it (the top key's p may then exceed 1
        by that much). An accurate exp and a correctly rounded division took ~12 instructions
        a key more (perf/NOTES.md, top-p session 17). The exact rule then runs on these
        probabilities."""
        return cute.math.exp2(_fma(x, Float32(LOG2_E), -offset), fastmath=True)

    @cute.jit
    def probability_range(self, x: cute.Tensor, n: Int32, sStats: cute.Tensor, red_f,
                          tidx: Int32, warp: Int32, lane: Int32, unroll: cutlass.Constexpr[int]):
        """(offset, p_hi, p_lo): `probability`'s offset and the row's largest and smallest
        probabilities, which place the first digit (`digit_plan`). From logits, the extreme
        keys' probabilities by the very operations their keys go through, from the row's
        statistics in sStats (no pass over the row); in ``from_probs`` mode a pass over the n
        entries of x (offset 0, unused)."""
        offset = Float32(0.0)
        p_hi = Float32(0.0)
        p_lo = Float32(0.0)
        if const_expr(self.from_probs):
            local_max = Float32(0.0)
            local_min = Float32.inf
            for j in cutlass.range(tidx, n, self.num_threads, unroll=unroll):
                local_max = cute.arch.fmax(local_max, x[j])
                local_min = cute.arch.fmin(local_min, x[j])
            p_hi, p_lo = self.block_reduce(((local_max, cute.arch.fmax),
                                            (local_min, cute.arch.fmin)), red_f, warp, lane)
        else:
            offset = sStats[0] * LOG2_E + cute.math.log2(sStats[1], fastmath=True)
            p_hi = self.probability(sStats[0], offset)
            p_lo = self.probability(sStats[2], offset)
        return offset, p_hi, p_lo

    @cute.jit
    def probability_parts(self, sP: cute.Tensor, head: Int32, body: Int32, chunk: Int32,
                          load_bar: cute.Pointer, phase: Int32, offset: Float32, sHist,
                          shift1: Int32, base1: Int32, bcast, tidx: Int32,
                          exact: cutlass.Constexpr[bool], whole: cutlass.Constexpr[bool]):
        """`probability_pass_vec` over the bulk copies' parts of a row in shared memory, each as
        soon as it has landed; returns the flag of keys outside the planned bins and the
        thread's mass (see `probability_pass_vec`)."""
        outside = Int32(0)
        mass = Float64(0.0)
        for c in cutlass.range_constexpr(LOAD_CHUNKS):
            cute.arch.mbarrier_wait(load_bar + c, phase)
            start = head + c * chunk
            stop = cutlass.min(start + chunk, head + body)
            part_outside, part_mass = self.probability_pass_vec(
                sP, start, stop, offset, sHist, shift1, base1, tidx, exact, whole)
            outside |= part_outside
            mass += part_mass
        return outside, mass

    @cute.jit
    def probability_pass_vec(self, xP: cute.Tensor, lo: Int32, hi: Int32, offset: Float32,
                             sHist, shift1: Int32, base1: Int32, tidx: Int32,
                             exact: cutlass.Constexpr[bool], whole: cutlass.Constexpr[bool]):
        """Keys [lo, hi) of a row in shared memory (lo 16-byte aligned, hi - lo a multiple of
        4): scaled logits replaced by their probabilities, each added to the first histogram;
        a thread takes 4 consecutive keys a step, by one 16-byte load and one 16-byte store
        (3-5% faster than 4 keys T apart; H200, perf/NOTES.md, top-p session 22). Returns a
        flag, non-zero when a weighted key fell outside the first round's bins (for the caller
        to store once: a branch per key to store it cost more than the key's other tests), and
        the thread's mass: with `whole` (and `exact`, every key of the row with an exponent of
        at least EXACT_EXP: `exact_units`) each key adds its whole units with one atomic, and
        the mass is the sum of the thread's probabilities in float64 (exact: each is a
        multiple of 2**-52, and a sum below 2 keeps them all), else 0."""
        T = self.num_threads
        outside = Int32(0)
        mass = Float64(0.0)
        for v in cutlass.range(lo + 4 * tidx, hi, 4 * T, unroll=1):
            sVec = self.smem_vec4(xP, v, Float32)
            xs = cute.make_rmem_tensor(4, Float32)
            cute.autovec_copy(sVec, xs)
            probs = cute.make_rmem_tensor(4, Float32)
            for k in cutlass.range_constexpr(4):
                prob = self.probability(xs[k], offset)
                probs[k] = prob
                outside |= self.weigh_first_digit_flat(sHist, prob, shift1, base1, exact, whole)
                if const_expr(whole):
                    mass += Float64(prob)
            cute.autovec_copy(probs, sVec)
        return outside, mass

    @cute.jit
    def smem_vec4(self, x: cute.Tensor, j: Int32, dtype):
        """Elements j .. j + 3 of shared-memory tensor x (16-byte aligned) as one 16-byte
        view, seen as `dtype`."""
        addr = (x.iterator + j).toint()
        return cute.make_tensor(cute.make_ptr(dtype, addr, cute.AddressSpace.smem,
                                              assumed_align=16), cute.make_layout(4))

    @cute.jit
    def vec_span(self, x: cute.Tensor, lo: Int32, hi: Int32):
        """How keys [lo, hi) of shared-memory tensor x split for 16-byte loads: (head, first,
        n_vec): n_vec groups of 4 keys from `first` = lo + head (16-byte aligned), and the at
        most 3 + 3 keys before and after them (`edge_key`)."""
        head = cutlass.min((4 - (x.iterator + lo).toint() // 4 % 4) % 4, hi - lo)
        first = lo + head
        return head, first, (hi - first) // 4

    @cute.jit
    def edge_key(self, lo: Int32, hi: Int32, head: Int32, first: Int32, n_vec: Int32,
                 t: Int32):
        """(key, whether worker t takes it): the keys of [lo, hi) outside `vec_span`'s groups,
        one a worker."""
        tail = first + 4 * n_vec
        edge = lo + t
        if t >= head:
            edge = tail + (t - head)
        return edge, t < head + (hi - tail)

    @cute.jit
    def weigh_digits_vec(self, sHist, xBits: cute.Tensor, lo: Int32, hi: Int32, base: Int32,
                         shift: Int32, bits: Int32, tidx: Int32):
        """`weigh_digits` over keys [lo, hi) of a row in shared memory: its 16-byte aligned
        middle 8 keys a thread and step, by two 16-byte loads, the at most 3 + 3 keys around
        it one a thread."""
        T = self.num_threads
        head, first, n_vec = self.vec_span(xBits, lo, hi)
        for v in cutlass.range(tidx, n_vec, 2 * T, unroll=1):
            keys = []
            for half in cutlass.range_constexpr(2):
                vec = cute.make_rmem_tensor(4, Int32)
                vec.fill(Int32(0))  # (bits 0: in no bin)
                if v + half * T < n_vec:
                    cute.autovec_copy(self.smem_vec4(xBits, first + 4 * (v + half * T), Int32),
                                      vec)
                keys += [vec[k] for k in range(4)]
            self.weigh_digits(sHist, keys, base, shift, bits)
        edge, has_edge = self.edge_key(lo, hi, head, first, n_vec, tidx)
        if has_edge:
            self.weigh_digits(sHist, [xBits[edge]], base, shift, bits)

    @cute.jit
    def weigh_first_digit_flat(self, sHist, prob: Float32, shift1: Int32, base1: Int32,
                               exact: cutlass.Constexpr[bool] = False,
                               whole: cutlass.Constexpr[bool] = False) -> Int32:
        """`weigh_first_digit` with one short branch (the two atomics): the key's bin and
        units are computed whether or not it has a bin (`exact_units` when every key of the
        row has an exponent of at least EXACT_EXP). Returns 1 for a weighted key outside the
        4,096 bins, else 0."""
        bits = prob.bitcast(Int32)
        rb = bits - LOW_BITS  # < 0: weighs nothing, and its digit is out of range too
        digit = (rb >> shift1) - base1
        in_range = Uint32(digit) < Uint32(HIST_BINS)
        units = self.exact_units(bits) if const_expr(exact) else self.bin_units(bits)
        if in_range:
            self.hist_add(sHist, digit, units, whole)
        return Int32((rb >= 0) & (~in_range))

    @cute.jit
    def keep_bits(self, sWords, sBitsP, n: Int32, tau: Int32, bcast, any_mass: Boolean,
                  c_begin: Int32, c_end: Int32, red_i, warp: Int32, lane: Int32,
                  lower_lanes: Uint32) -> Int32:
        """Adds to the keep words of this warp's chunks [c_begin, c_end) the keys above tau,
        and those equal to it while among the first `take` in index order (`take_at_tau`'s
        results, read from bcast where they are needed: held from the last scan on, they cost
        registers). Returns the number of keys the warp's words keep."""
        rank_ties = bcast[6] != 0
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
        if rank_ties:
            take = bcast[4]
            for c in cutlass.range(c_begin, c_end, unroll=1):
                j = c * 32 + lane
                greater = Boolean(False)
                tie = Boolean(False)
                if j < n:
                    rb = sBitsP[j] - LOW_BITS
                    greater = rb > tau
                    tie = rb == tau
                taken, tie_rank = self.take_ties(tie, tie_rank, take, lower_lanes)
                kept += self.merge_keep_word(sWords, c, any_mass & (greater | taken), lane)
        else:
            # Every key equal to tau is taken: keep exactly the keys at or above it. (The
            # row-uniform any_mass outside the loop: inside, its 64-bit test ran per key.)
            if any_mass:
                for c in cutlass.range(c_begin, c_end, unroll=4):
                    keep = self.at_or_above_tau(sBitsP, c * 32 + lane, n, tau)
                    kept += self.merge_keep_word(sWords, c, keep, lane)
            else:
                for c in cutlass.range(c_begin, c_end, unroll=1):
                    kept += self.merge_keep_word(sWords, c, Boolean(False), lane)
        return kept

    @cute.jit
    def at_or_above_tau(self, sBitsP: cute.Tensor, j: Int32, n: Int32, tau: Int32) -> Boolean:
        """Whether key j's bits are at least tau's (False past the row): a key that a row
        without ties to rank keeps."""
        keep = Boolean(False)
        if j < n:
            keep = sBitsP[j] - LOW_BITS >= tau
        return keep

    @cute.jit
    def count_kept_vec(self, sBitsP: cute.Tensor, n: Int32, tau: Int32, any_mass: Boolean,
                       c_begin: Int32, c_end: Int32) -> Int32:
        """The number of keys of this warp's chunks [c_begin, c_end) whose bits are at least
        tau's (none when the row weighs nothing): its 16-byte aligned middle by one 16-byte
        load a lane and step, the at most 3 + 3 keys around it one a lane. Counts what
        `keep_bits` would keep for a row without ties to rank or always-keep bits, in a
        quarter of its loads and without its ballots and word stores."""
        lane = cute.arch.lane_idx()
        lo = c_begin * 32
        hi = cutlass.min(c_end * 32, n)
        kept = Int32(0)
        if any_mass & (hi > lo):
            head, first, n_vec = self.vec_span(sBitsP, lo, hi)
            for v in cutlass.range(lane, n_vec, 32, unroll=2):
                vec = cute.make_rmem_tensor(4, Int32)
                cute.autovec_copy(self.smem_vec4(sBitsP, first + 4 * v, Int32), vec)
                for k in cutlass.range_constexpr(4):
                    kept += Int32(vec[k] - LOW_BITS >= tau)
            edge, has_edge = self.edge_key(lo, hi, head, first, n_vec, lane)
            if has_edge:
                kept += Int32(sBitsP[edge] - LOW_BITS >= tau)
        return warp_allreduce(kept, _add)

    @cute.jit
    def take_ties(self, tie: Boolean, tie_rank: Int64, take: Int64, lower_lanes: Uint32):
        """(whether this lane's key, if a tie, is among the first `take` ties in index order,
        the ties before the next chunk): tie_rank counts the ties before this chunk."""
        tie_ballot = Uint32(cute.arch.vote_ballot_sync(tie))
        rank = tie_rank + Int64(cute.arch.popc(tie_ballot & lower_lanes)) + 1
        return tie & (rank <= take), tie_rank + Int64(cute.arch.popc(tie_ballot))

    @cute.jit
    def prefetch_row(self, mX: cute.Tensor, future: Int32):
        """Starts an L2 prefetch of row `future` (none past the rows): the row this CTA's
        successor on the SM (one CTA per row: CTAs are dispatched in row order, one per SM, so
        row + the number of SMs) or this persistent CTA will load next. Issued after the pass
        over the probabilities, when this CTA's own load is long done (issued at the start it
        competed with that load and was 2% slower; here 2% faster). With short rows (two CTAs
        per SM) that row has usually started already, so the prefetch rarely helps there."""
        if future < cute.size(mX.shape[0]):
            x_next = mX[future, None]
            _, head, body = _aligned_span(x_next, cute.size(mX.shape[1]))
            if body > 0:
                nvvm.cp_async_bulk_prefetch(_global_ptr(x_next, head), Int32(body * 4).ir_value())

    @cute.jit
    def prefetch_stats(self, mStats: cute.Tensor, future: Int32, lane: Int32):
        """Lanes 0-2: an L2 prefetch of the lines that hold row `future`'s statistics (at most
        20 parts of 12 bytes for a row in shared memory), whose loads start that row (the
        scores kernel wrote them long before, and 805 MB of scores since)."""
        if future < cute.size(mStats.shape[0]):
            stats = mStats[future, None, None]
            span = cute.size(stats) * 4
            if lane < 3:
                byte = cutlass.min(lane * 128, span - 4)
                nvvm.prefetch(_global_ptr(stats, byte // 4),
                              cache_level=nvvm.PrefetchCacheLevel.L2)

    # ------------------------------------------------------------------ helpers
    @cute.jit
    def row_view(self, mX: cute.Tensor, row_idx: Int32, sRow: cute.Pointer, n: Int32):
        """(row row_idx of mX, its shared-memory copy sP, head, body): element j of the row at
        sP[j], sP shifted so that the row's 16-byte aligned part (from element `head`, `body`
        elements; `_aligned_span`) sits 16-byte aligned in shared memory, where bulk copies
        move it."""
        x_row = mX[row_idx, None]
        shift, head, body = _aligned_span(x_row, n)
        sP = cute.make_tensor(sRow + shift, cute.make_layout(self.max_n))
        return x_row, sP, head, body

    @cute.jit
    def load_chunk(self, body: Int32) -> Int32:
        """Elements per bulk copy of `load_row` (a multiple of 4; the last copy may be shorter,
        or empty)."""
        return cute.ceil_div(cute.ceil_div(body, LOAD_CHUNKS), 4) * 4

    @cute.jit
    def load_row(self, mX: cute.Tensor, row_idx: Int32, sRow: cute.Pointer, bar: cute.Pointer,
                 n: Int32, tidx: Int32):
        """Starts loading the first n keys of row row_idx into shared memory (`row_view`): its
        16-byte aligned middle by LOAD_CHUNKS bulk copies (the TMA unit streams them at full
        rate, with no loads in flight to keep up per thread), copy c complete when barrier
        bar + c completes its next phase; the at most 3 + 3 elements before and after it by
        plain loads, which only the storing threads may read before the next CTA barrier."""
        x_row, sP, head, body = self.row_view(mX, row_idx, sRow, n)
        chunk = self.load_chunk(body)
        if tidx == 0:
            for c in cutlass.range_constexpr(LOAD_CHUNKS):
                start = head + c * chunk
                size = cutlass.min(chunk, head + body - start)
                if size > 0:
                    cute.arch.mbarrier_arrive_and_expect_tx(bar + c, size * 4)
                    src = _global_ptr(x_row, start)
                    dst = llvm.addrspacecast(llvm.PointerType.get(SHARED_CLUSTER),
                                             (sP.iterator + start).llvm_ptr)
                    nvvm.cp_async_bulk_shared_cluster_global(dst, src, (bar + c).llvm_ptr,
                                                             Int32(size * 4).ir_value())
                else:
                    cute.arch.mbarrier_arrive(bar + c)
        if tidx < head:
            sP[tidx] = x_row[tidx]
        tail = head + body + tidx
        if tidx < 4 and tail < n:
            sP[tail] = x_row[tail]

    @cute.jit
    def wait_row(self, bar: cute.Pointer, phase: Int32):
        """Waits for every copy of `load_row` (barrier phase `phase`), and for the plain stores
        of every thread."""
        for c in cutlass.range_constexpr(LOAD_CHUNKS):
            cute.arch.mbarrier_wait(bar + c, phase)
        cute.arch.barrier()

    @cute.jit
    def radix_round(self, sBitsP: cute.Tensor, n: Int32, sHist, red_i, bcast, base: Int32,
                    above: Int64, tau_bin_weight: Int64, target: Int64, total: Int64,
                    p_top: Float64, shift: Int32, bits: Int32, first: cutlass.Constexpr[bool],
                    tidx: Int32, warp: Int32, lane: Int32, red_mass, check_mass: Boolean):
        """One digit (`bits` wide at `shift`, at most DIGIT_BITS; none left when bits is 0): the
        weight histogram of the keys with base <= rb >> shift < base + 2**bits (the first
        round's is built by the probability pass), then `find_digit`. Returns the chosen bin's
        rb >> shift (base itself when bits is 0) and what `find_digit` returns. The histogram is
        clear on entry (the previous scan cleared it, behind its closing barrier), and the first
        round's complete (the caller's barrier). red_mass and check_mass: the first round's
        wrap check (`find_digit`)."""
        out = (base, above, tau_bin_weight, target, total)
        if bits > 0:
            if const_expr(not first):
                # (16-byte loads: 3-5% faster than 4 keys a thread T apart; H200, perf/NOTES.md,
                # top-p session 22)
                self.weigh_digits_vec(sHist, sBitsP, Int32(0), n, base, shift, bits, tidx)
                cute.arch.barrier()
            out = self.find_digit(sHist, red_i, bcast, base, above, target, total, p_top,
                                  shift, bits, first, tidx, warp, lane, red_mass, check_mass)
        return out

    @cute.jit
    def weigh_digits(self, sHist, key_bits: list, base: Int32, shift: Int32, bits: Int32):
        """Adds each key of key_bits (float32 bits of its probability) to bin
        (rb >> shift) - base of a round `bits` wide, if it has one. Few keys have (those in
        the previous round's bin), so one branch covers the group, and a key's test is one
        unsigned compare: its rb lies in [base << shift, (base + 2**bits) << shift)."""
        lowest = (base << shift) + LOW_BITS  # float bits of the round's lowest value
        span = Uint32((Int32(1) << bits) << shift)
        offsets = [Uint32(b - lowest) for b in key_bits]
        inside = [o < span for o in offsets]
        any_inside = inside[0]
        for k in cutlass.range_constexpr(1, len(key_bits)):
            any_inside = any_inside | inside[k]
        if any_inside:
            for k in cutlass.range_constexpr(len(key_bits)):
                if inside[k]:
                    self.hist_add(sHist, Int32(offsets[k] >> Uint32(shift)),
                                  self.bin_units(key_bits[k]))

    @cute.jit
    def find_digit(self, sHist, red_i, bcast, base: Int32, above: Int64, target: Int64,
                   total: Int64, p_top: Float64, shift: Int32, bits: Int32,
                   first: cutlass.Constexpr[bool], tidx: Int32, warp: Int32, lane: Int32,
                   red_mass, check_mass: Boolean):
        """The digit at which the cumulative weight of a round's histogram (complete, behind a
        barrier) from the top reaches target - above (clamped to the lowest digit, as the torch
        code does). Returns its bin's rb >> shift (base + digit), the weight of the keys above
        it, the weight of the keys in its bin, and (set by the first round, whose histogram
        holds every key with a weight) the target ceil(p_top * total) and the row's total
        weight. The last round's scan (shift 0: its bin is tau itself) also leaves
        `take_at_tau`'s results in bcast[4] and bcast[6], and the first round's (with
        whole_units) whether its histogram wrapped in bcast[2]: with check_mass, its total
        against the float64 sum of the warps' masses in red_mass. Each thread clears the bins it
        scanned (no other thread reads them), so the histogram is clear behind the closing
        barrier, the scan's only one after its prefix (the next write to red_i follows it)."""
        nb = HIST_BINS  # (digits past 1 << bits are empty bins)
        # Scan from the top digit down, every thread at once: thread t holds the `per`
        # descending positions t * per .. t * per + per - 1 (position d is digit nb - 1 - d),
        # i.e. the bins lowest .. lowest + per - 1, read (and cleared) 16 bytes at a time: one
        # bin at a time, a warp's reads hit each bank per / 4 times over. (Fewer threads with
        # more bins each were slower: the scan waits on each thread's chain, not on issue;
        # perf/NOTES.md, top-p session 22.)
        per = nb // self.num_threads
        d0 = tidx * per
        lowest = nb - d0 - per
        units_lo, units_hi = self.take_bins(sHist, lowest, per)
        own = Int64(0)
        for i in cutlass.range_constexpr(per):
            own += self.bin_weight(units_lo[per - 1 - i], units_hi[per - 1 - i],
                                   lowest + (per - 1 - i), base, shift, bits)
        incl = warp_inclusive_sum(own, lane)
        if lane == 31:
            red_i[warp] = incl
        cute.arch.barrier()
        mine = Int64(0)
        if lane < self.num_warps:
            mine = red_i[lane]
        warps_incl = warp_inclusive_sum(mine, lane)
        incl += cute.arch.shuffle_sync(warps_incl - mine, warp)
        if const_expr(first):
            total = cute.arch.shuffle_sync(warps_incl, self.num_warps - 1)
            target_f = Float64(total) * p_top
            target = Int64(target_f)
            if Float64(target) < target_f:
                target += 1
            if const_expr(self.whole_units):
                # bcast[2]: whether, with check_mass, the histogram's total differs from the
                # float64 sum of the probabilities (a bin's word wrapped; `whole_units`).
                if warp == 0:
                    mass = Float64(0.0)
                    if lane < self.num_warps:
                        mass = red_mass[lane]
                    mass = warp_allreduce(mass, _add)
                    if lane == 0:
                        wrapped = check_mass & ((mass >= 2.0)
                                                | (Int64(mass * MASS_SCALE) != total))
                        bcast[2] = Int64(wrapped)
        excl = incl - own
        need = target - above
        # The first position whose cumulative weight reaches `need`, or the lowest digit when
        # none does (the torch code's clamp): exactly one thread finds it.
        crosses = (incl >= need) & ((d0 == 0) | (excl < need))
        clamped = (d0 + per == nb) & (incl < need)
        if crosses | clamped:
            running = excl
            pos = Int32(nb - 1)
            bin_weight = Int64(0)
            found = Boolean(False)
            for i in cutlass.range_constexpr(per):
                weight = self.bin_weight(units_lo[per - 1 - i], units_hi[per - 1 - i],
                                         lowest + (per - 1 - i), base, shift, bits)
                if not found:
                    if running + weight >= need or d0 + i == nb - 1:
                        pos = d0 + i
                        bin_weight = weight
                        found = Boolean(True)
                    else:
                        running += weight
            # (pos >= nb - (1 << bits) whenever the row has mass; without it, the value lands
            # past the round's bins, and any_mass keeps nothing anyway)
            value = base + (nb - 1 - pos)
            bcast[0] = Int64(value)
            bcast[1] = above + running
            bcast[3] = bin_weight
            if shift == 0:
                self.take_at_tau(bcast, value, target, above + running, bin_weight)
        cute.arch.barrier()
        return Int32(bcast[0]), bcast[1], bcast[3], target, total

    @cute.jit
    def gather_bin_keys(self, sBitsP: cute.Tensor, n: Int32, shift1: Int32, value0: Int32,
                        sCand: cute.Tensor, sCount: cute.Tensor, tidx: Int32):
        """The bits of every key in the first round's chosen bin (rb >> shift1 == value0) into
        sCand, in no particular order, up to CAND_CAP (sCount[0] counts them all): 8 keys a
        thread and step by 16-byte loads, one shared atomic per thread that finds any."""
        T = self.num_threads
        head, first, n_vec = self.vec_span(sBitsP, Int32(0), n)
        for v in cutlass.range(tidx, n_vec, 2 * T, unroll=1):
            keys = []
            for half in cutlass.range_constexpr(2):
                vec = cute.make_rmem_tensor(4, Int32)
                vec.fill(Int32(0))  # (bits 0: weighs nothing, in no bin)
                if v + half * T < n_vec:
                    cute.autovec_copy(self.smem_vec4(sBitsP, first + 4 * (v + half * T), Int32),
                                      vec)
                keys += [vec[k] for k in range(4)]
            self.append_bin_keys(keys, shift1, value0, sCand, sCount)
        edge, has_edge = self.edge_key(Int32(0), n, head, first, n_vec, tidx)
        if has_edge:
            self.append_bin_keys([sBitsP[edge]], shift1, value0, sCand, sCount)

    @cute.jit
    def append_bin_keys(self, keys: list, shift1: Int32, value0: Int32, sCand: cute.Tensor,
                        sCount: cute.Tensor):
        """Appends the keys of `keys` (float32 bits) in the first round's chosen bin to sCand
        (as far as CAND_CAP), with one atomic on sCount[0] for the thread's whole group."""
        inside = [((b - LOW_BITS) >> shift1) == value0 for b in keys]
        count = Int32(0)
        for k in cutlass.range_constexpr(len(keys)):
            count += Int32(inside[k])
        if count > 0:
            slot = cute.arch.atomic_add(sCount.iterator, count)
            for k in cutlass.range_constexpr(len(keys)):
                if inside[k]:
                    if slot < CAND_CAP:
                        sCand[slot] = keys[k]
                    slot += 1

    @cute.jit
    def resolve_over_keys(self, bcast, sKeys: cute.Tensor, sCount: cute.Tensor, count: Int32,
                          above: Int64, target: Int64, tidx: Int32):
        """tau from the keys of the first round's chosen bin, sKeys[0 .. count) (count <=
        RESOLVE_CAP), without radix rounds: thread i weighs the keys above key i and those
        equal to it, and tau is the one value whose keys above stay under the target while
        its own keys reach it. The thread of that key (every thread of a value several keys
        share, with the same results) leaves in bcast what the last round's scan would
        (`warp_find_digit`) and sets sCount[1]. None does when the keys cannot reach the
        target, where the rounds clamp; the caller runs them then."""
        if tidx < count:
            mine = sKeys[tidx]
            # The keys share the bin, hence the exponent: each weighs its units (`bin_units`)
            # shifted up by the bin's amount (`bin_weight`).
            exponent = mine >> 23
            down = cutlass.max(EXACT_EXP - exponent, 0)
            up = cutlass.max(exponent - EXACT_EXP, 0)
            greater = Uint32(0)
            equal = Uint32(0)
            for j in cutlass.range(count, unroll=4):
                other = sKeys[j]
                units = Uint32(self.exact_units(other) >> down)
                if other > mine:
                    greater += units
                if other == mine:
                    equal += units
            weight_above = Int64(greater) << up
            weight_at = Int64(equal) << up
            need = target - above
            if (weight_above < need) & (need <= weight_above + weight_at):
                tau = mine - LOW_BITS
                bcast[0] = Int64(tau)
                bcast[1] = above + weight_above
                bcast[3] = weight_at
                self.take_at_tau(bcast, tau, target, above + weight_above, weight_at)
                sCount[1] = Int32(1)

    @cute.jit
    def rounds_over_keys(self, sHist, bcast, sKeys: cute.Tensor, offset: Int32, start: Int32,
                         count: Int32, step, value: Int32, above: Int64, target: Int64,
                         shift1: Int32, warp: Int32, lane: Int32):
        """The radix rounds below the first (`value`: its chosen bin's rb >> shift1) over the
        keys that share that bin, sKeys[offset + i] for i = start, start + step, ... < count
        (each thread its own; together they hold every such key): 8-bit digits, each
        histogram filled by every thread and scanned by warp 0 (`warp_find_digit`, which also
        settles `take_at_tau` in the last). Returns tau and the weight above it."""
        cur_shift = shift1
        for _ in cutlass.range_constexpr(3):  # (shift1 <= 17 < 24)
            bits = cutlass.min(cur_shift, 8)
            if bits > 0:
                shift = cur_shift - bits
                for i in cutlass.range(start, count, step, unroll=1):
                    self.weigh_digits(sHist, [sKeys[offset + i]], value << bits, shift, bits)
                cute.arch.barrier()
                if warp == 0:
                    self.warp_find_digit(sHist, bcast, value << bits, above, target, shift, bits,
                                         lane)
                cute.arch.barrier()
                value = Int32(bcast[0])
                above = bcast[1]
                cur_shift = shift
        return value, above

    @cute.jit
    def warp_find_digit(self, sHist, bcast, base: Int32, above: Int64, target: Int64,
                        shift: Int32, bits: Int32, lane: Int32):
        """`find_digit` over 256 bins by one warp (lane l holds the 8 bins from the top at
        8 l), its results into bcast; the bins are left clear."""
        lowest = 256 - 8 * (lane + 1)
        units_lo, units_hi = self.take_bins(sHist, lowest, 8)
        own = Int64(0)
        for i in cutlass.range_constexpr(8):
            own += self.bin_weight(units_lo[i], units_hi[i], lowest + i, base, shift, bits)
        incl = warp_inclusive_sum(own, lane)
        excl = incl - own
        need = target - above
        crosses = (incl >= need) & ((lane == 0) | (excl < need))
        clamped = (lane == 31) & (incl < need)
        if crosses | clamped:
            running = excl
            pos = Int32(0)
            bin_w = Int64(0)
            found = Boolean(False)
            for i in cutlass.range_constexpr(8):
                weight = self.bin_weight(units_lo[7 - i], units_hi[7 - i], lowest + 7 - i,
                                         base, shift, bits)
                if not found:
                    if (running + weight >= need) | ((lane == 31) & (i == 7)):
                        pos = lowest + 7 - i
                        bin_w = weight
                        found = Boolean(True)
                    else:
                        running += weight
            value = base + pos
            bcast[0] = Int64(value)
            bcast[1] = above + running
            bcast[3] = bin_w
            if shift == 0:
                self.take_at_tau(bcast, value, target, above + running, bin_w)

    @cute.jit
    def take_at_tau(self, bcast, tau: Int32, target: Int64, above: Int64, tau_bin_weight: Int64):
        """How many keys equal to tau to take (into bcast[4]) and whether the keys equal to
        tau need ranking (bcast[6]), by the one thread of the last scan that found tau, before
        that scan's closing barrier: a 64-bit division is a long subroutine, and every thread
        computing it cost 3% of the selection's instructions."""
        # Weight of one key equal to tau: the float whose bits are tau + LOW_BITS.
        tau_weight = Int64((tau + LOW_BITS).bitcast(Float32) * MASS_SCALE)
        if tau_weight < 1:
            tau_weight = Int64(1)
        take = (target - above + tau_weight - 1) // tau_weight
        # The last round's bin is the single value tau, so it weighs (keys equal to tau) x
        # tau_weight. When all of them are taken (the usual case: one key), no tie needs a
        # rank: take < ties, i.e. (take + 1) x tau_weight <= the bin's weight.
        bcast[4] = take
        bcast[6] = Int64((take + 1) * tau_weight <= tau_bin_weight)

    @cute.jit
    def merge_keep_word(self, sWords, c: Int32, keep: Boolean, lane: Int32) -> Int32:
        """Adds this warp's keep ballot for chunk c to its always-keep word; returns the
        number of keys the word keeps."""
        word = Uint32(cute.arch.vote_ballot_sync(keep)) | sWords[c]
        cute.arch.sync_warp()  # every lane has read the word before lane 0 replaces it
        if lane == 0:
            sWords[c] = word
        return Int32(cute.arch.popc(word))

    @cute.jit
    def clear_hist(self, sHist, nb: Int32, tidx: Int32):
        for b in cutlass.range(tidx, nb, self.num_threads, unroll=1):
            sHist[b, 0] = Uint32(0)
            sHist[b, 1] = Uint32(0)

    @cute.jit
    def weigh_first_digit(self, sHist, prob: Float32, shift1: Int32, base1: Int32, bcast,
                          whole: cutlass.Constexpr[bool] = False):
        """Adds a key that weighs something (prob >= 2**-52) to the first round's bin of its
        probability, (rb >> shift1) - base1; one outside the 4,096 bins (above them, or below
        base1) sets bcast[5], and the histogram is built again with the fixed digit. `whole`:
        one atomic of the key's whole units (`whole_units`, exact rows only)."""
        bits = prob.bitcast(Int32)
        rb = bits - LOW_BITS
        if rb >= 0:
            digit = (rb >> shift1) - base1
            if Uint32(digit) < Uint32(HIST_BINS):
                units = self.exact_units(bits) if const_expr(whole) else self.bin_units(bits)
                self.hist_add(sHist, digit, units, whole)
            else:
                bcast[5] = Int64(1)

    @cute.jit
    def weigh_row_first_digit(self, sP: cute.Tensor, n: Int32, sHist, shift1: Int32,
                              base1: Int32, bcast, tidx: Int32):
        """The first histogram built again from the row's probabilities, in slices (a
        fallback: after a key outside the planned bins, or a wrapped whole-units bin), then
        the barrier that the first round's scan (which has none of its own) needs."""
        for j in cutlass.range(tidx, n, self.num_threads, unroll=1):
            self.weigh_first_digit(sHist, sP[j], shift1, base1, bcast)
        cute.arch.barrier()

    @cute.jit
    def digit_plan(self, p_lo: Float32, p_hi: Float32):
        """(shift1, base1): the first round's bins are rb >> shift1 less base1, with the
        smallest shift1 at which the row's weighted keys (their probabilities lie within p_lo
        and p_hi, give or take PLAN_MARGIN ulps) fit in 4,096 bins, and base1 the lowest key's.
        pooled_top_p's near-uniform rows (largest over smallest probability about 2) then need
        two rounds, not three; the fixed first digit (shift 17, base 0) spends most of its bins
        on values no key has. A bin still holds one exponent: shift1 is at most 17 < 23. p_lo
        is the row's smallest probability, weighted or not, so rows with keys below 2**-52 get
        lo = 0 and, mostly, the fixed digit."""
        lo = cutlass.max(p_lo.bitcast(Int32) - LOW_BITS - PLAN_MARGIN, 0)
        hi = cutlass.max(p_hi.bitcast(Int32) - LOW_BITS + PLAN_MARGIN, 0)
        span_bits = Int32(32) - Int32(cute.arch.clz(hi - lo))
        shift1 = cutlass.max(span_bits - DIGIT_BITS, 0)
        if (hi >> shift1) - (lo >> shift1) >= HIST_BINS:  # (the floors can add one bin)
            shift1 += 1
        base1 = lo >> shift1
        if shift1 > FIRST_DIGIT[0]:
            shift1 = Int32(FIRST_DIGIT[0])
            base1 = Int32(0)
        return shift1, base1

    # A key with probability P = m * 2**(E - 150) (biased exponent E, 24-bit significand m)
    # weighs floor(P * 2**52) = m << (E - EXACT_EXP) when E >= EXACT_EXP, else
    # m >> (EXACT_EXP - E). Every key of a bin has the same E (a bin's keys share
    # rb >> shift, and every round's shift is at most 17 < 23), so a bin sums, per key,
    # m or the floored weight (its "units") and weighs that sum << max(E - EXACT_EXP, 0). The
    # sum (< 24 bits per key) is kept in two 32-bit slices, added with native 32-bit
    # shared-memory atomics (64-bit ones compile to a CAS loop); neither overflows for rows of
    # up to 2**20 keys.
    @cute.jit
    def bin_units(self, bits: Int32) -> Int32:
        """What a key with float32 bits `bits` (weight > 0) adds to its bin."""
        exponent = bits >> 23
        return self.exact_units(bits) >> cutlass.max(EXACT_EXP - exponent, 0)

    @cute.jit
    def exact_units(self, bits: Int32) -> Int32:
        """`bin_units` of a key whose exponent is at least EXACT_EXP: its 24-bit significand
        (no floor)."""
        return (bits & 0x7FFFFF) | 0x800000

    @cute.jit
    def load_or(self, sX: cute.Tensor, j: Int32, n: Int32, fill):
        """sX[j] if j < n, else `fill`."""
        value = fill
        if j < n:
            value = sX[j]
        return value

    @cute.jit
    def hist_add(self, sHist, b: Int32, units: Int32, whole: cutlass.Constexpr[bool] = False):
        """Adds units to bin b: in its two 12-bit slices, or with `whole` (`whole_units`) all
        into its low word, one atomic."""
        if const_expr(whole):
            cute.arch.atomic_add(sHist.iterator + b, Uint32(units))
        else:
            cute.arch.atomic_add(sHist.iterator + b, Uint32(units & ((1 << SLICE_BITS) - 1)))
            cute.arch.atomic_add(sHist.iterator + HIST_BINS + b, Uint32(units >> SLICE_BITS))

    @cute.jit
    def take_bins(self, sHist, lowest: Int32, count: int):
        """The two slices of bins lowest .. lowest + count - 1 (lowest and count multiples of
        4), as register fragments, by 16-byte loads; the bins are left clear."""
        zeros = cute.make_rmem_tensor(count, Uint32)
        zeros.fill(Uint32(0))
        out = []
        for half in cutlass.range_constexpr(2):
            addr = (sHist.iterator + (half * HIST_BINS + lowest)).toint()
            src = cute.make_tensor(cute.make_ptr(Uint32, addr, cute.AddressSpace.smem,
                                                 assumed_align=16), cute.make_layout(count))
            units = cute.make_rmem_tensor(count, Uint32)
            cute.autovec_copy(src, units)
            cute.autovec_copy(zeros, src)
            out.append(units)
        return out[0], out[1]

    @cute.jit
    def bin_weight(self, lo: Uint32, hi: Uint32, b: Int32, base: Int32, shift: Int32,
                   bits: Int32) -> Int64:
        """The weight of bin b (slices lo, hi) of the round whose keys have rb >> shift =
        base + b (0 for bins past 1 << bits, which no key reaches)."""
        units = Int64(0)
        if b < (Int32(1) << bits):
            units = Int64(lo) + (Int64(hi) << SLICE_BITS)
            digits = base + b  # (bits - LOW_BITS) >> shift of the bin's keys
            exponent = (digits >> (23 - shift)) + (LOW_BITS >> 23)
            if exponent > EXACT_EXP:
                units = units << (exponent - EXACT_EXP)
        return units

    @cute.jit
    def exclusive_warp_prefix(self, value: Int64, red_i, warp: Int32, lane: Int32,
                              closing_barrier: cutlass.Constexpr[bool] = True):
        """(sum of the warp-uniform `value` over the warps before this one, sum over all).
        Without `closing_barrier`, the caller places a CTA barrier between this and the next
        write to red_i.

        Lane l of every warp takes warp l's value and the warp scans them: a few shuffles, where
        a walk over all the warps' values costs each thread ~130 instructions, four times a row
        (11% of the selection at Wan 480p; H200, perf/NOTES.md, top-p session 10)."""
        if lane == 0:
            red_i[warp] = value
        cute.arch.barrier()
        mine = Int64(0)
        if lane < self.num_warps:
            mine = red_i[lane]
        incl = warp_inclusive_sum(mine, lane)
        before = cute.arch.shuffle_sync(incl - mine, warp)
        total = cute.arch.shuffle_sync(incl, self.num_warps - 1)
        if const_expr(closing_barrier):
            cute.arch.barrier()
        return before, total

    @cute.jit
    def block_reduce(self, pairs, red, warp: Int32, lane: Int32):
        """Reduces each (value, op) of `pairs` (one or two Float32 values per thread) over the
        CTA behind one pair of barriers: warp butterflies, then lane l of every warp takes warp
        l's results from `red` (num_warps x 2) and the warp reduces them by butterflies again,
        where every thread used to walk all the warps' values (~60 instructions a thread and
        value). Every thread gets the same results (`warp_allreduce`)."""
        for i, (value, op) in enumerate(pairs):
            value = warp_allreduce(value, op)
            if lane == 0:
                red[warp, i] = value
        cute.arch.barrier()
        # (16 warps: lanes 16.. hold copies of lanes 0..15, reduced within each half)
        out = tuple(warp_allreduce(red[lane % self.num_warps, i], op, self.num_warps)
                    for i, (_, op) in enumerate(pairs))
        cute.arch.barrier()
        return out
