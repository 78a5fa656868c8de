"""Launch the sm90 forward on torch tensors (inputs already validated by interface.py).

No host synchronisation and no allocation beyond O and LSE: the kernel is called through
tvm-ffi with the torch tensors themselves, on torch's current stream.
"""

from __future__ import annotations

import torch

from fgattn_cute.host.compile import KernelConfig, compile_fwd, default_config

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_for(q: torch.Tensor, q_tile: int, engine: str | None = None) -> KernelConfig:
    return default_config(q.shape[-1], _DTYPE_NAMES[q.dtype], q_tile, engine)


def run_fwd_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    q_tile: int,
    softmax_scale: float,
    engine: str | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
):
    """out [B, Sq, H, D] in q's dtype and lse float32 [B, H, Sq]."""
    config = config or config_for(q, q_tile, engine)
    if config.q_tile != q_tile:
        raise ValueError(f"config.q_tile={config.q_tile} does not match the index's {q_tile}")
    fn = compile_fwd(config)
    batch, seqlen_q, heads, _ = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        fn(q, k, v, out, lse, indices, counts, float(softmax_scale))
    return out, lse
