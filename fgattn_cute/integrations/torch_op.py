"""``fg.sparse_attention`` as a ``torch.library`` custom op: ``torch.ops.fgattn.sparse_attention``.

The op takes plain tensors, so ``torch.compile`` (``fullgraph=True``) keeps it in the graph as one
opaque node, and a CUDA graph can capture it::

    out, lse = torch.ops.fgattn.sparse_attention(
        q, k, v, indices, counts, q_tile, softmax_scale, backend)

    q, k, v            [B, S, H, D] (FlashAttention / diffusers layout); seqlen_q is q.shape[1],
                       seqlen_k is k.shape[1]
    indices, counts    int32 [B, H, n_q_tiles, capacity] and [B, H, n_q_tiles]: a KeyIndex's lists
    q_tile             queries per tile (int)
    softmax_scale      float (already resolved: no None)
    backend            "cute" or "reference" (already resolved: no "auto")
    -> out [B, Sq, H, D] in q's dtype (contiguous), lse float32 [B, H, Sq]

Most callers use the wrapper ``sparse_attention_op(q, k, v, index, ...)``, which takes a
``KeyIndex``, resolves ``softmax_scale=None`` and ``backend="auto"`` and checks the structure.

Trust, and why the op never synchronises: under CUDA-graph capture and inside a
``torch.compile`` graph no host synchronisation is allowed, so the op never reads the index's
contents on the host. It checks shapes, dtypes and devices only (no sync) and treats the lists as
valid. Build the index with a ``KeyIndex`` builder (trusted: ``from_mask``, ``from_block_mask``,
``dense``, ``from_indices``, ``PackedKeyIndex.unpack``), or call ``index.validate()`` once
outside the graph. ``sparse_attention_op`` validates an untrusted index itself (one host sync)
when it runs eagerly, and refuses one while compiling or capturing. Writing new lists into a
trusted index's buffers in place (``index.indices.copy_(...)``, e.g. between CUDA-graph replays)
is the caller's responsibility: nothing re-checks them.

``backend="reference"`` (the float32 torch reference) synchronises internally to size its chunks:
it works eagerly and under ``torch.compile`` (the op is opaque), but not under CUDA-graph capture.
Capture the ``"cute"`` backend. The op has no autograd formula (forward only).
"""

from __future__ import annotations

import torch

from .. import _checks
from ..host.key_index import KeyIndex
from ..interface import BACKENDS, _allowed_dtypes, _choose_backend
from ..interface import sparse_attention as _fg_sparse_attention

__all__ = ["OP_NAME", "sparse_attention_op"]

OP_NAME = "fgattn::sparse_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def _op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    q_tile: int,
    softmax_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend not in ("cute", "reference"):
        raise ValueError(f"backend: expected 'cute' or 'reference' in the op, got {backend!r}")
    # Shapes and dtypes only (the constructor), then trusted without reading the lists: the
    # contents were checked (or vouched for) outside the op. No host sync here.
    index = KeyIndex._trusted_new(indices, counts, q_tile, q.shape[1], k.shape[1])
    out, lse = _fg_sparse_attention(
        q, k, v, index, softmax_scale=softmax_scale, return_lse=True, backend=backend
    )
    return out.contiguous(), lse


@_op.register_fake
def _op_fake(q, k, v, indices, counts, q_tile, softmax_scale, backend):
    b, sq, h, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((b, h, sq), dtype=torch.float32)
    return out, lse


def _is_capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def sparse_attention_op(q, k, v, index, softmax_scale=None, return_lse=False, backend="auto"):
    """``fg.sparse_attention`` through the custom op ``torch.ops.fgattn.sparse_attention``.

    Same arguments and results as ``fg.sparse_attention``: q [B, Sq, H, D], k and v
    [B, Sk, H, D], a ``KeyIndex``; returns out [B, Sq, H, D] (and lse float32 [B, H, Sq] when
    ``return_lse``). Use it inside ``torch.compile(fullgraph=True)`` and CUDA graphs.

    The structure of every argument is checked here (no host sync). The index must be trusted
    (made by a builder, or ``validate()``-d): an untrusted one is validated here with one host
    sync when running eagerly, and is an error (ValueError) while compiling or capturing a CUDA
    graph. See the module docstring.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    dtypes, note = _allowed_dtypes(backend)  # fg.sparse_attention's rule
    scale = _checks.check_all(q, k, v, index, softmax_scale, return_lse, dtypes, note)
    backend = _choose_backend(backend, q.device)
    if not index.trusted:
        if torch.compiler.is_compiling() or _is_capturing():
            raise ValueError(
                "index: expected a trusted KeyIndex (made by a builder or checked by "
                "index.validate()) inside torch.compile or CUDA-graph capture, where its "
                "contents cannot be checked; call index.validate() outside first"
            )
        index.validate("index.")
    out, lse = torch.ops.fgattn.sparse_attention(
        q, k, v, index.indices, index.counts, index.q_tile, float(scale), backend
    )
    return (out, lse) if return_lse else out
