"""Keep bits <-> kept-key lists, the conversions of ``KeyIndex`` and ``PackedKeyIndex``.

A ``SparsityCache`` unpacks a bitmap into lists at every reuse step and packs one at every
predict step, per layer; in eager torch each took several milliseconds at Wan 480p (more than
the sparse attention they serve). Both are memory-bound one-pass kernels here:

- ``KeepBitsToListsSm90``: rows of keep bits (a packed bitmap, bit j % 8 of byte j // 8, or a
  bool mask, one byte per key) -> sorted int32 lists with zeros after the count, and the counts.
  One CTA per row; each warp walks its part of the row in blocks of 32 keep words (1,024
  keys), twice: once to count its keys (the CTA then knows where each warp's keys start), once
  to write them, each kept key's slot from the popcount of the bits below it. A block's loads
  are all issued before any is used (the first version loaded 4 chunks at a time and waited on
  load latency), the stores of a word are contiguous, so a warp writes whole sectors; the zeros
  after the count go out as 16-byte stores.
- ``ListsToKeepBitsSm90``: lists -> a packed bitmap or a bool mask. One CTA per row ORs each
  listed key's bit into a shared-memory bitmap (32-bit shared atomics), then writes the row.

Counts above the capacity are written as they are and their keys past the capacity dropped, so
that the caller's capacity check (a device-side assert) sees them; nothing is truncated silently.
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Int32, Uint8, Uint32

MAX_SEQLEN_K = 1 << 17  # ListsToKeepBitsSm90's shared bitmap: 16 KiB


class KeepBitsToListsSm90:
    """Keep bits -> lists. ``packed``: the bits come as a bitmap (uint8 [R, ceil(Sk / 8)]),
    else as a mask (uint8 [R, Sk], non-zero = kept; a bool mask viewed as uint8)."""

    def __init__(self, packed: bool, num_warps: int = 8):
        self.packed = packed
        self.num_warps = num_warps
        self.num_threads = 32 * num_warps

    @cute.jit
    def __call__(
        self,
        mBits: cute.Tensor,  # uint8 [R, ceil(Sk / 8)] (packed) or [R, Sk]
        mIndices: cute.Tensor,  # int32 [R, capacity], capacity a multiple of 4
        mCounts: cute.Tensor,  # int32 [R]
        seqlen_k: Int32,
        stream: cuda.CUstream,
    ):
        @cute.struct
        class SharedStorage:
            warp_counts: cute.struct.MemRange[Int32, self.num_warps]

        self.kernel(mBits, mIndices, mCounts, seqlen_k, SharedStorage).launch(
            grid=[cute.size(mIndices.shape[0]), 1, 1],
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )

    @cute.kernel
    def kernel(self, mBits: cute.Tensor, mIndices: cute.Tensor, mCounts: cute.Tensor,
               seqlen_k: Int32, SharedStorage: cutlass.Constexpr):
        tidx = cute.arch.thread_idx()[0]
        warp = tidx // 32
        lane = tidx % 32
        row = cute.arch.block_idx()[0]
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sWarpCounts = storage.warp_counts.get_tensor(cute.make_layout(self.num_warps))
        bits = mBits[row, None]
        indices = mIndices[row, None]
        capacity = cute.size(indices)

        # Each warp takes a contiguous run of 32-word blocks (1,024 keys each; in a block lane l
        # loads word l): it counts its keys first, so that it knows where its run starts.
        n_blocks = cute.ceil_div(seqlen_k, 32 * 32)
        per_warp = cute.ceil_div(n_blocks, self.num_warps)
        b_begin = cutlass.min(warp * per_warp, n_blocks)
        b_end = cutlass.min(b_begin + per_warp, n_blocks)
        kept = Int32(0)
        for blk in cutlass.range(b_begin, b_end, unroll=1):
            words = self.block_words(bits, blk, lane, seqlen_k)
            for i in cutlass.range_constexpr(32):
                kept += Int32(cute.arch.popc(words[i]))
        if lane == 0:
            sWarpCounts[warp] = kept
        cute.arch.barrier()
        slot = Int32(0)
        count = Int32(0)
        for w in cutlass.range_constexpr(self.num_warps):
            if w < warp:
                slot += sWarpCounts[w]
            count += sWarpCounts[w]

        # Word i of a block: lane l keeps key 32 i + l when bit l is set; its slot is the
        # popcount of the bits below it. The 32 stores of a word are contiguous.
        lower_lanes = (Uint32(1) << Uint32(lane)) - Uint32(1)
        for blk in cutlass.range(b_begin, b_end, unroll=1):
            words = self.block_words(bits, blk, lane, seqlen_k)
            for i in cutlass.range_constexpr(32):
                mine = slot + Int32(cute.arch.popc(words[i] & lower_lanes))
                if (((words[i] >> Uint32(lane)) & Uint32(1)) != Uint32(0)) & (mine < capacity):
                    indices[mine] = (blk * 32 + i) * 32 + lane
                slot += Int32(cute.arch.popc(words[i]))
        self.zero_tail(indices, count, capacity, tidx)
        if tidx == 0:
            mCounts[row] = count

    @cute.jit
    def block_words(self, bits: cute.Tensor, blk: Int32, lane: Int32, seqlen_k: Int32):
        """The 32 keep words of block blk (word i: keys 32 (32 blk + i) + b at bit b, zero past
        the row), the same in every lane. Every load is issued before any word is used."""
        words = []
        if cutlass.const_expr(self.packed):
            # Lane l assembles word l from its 4 bytes (rows are byte-aligned: no wider loads),
            # then the words go round by shuffles.
            word = self.packed_word(bits, blk * 32 + lane, seqlen_k)
            words = [Uint32(cute.arch.shuffle_sync(word, i)) for i in range(32)]
        else:
            # One byte per key: word i is the ballot of its 32 bytes, lane l reading key l.
            first = blk * 1024 + lane
            flags = [self.mask_byte(bits, first + 32 * i, seqlen_k) for i in range(32)]
            words = [Uint32(cute.arch.vote_ballot_sync(f != Uint8(0))) for f in flags]
        return words

    @cute.jit
    def packed_word(self, bits: cute.Tensor, w: Int32, seqlen_k: Int32) -> Uint32:
        """Keys 32 w .. 32 w + 31 of a bitmap row, bits past seqlen_k cleared."""
        word = Uint32(0)
        n_bytes = cute.ceil_div(seqlen_k, 8)
        for i in cutlass.range_constexpr(4):
            byte = Uint32(0)
            if 4 * w + i < n_bytes:
                byte = Uint32(bits[4 * w + i])
            word = word | (byte << Uint32(8 * i))
        valid = seqlen_k - 32 * w
        if valid < 32:
            word = word & ((Uint32(1) << Uint32(cutlass.max(valid, 0))) - Uint32(1))
        return word

    @cute.jit
    def mask_byte(self, bits: cute.Tensor, j: Int32, seqlen_k: Int32) -> Uint8:
        """Byte j of a mask row (0 past the row)."""
        flag = Uint8(0)
        if j < seqlen_k:
            flag = bits[j]
        return flag

    @cute.jit
    def zero_tail(self, indices: cute.Tensor, count: Int32, capacity: Int32, tidx: Int32):
        """Zeros in slots count .. capacity - 1: up to 3 single slots to a 16-byte boundary,
        then 16-byte stores by the whole CTA (at low keeps these are most of the bytes)."""
        aligned = cutlass.min((count + 3) // 4 * 4, capacity)
        if tidx < aligned - count:
            indices[count + tidx] = 0
        quads = cute.zipped_divide(indices, (4,))  # [(4), capacity / 4]
        zeros = cute.full((4,), 0, Int32)
        for v in cutlass.range(aligned // 4 + tidx, capacity // 4, self.num_threads, unroll=2):
            quads[None, v].store(zeros)


class ListsToKeepBitsSm90:
    """Lists -> keep bits. ``packed``: write a bitmap (uint8 [R, ceil(Sk / 8)]), else a mask
    (uint8 [R, Sk], 1 = kept). Keys outside [0, Sk) are skipped (a trusted index has none; the
    check keeps the shared-memory bitmap in bounds), and so are slots past the capacity."""

    def __init__(self, packed: bool, num_threads: int = 256):
        self.packed = packed
        self.num_threads = num_threads

    @cute.jit
    def __call__(
        self,
        mIndices: cute.Tensor,  # int32 [R, capacity]
        mCounts: cute.Tensor,  # int32 [R]
        mBits: cute.Tensor,  # uint8 [R, ceil(Sk / 8)] (packed) or [R, Sk]
        seqlen_k: Int32,
        stream: cuda.CUstream,
    ):
        @cute.struct
        class SharedStorage:
            words: cute.struct.MemRange[Uint32, MAX_SEQLEN_K // 32]

        self.kernel(mIndices, mCounts, mBits, seqlen_k, SharedStorage).launch(
            grid=[cute.size(mIndices.shape[0]), 1, 1],
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )

    @cute.kernel
    def kernel(self, mIndices: cute.Tensor, mCounts: cute.Tensor, mBits: cute.Tensor,
               seqlen_k: Int32, SharedStorage: cutlass.Constexpr):
        tidx = cute.arch.thread_idx()[0]
        row = cute.arch.block_idx()[0]
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sWords = storage.words.get_tensor(cute.make_layout(MAX_SEQLEN_K // 32))
        n_words = cute.ceil_div(seqlen_k, 32)
        for w in cutlass.range(tidx, n_words, self.num_threads, unroll=1):
            sWords[w] = Uint32(0)
        cute.arch.barrier()

        indices = mIndices[row, None]
        count = cutlass.min(mCounts[row], cute.size(indices))
        for s in cutlass.range(tidx, count, self.num_threads, unroll=4):
            key = indices[s]
            if (key >= 0) & (key < seqlen_k):
                cute.arch.atomic_or(sWords.iterator + (key >> 5), Uint32(1) << Uint32(key & 31))
        cute.arch.barrier()

        out = mBits[row, None]
        if cutlass.const_expr(self.packed):
            for b in cutlass.range(tidx, cute.ceil_div(seqlen_k, 8), self.num_threads, unroll=4):
                out[b] = Uint8((sWords[b >> 2] >> Uint32((b & 3) * 8)) & Uint32(0xFF))
        else:
            for j in cutlass.range(tidx, seqlen_k, self.num_threads, unroll=4):
                out[j] = Uint8((sWords[j >> 5] >> Uint32(j & 31)) & Uint32(1))
