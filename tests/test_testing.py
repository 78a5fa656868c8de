"""fgattn_cute.testing.video_like_qkv: shapes, determinism, and the structure it promises."""

import pytest
import torch

from fgattn_cute.testing import rope_split, video_like_qkv

F, HH, WW, H, D = 3, 8, 10, 4, 32
N = F * HH * WW


def _probs(q, k):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1)


def _grid_distance():
    g = torch.arange(N)
    t, y, x = g // (HH * WW), (g // WW) % HH, g % WW
    return ((t[:, None] - t[None]) ** 2 + (y[:, None] - y[None]) ** 2
            + (x[:, None] - x[None]) ** 2).double().sqrt()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shapes_dtypes(dtype):
    q, k, v = video_like_qkv(F, HH, WW, H, D, seed=0, batch=2, dtype=dtype, text_tokens=5)
    for t in (q, k, v):
        assert t.shape == (2, 5 + N, H, D) and t.dtype == dtype and t.is_contiguous()
        assert t.device.type == "cpu" and torch.isfinite(t.float()).all()


def test_deterministic_in_seed():
    a = video_like_qkv(F, HH, WW, H, D, seed=7, text_tokens=3)
    b = video_like_qkv(F, HH, WW, H, D, seed=7, text_tokens=3)
    c = video_like_qkv(F, HH, WW, H, D, seed=8, text_tokens=3)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and not torch.equal(x, z)
    # Batch elements are independent draws.
    q, _, _ = video_like_qkv(F, HH, WW, H, D, seed=7, batch=2)
    assert not torch.equal(q[0], q[1])


def test_rope_split():
    for d in (6, 8, 16, 64, 128, 256):
        parts = rope_split(d)
        assert sum(parts) == d and all(p % 2 == 0 and p > 0 for p in parts)


def test_features_are_smooth():
    # v carries the smooth features without any positional term: neighbours correlate.
    _, _, v = video_like_qkv(F, HH, WW, 1, D, seed=1, dtype=torch.float32)
    v = v[0, :, 0].view(F, HH, WW, D)
    v = v - v.mean(dim=(0, 1, 2))  # the per-head offset (v_mean) is not a feature
    v = v / v.std()
    right = (v[:, :, 1:] * v[:, :, :-1]).mean()
    far = (v[:, :, 5:] * v[:, :, :-5]).mean()
    assert right > 0.5 and right > far + 0.3


def test_heads_range_from_global_to_local():
    q, k, _ = video_like_qkv(F, HH, WW, H, D, seed=2, dtype=torch.float32)
    probs = _probs(q, k)[0]  # [H, N, N]
    near = (_grid_distance() <= 1.5).double()
    near_mass = (probs * near).sum(-1).mean(-1)  # per head
    assert near_mass[-1] > 2 * near_mass[0]
    assert near_mass[2:].mean() > 2 * near_mass[:2].mean()  # the trend follows locality
    # The most local head is sparse (few keys hold 90 % of the mass); the global one is not.
    sorted_mass = probs.sort(-1, descending=True).values.cumsum(-1)
    keys_90 = ((sorted_mass < 0.9).sum(-1) + 1).double().mean(-1) / N
    assert keys_90[-1] < 0.25 and keys_90[0] > 2 * keys_90[-1]


def test_sinks_attract_mass():
    q, k, _ = video_like_qkv(F, HH, WW, H, D, seed=3, dtype=torch.float32, text_tokens=4)
    probs = _probs(q, k)[0]
    sinks = torch.tensor([4 + f * HH * WW for f in range(F)])
    per_sink = probs[..., sinks].mean()
    per_key = probs.mean()
    assert per_sink > 20 * per_key
    # Disabled: no key stands out that way.
    q, k, _ = video_like_qkv(F, HH, WW, H, D, seed=3, dtype=torch.float32, text_tokens=4,
                             sinks=[])
    assert _probs(q, k)[0][..., sinks].mean() < 5 * per_key


def test_sharpness_and_v_mean():
    near = (_grid_distance() <= 1.5).double()
    mass = []
    for sharp in (0.0, 1.0):
        q, k, _ = video_like_qkv(F, HH, WW, 1, D, seed=4, dtype=torch.float32, locality=[1.0],
                                 locality_sharpness=sharp, sinks=[])
        mass.append(float((_probs(q, k)[0, 0] * near).sum(-1).mean()))
    assert mass[1] > mass[0] + 0.05
    _, _, v0 = video_like_qkv(F, HH, WW, 2, D, seed=4, dtype=torch.float32, v_mean=0.0)
    _, _, v1 = video_like_qkv(F, HH, WW, 2, D, seed=4, dtype=torch.float32, v_mean=1.0)
    assert v0.mean(dim=1).abs().mean() < 0.1 < v1.mean(dim=1).abs().mean()


def test_custom_locality_and_device_arg():
    q, k, _ = video_like_qkv(2, 4, 4, 2, 16, seed=0, locality=[0.0, 0.0], device="cpu")
    q2, k2, _ = video_like_qkv(2, 4, 4, 2, 16, seed=0, locality=[1.0, 1.0])
    assert not torch.equal(q, q2)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"frames": 0}, ValueError, "frames"),
        ({"heads": 1.5}, TypeError, "heads"),
        ({"head_dim": 7}, ValueError, "head_dim: expected an even"),
        ({"head_dim": 4}, ValueError, "head_dim"),
        ({"seed": -1}, ValueError, "seed"),
        ({"text_tokens": -1}, ValueError, "text_tokens"),
        ({"dtype": torch.float64}, TypeError, "dtype"),
        ({"locality": [0.5]}, ValueError, "locality"),
        ({"locality": [0.5, 2.0]}, ValueError, "locality"),
        ({"sinks": [100]}, ValueError, "sinks"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"frames": 2, "height": 3, "width": 4, "heads": 2, "head_dim": 16, "seed": 0}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        video_like_qkv(**args)
