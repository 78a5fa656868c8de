"""Argument checks shared by the predictors.

Every failure is a TypeError (wrong kind or dtype) or a ValueError (wrong value, shape, device)
whose message starts with the argument's name and says what was expected and what was given.
Nothing here synchronises with an accelerator: ``always_keep`` given as an integer tensor on a
GPU is range-checked with a device-side assert.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator

import torch

from .._checks import check_scale, check_tokens

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CUTE_Q_TILES = (64, 128)  # what the sm90 kernel runs (fgattn_cute.interface.CUTE_Q_TILES)


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Float32 matmuls in full IEEE precision inside the block (no TF32 even when the caller
    enabled it with ``torch.set_float32_matmul_precision``), restoring the setting after."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def check_qk(q, k):
    """q [B, Sq, H, D], k [B, Sk, H, D]: same dtype (bf16, fp16, fp32), device, B, H, D."""
    for name, t in (("q", q), ("k", k)):
        check_tokens(name, t)
    if q.dtype not in DTYPES:
        raise TypeError(
            f"q: expected dtype torch.bfloat16, torch.float16 or torch.float32, got {q.dtype}"
        )
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k: expected the device of q ({q.device}), got {k.device}")
    for dim, what in ((0, "batch B"), (2, "heads H"), (3, "head dim D")):
        if k.shape[dim] != q.shape[dim]:
            raise ValueError(
                f"k: expected {what} = {q.shape[dim]} as in q (dim {dim} of [B, S, H, D]), "
                f"got {k.shape[dim]} (k shape {tuple(k.shape)}, q shape {tuple(q.shape)})"
            )


def check_q_tile(q_tile):
    """A positive Python int. The CuTe kernel runs 64 and 128; the reference runs any."""
    if isinstance(q_tile, bool) or isinstance(q_tile, torch.Tensor):
        raise TypeError(
            f"q_tile: expected a positive Python int (the CuTe kernel runs {CUTE_Q_TILES}), got "
            f"{type(q_tile).__name__}"
        )
    try:
        value = operator.index(q_tile)
    except TypeError:
        raise TypeError(
            f"q_tile: expected a positive Python int (the CuTe kernel runs {CUTE_Q_TILES}), got "
            f"{type(q_tile).__name__}"
        ) from None
    if value < 1:
        raise ValueError(
            f"q_tile: expected a positive int (the CuTe kernel runs {CUTE_Q_TILES}), got {value}"
        )
    return value


def _real(name, value, expected):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    return float(value)


def check_threshold(threshold):
    """A finite float >= 0 (keep key j when the tile's max probability >= threshold / Sk)."""
    value = _real("threshold", threshold, "a finite float >= 0")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"threshold: expected a finite float >= 0, got {value}")
    return value


def check_p(p):
    """A float in (0, 1]."""
    value = _real("p", p, "a float in (0, 1]")
    if not (0.0 < value <= 1.0):  # also false for NaN
        raise ValueError(f"p: expected a float in (0, 1], got {value}")
    return value


def check_backend(backend, choices):
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend: expected one of {choices}, got {backend!r}")
    return backend


def scale_for(softmax_scale, head_dim):
    """The softmax scale: None gives head_dim ** -0.5; otherwise a positive finite float."""
    return check_scale(softmax_scale, head_dim)


