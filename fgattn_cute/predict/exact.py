"""``calibrate``: the exact predictor.

Tile t keeps key j when

    max over the tile's real queries q of  softmax(scale * Q K^T)[q, j]  >=  threshold / seqlen_k

(the softmax is over all seqlen_k keys; the last tile's padding rows never count).

On a Hopper GPU the default is one CuTe kernel (``fgattn_cute/kernels/calibrate_sm90.py``: an
LSE pass and a keep-bit pass over Q K^T per pair of query tiles, lists written in the kernel).
The torch path, elsewhere or with ``backend="torch"``, runs two chunked passes, so that no
S x S matrix is ever materialised (S = 75,600, H = 40 included):

1. ``query_lse``: each query's natural-log log-sum-exp over all keys (an online log-sum-exp over
   key chunks). Replaceable through ``calibrate(..., lse_fn=...)`` by any faster source of the
   same quantity, e.g. ``kernel_lse`` (the CuTe kernel's LSE over a dense list).
2. ``tile_keep_mask``: per chunk of heads, query tiles and keys, the column max over the tile's
   rows of ``scale * s - lse`` (the log-probability); ``exp`` of it is compared with
   ``threshold / seqlen_k`` and the bool mask [B, H, n_q_tiles, seqlen_k] is written chunk by
   chunk. Replaceable through ``calibrate(..., mask_fn=...)`` by a fused kernel.

Scores are computed in float32 from the inputs' values (bf16 and fp16 products are exact in
float32; only the summation order differs from a float64 computation), with IEEE float32
matmuls even when the caller allowed TF32 (``torch.set_float32_matmul_precision``).
"""

from __future__ import annotations

import math

import torch

from ..host.key_index import KeyIndex
from . import _args

__all__ = [
    "CALIBRATE_BACKENDS",
    "calibrate",
    "kernel_lse",
    "query_lse",
    "tile_column_max_probs",
    "tile_keep_mask",
]

CALIBRATE_BACKENDS = ("auto", "cute", "torch")
# The calibrate kernel's shared-memory bitmap (fgattn_cute.kernels.calibrate_sm90.MAX_SEQLEN_K).
_CUTE_MAX_SEQLEN_K = 1 << 17

# Budget, in float32 elements, for one chunk of scores. On the CPU a chunk that stays in cache
# is fastest; on accelerators larger chunks mean fewer launches.
_SCORE_ELEMS = {"cpu": 1 << 18}
_SCORE_ELEMS_DEFAULT = 1 << 26
# Budget, in elements, for the float32 copies of one chunk of heads of q and k.
_HEAD_ELEMS = 1 << 26
# Stands for -lse on the last tile's padding rows: their log-probabilities are about -1e30, so
# they never win a tile's max (a finite value: no inf enters the matmul).
_PAD_NEG_LSE = -1e30


def _score_budget(device):
    return _SCORE_ELEMS.get(device.type, _SCORE_ELEMS_DEFAULT)


def _cdiv(a, b):
    return (a + b - 1) // b


