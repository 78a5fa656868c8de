"""Kept-key lists: ``KeyIndex`` (what the kernel reads) and ``PackedKeyIndex`` (a bitmap to cache).

A ``KeyIndex`` says, for every (batch, head, query tile), which keys that tile attends to:

    indices  int32 [B, H, n_q_tiles, capacity]  each row's first ``counts`` entries are the kept
                                                key ids, strictly ascending; the rest is 0
    counts   int32 [B, H, n_q_tiles]            number of kept keys per row
    n_q_tiles = ceil(seqlen_q / q_tile)         the last tile may be partial

``capacity`` (the row length) is always a positive multiple of 128: the kernel reads the lists in
groups of up to 128 entries. Builders that take ``capacity`` round it up to a multiple of 128;
``capacity=None`` means the worst case, ``round_up(seqlen_k, 128)``.

The builders (``from_mask``, ``from_block_mask``, ``dense``, ``PackedKeyIndex.unpack``) and
``to_mask``, ``density``, ``pack`` run on the input's device with no host synchronisation, so
they can run inside CUDA graphs (on Hopper, call a conversion once before capturing: its kernel
is compiled or loaded on first use). The conversions between keep bits and lists
(``from_mask``, ``to_mask``, ``pack``, ``unpack``) take ``backend``: "cute" (one sm90 kernel
each, see ``fgattn_cute.kernels.key_lists_sm90``: a ``SparsityCache`` runs them per layer and
step; ``to_mask`` and ``pack`` up to 131,072 keys), "torch" (plain tensor ops, any device,
traceable by ``torch.compile``) or "auto" (the kernel on a Hopper GPU where it runs the call,
except while ``torch.compile`` traces; torch otherwise). Both give the same tensors.

Trust: an index made by a builder, or checked by ``validate()``, is *trusted*: ``sparse_attention``
then checks only shapes, dtypes and devices. An index made by calling ``KeyIndex(...)`` directly is
untrusted until its contents have been checked once (``validate()``, or the first
``sparse_attention`` / ``to_mask`` / ``density`` / ``pack`` call, which does it with one host sync).
Changing the tensors of a trusted index in place is the user's responsibility: nothing re-checks.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["CAPACITY_ALIGN", "KeyIndex", "PackedKeyIndex"]

CAPACITY_ALIGN = 128
"""Every ``KeyIndex.capacity`` is a positive multiple of this."""

# fgattn_cute.kernels.key_lists_sm90.MAX_SEQLEN_K (not imported: it would import the DSL).
_MAX_SEQLEN_K_BITS = 1 << 17

# Largest temporary (in elements) one chunk of rows may allocate in the builders. The int64 index
# tensors that scatter needs are 8 bytes per element, so a chunk costs at most a few hundred MB.
_CHUNK_ELEMS = 1 << 25

_INT_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)


def _cdiv(a, b):
    return (a + b - 1) // b


def _round_up(a, b):
    return _cdiv(a, b) * b


def _as_int(name, value, minimum):
    """``value`` as a Python int (or SymInt under torch.compile), at least ``minimum``."""
    if isinstance(value, torch.SymInt):
        out = value
    elif isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    else:
        try:
            out = operator.index(value)
        except TypeError:
            raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}") from None
    if out < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {out}")
    return out


def _resolve_capacity(capacity, seqlen_k):
    if capacity is None:
        return _round_up(seqlen_k, CAPACITY_ALIGN)
    return _round_up(_as_int("capacity", capacity, 1), CAPACITY_ALIGN)


BACKENDS = ("auto", "cute", "torch")
"""Backends of the conversions between keep bits and lists (see the module docstring)."""


def _use_kernel(backend, device, seqlen_k, bitmap_bound=False):
    """Whether the sm90 kernel runs a conversion: ``backend`` checked, "cute" raising with the
    reason when the kernel cannot run the call. ``bitmap_bound``: the lists -> bits kernel,
    whose shared-memory bitmap holds up to 131,072 keys."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    from ..interface import _not_hopper_reason

    if torch.compiler.is_compiling():
        why_not = "torch.compile is tracing (the kernel is opaque to it)"
    else:
        why_not = _not_hopper_reason(device)
    if why_not is None and bitmap_bound and seqlen_k > _MAX_SEQLEN_K_BITS:
        why_not = f"it runs seqlen_k <= {_MAX_SEQLEN_K_BITS}, got {seqlen_k}"
    if why_not is None:
        return True
    if backend == "cute":
        raise RuntimeError(f"backend: the KeyIndex conversion kernel cannot run this call: "
                           f"{why_not}")
    return False


