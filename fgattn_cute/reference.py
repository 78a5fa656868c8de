"""The float32 torch reference: the definition of a correct fine-grained sparse attention.

    O[q]   = sum_{j in keys(tile(q))} softmax_j(scale * Q[q] . K[j]) V[j]
    LSE[q] = log sum_{j in keys(tile(q))} exp(scale * Q[q] . K[j])        (natural log)

where tile(q) = q // index.q_tile and keys(t) is the list ``index.indices[b, h, t, :counts]``.
A tile with no kept keys gives O = 0 and LSE = -inf (never NaN).

It gathers the listed K and V rows (it never builds a dense mask), in float32 on the input's
device, chunked over heads, query tiles and list slots with an online log-sum-exp, so that
75K-token problems fit in memory.
"""

from __future__ import annotations

import torch

from . import _checks

__all__ = ["sparse_attention"]

# Budget for the per-chunk temporaries, in float32 elements: gathered K and V rows, scores and
# probabilities. 2**24 elements is 64 MiB; the chunk's temporaries stay within a few times that.
_CHUNK_ELEMS = 1 << 24
# Most list slots processed at once per (head, tile).
_MAX_SLOTS = 2048


def _plan(heads, n_tiles, q_tile, head_dim, max_count):
    """(heads per chunk, tiles per chunk, slots per chunk)."""
    slots = max(1, min(_MAX_SLOTS, max_count))
    per_pair = slots * (2 * head_dim + 2 * q_tile) + 3 * q_tile * head_dim
    pairs = max(1, _CHUNK_ELEMS // per_pair)
    tiles = min(n_tiles, pairs)
    heads_per = min(heads, max(1, pairs // tiles))
    return heads_per, tiles, slots


@torch.no_grad()
def sparse_attention(q, k, v, index, softmax_scale=None, return_lse=False):
    """Fine-grained sparse attention, computed in float32 with plain torch.

    Args:
        q: [B, Sq, H, D], k and v: [B, Sk, H, D]; bf16, fp16 or float32, any one device, last
            dimension contiguous.
        index: a ``KeyIndex`` for these shapes, on the same device (an untrusted one is
            validated first, with one host sync).
        softmax_scale: positive float; None means D ** -0.5.
        return_lse: also return the log-sum-exp.

    Returns:
        out: float32 [B, Sq, H, D] (always float32: this is the definition of correct, the
        caller rounds it as it likes); and, when ``return_lse``, lse: float32 [B, H, Sq].

    Memory: besides the inputs, the index and the float32 output (B*Sq*H*D*4 bytes), the
    temporaries of one chunk are bounded by about 4 * 2**24 float32 elements (about 256 MiB at
    peak) whatever the problem size. For B=1, H=24, S=32760, D=128, bf16, with a dense index,
    the process peaked at 2.3 GB resident (inputs 0.6 GB, index 0.8 GB, output 0.4 GB) and took
    about 5 minutes on 2 CPU cores.

    It syncs with the device once per chunk (to skip the list slots past the chunk's largest
    count): it is a reference, not a fast path.
    """
    scale = _checks.check_all(
        q, k, v, index, softmax_scale, return_lse,
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
    )
    index.validate("index.")
    B, Sq, H, D = q.shape
    M = index.q_tile
    n_tiles = index.n_q_tiles
    device = q.device

    out = torch.zeros(B, Sq, H, D, dtype=torch.float32, device=device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=device)
    max_count = int(index.counts.max())
    if max_count == 0:
        return (out, lse) if return_lse else out
    heads_per, tiles_per, slots_per = _plan(H, n_tiles, M, D, max_count)

    for b in range(B):
        k_b = k[b].transpose(0, 1)  # [H, Sk, D], a view
        v_b = v[b].transpose(0, 1)
        for h0 in range(0, H, heads_per):
            h1 = min(H, h0 + heads_per)
            head_ids = torch.arange(h0, h1, device=device).view(-1, 1, 1)
            for t0 in range(0, n_tiles, tiles_per):
                t1 = min(n_tiles, t0 + tiles_per)
                _tile_chunk(
                    q, k_b, v_b, index, out, lse, scale, b, h0, h1, head_ids, t0, t1,
                    slots_per,
                )
    return (out, lse) if return_lse else out


def _tile_chunk(q, k_b, v_b, index, out, lse, scale, b, h0, h1, head_ids, t0, t1, slots_per):
    """Attention for heads [h0, h1) and query tiles [t0, t1) of batch b, written into out/lse."""
    Sq, D = q.shape[1], q.shape[3]
    M = index.q_tile
    nh, nt = h1 - h0, t1 - t0
    q0, q1 = t0 * M, min(Sq, t1 * M)
    device = q.device

    # Queries of the chunk, padded to whole tiles: [nh, nt, M, D], scaled, float32.
    qc = q[b, q0:q1, h0:h1].float() * scale  # [rows, nh, D]
    if q1 - q0 < nt * M:
        qc = torch.nn.functional.pad(qc, (0, 0, 0, 0, 0, nt * M - (q1 - q0)))
    qc = qc.view(nt, M, nh, D).permute(2, 0, 1, 3)

    counts = index.counts[b, h0:h1, t0:t1].long()  # [nh, nt]
    n_slots = int(counts.max())
    row_max = torch.full((nh, nt, M), float("-inf"), dtype=torch.float32, device=device)
    row_sum = torch.zeros(nh, nt, M, dtype=torch.float32, device=device)
    acc = torch.zeros(nh, nt, M, D, dtype=torch.float32, device=device)

    for s0 in range(0, n_slots, slots_per):
        s1 = min(n_slots, s0 + slots_per)
        slot = torch.arange(s0, s1, device=device)
        valid = slot < counts.unsqueeze(-1)  # [nh, nt, ns]
        keys = index.indices[b, h0:h1, t0:t1, s0:s1].long()
        keys = torch.where(valid, keys, 0)
        kg = k_b[head_ids, keys].float()  # [nh, nt, ns, D]
        vg = v_b[head_ids, keys].float()
        scores = torch.matmul(qc, kg.transpose(-1, -2))  # [nh, nt, M, ns]
        scores.masked_fill_(~valid.unsqueeze(-2), float("-inf"))
        new_max = torch.maximum(row_max, scores.amax(dim=-1))
        # Rows that have seen no key yet keep max -inf; shift them by 0 instead (no NaN).
        shift = torch.where(new_max == float("-inf"), 0.0, new_max)
        probs = torch.exp(scores - shift.unsqueeze(-1))
        rescale = torch.exp(row_max - shift)
        row_sum = row_sum * rescale + probs.sum(dim=-1)
        acc = acc * rescale.unsqueeze(-1) + torch.matmul(probs, vg)
        row_max = new_max

    has_keys = row_sum > 0
    o = torch.where(has_keys.unsqueeze(-1), acc / row_sum.clamp_min(1e-30).unsqueeze(-1), 0.0)
    l_ = torch.where(has_keys, row_max + torch.log(row_sum.clamp_min(1e-30)), float("-inf"))
    rows = q1 - q0
    # o: [nh, nt, M, D] -> [rows, nh, D]; l_: [nh, nt, M] -> [nh, rows]
    out[b, q0:q1, h0:h1] = o.permute(1, 2, 0, 3).reshape(nt * M, nh, D)[:rows]
    lse[b, h0:h1, q0:q1] = l_.reshape(nh, nt * M)[:, :rows]
