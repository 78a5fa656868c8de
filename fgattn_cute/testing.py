"""Synthetic, video-like attention inputs for tests and quality sweeps (no downloads).

``video_like_qkv`` builds q, k, v whose attention looks like a video DiT's in the ways that matter
for sparsity: tokens on a frames x height x width grid with features that vary smoothly in space
and time, a 3D rotary position embedding, heads ranging from global to local, and a few sink
keys that every query attends to. It is synthetic: it imitates the structure, not any model's
numbers. Deterministic in ``seed`` (everything is drawn on the CPU in float32 and then moved).
"""

from __future__ import annotations

import math
import operator

import torch

__all__ = ["rope_split", "video_like_qkv"]


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def rope_split(head_dim):
    """(d_t, d_h, d_w): how the head dim is split between the time, height and width rotary
    embeddings (each even; height and width get 2 * (head_dim // 6) each, time the rest)."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _rope_freqs(dim, base):
    """[dim // 2] rotary frequencies base^(-2i/dim)."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _rope_angles(positions, dim, base):
    """[n, dim // 2] rotation angles for integer ``positions`` [n]."""
    return positions.double().unsqueeze(-1) * _rope_freqs(dim, base)


def _apply_rope(x, angles):
    """Rotate the (2i, 2i+1) pairs of x [B, S, H, D] by angles [S, D // 2]."""
    cos = angles.cos().float()[None, :, None, :]
    sin = angles.sin().float()[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _smooth_noise(gen, batch, channels, grid, sigma):
    """[batch, prod(grid), channels] Gaussian-filtered white noise on a periodic grid, each
    channel scaled to unit variance; ``sigma`` is the filter width in grid steps per axis."""
    noise = torch.randn(batch, channels, *grid, generator=gen)
    spec = torch.fft.rfftn(noise, dim=(-3, -2, -1))
    response = torch.ones(spec.shape[-3:])
    for axis, (n, s) in enumerate(zip(grid, sigma, strict=True)):
        f = torch.fft.rfftfreq(n) if axis == 2 else torch.fft.fftfreq(n)
        shape = [1, 1, 1]
        shape[axis] = -1
        response = response * torch.exp(-2 * (math.pi * s * f) ** 2).view(shape)
    x = torch.fft.irfftn(spec * response, s=grid, dim=(-3, -2, -1))
    x = x.flatten(2).transpose(1, 2)  # [batch, S, channels]
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.std(dim=1, keepdim=True).clamp_min(1e-6)


def video_like_qkv(frames, height, width, heads, head_dim, seed, batch=1, dtype=torch.bfloat16,
                   device="cpu", text_tokens=0, *, locality=None, local_peak=12.0,
                   locality_sharpness=0.5, sink_strength=5.0, sinks=None, channels=32,
                   sigma=(1.0, 2.0, 2.0), rope_base=10000.0, v_mean=1.0):
    """Synthetic video-DiT-like q, k, v, each [batch, S, heads, head_dim] in ``dtype`` on
    ``device``, S = text_tokens + frames * height * width.

    Tokens: ``text_tokens`` text tokens first (i.i.d. features, no rotary embedding), then the
    video tokens in (frame, row, column) order.

    Construction, per head h:

    - content: features on the grid are Gaussian-filtered noise (``sigma`` grid steps in
      (time, height, width), ``channels`` channels, unit variance), projected to q and k with
      correlated random matrices (W_k = (W_q + W') / sqrt 2), so similar, i.e. nearby, tokens
      score higher; v is a third projection plus a per-head offset of scale ``v_mean`` (real
      value vectors share a large common component, so a broad head's output is not ~0). The
      content logits of head h are scaled by 0.2 + 0.8 * locality[h] (a per-head temperature:
      global heads are flatter).
    - locality: a fixed vector (the same for every token) of norm^2 proportional to
      ``locality[h]`` is added to q and k before the rotary embedding; after it, q . k gains a
      term that peaks at zero distance (``local_peak * locality[h]`` in softmax-scaled logits)
      and decays with the distance between the tokens. ``locality`` (floats in [0, 1], one per
      head) defaults to linspace(0, 1, heads): head 0 global, the last head the most local. The
      vector's norm^2 is shared among the rotary pairs in proportion to
      theta_i ** ``locality_sharpness`` (default 0.5): 0 spreads it evenly over all frequencies
      (a slow, logarithmic decay with distance), larger values favour the high frequencies (a
      sharper neighbourhood with lighter tails).
    - 3D rotary embedding: the head dim is split into time, height and width parts
      (``rope_split``), each rotated by its own coordinate (frequencies rope_base^(-2i/d)).
    - sinks: the keys at ``sinks`` (token positions; default the first video token of every
      frame) get, after the rotary embedding, a component along a per-head direction that every
      query shares, worth ``sink_strength`` softmax-scaled logits whatever the distance.

    Args:
        frames, height, width, heads, head_dim: positive ints (head_dim even, >= 6).
        seed: int; the same arguments give the same tensors on every device.
        batch: batch size (each batch element is an independent draw).
        dtype: torch.bfloat16, torch.float16 or torch.float32.
        device: where the returned tensors live (they are built on the CPU).
        text_tokens: number of text tokens prepended (default 0).

    Returns:
        (q, k, v), each [batch, S, heads, head_dim]; use softmax_scale = head_dim ** -0.5.
    """
    frames = _positive_int("frames", frames)
    height = _positive_int("height", height)
    width = _positive_int("width", width)
    heads = _positive_int("heads", heads)
    head_dim = _positive_int("head_dim", head_dim, 6)
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even int (rotary pairs), got {head_dim}")
    batch = _positive_int("batch", batch)
    text_tokens = _positive_int("text_tokens", text_tokens, 0)
    channels = _positive_int("channels", channels)
    seed = _positive_int("seed", seed, 0)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype: expected torch.bfloat16, torch.float16 or torch.float32, "
                        f"got {dtype}")
    if locality is None:
        locality = torch.linspace(0.0, 1.0, heads) if heads > 1 else torch.zeros(1)
    else:
        locality = torch.as_tensor(locality, dtype=torch.float32).flatten()
        if locality.numel() != heads or bool(((locality < 0) | (locality > 1)).any()):
            raise ValueError(f"locality: expected {heads} floats in [0, 1], got "
                             f"{locality.tolist()}")
    n_video = frames * height * width
    S = text_tokens + n_video
    if sinks is None:
        sinks = [text_tokens + f * height * width for f in range(frames)]
    sinks = torch.as_tensor(sinks, dtype=torch.long).flatten()
    if sinks.numel() and bool(((sinks < 0) | (sinks >= S)).any()):
        raise ValueError(f"sinks: expected token positions in [0, {S}), got {sinks.tolist()}")

    gen = torch.Generator().manual_seed(seed)
    D, H, C = head_dim, heads, channels
    feats = _smooth_noise(gen, batch, C, (frames, height, width), sigma)
    if text_tokens:
        feats = torch.cat([torch.randn(batch, text_tokens, C, generator=gen), feats], dim=1)
    w_q = torch.randn(H, C, D, generator=gen) / math.sqrt(C)
    w_k = (w_q + torch.randn(H, C, D, generator=gen) / math.sqrt(C)) / math.sqrt(2.0)
    w_v = torch.randn(H, C, D, generator=gen) / math.sqrt(C)
    v_bias = torch.randn(H, D, generator=gen) * v_mean
    # Content temperature: global heads score content more softly (their logits are scaled by
    # 0.2 + 0.8 * locality relative to the most local head's).
    gain = torch.sqrt(0.2 + 0.8 * locality).view(H, 1, 1)
    q = torch.einsum("bsc,hcd->bshd", feats, w_q * gain)
    k = torch.einsum("bsc,hcd->bshd", feats, w_k * gain)
    v = torch.einsum("bsc,hcd->bshd", feats, w_v) + v_bias

    # Locality: q . k gains a^2 * sum_i cos(theta_i * distance) after the rotation, a^2 * D at
    # distance 0, i.e. a^2 * sqrt(D) scaled logits.
    d_t, d_h, d_w = rope_split(D)
    freqs = torch.cat([_rope_freqs(d, rope_base) for d in (d_t, d_h, d_w)])  # [D // 2]
    weight = freqs**locality_sharpness
    weight = (weight / weight.mean()).float().repeat_interleave(2)  # [D], mean 1
    amp = torch.sqrt(locality * local_peak / math.sqrt(D))  # [H]
    pos_vec = amp.view(1, 1, H, 1) * weight.sqrt().view(1, 1, 1, D)
    q[:, text_tokens:] += pos_vec
    k[:, text_tokens:] += pos_vec
    grid = torch.arange(n_video)
    t_pos = grid // (height * width)
    y_pos = (grid // width) % height
    x_pos = grid % width
    angles = torch.cat(
        [
            _rope_angles(t_pos, d_t, rope_base),
            _rope_angles(y_pos, d_h, rope_base),
            _rope_angles(x_pos, d_w, rope_base),
        ],
        dim=-1,
    )  # [n_video, D // 2]
    q[:, text_tokens:] = _apply_rope(q[:, text_tokens:], angles)
    k[:, text_tokens:] = _apply_rope(k[:, text_tokens:], angles)

    # Sinks: +sink_strength scaled logits for every query, position-independent.
    direction = torch.randint(0, 2, (H, D), generator=gen).float() * 2 - 1  # norm^2 = D
    q_gain = 0.5
    k_gain = sink_strength / (q_gain * math.sqrt(D))
    q += q_gain * direction
    if sinks.numel():
        k[:, sinks] += k_gain * direction

    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))