def _row_chunks(rows, elems_per_row):
    """Split ``rows`` rows into (start, stop) chunks of at most ``_CHUNK_ELEMS`` elements."""
    step = max(1, _CHUNK_ELEMS // max(1, elems_per_row))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _check_tensor(name, t, ndim, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor {what}, got shape {tuple(t.shape)}"
        )


def _lists_from_mask_rows(mask_rows, capacity):
    """bool [r, seqlen_k] -> (indices int32 [r, capacity], counts int32 [r]). No host sync.

    Each kept key goes to slot ``cumsum - 1`` of its row; dropped keys, and kept keys past the
    capacity, go to one extra dump column that is sliced off.
    """
    rows, seqlen_k = mask_rows.shape
    pos = torch.cumsum(mask_rows, dim=-1, dtype=torch.int32) - 1
    target = torch.where(mask_rows & (pos < capacity), pos, capacity).long()
    keys = torch.arange(seqlen_k, dtype=torch.int32, device=mask_rows.device)
    buf = torch.zeros(rows, capacity + 1, dtype=torch.int32, device=mask_rows.device)
    buf.scatter_(1, target, keys.expand(rows, seqlen_k))
    counts = pos[:, -1] + 1
    return buf[:, :capacity], counts


def _check_capacity(counts, capacity, seqlen_k):
    """Refuse to truncate: every count must fit the capacity. No host sync on accelerators."""
    if capacity >= seqlen_k:
        return  # no row can hold more than seqlen_k keys
    msg = (
        f"capacity: expected at least the largest number of kept keys in a row, got "
        f"capacity={capacity} (rounded up to a multiple of {CAPACITY_ALIGN}); pass a larger "
        f"capacity or capacity=None"
    )
    if counts.device.type == "cpu" and not torch.compiler.is_compiling():
        over = counts > capacity
        if bool(over.any()):
            first = tuple(int(i) for i in over.nonzero()[0])
            raise ValueError(f"{msg}; counts{list(first)} = {int(counts[first])}")
    else:
        # Device-side assert: no sync. On CUDA a failure surfaces at a later launch and leaves
        # the CUDA context unusable, as every device-side assert does.
        torch._assert_async((counts <= capacity).all(), msg)


def _first_bad(flags):
    return tuple(int(i) for i in flags.nonzero()[0])


def _check_contents(indices, counts, seqlen_k, capacity, prefix=""):
    """Raise ValueError unless counts lie in [0, capacity] and every row's first ``counts``
    entries lie in [0, seqlen_k) and are strictly ascending. One host sync when all is well."""
    if indices.dtype not in (torch.int32, torch.int64):
        indices = indices.long()
    if counts.dtype not in (torch.int32, torch.int64):
        counts = counts.long()
    counts_bad = (counts < 0) | (counts > capacity)
    slot = torch.arange(indices.shape[-1], device=indices.device)
    valid = slot < counts.unsqueeze(-1)
    range_bad = valid & ((indices < 0) | (indices >= seqlen_k))
    order_bad = valid[..., 1:] & (indices[..., 1:] <= indices[..., :-1])
    flags = torch.stack([counts_bad.any(), range_bad.any(), order_bad.any()]).tolist()
    if flags[0]:
        at = _first_bad(counts_bad)
        raise ValueError(
            f"{prefix}counts: expected every count in [0, capacity={capacity}], got "
            f"{prefix}counts{list(at)} = {int(counts[at])}"
        )
    if flags[1]:
        at = _first_bad(range_bad)
        raise ValueError(
            f"{prefix}indices: expected the first counts[b, h, tile] entries of each row in "
            f"[0, seqlen_k={seqlen_k}), got {prefix}indices{list(at)} = {int(indices[at])}"
        )
    if flags[2]:
        b, h, t, s = _first_bad(order_bad)
        raise ValueError(
            f"{prefix}indices: expected each row's valid entries strictly ascending (sorted, no "
            f"duplicates), got {prefix}indices{[b, h, t, s]} = {int(indices[b, h, t, s])} "
            f"followed by {prefix}indices{[b, h, t, s + 1]} = {int(indices[b, h, t, s + 1])}"
        )