def _head_chunks(q, k):
    """(h0, h1) chunks of heads whose float32 q and k copies fit ``_HEAD_ELEMS``."""
    _, sq, h, d = q.shape
    per_head = (sq + k.shape[1]) * (d + 8)
    step = max(1, min(h, _HEAD_ELEMS // per_head))
    return [(h0, min(h, h0 + step)) for h0 in range(0, h, step)]


def _heads_f32(x, b, h0, h1):
    """x[b, :, h0:h1] as float32 [h1 - h0, S, D], contiguous."""
    return x[b, :, h0:h1].transpose(0, 1).float().contiguous()


class _Buffers:
    """Reusable float32 matmul outputs, one per shape (a call sees at most four shapes), so
    that the chunk loop does not allocate."""

    def __init__(self, device):
        self.device = device
        self.bufs = {}

    def __call__(self, *shape):
        buf = self.bufs.get(shape)
        if buf is None:
            buf = self.bufs[shape] = torch.empty(shape, dtype=torch.float32, device=self.device)
        return buf


@torch.no_grad()
def query_lse(q, k, scale):
    """Each query's natural-log log-sum-exp over all keys: float32 [B, H, Sq].

    ``lse[b, h, i] = log sum_j exp(scale * q[b, i, h] . k[b, j, h])``, computed in float32 on q's
    device with an online log-sum-exp over key chunks (about ``_SCORE_ELEMS`` scores at once,
    in one reused buffer). Cost: 2 * B * H * Sq * Sk * D flops of float32 matmul plus
    B * H * Sq * Sk exponentials, and in eager torch about 16 * B * H * Sq * Sk bytes of chunk
    traffic (matmul output, max, exp in place, sum). It is the default ``lse_fn`` of
    ``calibrate``; a replacement must return the same quantity, float32 [B, H, Sq], on q's
    device (e.g. the LSE a dense flash-attention forward returns, if it is float32 and exact
    enough for the thresholds in use).
    """
    B, sq, H, D = q.shape
    sk = k.shape[1]
    budget = _score_budget(q.device)
    buffers = _Buffers(q.device)
    out = torch.empty(B, H, sq, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h0, h1 in _head_chunks(q, k):
            nh = h1 - h0
            qs = _heads_f32(q, b, h0, h1).mul_(scale)
            kt = _heads_f32(k, b, h0, h1).transpose(1, 2)  # [nh, D, Sk]
            nk = max(1, min(sk, budget // nh))
            nq = max(1, min(sq, budget // (nh * nk)))
            for q0 in range(0, sq, nq):
                q1 = min(sq, q0 + nq)
                run_max = torch.full((nh, q1 - q0), float("-inf"), device=q.device)
                run_sum = torch.zeros(nh, q1 - q0, device=q.device)
                for k0 in range(0, sk, nk):
                    k1 = min(sk, k0 + nk)
                    with _args.ieee_fp32_matmul():
                        s = torch.bmm(qs[:, q0:q1], kt[:, :, k0:k1],
                                      out=buffers(nh, q1 - q0, k1 - k0))
                    new_max = torch.maximum(run_max, s.amax(dim=-1))
                    s.sub_(new_max.unsqueeze(-1)).exp_()
                    run_sum = run_sum * torch.exp(run_max - new_max) + s.sum(dim=-1)
                    run_max = new_max
                out[b, h0:h1, q0:q1] = run_max + torch.log(run_sum)
    return out


# Budget, in bytes, for the dense KeyIndex of one chunk of heads in ``kernel_lse``.
_KERNEL_INDEX_BYTES = 1 << 30


@torch.no_grad()
def kernel_lse(q, k, scale):
    """The same quantity as ``query_lse``, from ``fg.sparse_attention`` with a dense index and
    ``return_lse=True``: on a Hopper GPU (bf16 / fp16, head dim 64 or 128) the CuTe kernel, whose
    bf16 / fp16 products are exact in its float32 accumulators (only the summation order
    differs); elsewhere the float32 reference (correct, slow).
    A drop-in ``lse_fn`` for ``calibrate``: about one dense attention forward instead of a
    float32 GEMM plus an eager exponential pass. v is k (the output is discarded); heads are
    taken in chunks whose dense index stays within about 1 GiB.
    """
    from ..interface import CUTE_DTYPES, CUTE_HEAD_DIMS, sparse_attention

    B, sq, H, D = q.shape
    on_kernel = (q.device.type == "cuda" and q.dtype in CUTE_DTYPES and D in CUTE_HEAD_DIMS
                 and torch.cuda.get_device_capability(q.device)[0] == 9)
    backend = "cute" if on_kernel else "reference"
    sk = k.shape[1]
    n_tiles = _cdiv(sq, 128)
    per_head = B * n_tiles * _cdiv(sk, 128) * 128 * 4
    step = max(1, min(H, _KERNEL_INDEX_BYTES // per_head))
    out = torch.empty(B, H, sq, dtype=torch.float32, device=q.device)
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        index = KeyIndex.dense(B, h1 - h0, sq, sk, 128, q.device)
        kh = k[:, :, h0:h1]
        _, lse = sparse_attention(q[:, :, h0:h1], kh, kh, index, scale, return_lse=True,
                                  backend=backend)
        out[:, h0:h1] = lse
    return out


def _column_max_logp(q, k, lse, q_tile, scale, emit):
    """For every chunk, ``emit(b, h0, h1, t0, t1, k0, k1, m)`` with m float32 [nh, nt, nk]: the
    max over the tile's real queries of ``scale * q . k - lse`` (the log-probability).

    The subtraction rides in the matmul: q is extended with a column -lse and k with a column
    of ones, so one GEMM gives the log-probabilities and the only other pass is the max."""
    B, sq, H, D = q.shape
    sk = k.shape[1]
    n_tiles = _cdiv(sq, q_tile)
    budget = _score_budget(q.device)
    buffers = _Buffers(q.device)
    rows = n_tiles * q_tile
    width = _cdiv(D + 1, 8) * 8  # the extra column, padded to keep rows 32-byte aligned
    for b in range(B):
        for h0, h1 in _head_chunks(q, k):
            nh = h1 - h0
            qa = torch.zeros(nh, rows, width, dtype=torch.float32, device=q.device)
            qa[:, :sq, :D] = q[b, :, h0:h1].transpose(0, 1)
            qa[:, :sq, :D] *= scale
            qa[:, :sq, D] = -lse[b, h0:h1]
            qa[:, sq:, D] = _PAD_NEG_LSE
            ka = torch.zeros(nh, sk, width, dtype=torch.float32, device=q.device)
            ka[:, :, :D] = k[b, :, h0:h1].transpose(0, 1)
            ka[:, :, D] = 1.0
            kt = ka.transpose(1, 2)  # [nh, width, Sk]
            nk = max(1, min(sk, budget // (nh * q_tile)))
            nt = max(1, min(n_tiles, budget // (nh * q_tile * nk)))
            for t0 in range(0, n_tiles, nt):
                t1 = min(n_tiles, t0 + nt)
                q_c = qa[:, t0 * q_tile:t1 * q_tile]
                for k0 in range(0, sk, nk):
                    k1 = min(sk, k0 + nk)
                    with _args.ieee_fp32_matmul():
                        s = torch.bmm(q_c, kt[:, :, k0:k1],
                                      out=buffers(nh, (t1 - t0) * q_tile, k1 - k0))
                    m = s.view(nh, t1 - t0, q_tile, k1 - k0).amax(dim=2)
                    emit(b, h0, h1, t0, t1, k0, k1, m)


@torch.no_grad()
def tile_column_max_probs(q, k, lse, q_tile, scale):
    """float32 [B, H, n_q_tiles, Sk]: for tile t and key j, the max over the tile's real queries
    of softmax(scale * Q K^T)[q, j] = exp(scale * q . k_j - lse[q]).

    Materialises B * H * n_q_tiles * Sk float32 values (1.8 GB at S = 32,760, H = 24, q_tile 64):
    meant for analysis (block maxima in ``perf/quality.py``); ``calibrate`` uses
    ``tile_keep_mask``, which writes only a bool per value. Cost as in ``tile_keep_mask``.
    """
    n_tiles = _cdiv(q.shape[1], q_tile)
    out = torch.empty(q.shape[0], q.shape[2], n_tiles, k.shape[1], dtype=torch.float32,
                      device=q.device)

    def emit(b, h0, h1, t0, t1, k0, k1, m):
        out[b, h0:h1, t0:t1, k0:k1] = torch.exp(m)

    _column_max_logp(q, k, lse, q_tile, scale, emit)
    return out


@torch.no_grad()
def tile_keep_mask(q, k, lse, q_tile, scale, threshold):
    """bool [B, H, n_q_tiles, Sk]: True where max over the tile's real queries of
    exp(scale * q . k_j - lse[q]) >= threshold / Sk (compared in float32).

    The second pass of ``calibrate``, and the piece a fused GPU kernel should replace (same
    arguments, same result). Chunked over heads, query tiles and keys (about ``_SCORE_ELEMS``
    scores at once).

    Cost: 2 * B * H * Sq * Sk * (D + 8) flops (one float32 GEMM of q extended with a -lse
    column against k extended with ones, which yields the log-probabilities directly), the max
    over each tile's rows (B * H * Sq * Sk compares), and B * H * n_q_tiles * Sk exponentials
    and compares. Bytes: the output, B * H * n_q_tiles * Sk (one byte each); the float32
    extended copies of q and k, (Sq + Sk) * (D + 8) * 4 bytes per (batch, head), re-read per
    chunk; and, in eager torch, each chunk's float32 scores written once by the GEMM and read
    once by the max, about 8 * B * H * Sq * Sk bytes (a fused kernel keeps them in registers:
    its traffic is q, k and the output only). At S = 32,760, H = 24, D = 128: 7.0 TFLOP of
    float32 GEMM, 0.2 GB of output at q_tile 128, and 206 GB of eager score traffic (about
    0.1 s at H100 bandwidth; the GEMM itself takes about as long in float32 without TF32).
    """
    sk = k.shape[1]
    n_tiles = _cdiv(q.shape[1], q_tile)
    cut = threshold / sk
    out = torch.empty(q.shape[0], q.shape[2], n_tiles, sk, dtype=torch.bool, device=q.device)

    def emit(b, h0, h1, t0, t1, k0, k1, m):
        out[b, h0:h1, t0:t1, k0:k1] = torch.exp(m) >= cut

    _column_max_logp(q, k, lse, q_tile, scale, emit)
    return out


def _check_lse(lse, q):
    B, sq, H, _ = q.shape
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse_fn: expected it to return a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != (B, H, sq) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(
            f"lse_fn: expected it to return float32 [B, H, Sq] = [{B}, {H}, {sq}] on {q.device}, "
            f"got {lse.dtype} {tuple(lse.shape)} on {lse.device}"
        )


def _cute_unsupported(q, k, q_tile, hooks):
    """None when the calibrate kernel runs these inputs, else the reason it does not."""
    from ..interface import CUTE_HEAD_DIMS, CUTE_Q_TILES

    if hooks:
        return "lse_fn / mask_fn replace parts of the torch path"
    reason = _args.hopper_kernel_unsupported(q, k, _CUTE_MAX_SEQLEN_K)
    if reason is None and q.shape[-1] not in CUTE_HEAD_DIMS:
        reason = f"it runs head dims {CUTE_HEAD_DIMS}, got {q.shape[-1]}"
    if reason is None and q_tile not in CUTE_Q_TILES:
        reason = f"it runs q_tile {CUTE_Q_TILES}, got {q_tile}"
    return reason


def _calibrate_cute(q, k, q_tile, threshold, scale, keep, capacity):
    from ..host.key_index import KeyIndex, _check_capacity, _resolve_capacity
    from ..host.launch import run_calibrate_sm90

    sk = k.shape[1]
    cap = _resolve_capacity(capacity, sk)
    log_cut = math.log(threshold / sk) if threshold > 0 else -math.inf
    words = _args.keep_words(keep, sk, q.device)
    indices, counts = run_calibrate_sm90(
        _args.tma_ready(q), _args.tma_ready(k), words, q_tile, scale, log_cut, cap
    )
    _check_capacity(counts, cap, sk)
    return KeyIndex._trusted_new(indices, counts, q_tile, q.shape[1], sk)


@torch.no_grad()
def calibrate(q, k, q_tile=128, threshold=0.5, softmax_scale=None, always_keep=None,
              capacity=None, *, backend="auto", lse_fn=None, mask_fn=None):
    """The exact predictor: tile t keeps key j when the largest probability that any of the
    tile's (real) queries gives key j is at least ``threshold / seqlen_k``:

        max_{q in tile t, q < Sq} softmax_j(scale * Q[q] . K^T) >= threshold / Sk

    ``threshold`` = 1 keeps the keys some query of the tile attends to more than uniformly;
    0 keeps every key. Probabilities are computed in float32 from the inputs' values.

    Args:
        q: [B, Sq, H, D]; k: [B, Sk, H, D] (Sk may differ from Sq). bf16, fp16 or float32, one
            device (CPU or CUDA); everything runs on that device without host synchronisation.
        q_tile: queries per tile, a positive int (the CuTe kernel runs 64 and 128).
        threshold: finite float >= 0.
        softmax_scale: positive float; None means D ** -0.5.
        always_keep: None, a bool tensor [Sk], or key ids (1-D integer tensor or list of ints)
            that every tile keeps whatever their probability (e.g. text tokens).
        capacity: list capacity of the returned ``KeyIndex`` (None: the worst case,
            round_up(Sk, 128)); a row with more kept keys is an error, never truncated.
        backend: "cute" (the fused sm90 kernel: Hopper GPU, bf16 / fp16, head dim 64 or 128,
            q_tile 64 or 128, Sk <= 131,072; RuntimeError / ValueError otherwise), "torch"
            (chunked float32 torch, any device and dtype), or "auto" (the kernel where it runs
            the inputs, else torch). The two compute the same rule; they may differ only on
            keys whose probability is within float32 rounding of the cut (the kernel sums
            exponentials in a different order, with the hardware exp2).
        lse_fn: ``lse_fn(q, k, scale) -> float32 [B, H, Sq]``, the per-query natural-log LSE
            over all keys (default ``query_lse``, chunked float32 torch). Plug a faster exact
            source here.
        mask_fn: ``mask_fn(q, k, lse, q_tile, scale, threshold) -> bool [B, H, n_q_tiles, Sk]``
            (default ``tile_keep_mask``). Plug a fused kernel here.

    Returns:
        a trusted ``KeyIndex`` on q's device.

    Cost, the kernel: two Q K^T passes on the tensor cores (4 * B * H * Sq * Sk * D flops, as
    many as one dense attention forward), one exponential per score (as attention), nothing
    S x S in memory; it writes the lists directly. The torch path: two float32 Q K^T passes
    plus an eager exp pass, and the bool mask B * H * n_q_tiles * Sk bytes plus chunk
    temporaries. Either is meant to run at a few denoising steps and be reused
    (``SparsityCache``).
    """
    _args.check_qk(q, k)
    q_tile = _args.check_q_tile(q_tile)
    threshold = _args.check_threshold(threshold)
    scale = _args.scale_for(softmax_scale, q.shape[-1])
    backend = _args.check_backend(backend, CALIBRATE_BACKENDS)
    sk = k.shape[1]
    keep = _args.always_keep_mask(always_keep, sk, q.device)
    if backend != "torch":
        why_not = _cute_unsupported(q, k, q_tile, lse_fn is not None or mask_fn is not None)
        if why_not is None:
            return _calibrate_cute(q, k, q_tile, threshold, scale, keep, capacity)
        if backend == "cute":
            raise RuntimeError(f"backend: the calibrate kernel cannot run this call: {why_not}")
    lse = (lse_fn or query_lse)(q, k, scale)
    _check_lse(lse, q)
    mask = (mask_fn or tile_keep_mask)(q, k, lse, q_tile, scale, threshold)
    if keep is not None:
        mask |= keep
    # backend="torch" runs torch throughout (the conversion too); else the conversion kernel
    # where it runs.
    return KeyIndex.from_mask(mask, q_tile, q.shape[1], capacity=capacity,
                              backend="torch" if backend == "torch" else "auto")