def always_keep_mask(always_keep, seqlen_k, device):
    """``always_keep`` as a bool [seqlen_k] tensor on ``device``, or None.

    Accepted: None; a bool tensor [seqlen_k]; a 1-D integer tensor of key ids in [0, seqlen_k)
    (duplicates allowed); a list or tuple of Python ints in [0, seqlen_k). Tensors must be on
    ``device`` (q's device). On CPU the range is checked eagerly (ValueError); on other devices
    with a device-side assert (no host sync).
    """
    if always_keep is None:
        return None
    name = "always_keep"
    if isinstance(always_keep, (list, tuple)):
        ids = []
        for i, item in enumerate(always_keep):
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(
                    f"{name}: expected a list of int key ids, got {type(item).__name__} at "
                    f"position {i}"
                )
            if not 0 <= int(item) < seqlen_k:
                raise ValueError(
                    f"{name}: expected key ids in [0, seqlen_k={seqlen_k}), got {int(item)} at "
                    f"position {i}"
                )
            ids.append(int(item))
        mask = torch.zeros(seqlen_k, dtype=torch.bool)
        if ids:
            mask[torch.tensor(ids, dtype=torch.long)] = True
        return mask.to(device)
    if not isinstance(always_keep, torch.Tensor):
        raise TypeError(
            f"{name}: expected None, a bool tensor [seqlen_k], an integer tensor of key ids or a "
            f"list of ints, got {type(always_keep).__name__}"
        )
    if always_keep.device != device:
        raise ValueError(f"{name}: expected the device of q ({device}), got {always_keep.device}")
    if always_keep.dtype == torch.bool:
        if tuple(always_keep.shape) != (seqlen_k,):
            raise ValueError(
                f"{name}: expected a bool tensor of shape [seqlen_k] = [{seqlen_k}], got shape "
                f"{tuple(always_keep.shape)}"
            )
        return always_keep
    if always_keep.dtype.is_floating_point or always_keep.dtype.is_complex:
        raise TypeError(
            f"{name}: expected dtype torch.bool or an integer dtype, got {always_keep.dtype}"
        )
    if always_keep.dim() != 1:
        raise ValueError(
            f"{name}: expected a 1-D tensor of key ids, got shape {tuple(always_keep.shape)}"
        )
    ids = always_keep.long()
    msg = f"{name}: expected key ids in [0, seqlen_k={seqlen_k})"
    in_range = ((ids >= 0) & (ids < seqlen_k)).all()
    if device.type == "cpu":
        if not bool(in_range):
            bad = ids[(ids < 0) | (ids >= seqlen_k)][0]
            raise ValueError(f"{msg}, got {int(bad)}")
    else:
        torch._assert_async(in_range, msg)
    mask = torch.zeros(seqlen_k + 1, dtype=torch.bool, device=device)
    # Out-of-range ids (only possible after a failed device assert) land in the dump slot.
    mask.scatter_(0, torch.where((ids >= 0) & (ids < seqlen_k), ids, seqlen_k), True)
    return mask[:seqlen_k]


def keep_words(keep, sk, device):
    """int32 [ceil(sk / 32)]: bit j % 32 of word j // 32 set where keep[j] (None: all zero)."""
    n_words = -(-sk // 32)
    if keep is None:
        return torch.zeros(n_words, dtype=torch.int32, device=device)
    bits = torch.zeros(n_words * 32, dtype=torch.uint8, device=device)
    bits[:sk] = keep
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=device)
    packed = (bits.view(-1, 8) * weights).sum(dim=-1, dtype=torch.uint8)  # little-endian bytes
    return packed.view(torch.int32)


def hopper_kernel_unsupported(q, k, max_seqlen_k):
    """None when a predictor's Hopper kernel takes q and k (device, dtype, number of keys),
    else the reason it does not."""
    from ..interface import CUTE_DTYPES, _not_hopper_reason

    not_hopper = _not_hopper_reason(q.device)
    if not_hopper:
        return not_hopper
    if q.dtype not in CUTE_DTYPES:
        return f"it runs torch.bfloat16 and torch.float16, got {q.dtype}"
    if k.shape[1] > max_seqlen_k:
        return f"it runs seqlen_k <= {max_seqlen_k}, got {k.shape[1]}"
    return None


def tma_ready(x):
    """x itself if a kernel can load it (16-byte aligned pointer and strides, last dim
    contiguous), else a contiguous copy."""
    step = 16 // x.element_size()
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and not any(s % step for s in x.stride()[:3]):
        return x
    return x.contiguous()
