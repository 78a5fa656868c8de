"""The systems the sweep times, each built for one problem outside the timed region and
returning a zero-argument callable that runs the attention once.

- fgattn: fg.sparse_attention with a KeyIndex of M x 1 key lists (one gather engine each).
- fa4_dense: FlashAttention-4 (flash_attn.cute) dense forward.
- fa4_block: FA4 block-sparse forward with (128 x kb) blocks given as "full" blocks
  (fa4_block_from_mask: the same from a block mask, as perf/quality.py's block rules give).
- fa4_paged: FA4's paged-KV forward with page_size=1 as a fine-grained baseline: every
  (batch, head, query tile) is one sequence of one head whose page table is its key list;
  K and V [B, S, H, D] are viewed, without a copy, as B*S*H pages of one row each.
- cudnn: torch SDPA restricted to the cuDNN backend, dense.
"""

from __future__ import annotations

import math

import torch

import fgattn_cute as fg


def random_qkv(seqlen, heads, head_dim, gen, dtype=torch.bfloat16):
    """q, k, v [1, seqlen, heads, head_dim] of standard normal entries drawn from the CUDA
    generator gen, in that order."""
    return tuple(torch.randn(1, seqlen, heads, head_dim, generator=gen, device="cuda",
                             dtype=dtype) for _ in range(3))


