"""Launch the sm90 kernels (attention forward and the predictors') on validated torch tensors.

No host synchronisation and no allocation beyond the outputs (and, for a persistent attention
launch, a zeroed 4-byte tile counter): the kernels are called through tvm-ffi with the torch
tensors themselves, on torch's current stream.
"""

from __future__ import annotations

import functools

import torch

from fgattn_cute.host.compile import (
    CalibrateConfig,
    KernelConfig,
    KeyListsConfig,
    PooledScoresConfig,
    TileMeansConfig,
    TopPConfig,
    compile_fwd,
    default_config,
)

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# A CUDA grid's largest y (and z) extent: the tile-means kernel's query tiles run along y.
MAX_GRID_YZ = 65535


def config_for(q: torch.Tensor, q_tile: int, engine: str | None = None) -> KernelConfig:
    return default_config(
        q.shape[-1], _DTYPE_NAMES[q.dtype], q_tile, engine, _num_sms(q.device)
    )


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _unused_counter(device: torch.device) -> torch.Tensor:
    """The tile counter argument of kernels with one CTA per tile, which never touch it."""
    return torch.zeros(1, dtype=torch.int32, device=device)


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
    if config.max_ctas:
        # Persistent CTAs take query tiles from this counter: zero at every launch.
        tile_counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    else:
        tile_counter = _unused_counter(q.device)
    with torch.cuda.device(q.device):
        fn(q, k, v, out, lse, indices, counts, tile_counter, float(softmax_scale))
    return out, lse