class KeyIndex:
    """Per query tile, the sorted list of kept keys. See the module docstring.

    Fields: ``indices`` int32 [B, H, n_q_tiles, capacity], ``counts`` int32 [B, H, n_q_tiles],
    ``q_tile``, ``seqlen_q``, ``seqlen_k``. Calling the constructor checks shapes and dtypes only
    and gives an untrusted index; prefer the builders (``from_mask``, ``from_block_mask``,
    ``from_indices``, ``dense``), which give trusted ones.

    ``q_tile`` may be any positive int here; the CuTe kernel runs 64 and 128 (checked when it
    is called).
    """

    def __init__(self, indices, counts, q_tile, seqlen_q, seqlen_k):
        q_tile = _as_int("q_tile", q_tile, 1)
        seqlen_q = _as_int("seqlen_q", seqlen_q, 1)
        seqlen_k = _as_int("seqlen_k", seqlen_k, 1)
        _check_tensor("indices", indices, 4, "[B, H, n_q_tiles, capacity]")
        _check_tensor("counts", counts, 3, "[B, H, n_q_tiles]")
        for name, t in (("indices", indices), ("counts", counts)):
            if t.dtype != torch.int32:
                raise TypeError(
                    f"{name}: expected dtype torch.int32, got {t.dtype} "
                    f"(KeyIndex.from_indices converts other integer dtypes)"
                )
        if counts.device != indices.device:
            raise ValueError(
                f"counts: expected the device of indices ({indices.device}), got {counts.device}"
            )
        b, h, n_tiles, capacity = indices.shape
        expected_tiles = _cdiv(seqlen_q, q_tile)
        if n_tiles != expected_tiles:
            raise ValueError(
                f"indices: expected n_q_tiles = ceil(seqlen_q / q_tile) = "
                f"ceil({seqlen_q} / {q_tile}) = {expected_tiles} in dim 2, got shape "
                f"{tuple(indices.shape)}"
            )
        if capacity <= 0 or capacity % CAPACITY_ALIGN != 0:
            raise ValueError(
                f"indices: expected capacity (dim 3) a positive multiple of {CAPACITY_ALIGN}, "
                f"got {capacity} (KeyIndex.from_indices pads it)"
            )
        if tuple(counts.shape) != (b, h, n_tiles):
            raise ValueError(
                f"counts: expected shape {(b, h, n_tiles)} (indices.shape[:3]), got "
                f"{tuple(counts.shape)}"
            )
        self.indices = indices
        self.counts = counts
        self.q_tile = q_tile
        self.seqlen_q = seqlen_q
        self.seqlen_k = seqlen_k
        self._trusted = False

    # ----------------------------------------------------------------- properties

    @property
    def batch(self):
        return self.indices.shape[0]

    @property
    def heads(self):
        return self.indices.shape[1]

    @property
    def n_q_tiles(self):
        return self.indices.shape[2]

    @property
    def capacity(self):
        return self.indices.shape[3]

    @property
    def device(self):
        return self.indices.device

    @property
    def trusted(self):
        """True when built by a builder or checked by ``validate()``."""
        return self._trusted

    @property
    def nbytes(self):
        """Bytes held by ``indices`` and ``counts``."""
        return (
            self.indices.numel() * self.indices.element_size()
            + self.counts.numel() * self.counts.element_size()
        )

    def __repr__(self):
        return (
            f"KeyIndex(batch={self.batch}, heads={self.heads}, n_q_tiles={self.n_q_tiles}, "
            f"capacity={self.capacity}, q_tile={self.q_tile}, seqlen_q={self.seqlen_q}, "
            f"seqlen_k={self.seqlen_k}, device={self.device}, trusted={self._trusted})"
        )

    @classmethod
    def _trusted_new(cls, indices, counts, q_tile, seqlen_q, seqlen_k):
        out = cls(indices, counts, q_tile, seqlen_q, seqlen_k)
        out._trusted = True
        return out

    # ----------------------------------------------------------------- checking

    def validate(self, _prefix=""):
        """Check the contents (counts in [0, capacity], valid entries in [0, seqlen_k) and
        strictly ascending) with one host sync, mark the index trusted and return it.
        Raises ValueError naming the first offending (b, h, tile[, slot])."""
        if not self._trusted:
            _check_contents(self.indices, self.counts, self.seqlen_k, self.capacity, _prefix)
            self._trusted = True
        return self

    # ----------------------------------------------------------------- builders

    @classmethod
    def from_mask(cls, mask, q_tile, seqlen_q, capacity=None, *, backend="auto"):
        """Build from a bool ``mask`` [B, H, n_q_tiles, seqlen_k]: tile t keeps key j where
        ``mask[b, h, t, j]``. ``capacity`` (None: round_up(seqlen_k, 128)) is rounded up to a
        multiple of 128; a row with more kept keys than that is an error, never truncated
        (ValueError on CPU; on other devices a device-side assert, so no host sync).
        ``backend``: see the module docstring."""
        q_tile = _as_int("q_tile", q_tile, 1)
        seqlen_q = _as_int("seqlen_q", seqlen_q, 1)
        _check_tensor("mask", mask, 4, "[B, H, n_q_tiles, seqlen_k]")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        b, h, n_tiles, seqlen_k = mask.shape
        if n_tiles != _cdiv(seqlen_q, q_tile):
            raise ValueError(
                f"mask: expected n_q_tiles = ceil(seqlen_q / q_tile) = {_cdiv(seqlen_q, q_tile)} "
                f"in dim 2, got shape {tuple(mask.shape)}"
            )
        if seqlen_k < 1:
            raise ValueError(f"mask: expected seqlen_k (dim 3) >= 1, got {seqlen_k}")
        cap = _resolve_capacity(capacity, seqlen_k)
        rows = mask.reshape(b * h * n_tiles, seqlen_k)
        if _use_kernel(backend, mask.device, seqlen_k):
            return cls._from_bits_kernel(rows.contiguous().view(torch.uint8), False,
                                         (b, h, n_tiles), q_tile, seqlen_q, seqlen_k, cap)
        return cls._from_rows(lambda r0, r1: rows[r0:r1], (b, h, n_tiles), q_tile, seqlen_q,
                              seqlen_k, cap, mask.device)

    @classmethod
    def _from_bits_kernel(cls, bits, packed, bht, q_tile, seqlen_q, seqlen_k, cap):
        from .launch import run_keep_bits_to_lists_sm90

        indices, counts = run_keep_bits_to_lists_sm90(bits, seqlen_k, cap, packed)
        counts = counts.reshape(bht)
        _check_capacity(counts, cap, seqlen_k)
        return cls._trusted_new(indices.reshape(*bht, cap), counts, q_tile, seqlen_q, seqlen_k)

    @classmethod
    def _from_rows(cls, get_rows, bht, q_tile, seqlen_q, seqlen_k, cap, device):
        n_rows = bht[0] * bht[1] * bht[2]
        indices = torch.empty(n_rows, cap, dtype=torch.int32, device=device)
        counts = torch.empty(n_rows, dtype=torch.int32, device=device)
        for r0, r1 in _row_chunks(n_rows, seqlen_k + cap):
            indices[r0:r1], counts[r0:r1] = _lists_from_mask_rows(get_rows(r0, r1), cap)
        counts = counts.reshape(bht)
        _check_capacity(counts, cap, seqlen_k)
        return cls._trusted_new(indices.reshape(*bht, cap), counts, q_tile, seqlen_q, seqlen_k)

    @classmethod
    def from_block_mask(cls, block_mask, q_tile, seqlen_q, k_block, seqlen_k, capacity=None):
        """Build from a bool ``block_mask`` [B, H, n_q_tiles, ceil(seqlen_k / k_block)]: tile t
        keeps every key of block c (keys c*k_block .. min((c+1)*k_block, seqlen_k) - 1) where
        ``block_mask[b, h, t, c]``. ``capacity`` as in ``from_mask``."""
        q_tile = _as_int("q_tile", q_tile, 1)
        seqlen_q = _as_int("seqlen_q", seqlen_q, 1)
        k_block = _as_int("k_block", k_block, 1)
        seqlen_k = _as_int("seqlen_k", seqlen_k, 1)
        _check_tensor("block_mask", block_mask, 4, "[B, H, n_q_tiles, ceil(seqlen_k / k_block)]")
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask: expected dtype torch.bool, got {block_mask.dtype}")
        b, h, n_tiles, n_blocks = block_mask.shape
        if n_tiles != _cdiv(seqlen_q, q_tile):
            raise ValueError(
                f"block_mask: expected n_q_tiles = ceil(seqlen_q / q_tile) = "
                f"{_cdiv(seqlen_q, q_tile)} in dim 2, got shape {tuple(block_mask.shape)}"
            )
        if n_blocks != _cdiv(seqlen_k, k_block):
            raise ValueError(
                f"block_mask: expected ceil(seqlen_k / k_block) = ceil({seqlen_k} / {k_block}) = "
                f"{_cdiv(seqlen_k, k_block)} blocks in dim 3, got shape {tuple(block_mask.shape)}"
            )
        cap = _resolve_capacity(capacity, seqlen_k)
        rows = block_mask.reshape(b * h * n_tiles, n_blocks)
        block_of_key = torch.arange(seqlen_k, device=block_mask.device) // k_block
        return cls._from_rows(lambda r0, r1: rows[r0:r1].index_select(1, block_of_key),
                              (b, h, n_tiles), q_tile, seqlen_q, seqlen_k, cap,
                              block_mask.device)

    @classmethod
    def from_indices(cls, indices, counts, q_tile, seqlen_q, seqlen_k, validate=True):
        """Adopt user lists: ``indices`` [B, H, n_q_tiles, c] and ``counts`` [B, H, n_q_tiles] of
        any integer dtype. They are converted to contiguous int32, the entries past each row's
        count are set to 0 and the capacity is padded with zeros to a multiple of 128.

        ``validate=True`` checks the contents first (counts in [0, c], valid entries in
        [0, seqlen_k) and strictly ascending) with one host sync. ``validate=False`` skips that
        (no sync: for CUDA-graph capture) and trusts the caller: the index is marked trusted.
        """
        q_tile = _as_int("q_tile", q_tile, 1)
        seqlen_q = _as_int("seqlen_q", seqlen_q, 1)
        seqlen_k = _as_int("seqlen_k", seqlen_k, 1)
        _check_tensor("indices", indices, 4, "[B, H, n_q_tiles, capacity]")
        _check_tensor("counts", counts, 3, "[B, H, n_q_tiles]")
        for name, t in (("indices", indices), ("counts", counts)):
            if t.dtype not in _INT_DTYPES:
                raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
        if counts.device != indices.device:
            raise ValueError(
                f"counts: expected the device of indices ({indices.device}), got {counts.device}"
            )
        b, h, n_tiles, given_cap = indices.shape
        if n_tiles != _cdiv(seqlen_q, q_tile):
            raise ValueError(
                f"indices: expected n_q_tiles = ceil(seqlen_q / q_tile) = "
                f"{_cdiv(seqlen_q, q_tile)} in dim 2, got shape {tuple(indices.shape)}"
            )
        if tuple(counts.shape) != (b, h, n_tiles):
            raise ValueError(
                f"counts: expected shape {(b, h, n_tiles)} (indices.shape[:3]), got "
                f"{tuple(counts.shape)}"
            )
        if validate:
            _check_contents(indices, counts, seqlen_k, given_cap)
        cap = max(CAPACITY_ALIGN, _round_up(given_cap, CAPACITY_ALIGN))
        counts32 = counts.to(torch.int32).contiguous()
        idx32 = indices.to(torch.int32)
        if cap != given_cap:
            idx32 = torch.nn.functional.pad(idx32, (0, cap - given_cap))
        slot = torch.arange(cap, dtype=torch.int32, device=indices.device)
        idx32 = torch.where(slot < counts32.unsqueeze(-1), idx32, 0).contiguous()
        return cls._trusted_new(idx32, counts32, q_tile, seqlen_q, seqlen_k)

    @classmethod
    def dense(cls, B, H, seqlen_q, seqlen_k, q_tile, device=None):
        """Every tile keeps every key (capacity round_up(seqlen_k, 128))."""
        B = _as_int("B", B, 1)
        H = _as_int("H", H, 1)
        q_tile = _as_int("q_tile", q_tile, 1)
        seqlen_q = _as_int("seqlen_q", seqlen_q, 1)
        seqlen_k = _as_int("seqlen_k", seqlen_k, 1)
        n_tiles = _cdiv(seqlen_q, q_tile)
        cap = _round_up(seqlen_k, CAPACITY_ALIGN)
        row = torch.arange(cap, dtype=torch.int32, device=device)
        row = torch.where(row < seqlen_k, row, 0)
        indices = row.expand(B, H, n_tiles, cap).contiguous()
        counts = torch.full((B, H, n_tiles), seqlen_k, dtype=torch.int32, device=device)
        return cls._trusted_new(indices, counts, q_tile, seqlen_q, seqlen_k)

    # ----------------------------------------------------------------- views

    def _rows(self):
        n_rows = self.batch * self.heads * self.n_q_tiles
        return (
            n_rows,
            self.indices.reshape(n_rows, self.capacity),
            self.counts.reshape(n_rows, 1),
        )

    def to_mask(self, *, backend="auto"):
        """bool [B, H, n_q_tiles, seqlen_k]: True where the tile keeps the key. No host sync
        (for a trusted index; an untrusted one is validated first). ``backend``: see the module
        docstring."""
        kernel = _use_kernel(backend, self.device, self.seqlen_k, bitmap_bound=True)
        self.validate()
        n_rows, idx_rows, cnt_rows = self._rows()
        sk, cap = self.seqlen_k, self.capacity
        if kernel:
            out = self._bits_kernel(idx_rows, cnt_rows, packed=False).view(torch.bool)
            return out.reshape(self.batch, self.heads, self.n_q_tiles, sk)
        out = torch.empty(n_rows, sk, dtype=torch.bool, device=self.device)
        slot = torch.arange(cap, dtype=torch.int32, device=self.device)
        for r0, r1 in _row_chunks(n_rows, sk + 2 * cap):
            valid = slot < cnt_rows[r0:r1]
            target = torch.where(valid, idx_rows[r0:r1], sk).long()
            buf = torch.zeros(r1 - r0, sk + 1, dtype=torch.bool, device=self.device)
            buf.scatter_(1, target, True)
            out[r0:r1] = buf[:, :sk]
        return out.reshape(self.batch, self.heads, self.n_q_tiles, sk)

    def density(self):
        """Kept fraction of all B * H * seqlen_q * seqlen_k scores, as a 0-dim float32 tensor on
        the index's device (no host sync). The last tile counts only its real queries."""
        self.validate()
        counts = self.counts.long()
        missing = self.n_q_tiles * self.q_tile - self.seqlen_q  # queries the last tile lacks
        kept = counts.sum() * self.q_tile - counts[..., -1].sum() * missing
        total = self.batch * self.heads * self.seqlen_q * self.seqlen_k
        return (kept.double() / total).float()

    def pack(self, *, backend="auto"):
        """The compact form: a ``PackedKeyIndex`` bitmap (bit j % 8 of byte j // 8 set when key j
        is kept). No host sync (for a trusted index; an untrusted one is validated first).
        ``backend``: see the module docstring."""
        kernel = _use_kernel(backend, self.device, self.seqlen_k, bitmap_bound=True)
        self.validate()
        n_rows, idx_rows, cnt_rows = self._rows()
        n_bytes = _cdiv(self.seqlen_k, 8)
        cap = self.capacity
        if kernel:
            out = self._bits_kernel(idx_rows, cnt_rows, packed=True)
            bitmap = out.reshape(self.batch, self.heads, self.n_q_tiles, n_bytes)
            return PackedKeyIndex(bitmap, self.q_tile, self.seqlen_q, self.seqlen_k)
        out = torch.empty(n_rows, n_bytes, dtype=torch.uint8, device=self.device)
        slot = torch.arange(cap, dtype=torch.int32, device=self.device)
        for r0, r1 in _row_chunks(n_rows, n_bytes + 3 * cap):
            valid = slot < cnt_rows[r0:r1]
            idx = idx_rows[r0:r1]
            byte = torch.where(valid, idx >> 3, n_bytes).long()
            bit = torch.where(valid, torch.ones_like(idx) << (idx & 7), 0)
            buf = torch.zeros(r1 - r0, n_bytes + 1, dtype=torch.int32, device=self.device)
            buf.scatter_add_(1, byte, bit)  # keys are unique, so add == bitwise or
            out[r0:r1] = buf[:, :n_bytes].to(torch.uint8)
        bitmap = out.reshape(self.batch, self.heads, self.n_q_tiles, n_bytes)
        return PackedKeyIndex(bitmap, self.q_tile, self.seqlen_q, self.seqlen_k)

    def _bits_kernel(self, idx_rows, cnt_rows, packed):
        from .launch import run_lists_to_keep_bits_sm90

        return run_lists_to_keep_bits_sm90(idx_rows.contiguous(),
                                           cnt_rows.reshape(-1).contiguous(), self.seqlen_k,
                                           packed)

    def to(self, device, non_blocking=False):
        """A copy on ``device`` (same trust)."""
        out = KeyIndex(
            self.indices.to(device, non_blocking=non_blocking),
            self.counts.to(device, non_blocking=non_blocking),
            self.q_tile,
            self.seqlen_q,
            self.seqlen_k,
        )
        out._trusted = self._trusted
        return out


