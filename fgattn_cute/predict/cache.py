"""``SparsityCache``: one ``KeyIndex`` per layer, reused across denoising steps.

Attention patterns of a video DiT change slowly from one denoising step to the next, so an
index predicted at one step serves the following ones: the cache runs the predictor for a layer
at the steps the schedule names (and whenever the layer has no usable entry), and hands back the
stored index at the other steps.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..host.key_index import KeyIndex, PackedKeyIndex

__all__ = ["SparsityCache", "SparsityCacheFull"]

ON_FULL = ("raise", "evict")


class SparsityCacheFull(RuntimeError):
    """Storing an index would take the cache past ``max_bytes`` (with ``on_full="raise"``, or
    when that one index alone is larger than ``max_bytes``)."""


@dataclass
class _Entry:
    step: int  # the step it was predicted at
    signature: tuple  # (B, Sq, H, Sk, device) of the q, k it was predicted from
    stored: KeyIndex | PackedKeyIndex
    capacity: int  # the predictor's capacity, restored on unpack

    @property
    def nbytes(self):
        return self.stored.nbytes


def _step_int(step):
    if isinstance(step, bool) or isinstance(step, torch.Tensor):
        raise TypeError(f"step: expected a Python int >= 0, got {type(step).__name__}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"step: expected a Python int >= 0, got {type(step).__name__}") from None
    if value < 0:
        raise ValueError(f"step: expected a Python int >= 0, got {value}")
    return value


class SparsityCache:
    """Per-layer cache of predicted ``KeyIndex``es across denoising steps.

    Schedule, for ``get(layer_id, step, q, k)``:

    - ``step < dense_steps``: returns ``None``, the dense marker: run that layer dense (e.g.
      ``torch.nn.functional.scaled_dot_product_attention``). Nothing is predicted or stored.
    - otherwise, the predictor runs (``predictor(q, k)``) and its index is stored and returned
      when the layer has no entry yet, when ``step`` is in ``recalibrate_at`` (once per step:
      repeated calls at the same step, e.g. the two passes of classifier-free guidance, reuse
      it), or when the shapes (B, Sq, H, Sk) or device of q, k differ from the entry's;
    - at every other step the stored index is returned (unpacked from its bitmap when
      ``compact``; with the predictor's capacity, so it equals what the predictor returned).

    A step smaller than the previous call's starts a new generation: every entry is dropped
    first (so a second video never reuses the first one's indexes). ``clear()`` does the same
    explicitly.

    Args:
        predictor: callable ``(q, k) -> KeyIndex``, e.g.
            ``functools.partial(fg.predict.calibrate, q_tile=128, threshold=0.5)``.
        recalibrate_at: step numbers (ints >= 0) at which the predictor reruns.
        dense_steps: the first ``dense_steps`` steps run dense (``get`` returns None).
        compact: store a ``PackedKeyIndex`` bitmap (Sk / 8 bytes per (b, h, tile) row) rather
            than the int32 lists (4 * capacity bytes per row), and unpack it at every reuse
            (sync-free; on a Hopper GPU one kernel that writes the lists at close to memory
            speed, 0.34 ms per layer and step at 32,760 tokens and 24 heads on an H200, where
            eager torch took 8.4 ms; elsewhere the torch ops). Default True. Unpacking writes
            every slot of the capacity, so a predictor with a tight ``capacity=`` makes it
            cheaper; ``compact=False`` skips it.
        max_bytes: None (no bound) or the most bytes the stored entries may take together.
        on_full: what storing past ``max_bytes`` does: "raise" (``SparsityCacheFull``; the cache
            is left as it was) or "evict" (drop the least recently used other layers until it
            fits; each eviction is counted in ``stats["evictions"]``, and an evicted layer is
            predicted again at its next step). One index larger than ``max_bytes`` always
            raises.

    Memory per layer (B = 1; double it for classifier-free guidance batched as B = 2), for
    75,600 tokens (720p Wan / HunyuanVideo), 40 heads, q_tile 128 (591 tiles):

    | stored form                                            | per layer        | 40 layers |
    | ------------------------------------------------------ | ---------------- | --------- |
    | bitmap (``compact=True``), 9,450 bytes per row         | 223 MB (213 MiB) | 8.9 GB    |
    | int32 lists, capacity 22,784 (30 % of the keys)        | 2.15 GB          | 86 GB     |
    | int32 lists, worst-case capacity 75,648                | 7.15 GB          | 286 GB    |

    With q_tile 64 every figure doubles. The returned ``KeyIndex`` is transient (one layer at a
    time) but sized by the predictor's capacity: pass ``capacity=`` to the predictor.

    Counters in ``stats``: "predictor_calls", "dense" (None returned), "reused",
    "shape_changes", "generations" (new generations detected), "evictions".
    """

    def __init__(self, predictor, recalibrate_at=(), dense_steps=0, compact=True,
                 max_bytes=None, on_full="raise"):
        if not callable(predictor):
            raise TypeError(
                f"predictor: expected a callable (q, k) -> KeyIndex, got "
                f"{type(predictor).__name__}"
            )
        if isinstance(recalibrate_at, (str, bytes)) or not hasattr(recalibrate_at, "__iter__"):
            raise TypeError(
                f"recalibrate_at: expected a set or list of step numbers, got "
                f"{type(recalibrate_at).__name__}"
            )
        steps = set()
        for s in recalibrate_at:
            try:
                steps.add(_step_int(s))
            except (TypeError, ValueError):
                raise ValueError(
                    f"recalibrate_at: expected step numbers (ints >= 0), got {s!r}"
                ) from None
        try:
            dense = _step_int(dense_steps)
        except (TypeError, ValueError):
            raise ValueError(f"dense_steps: expected an int >= 0, got {dense_steps!r}") from None
        if not isinstance(compact, bool):
            raise TypeError(f"compact: expected a bool, got {type(compact).__name__}")
        if max_bytes is not None:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
                raise ValueError(f"max_bytes: expected None or a positive int, got {max_bytes!r}")
        if on_full not in ON_FULL:
            raise ValueError(f"on_full: expected one of {ON_FULL}, got {on_full!r}")
        self.predictor = predictor
        self.recalibrate_at = frozenset(steps)
        self.dense_steps = dense
        self.compact = compact
        self.max_bytes = max_bytes
        self.on_full = on_full
        self._entries = OrderedDict()  # layer_id -> _Entry, least recently used first
        self._last_step = None
        self._stats = dict.fromkeys(
            ("predictor_calls", "dense", "reused", "shape_changes", "generations", "evictions"),
            0,
        )

    # ------------------------------------------------------------------ queries

    @property
    def nbytes(self):
        """Bytes held by the stored entries (bitmaps or lists with their counts)."""
        return sum(e.nbytes for e in self._entries.values())

    @property
    def stats(self):
        """A copy of the counters (see the class docstring)."""
        return dict(self._stats)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, layer_id):
        return layer_id in self._entries

    def __repr__(self):
        return (
            f"SparsityCache(layers={len(self)}, nbytes={self.nbytes}, "
            f"dense_steps={self.dense_steps}, recalibrate_at={sorted(self.recalibrate_at)}, "
            f"compact={self.compact}, max_bytes={self.max_bytes})"
        )

    def clear(self):
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self._last_step = None

    # ------------------------------------------------------------------ the schedule

    def get(self, layer_id, step, q, k):
        """The ``KeyIndex`` for ``layer_id`` at ``step`` (q, k: [B, S, H, D] of that layer and
        step), or None for a dense step. Predicts, stores or reuses as the schedule says (see
        the class docstring)."""
        step = _step_int(step)
        if self._last_step is not None and step < self._last_step:
            self._entries.clear()
            self._stats["generations"] += 1
        self._last_step = step
        if step < self.dense_steps:
            self._stats["dense"] += 1
            return None
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise TypeError(f"{name}: expected a torch.Tensor [B, S, H, D]")
        signature = (q.shape[0], q.shape[1], q.shape[2], k.shape[1], q.device)
        entry = self._entries.get(layer_id)
        if entry is not None and entry.signature != signature:
            self._stats["shape_changes"] += 1
            entry = None
        if entry is None or (step in self.recalibrate_at and entry.step != step):
            return self._predict(layer_id, step, q, k, signature)
        self._entries.move_to_end(layer_id)
        self._stats["reused"] += 1
        if self.compact:
            return entry.stored.unpack(capacity=entry.capacity)
        return entry.stored

    def _predict(self, layer_id, step, q, k, signature):
        index = self.predictor(q, k)
        self._stats["predictor_calls"] += 1
        if not isinstance(index, KeyIndex):
            raise TypeError(
                f"predictor: expected it to return a fgattn_cute.KeyIndex, got "
                f"{type(index).__name__}"
            )
        got = (index.batch, index.seqlen_q, index.heads, index.seqlen_k, index.device)
        if got != signature:
            raise ValueError(
                f"predictor: expected an index for (B, Sq, H, Sk, device) = {signature}, got "
                f"{got}"
            )
        stored = index.pack() if self.compact else index
        entry = _Entry(step, signature, stored, index.capacity)
        self._make_room(layer_id, entry.nbytes)
        self._entries[layer_id] = entry
        self._entries.move_to_end(layer_id)
        return index

    def _make_room(self, layer_id, new_bytes):
        if self.max_bytes is None:
            return
        others = [(lid, e) for lid, e in self._entries.items() if lid != layer_id]
        used = sum(e.nbytes for _, e in others)
        if new_bytes > self.max_bytes or (self.on_full == "raise"
                                          and used + new_bytes > self.max_bytes):
            raise SparsityCacheFull(
                f"max_bytes: storing layer {layer_id!r}'s index ({new_bytes} bytes) would bring "
                f"the cache to {used + new_bytes} bytes > max_bytes={self.max_bytes} "
                f"({len(others)} other layers stored); raise max_bytes, use compact=True, or "
                f"on_full='evict'"
            )
        for lid, e in others:  # least recently used first
            if used + new_bytes <= self.max_bytes:
                break
            del self._entries[lid]
            used -= e.nbytes
            self._stats["evictions"] += 1
