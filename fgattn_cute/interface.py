"""The torch-facing entry point: ``fg.sparse_attention``.

It validates everything before anything runs, picks the backend (never falling back silently)
and calls it: the CuTe DSL kernel on Hopper (``_cute_forward``) or the float32 reference.
"""

from __future__ import annotations

import torch

from . import _checks
from . import reference as _reference

__all__ = ["sparse_attention"]

BACKENDS = ("auto", "cute", "reference")

# What the sm90 kernel runs.
CUTE_HEAD_DIMS = (64, 128)
CUTE_Q_TILES = (64, 128)
CUTE_DTYPES = (torch.bfloat16, torch.float16)
ENGINES = ("cpasync", "tma", "hybrid")  # fgattn_cute.host.compile.ENGINES, without its import


def _device_capability(device):
    return torch.cuda.get_device_capability(device)


def _is_hopper(device):
    return device.type == "cuda" and _device_capability(device)[0] == 9


def _describe_device(device):
    if device.type != "cuda":
        return f"device {device}"
    major, minor = _device_capability(device)
    name = torch.cuda.get_device_name(device)
    return f"device {device} ({name}, compute capability {major}.{minor})"


def _not_hopper_reason(device):
    """None on a Hopper GPU, else why the sm90 kernels cannot run there (for error messages)."""
    if _is_hopper(device):
        return None
    return f"it needs a Hopper GPU (compute capability 9.x), got {_describe_device(device)}"


def _check_cute_supported(q, index):
    """Raise unless the sm90 kernel runs this problem: dtype, head dim and q_tile first (a
    TypeError / ValueError naming the argument), then the device (a RuntimeError unless q is on
    a compute capability 9.x GPU)."""
    if q.dtype not in CUTE_DTYPES:
        raise TypeError(
            f"q: expected dtype torch.bfloat16 or torch.float16 for backend='cute', got {q.dtype}"
        )
    head_dim = q.shape[-1]
    if head_dim not in CUTE_HEAD_DIMS:
        raise ValueError(
            f"q: expected head dim D in {CUTE_HEAD_DIMS} for backend='cute', got {head_dim} "
            f"(backend='reference' runs any head dim)"
        )
    if index.q_tile not in CUTE_Q_TILES:
        raise ValueError(
            f"index.q_tile: expected one of {CUTE_Q_TILES} for backend='cute', got "
            f"{index.q_tile} (backend='reference' runs any q_tile)"
        )
    if not _is_hopper(q.device):
        raise RuntimeError(
            f"backend='cute' needs a Hopper GPU (compute capability 9.x), got "
            f"{_describe_device(q.device)}; backend='reference' runs anywhere"
        )


def _check_cute_layout(q, k, v, index):
    """Raise ValueError unless the tensors have the layout the kernel loads: q, k, v with
    16-byte aligned data and strides (other than the head dim's 1) that are multiples of 16 bytes
    (TMA and cp.async move 16-byte pieces), k and v with a stride along S below 4 GiB; index
    tensors contiguous."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        step = 16 // t.element_size()
        if any(s % step for s in t.stride()[:3]):
            raise ValueError(
                f"{name}: expected strides of [B, S, H] that are multiples of 16 bytes "
                f"({step} elements) for backend='cute', got strides {tuple(t.stride())}"
            )
        if t.data_ptr() % 16:
            raise ValueError(
                f"{name}: expected a 16-byte aligned data pointer for backend='cute', got "
                f"address {t.data_ptr():#x}"
            )
    for name, t in (("k", k), ("v", v)):
        # The cp.async gather forms a row's offset as key x row bytes in 32 x 32 bits.
        if t.stride(1) * t.element_size() >= 2**32:
            raise ValueError(
                f"{name}: expected a stride along S below 2**32 bytes for backend='cute', got "
                f"{t.stride(1)} elements of {t.element_size()} bytes"
            )
    for name, t in (("index.indices", index.indices), ("index.counts", index.counts)):
        if not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous tensor for backend='cute', got strides "
                f"{tuple(t.stride())} for shape {tuple(t.shape)}"
            )


def _allowed_dtypes(backend):
    """(dtypes q/k/v may have, a note for the error) for the backend asked for."""
    if backend == "reference":
        return (torch.bfloat16, torch.float16, torch.float32), ""
    return CUTE_DTYPES, " (torch.float32 only with backend='reference')"


def _choose_backend(backend, device):
    if backend != "auto":
        return backend
    if device.type == "cpu":
        return "reference"
    if _is_hopper(device):
        return "cute"
    raise RuntimeError(
        f"backend='auto' found no kernel for {_describe_device(device)}: the CuTe kernel needs a "
        f"Hopper GPU (compute capability 9.x). Pass backend='reference' to run the float32 torch "
        f"reference on it (slow)."
    )


def _cute_forward(q, k, v, index, softmax_scale, return_lse, engine=None):
    """Run the sm90 kernel on validated inputs. Returns (out in q's dtype [B, Sq, H, D], lse
    float32 [B, H, Sq] or None when not return_lse)."""
    from .host.launch import run_fwd_sm90

    out, lse = run_fwd_sm90(
        q, k, v, index.indices, index.counts, index.q_tile, softmax_scale, engine=engine
    )
    return out, (lse if return_lse else None)


def sparse_attention(
    q, k, v, index, softmax_scale=None, return_lse=False, backend="auto", *, engine=None
):
    """Fine-grained (M x 1) sparse attention.

    For every query q in tile t = q // index.q_tile, attend to the keys listed in
    ``index.indices[b, h, t, :index.counts[b, h, t]]``:

        out[b, q, h] = sum_j softmax_j(scale * q . k_j) v_j,   lse = log sum_j exp(scale q . k_j)

    A tile with no kept keys gives out = 0 and lse = -inf.

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, H, D]. bf16 or fp16 (float32 only with
            backend="reference"), one device, last dimension contiguous.
        index: a ``KeyIndex`` with batch B, heads H, seqlen_q Sq, seqlen_k Sk, on q's device.
            An untrusted one (made by the plain constructor) has its contents checked once,
            with one host sync, and is then marked trusted.
        softmax_scale: positive finite float; None means D ** -0.5.
        return_lse: also return the float32 log-sum-exp [B, H, Sq].
        backend: "auto" (CPU: the reference; a Hopper GPU: the CuTe kernel; another GPU: an
            error), "cute" or "reference". Never falls back silently.

    Returns:
        out [B, Sq, H, D] in q's dtype, and lse float32 [B, H, Sq] when ``return_lse``.

    Raises:
        TypeError / ValueError naming the bad argument; RuntimeError when the backend cannot
        run on q's device.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine: expected None or one of {ENGINES}, got {engine!r}")
    dtypes, note = _allowed_dtypes(backend)
    scale = _checks.check_all(q, k, v, index, softmax_scale, return_lse, dtypes, note)
    chosen = _choose_backend(backend, q.device)
    if engine is not None and chosen != "cute":
        raise ValueError(f"engine: only the CuTe kernel has gather engines, got backend {chosen!r}")
    if chosen == "cute":
        _check_cute_supported(q, index)
        _check_cute_layout(q, k, v, index)
    index.validate("index.")  # contents, once per untrusted index (one host sync)

    if chosen == "reference":
        res = _reference.sparse_attention(q, k, v, index, scale, return_lse)
        if return_lse:
            return res[0].to(q.dtype), res[1]
        return res.to(q.dtype)
    out, lse = _cute_forward(q, k, v, index, scale, return_lse, engine)
    return (out, lse) if return_lse else out
