"""``pooled_top_p``: the cheap predictor, and ``top_p_mask``, its sort-free top-p selection.

For every query tile, the mean of its real queries is scored against every key, the scores go
through a float32 softmax over the keys, and the tile keeps the smallest set of keys whose
probability mass reaches ``p``.

Selection rule (exact, and the same on every device):

- Order the keys by float32 probability, largest first; among equal probabilities the lower key
  index comes first.
- Mass is counted in integer units of 2**-52: key j weighs ``m_j = floor(P_j * 2**52)``
  (exact integer sums, so the result never depends on summation order or atomics). The row's
  target is ``ceil(p * sum_j m_j)`` (computed in float64, exact for these integers).
- Keep the shortest prefix of that order whose weight reaches the target. Keys with
  P_j < 2**-52 weigh nothing and are kept only when p = 1, which keeps every key.

``top_p_mask`` finds that prefix without sorting: a three-round radix select over the float32
bit patterns of the probabilities (non-negative floats order like their bit patterns), with one
per-row histogram of weights per round (10, 10 and 9 bits: 1,025 bins per row at most), gives
the exact boundary probability tau and the weight of the keys above it; the keys equal to tau
are then taken in index order (a cumulative count) until the target is reached. Fixed shapes
throughout, no host synchronisation, no data-dependent sizes; rows full of ties (uniform
probabilities) need nothing special.
"""

from __future__ import annotations

import torch

from ..host.key_index import KeyIndex
from . import _args

__all__ = [
    "POOLED_BACKENDS",
    "compiled_top_p_select",
    "pooled_probs",
    "pooled_top_p",
    "tile_means",
    "top_p_mask",
    "top_p_select",
]

POOLED_BACKENDS = ("auto", "cute", "torch")
# The selection kernel's bitmap bound (fgattn_cute.kernels.top_p_stream_sm90.MAX_SEQLEN_K).
_CUTE_MAX_SEQLEN_K = 1 << 17
# Budget, in bytes, for the float32 logits on the kernel path (one head's if larger): chunks of
# heads within it, which the package's scores kernel writes into one buffer, and torch's
# GEMM (head dims that kernel lacks) into one tensor per chunk, freed before the next.
_CUTE_LOGIT_BYTES = 1 << 30

_MASS_BITS = 52
_MASS_SCALE = float(2**_MASS_BITS)
# float32 bit pattern of 2**-52, the smallest probability with a non-zero weight.
_LOW_BITS = (127 - _MASS_BITS) << 23
# Radix rounds over the 29 bits of (bits - _LOW_BITS) for probabilities in [2**-52, 1]:
# (shift, bits) from the most significant digit down.
_ROUNDS = ((19, 10), (9, 10), (0, 9))

# Budget, in elements of [rows, Sk], for one chunk of rows (temporaries: about 40 bytes each).
_ROW_ELEMS = {"cpu": 1 << 22}
_ROW_ELEMS_DEFAULT = 1 << 24


def _cdiv(a, b):
    return (a + b - 1) // b