def random_lists(B, H, seqlen_q, seqlen_k, q_tile, keep, device, seed=0, spread=0.0):
    """M x 1 key lists with exactly round(keep * seqlen_k) random keys per query tile, or with
    spread > 0 round(keep * f * seqlen_k) keys, f uniform in [1 - spread, 1 + spread] per tile
    (lists of unequal length, as predictors give: the load a scheduler has to balance)."""
    T = math.ceil(seqlen_q / q_tile)
    n = max(1, min(seqlen_k, round(keep * seqlen_k)))
    if n == seqlen_k and spread == 0:
        return fg.KeyIndex.dense(B, H, seqlen_q, seqlen_k, q_tile, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    if spread == 0:
        counts = torch.full((B, H, T), n, dtype=torch.int32, device=device)
    else:
        factor = 1 + spread * (2 * torch.rand(B, H, T, generator=gen, device=device) - 1)
        counts = (keep * factor * seqlen_k).round().clamp(1, seqlen_k).int()
    n_max = n if spread == 0 else int(counts.max())
    cap = math.ceil(n_max / 128) * 128
    indices = torch.zeros(B, H, T, cap, dtype=torch.int32, device=device)
    slot = torch.arange(n_max, device=device)
    for b in range(B):
        for h in range(H):  # one head at a time bounds the scratch memory
            order = torch.rand(T, seqlen_k, generator=gen, device=device).argsort(-1)
            # each tile's first counts[t] keys of a random order, ascending, zeros after them
            kept = torch.where(slot < counts[b, h, :, None], order[:, :n_max], seqlen_k)
            kept = kept.sort(-1).values
            indices[b, h, :, :n_max] = torch.where(kept < seqlen_k, kept, 0).int()
    return fg.KeyIndex.from_indices(indices, counts, q_tile, seqlen_q, seqlen_k, validate=False)


def random_block_lists(B, H, seqlen_q, seqlen_k, k_block, keep, device, seed=0):
    """(128 x k_block) block sparsity: exactly round(keep * n_blocks) random key blocks per
    query tile. Returns (block indices [B, H, T, n] ascending, count)."""
    T = math.ceil(seqlen_q / 128)
    n_blocks = math.ceil(seqlen_k / k_block)
    n = max(1, min(n_blocks, round(keep * n_blocks)))
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.rand(B, H, T, n_blocks, generator=gen, device=device).argsort(-1)
    return order[..., :n].sort(-1).values.int().contiguous(), n


def fgattn(q, k, v, index, engine):
    return lambda: fg.sparse_attention(q, k, v, index, engine=engine)


def fa4_dense(q, k, v):
    from flash_attn.cute import flash_attn_func

    return lambda: flash_attn_func(q, k, v)


def _fa4_full_blocks(q, k, v, full_cnt, full_idx, k_block):
    """FA4's block-sparse forward over (128 x k_block) blocks that are all full (unmasked):
    full_cnt [B, H, T] kept blocks per query tile, full_idx [B, H, T, n_blocks] their indices
    first (entries past the count are not read)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    tensors = BlockSparseTensorsTorch(
        mask_block_cnt=torch.zeros_like(full_cnt),
        mask_block_idx=torch.zeros_like(full_idx),
        full_block_cnt=full_cnt,
        full_block_idx=full_idx,
        block_size=(128, k_block),
    )
    return lambda: flash_attn_func(q, k, v, block_sparse_tensors=tensors)


def fa4_block(q, k, v, block_idx, n, k_block):
    """FA4 block-sparse forward; every kept block is a full (unmasked) block."""
    B, H, T, _ = block_idx.shape
    n_blocks = math.ceil(k.shape[1] / k_block)
    full_idx = torch.zeros(B, H, T, n_blocks, dtype=torch.int32, device=q.device)
    full_idx[..., :n] = block_idx
    full_cnt = torch.full((B, H, T), n, dtype=torch.int32, device=q.device)
    return _fa4_full_blocks(q, k, v, full_cnt, full_idx, k_block)


def fa4_block_from_mask(q, k, v, mask, k_block):
    """FA4 block-sparse forward over a block mask [B, H, T, ceil(Sk / k_block)] of 128-query
    tiles (any number of kept blocks per tile), every kept block a full (unmasked) block."""
    B, H, T, n_blocks = mask.shape
    if T != math.ceil(q.shape[1] / 128) or n_blocks != math.ceil(k.shape[1] / k_block):
        raise ValueError(f"mask: expected [B, H, {math.ceil(q.shape[1] / 128)}, "
                         f"{math.ceil(k.shape[1] / k_block)}], got {tuple(mask.shape)}")
    # The kept blocks first, ascending (a stable sort of "not kept"), then the rest, unread.
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    full_cnt = mask.sum(-1, dtype=torch.int32).contiguous()
    return _fa4_full_blocks(q, k, v, full_cnt, order.int().contiguous(), k_block)


def fa4_paged(q, k, v, index):
    """FA4 paged KV, page_size=1, one sequence per (batch, head, query tile)."""
    from flash_attn.cute import flash_attn_varlen_func

    B, S, H, D = q.shape
    Sk, q_tile = k.shape[1], index.q_tile
    T = index.n_q_tiles
    # q as [B*H*T, q_tile, 1, D]: a copy made here, outside the timed region.
    q_pad = torch.zeros(B, T * q_tile, H, D, dtype=q.dtype, device=q.device)
    q_pad[:, :S] = q
    q_seq = q_pad.view(B, T, q_tile, H, D).permute(0, 3, 1, 2, 4).reshape(B * H * T, q_tile, 1, D)
    k_pages = k.reshape(B * Sk * H, 1, 1, D)
    v_pages = v.reshape(B * Sk * H, 1, 1, D)
    b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    h = torch.arange(H, device=q.device).view(1, H, 1, 1)
    pages = ((b * Sk + index.indices.long()) * H + h).int().reshape(B * H * T, -1).contiguous()
    seqused = index.counts.reshape(-1).contiguous()
    q_seq = q_seq.contiguous()

    def run():
        return flash_attn_varlen_func(q_seq, k_pages, v_pages, page_table=pages,
                                      seqused_k=seqused)

    def unpack(out):
        """The paged output back in [B, S, H, D]."""
        o = out[0] if isinstance(out, tuple) else out
        o = o.reshape(B, H, T, q_tile, D).permute(0, 2, 3, 1, 4).reshape(B, T * q_tile, H, D)
        return o[:, :S]

    return run, unpack


def cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return scaled_dot_product_attention(qt, kt, vt)

    return run