def run_calibrate_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    keep_words: torch.Tensor,
    q_tile: int,
    softmax_scale: float,
    log_cut: float,
    capacity: int,
    indices: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
):
    """The calibrate kernel: (indices int32 [B, H, n_q_tiles, capacity], counts int32
    [B, H, n_q_tiles]). keep_words: int32 [ceil(Sk / 32)], the always-keep bits (key j at bit
    j % 32 of word j // 32). Counts are exact even past the capacity (nothing is written
    there); the caller checks them. indices / counts: optional preallocated outputs (every
    element is written)."""
    config = CalibrateConfig(q.shape[-1], _DTYPE_NAMES[q.dtype], q_tile)
    fn = compile_fwd(config)
    batch, seqlen_q, heads, _ = q.shape
    n_q_tiles = -(-seqlen_q // q_tile)
    if indices is None:
        indices = torch.empty(batch, heads, n_q_tiles, capacity, dtype=torch.int32,
                              device=q.device)
    if counts is None:
        counts = torch.empty(batch, heads, n_q_tiles, dtype=torch.int32, device=q.device)
    with torch.cuda.device(q.device):
        fn(q, k, keep_words, indices, counts, float(softmax_scale), float(log_cut))
    return indices, counts


def run_top_p_select_sm90(
    rows: torch.Tensor,
    keep_words: torch.Tensor,
    p: float,
    scale: float | None,
    capacity: int,
    from_probs: bool = False,
    indices: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
):
    """The pooled top-p selection kernel on float32 rows [R, N] (each row contiguous, any row
    stride; logits, softmaxed in the kernel after multiplying by scale; or probabilities with
    from_probs): (indices int32 [R, capacity], counts int32 [R]). keep_words as in
    run_calibrate_sm90; p in (0, 1). stats: float32 [R, parts, 3], each part's max, min and
    sum of exp(x - max) as run_pooled_scores_sm90 writes them; the rows are then scaled logits
    already and scale must be None. Without stats, the rows are multiplied by scale and their
    statistics computed by torch first (into new tensors). indices / counts: optional
    preallocated outputs (every element is written). The rows are only read."""
    if from_probs:
        if stats is not None or scale is not None:
            raise ValueError("from_probs: stats and scale must be None (the rows are "
                             "probabilities)")
        stats = torch.empty(rows.shape[0], 1, 3, dtype=torch.float32, device=rows.device)
    elif stats is None:
        if scale is None:
            raise ValueError("scale: expected a float for logits without stats, got None")
        rows = rows * scale
        stats = logit_stats(rows)
    elif scale is not None:
        raise ValueError(f"scale: expected None with stats (scaled logits), got {scale}")
    fn = compile_fwd(TopPConfig.for_rows(rows.shape[1], from_probs))
    n_rows = rows.shape[0]
    if indices is None:
        indices = torch.empty(n_rows, capacity, dtype=torch.int32, device=rows.device)
    if counts is None:
        counts = torch.empty(n_rows, dtype=torch.int32, device=rows.device)
    with torch.cuda.device(rows.device):
        fn(rows, stats, keep_words, indices, counts, float(p))
    return indices, counts


def logit_stats(x: torch.Tensor) -> torch.Tensor:
    """float32 [R, 1, 3]: each row's max, min and sum of exp(x - max), the statistics that
    run_top_p_select_sm90 takes (one part per row)."""
    row_max = x.amax(-1, keepdim=True)
    total = (x - row_max).exp_().sum(-1, keepdim=True)  # (one R x N temporary, not two)
    return torch.stack([row_max, x.amin(-1, keepdim=True), total], dim=-1).float()


def run_tile_means_split_sm90(
    q: torch.Tensor, q_tile: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, H, n_q_tiles, 3 D] in q's dtype: each query tile's mean (of its real queries) as
    hi | mid | lo 16-bit parts whose sum is the float32 mean to about 2**-24 relative. q: 16-byte
    aligned pointer and strides, last dim contiguous. out: optional preallocated output (every
    element is written)."""
    batch, seqlen_q, heads, head_dim = q.shape
    n_tiles = -(-seqlen_q // q_tile)
    if n_tiles > MAX_GRID_YZ:
        raise ValueError(
            f"q: expected at most {MAX_GRID_YZ} query tiles (seqlen_q <= {MAX_GRID_YZ * q_tile} "
            f"at q_tile {q_tile}), got seqlen_q {seqlen_q}"
        )
    fn = compile_fwd(TileMeansConfig(head_dim, _DTYPE_NAMES[q.dtype], q_tile))
    if out is None:
        out = torch.empty(batch, heads, n_tiles, 3 * head_dim, dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device):
        fn(q, out)
    return out


# The pooled-scores kernel's TMA-store path (`PooledScoresSm90(tma_store=True)`, 7-38% faster
# than its register stores with bitwise-equal outputs on an H200; perf/NOTES.md, session 18),
# used wherever every row starts 16-byte aligned. False runs the register stores everywhere
# (the tests compare the two).
SCORES_TMA_STORE = True


def _pooled_scores_out(batch: int, heads: int, n_tiles: int, seqlen_k: int, device):
    """Empty scores float32 [B, H, n_tiles, Sk]: with SCORES_TMA_STORE, a view of the first Sk
    of rows padded to a multiple of 4 keys, so that every row starts 16-byte aligned and the
    kernel's TMA stores apply."""
    padded = -(-seqlen_k // 4) * 4 if SCORES_TMA_STORE else seqlen_k
    return torch.empty(batch, heads, n_tiles, padded, dtype=torch.float32,
                       device=device)[..., :seqlen_k]


def _pooled_scores_stats(batch: int, heads: int, n_tiles: int, seqlen_k: int, device):
    """Empty statistics float32 [B, H, n_tiles, parts, 3], one part per CTA's keys."""
    from fgattn_cute.kernels.pooled_scores_sm90 import BLOCKS_PER_CTA, TILE_N

    parts = -(-seqlen_k // (BLOCKS_PER_CTA * TILE_N))
    return torch.empty(batch, heads, n_tiles, parts, 3, dtype=torch.float32, device=device)


def pooled_scores_buffers(batch: int, heads: int, n_tiles: int, seqlen_k: int,
                          device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 [B, H, n_tiles, Sk], stats float32 [B, H, n_tiles, parts, 3]), empty,
    as run_pooled_scores_sm90 makes them (with SCORES_TMA_STORE, the scores' rows padded to a
    multiple of 4 keys, a view of the first Sk); pass them back with out_padding=True."""
    return (_pooled_scores_out(batch, heads, n_tiles, seqlen_k, device),
            _pooled_scores_stats(batch, heads, n_tiles, seqlen_k, device))


def run_pooled_scores_sm90(
    split_means: torch.Tensor,
    k: torch.Tensor,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    out_padding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 [B, H, n_q_tiles, Sk], stats float32 [B, H, n_q_tiles, parts, 3]): each
    tile's mean . every key, float32-accurate, times scale (rounded once), from split_means
    [B, H, n_q_tiles, 3 D] (contiguous; hi | mid | lo as made by run_tile_means_split_sm90)
    and k [B, Sk, H, D] (16-byte aligned pointer and strides, last dim contiguous); and per
    row and part of 2,048 keys (parts = ceil(Sk / 2048)) the max, min and sum of exp(x - max)
    of its scaled scores x (what run_top_p_select_sm90 takes). out, stats: optional
    preallocated outputs (every element is written; out's rows contiguous, its other strides
    any). The scores made here are `pooled_scores_buffers`' (with SCORES_TMA_STORE, rows
    padded to a multiple of 4 keys), so that the kernel's TMA stores apply; those may write
    the padding (a row's last 16 bytes whole), so a given out gets them only when Sk is a
    multiple of 4, or when out_padding says that its rows may be written up to their next
    16-byte boundary (the caller owns that padding, as in `pooled_scores_buffers`)."""
    batch, heads, n_tiles, _ = split_means.shape
    head_dim = k.shape[-1]
    seqlen_k = k.shape[1]
    padding_writable = out is None or out_padding
    if out is None:
        out = _pooled_scores_out(batch, heads, n_tiles, seqlen_k, k.device)
    elif out.shape != (batch, heads, n_tiles, seqlen_k) or out.stride(-1) != 1:
        raise ValueError(f"out: expected [{batch}, {heads}, {n_tiles}, {seqlen_k}] with "
                         f"contiguous rows, got {tuple(out.shape)} strides {out.stride()}")
    if stats is None:
        stats = _pooled_scores_stats(batch, heads, n_tiles, seqlen_k, k.device)
    # TMA stores (the kernel's faster path) where every row starts 16-byte aligned and may be
    # written up to its next 16-byte boundary
    tma_store = (SCORES_TMA_STORE and out.data_ptr() % 16 == 0
                 and all(st % 4 == 0 for st in out.stride()[:-1])
                 and (padding_writable or seqlen_k % 4 == 0))
    fn = compile_fwd(PooledScoresConfig(head_dim, _DTYPE_NAMES[k.dtype], tma_store))
    with torch.cuda.device(k.device):
        fn(split_means, k, out, stats, float(scale))
    return out, stats


def run_keep_bits_to_lists_sm90(
    bits: torch.Tensor,
    seqlen_k: int,
    capacity: int,
    packed: bool,
    indices: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int32 [R, capacity], counts int32 [R]): each row's kept keys, ascending, zeros
    after the count. bits: contiguous uint8 [R, ceil(seqlen_k / 8)] (packed: bit j % 8 of byte
    j // 8 is key j; bits past seqlen_k are ignored) or [R, seqlen_k] (one byte per key,
    non-zero = kept; a bool mask viewed as uint8). Counts are exact even past the capacity
    (those keys are not written); the caller checks them. indices / counts: optional
    preallocated outputs (every element is written)."""
    width = -(-seqlen_k // 8) if packed else seqlen_k
    if bits.dim() != 2 or bits.shape[1] != width:
        raise ValueError(f"bits: expected [rows, {width}] for seqlen_k={seqlen_k}, got "
                         f"{tuple(bits.shape)}")
    fn = compile_fwd(KeyListsConfig(to_lists=True, packed=packed))
    n_rows = bits.shape[0]
    if indices is None:
        indices = torch.empty(n_rows, capacity, dtype=torch.int32, device=bits.device)
    if counts is None:
        counts = torch.empty(n_rows, dtype=torch.int32, device=bits.device)
    if n_rows == 0:  # (an empty grid is a launch error)
        return indices, counts
    with torch.cuda.device(bits.device):
        fn(bits, indices, counts, int(seqlen_k))
    return indices, counts


def run_lists_to_keep_bits_sm90(
    indices: torch.Tensor,
    counts: torch.Tensor,
    seqlen_k: int,
    packed: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 [R, ceil(seqlen_k / 8)] (packed: bit j % 8 of byte j // 8 set when key j is
    listed, bits past seqlen_k zero) or [R, seqlen_k] (1 where listed, else 0), from the first
    counts[r] entries of each row of indices (contiguous int32 [R, capacity]; counts int32 [R]).
    seqlen_k <= 131,072 (the kernel's shared-memory bitmap). out: optional preallocated output
    (every element is written)."""
    from fgattn_cute.kernels.key_lists_sm90 import MAX_SEQLEN_K

    if seqlen_k > MAX_SEQLEN_K:
        raise ValueError(f"seqlen_k: the kernel runs up to {MAX_SEQLEN_K}, got {seqlen_k}")
    n_rows = indices.shape[0]
    width = -(-seqlen_k // 8) if packed else seqlen_k
    if out is None:
        out = torch.empty(n_rows, width, dtype=torch.uint8, device=indices.device)
    if tuple(out.shape) != (n_rows, width):
        raise ValueError(f"out: expected [{n_rows}, {width}], got {tuple(out.shape)}")
    fn = compile_fwd(KeyListsConfig(to_lists=False, packed=packed))
    if n_rows == 0:  # (an empty grid is a launch error)
        return out
    with torch.cuda.device(indices.device):
        fn(indices, counts, out, int(seqlen_k))
    return out