def top_p_select(probs, p):
    """The selection on rows: bool [R, N] for float32 ``probs`` [R, N] (entries in [0, 1]) and
    ``p`` a 0-dim float64 tensor in (0, 1) on probs' device (a tensor, so that a compiled
    version does not specialise on its value). The rule of the module docstring; p = 1 is the
    caller's business (it keeps everything). No host sync, fixed shapes: it compiles with
    ``torch.compile(fullgraph=True)`` (see ``compiled_top_p_select``)."""
    R, N = probs.shape
    device = probs.device
    mass = (probs * _MASS_SCALE).to(torch.int64)  # floor: probs >= 0
    total = mass.sum(dim=-1)
    target = torch.ceil(total.double() * p).to(torch.int64)
    rb = probs.view(torch.int32) - _LOW_BITS  # < 0 exactly where the weight is 0
    prefix = torch.zeros(R, dtype=torch.int32, device=device)
    above = torch.zeros(R, dtype=torch.int64, device=device)  # weight of keys above the prefix
    for shift, bits in _ROUNDS:
        nb = 1 << bits
        inside = (rb >> (shift + bits)) == prefix.unsqueeze(-1)
        digit = (rb >> shift) & (nb - 1)
        idx = torch.where(inside, digit, nb).long()  # keys outside the prefix: dump bin nb
        hist = torch.zeros(R, nb + 1, dtype=torch.int64, device=device)
        hist.scatter_add_(1, idx, mass)
        desc = hist[:, :nb].flip(-1)  # bin of digit nb - 1 - i at column i
        incl = desc.cumsum(dim=-1)
        need = (target - above).unsqueeze(-1)
        pos = (incl < need).sum(dim=-1, keepdim=True).clamp_(max=nb - 1)
        above = above + (incl - desc).gather(1, pos).squeeze(1)
        prefix = (prefix << bits) | (nb - 1 - pos.squeeze(1)).to(torch.int32)
    tau = prefix.unsqueeze(-1)
    greater = rb > tau
    tie = rb == tau
    tau_weight = ((prefix + _LOW_BITS).view(torch.float32) * _MASS_SCALE).to(torch.int64)
    missing = target - above  # > 0, met by the first `take` ties
    take = (missing + tau_weight.clamp(min=1) - 1) // tau_weight.clamp(min=1)
    rank = tie.cumsum(dim=-1, dtype=torch.int32)
    keep = greater | (tie & (rank <= take.unsqueeze(-1)))
    return keep & (total > 0).unsqueeze(-1)


_COMPILED = {}


def compiled_top_p_select():
    """``torch.compile(top_p_select, fullgraph=True, dynamic=False)``, built once. Pass it as
    ``pooled_top_p(..., select_fn=compiled_top_p_select())``: same results, the elementwise
    passes fused (2.3x faster on a CPU in a quick check; the first call per row-chunk shape
    compiles, for seconds). Known failure: on an H200 with torch 2.11, rows of Wan 720p's
    75,600 keys stop inside torch.compile with an ``InductorError`` (perf/NOTES.md, session
    21); torch 2.13 on the CPU compiles them."""
    if "select" not in _COMPILED:
        _COMPILED["select"] = torch.compile(top_p_select, fullgraph=True, dynamic=False)
    return _COMPILED["select"]


def _select(rows, p, select_fn=None):
    if p >= 1.0:
        return torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    p_t = torch.full((), p, dtype=torch.float64, device=rows.device)
    return (select_fn or top_p_select)(rows, p_t)