class PackedKeyIndex:
    """A ``KeyIndex`` as a bitmap, for caching across layers or denoising steps:
    ``bitmap`` uint8 [B, H, n_q_tiles, ceil(seqlen_k / 8)], bit (j % 8) of byte (j // 8) set when
    key j is kept; plus ``q_tile``, ``seqlen_q``, ``seqlen_k``. ``seqlen_k / 8`` bytes per row
    against ``4 * capacity`` for the lists. ``unpack()`` gives the ``KeyIndex`` back."""

    def __init__(self, bitmap, q_tile, seqlen_q, seqlen_k):
        q_tile = _as_int("q_tile", q_tile, 1)
        seqlen_q = _as_int("seqlen_q", seqlen_q, 1)
        seqlen_k = _as_int("seqlen_k", seqlen_k, 1)
        _check_tensor("bitmap", bitmap, 4, "[B, H, n_q_tiles, ceil(seqlen_k / 8)]")
        if bitmap.dtype != torch.uint8:
            raise TypeError(f"bitmap: expected dtype torch.uint8, got {bitmap.dtype}")
        expected = (_cdiv(seqlen_q, q_tile), _cdiv(seqlen_k, 8))
        if tuple(bitmap.shape[2:]) != expected:
            raise ValueError(
                f"bitmap: expected [B, H, ceil(seqlen_q / q_tile), ceil(seqlen_k / 8)] = "
                f"[B, H, {expected[0]}, {expected[1]}], got shape {tuple(bitmap.shape)}"
            )
        self.bitmap = bitmap
        self.q_tile = q_tile
        self.seqlen_q = seqlen_q
        self.seqlen_k = seqlen_k

    @property
    def batch(self):
        return self.bitmap.shape[0]

    @property
    def heads(self):
        return self.bitmap.shape[1]

    @property
    def n_q_tiles(self):
        return self.bitmap.shape[2]

    @property
    def device(self):
        return self.bitmap.device

    @property
    def nbytes(self):
        return self.bitmap.numel() * self.bitmap.element_size()

    def __repr__(self):
        return (
            f"PackedKeyIndex(batch={self.batch}, heads={self.heads}, n_q_tiles={self.n_q_tiles}, "
            f"q_tile={self.q_tile}, seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, "
            f"device={self.device})"
        )

    def unpack(self, capacity=None, *, backend="auto"):
        """The ``KeyIndex`` (trusted). ``capacity`` as in ``KeyIndex.from_mask``. No host sync.
        Bits past seqlen_k in a row's last byte are ignored. ``backend``: "cute" (one sm90
        kernel), "torch" or "auto", as for ``KeyIndex.from_mask``."""
        sk = self.seqlen_k
        cap = _resolve_capacity(capacity, sk)
        n_bytes = self.bitmap.shape[3]
        bht = (self.batch, self.heads, self.n_q_tiles)
        rows = self.bitmap.reshape(bht[0] * bht[1] * bht[2], n_bytes)
        if _use_kernel(backend, self.device, sk):
            return KeyIndex._from_bits_kernel(rows.contiguous(), True, bht, self.q_tile,
                                              self.seqlen_q, sk, cap)
        shifts = torch.arange(8, dtype=torch.uint8, device=self.device)

        def get_rows(r0, r1):
            bits = (rows[r0:r1].unsqueeze(-1) >> shifts) & 1
            return bits.reshape(r1 - r0, n_bytes * 8)[:, :sk].bool()

        return KeyIndex._from_rows(get_rows, bht, self.q_tile, self.seqlen_q, sk, cap,
                                   self.device)

    def to(self, device, non_blocking=False):
        """A copy on ``device``."""
        return PackedKeyIndex(
            self.bitmap.to(device, non_blocking=non_blocking),
            self.q_tile,
            self.seqlen_q,
            self.seqlen_k,
        )
