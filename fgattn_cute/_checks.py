"""Argument checks shared by ``fg.sparse_attention`` and ``fg.reference.sparse_attention``.

Every failure is a TypeError (wrong kind or dtype) or ValueError (wrong value, shape, device,
stride) whose message starts with the argument's name and says what was expected and what was
given. Nothing here synchronises with the device, except ``KeyIndex.validate`` for an untrusted
index, which the callers run last.
"""

from __future__ import annotations

import math
import numbers

import torch

from .host.key_index import CAPACITY_ALIGN, KeyIndex

_DTYPE_NAMES = {
    torch.bfloat16: "torch.bfloat16",
    torch.float16: "torch.float16",
    torch.float32: "torch.float32",
}


def check_tokens(name, t):
    """A non-empty torch tensor [B, S, H, D] (q, k or v in the FlashAttention layout)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, S, H, D], got shape {tuple(t.shape)}")
    if min(t.shape) < 1:
        raise ValueError(
            f"{name}: expected every dimension of [B, S, H, D] >= 1, got shape {tuple(t.shape)}"
        )


def check_qkv(q, k, v, dtypes, dtype_note=""):
    """q, k, v: tensors [B, S, H, D] of one dtype in ``dtypes`` on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tokens(name, t)
    if q.dtype not in dtypes:
        allowed = " or ".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)
        raise TypeError(f"q: expected dtype {allowed}{dtype_note}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {t.device}")
    if v.shape != k.shape:
        raise ValueError(
            f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    for dim, what in ((0, "batch B"), (2, "heads H"), (3, "head dim D")):
        if k.shape[dim] != q.shape[dim]:
            raise ValueError(
                f"k: expected {what} = {q.shape[dim]} as in q (dim {dim} of [B, S, H, D]), "
                f"got {k.shape[dim]} (k shape {tuple(k.shape)}, q shape {tuple(q.shape)})"
            )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected the last dimension (D) contiguous, stride 1, got strides "
                f"{tuple(t.stride())}"
            )


def check_index(index, q, k):
    """Structural checks of ``index`` against q and k: no host sync."""
    if not isinstance(index, KeyIndex):
        raise TypeError(
            f"index: expected a fgattn_cute.KeyIndex (see KeyIndex.from_mask), got "
            f"{type(index).__name__}"
        )
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    for name, t, ndim in (("index.indices", index.indices, 4), ("index.counts", index.counts, 3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {t.device}")
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    q_tile = index.q_tile
    if isinstance(q_tile, bool) or not isinstance(q_tile, int) or q_tile < 1:
        raise ValueError(f"index.q_tile: expected a positive int, got {q_tile!r}")
    if index.seqlen_q != sq:
        raise ValueError(
            f"index.seqlen_q: expected q's sequence length {sq} (q.shape[1]), got "
            f"{index.seqlen_q}"
        )
    if index.seqlen_k != sk:
        raise ValueError(
            f"index.seqlen_k: expected k's sequence length {sk} (k.shape[1]), got "
            f"{index.seqlen_k}"
        )
    n_tiles = (sq + q_tile - 1) // q_tile
    if tuple(index.indices.shape[:3]) != (b, h, n_tiles):
        raise ValueError(
            f"index.indices: expected shape [B={b}, H={h}, n_q_tiles=ceil({sq} / {q_tile})="
            f"{n_tiles}, capacity], got {tuple(index.indices.shape)}"
        )
    if tuple(index.counts.shape) != (b, h, n_tiles):
        raise ValueError(
            f"index.counts: expected shape [B={b}, H={h}, n_q_tiles={n_tiles}], got "
            f"{tuple(index.counts.shape)}"
        )
    cap = index.indices.shape[3]
    if cap < 1 or cap % CAPACITY_ALIGN != 0:
        raise ValueError(
            f"index.indices: expected capacity (dim 3) a positive multiple of {CAPACITY_ALIGN}, "
            f"got {cap}"
        )


def check_scale(softmax_scale, head_dim):
    """``softmax_scale`` as a float: None gives head_dim ** -0.5."""
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(
            f"softmax_scale: expected a positive finite float or None, got "
            f"{type(softmax_scale).__name__}"
        )
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale: expected a positive finite float, got {scale}")
    return scale


def check_return_lse(return_lse):
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")


def check_all(q, k, v, index, softmax_scale, return_lse, dtypes, dtype_note=""):
    """Every cheap check, in order; returns the resolved softmax scale."""
    check_qkv(q, k, v, dtypes, dtype_note)
    check_index(index, q, k)
    scale = check_scale(softmax_scale, q.shape[-1])
    check_return_lse(return_lse)
    return scale