@torch.no_grad()
def top_p_mask(probs, p):
    """bool, shape of ``probs``: along the last dim, the smallest set of entries whose mass
    reaches ``p`` (the rule of the module docstring: largest first, ties to the lower index,
    mass in units of 2**-52). ``probs``: float32 [..., N] with entries in [0, 1] (each row
    normally sums to 1; the target is relative to the row's own total). No host sync.

    Cost per row of N entries: one float-to-int64 pass and three radix rounds, each a few
    elementwise passes and one scatter_add into 1,025 int64 bins, then a cumulative count over
    the ties: about 30 passes over N elements in eager torch (roughly 150 bytes per element
    moved), all fusable into about 4 reads of the probabilities with atomics in shared memory.
    """
    p = _args.check_p(p)
    if not isinstance(probs, torch.Tensor) or probs.dtype != torch.float32 or probs.dim() < 1:
        raise TypeError("probs: expected a float32 tensor [..., N]")
    shape = probs.shape
    rows = probs.reshape(-1, shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    return _select(rows, p).reshape(shape)


def tile_means(q, q_tile):
    """float32 [B, H, n_q_tiles, D]: the mean of each tile's real queries (the last tile may
    hold fewer than q_tile). Sums in float32 straight from q's dtype: no float32 copy of q."""
    B, sq, H, D = q.shape
    n_tiles = _cdiv(sq, q_tile)
    full = sq // q_tile
    out = torch.empty(B, n_tiles, H, D, dtype=torch.float32, device=q.device)
    if full:
        tiles = q[:, : full * q_tile].reshape(B, full, q_tile, H, D)
        torch.sum(tiles, dim=2, dtype=torch.float32, out=out[:, :full])
    if full < n_tiles:
        torch.sum(q[:, full * q_tile:], dim=1, dtype=torch.float32, out=out[:, full])
    # Real queries per tile, built on the device: a scalar written into a CUDA tensor would
    # be a blocking host-to-device copy.
    first = torch.arange(n_tiles, device=q.device) * q_tile
    rows = (sq - first).clamp(max=q_tile).to(torch.float32)
    out /= rows.view(1, n_tiles, 1, 1)
    return out.permute(0, 2, 1, 3)


def _prob_chunks(q, k, q_tile, scale):
    """Yield (b, h0, h1, t0, t1, probs float32 [nh, nt, Sk]): the softmax over keys of
    scale * mean(tile queries) . k, chunk by chunk (about ``_ROW_ELEMS`` entries each)."""
    B, sq, H, D = q.shape
    sk = k.shape[1]
    n_tiles = _cdiv(sq, q_tile)
    means = tile_means(q, q_tile)  # [B, H, T, D]
    budget = _ROW_ELEMS.get(q.device.type, _ROW_ELEMS_DEFAULT)
    nt = max(1, min(n_tiles, budget // sk))
    nh = max(1, min(H, budget // (nt * sk)))
    for b in range(B):
        for h0 in range(0, H, nh):
            h1 = min(H, h0 + nh)
            kf = k[b, :, h0:h1].transpose(0, 1).float()  # [nh, Sk, D]
            for t0 in range(0, n_tiles, nt):
                t1 = min(n_tiles, t0 + nt)
                with _args.ieee_fp32_matmul():  # the same probabilities whatever TF32 says
                    logits = torch.matmul(means[b, h0:h1, t0:t1], kf.transpose(1, 2))
                yield b, h0, h1, t0, t1, torch.softmax(logits.mul_(scale), dim=-1)


@torch.no_grad()
def pooled_probs(q, k, q_tile=128, softmax_scale=None):
    """float32 [B, H, n_q_tiles, Sk]: per tile, softmax over keys of scale * mean(q_tile) . k,
    exactly the probabilities ``pooled_top_p`` selects from (same chunks, same ops)."""
    _args.check_qk(q, k)
    q_tile = _args.check_q_tile(q_tile)
    scale = _args.scale_for(softmax_scale, q.shape[-1])
    n_tiles = _cdiv(q.shape[1], q_tile)
    out = torch.empty(q.shape[0], q.shape[2], n_tiles, k.shape[1], dtype=torch.float32,
                      device=q.device)
    for b, h0, h1, t0, t1, probs in _prob_chunks(q, k, q_tile, scale):
        out[b, h0:h1, t0:t1] = probs
    return out


def _cute_unsupported(q, k, p, select_fn):
    """None when the selection kernel runs this call, else the reason it does not."""
    if select_fn is not None:
        return "select_fn replaces the selection of the torch path"
    if p >= 1.0:
        return "p = 1 keeps every key (the torch path does it without scoring)"
    return _args.hopper_kernel_unsupported(q, k, _CUTE_MAX_SEQLEN_K)


def _split_in_three(x, dtype):
    """[..., 3 D] in ``dtype``: hi | mid | lo with hi + mid + lo = x (float32) to about 2**-24
    relative (three 8-bit mantissas for bf16; for fp16, whose third part can be subnormal,
    about 2**-24 of the row's largest entry), so that one 16-bit GEMM against [k; k; k] gives
    float32-accurate dot products of x with k (the products are exact, the sums float32)."""
    hi = x.to(dtype)
    rest = x - hi.float()
    mid = rest.to(dtype)
    lo = (rest - mid.float()).to(dtype)
    return torch.cat([hi, mid, lo], dim=-1)


def _pooled_top_p_cute(q, k, q_tile, p, scale, keep, capacity):
    from ..host.key_index import _check_capacity, _resolve_capacity
    from ..host.launch import logit_stats, run_top_p_select_sm90
    from ..interface import CUTE_HEAD_DIMS, CUTE_Q_TILES

    B, sq, H, D = q.shape
    sk = k.shape[1]
    n_tiles = _cdiv(sq, q_tile)
    cap = _resolve_capacity(capacity, sk)
    # The query side and the scores by the package's kernels where they run (head dims and
    # q_tile of the other kernels), else by torch (a GEMM against a [k; k; k] copy).
    kernels = D in CUTE_HEAD_DIMS and q_tile in CUTE_Q_TILES
    if kernels:
        from ..host.launch import run_pooled_scores_sm90, run_tile_means_split_sm90

        split_means = run_tile_means_split_sm90(_args.tma_ready(q), q_tile)  # [B, H, T, 3D]
        k = _args.tma_ready(k)
    else:
        split_means = _split_in_three(tile_means(q, q_tile), k.dtype)
    words = _args.keep_words(keep, sk, q.device)
    indices = torch.empty(B, H, n_tiles, cap, dtype=torch.int32, device=q.device)
    counts = torch.empty(B, H, n_tiles, dtype=torch.int32, device=q.device)
    nh = max(1, min(H, _CUTE_LOGIT_BYTES // (n_tiles * _cdiv(sk, 4) * 16)))  # (padded rows)
    if kernels:
        from ..host.launch import pooled_scores_buffers

        # One buffer for every chunk's scaled logits and their statistics per 2,048 keys (each
        # chunk's selection is done with it before the next chunk's scores, in stream order;
        # a tensor per chunk would keep two chunks alive at each allocation).
        all_logits, all_stats = pooled_scores_buffers(1, nh, n_tiles, sk, q.device)
    for b in range(B):
        for h0 in range(0, H, nh):
            h1 = min(H, h0 + nh)
            if kernels:
                logits = all_logits[:, :h1 - h0]  # [1, h1 - h0, T, Sk] (rows padded to 16 bytes)
                stats = all_stats[:, :h1 - h0]
                # [1, h1 - h0, T, 3D] (no copy when the chunk holds all of the batch's heads)
                a = split_means[b:b + 1, h0:h1].contiguous()
                run_pooled_scores_sm90(a, k[b:b + 1, :, h0:h1], scale, out=logits, stats=stats,
                                       out_padding=True)
                stats = stats.flatten(0, 2)
            else:
                kh = k[b, :, h0:h1]  # [Sk, nh, D]
                # [Sk, nh, 3D]: one coalesced copy in k's own order; the GEMM reads it as
                # [nh, 3D, Sk] with the 3D axis contiguous (a transposed operand, no copy).
                k3 = torch.cat([kh, kh, kh], dim=-1)
                logits = torch.bmm(split_means[b, h0:h1], k3.permute(1, 2, 0),
                                   out_dtype=torch.float32)
                del k3
                # scaled in place (these rows are ours: no second copy of them) and their
                # statistics by torch
                logits.mul_(scale)
                stats = logit_stats(logits.flatten(0, -2))
            run_top_p_select_sm90(
                logits.flatten(0, -2), words, p, None, cap, stats=stats,
                indices=indices[b, h0:h1].view(-1, cap), counts=counts[b, h0:h1].view(-1),
            )
            # (the torch scores' chunk freed before the next one is made)
            del logits, stats
    _check_capacity(counts, cap, sk)
    return KeyIndex._trusted_new(indices, counts, q_tile, sq, sk)


@torch.no_grad()
def pooled_top_p(q, k, q_tile=128, p=0.9, softmax_scale=None, always_keep=None, capacity=None,
                 *, backend="auto", select_fn=None):
    """The cheap predictor: each tile scores its mean query against every key and keeps the
    smallest set of keys whose softmax mass reaches ``p``, plus ``always_keep``.

    The mean is over the tile's real queries (the last tile may be partial); scores and the
    softmax over all Sk keys are float32. Ties: among keys of equal float32 probability the
    lower key index is kept first; mass is counted in units of 2**-52 (see the module
    docstring for the exact rule). ``always_keep`` keys are added after the selection (they do
    not count towards p). p = 1 keeps every key.

    Args:
        q: [B, Sq, H, D]; k: [B, Sk, H, D]. bf16, fp16 or float32, one device (CPU or CUDA);
            everything runs there, without host synchronisation or data-dependent shapes.
        q_tile: queries per tile, a positive int (the CuTe kernel runs 64 and 128).
        p: mass to keep, in (0, 1].
        softmax_scale: positive float; None means D ** -0.5.
        always_keep: None, a bool tensor [Sk], or key ids (1-D integer tensor or list of ints).
        capacity: list capacity of the returned ``KeyIndex`` (None: round_up(Sk, 128)); a row
            with more kept keys is an error, never truncated.
        backend: "cute" (Hopper GPU, bf16 / fp16, Sk <= 131,072, p < 1: the tile means split
            in three 16-bit parts by one kernel, the float32-accurate scores of the parts
            against every key by a wgmma kernel, then one selection kernel per row that does
            the softmax, the exact rule and the list in shared memory; RuntimeError
            otherwise), "torch" (chunked torch, any device and dtype) or "auto" (the kernel
            where it runs the call, else torch). The rule is
            the same; the probabilities may differ in their last bits between the two (matmul
            and softmax summation order, and the kernel's fast exp2: ~2**-18 relative), which
            can move a key at the boundary.
        select_fn: ``select_fn(probs [R, Sk] float32, p 0-dim float64 tensor) -> bool [R, Sk]``,
            the selection of the torch path (default ``top_p_select``;
            ``compiled_top_p_select()`` is the same, compiled).

    Returns:
        a trusted ``KeyIndex`` on q's device.

    Cost (R = B * H * n_q_tiles rows of Sk keys, at S = 32,760, H = 24, q_tile 128: R * Sk =
    2.0e8). Kernel path: the tile means (one read of q), 3 x 2 * R * Sk * D tensor-core flops
    with a float32 output (0.8 GB), one read of it by the selection kernel, and the lists (0.8
    GB); 1.09 ms per call back to back on an H200 on random inputs, 1.17 on video-like ones
    (0.055x and 0.060x FA4 dense, perf/bench_predict.py, session 27; a single call after a
    sync adds the host's launch latency, 0.07-0.3 ms in sessions 22-27). Its
    scratch besides the lists: the float32 output, at most 1 GiB (or one head's, if larger),
    in one buffer that chunks of heads take in turn (Wan 720p's 40 heads go 6 at a time).
    Torch path: a float32 [R, D] x [D, Sk] matmul, a softmax, ``top_p_mask`` (three histogram
    rounds) and ``KeyIndex.from_mask``, tens of bytes per (row, key) in eager torch: 48 ms
    there (session 2's measurement, before the ``from_mask`` kernel that ``backend="auto"`` now
    uses on this path).
    """
    _args.check_qk(q, k)
    q_tile = _args.check_q_tile(q_tile)
    p = _args.check_p(p)
    scale = _args.scale_for(softmax_scale, q.shape[-1])
    backend = _args.check_backend(backend, POOLED_BACKENDS)
    sk = k.shape[1]
    keep = _args.always_keep_mask(always_keep, sk, q.device)
    if backend != "torch":
        why_not = _cute_unsupported(q, k, p, select_fn)
        if why_not is None:
            return _pooled_top_p_cute(q, k, q_tile, p, scale, keep, capacity)
        if backend == "cute":
            raise RuntimeError(f"backend: the top-p kernel cannot run this call: {why_not}")
    n_tiles = _cdiv(q.shape[1], q_tile)
    mask = torch.empty(q.shape[0], q.shape[2], n_tiles, sk, dtype=torch.bool, device=q.device)
    for b, h0, h1, t0, t1, probs in _prob_chunks(q, k, q_tile, scale):
        rows = probs.reshape(-1, sk)
        mask[b, h0:h1, t0:t1] = _select(rows, p, select_fn).view(h1 - h0, t1 - t0, sk)
    if keep is not None:
        mask |= keep
    # backend="torch" runs torch throughout (the conversion too); else the conversion kernel
    # where it runs.
    return KeyIndex.from_mask(mask, q_tile, q.shape[1], capacity=capacity,
                              backend="torch" if backend == "torch" else "auto")
