"""The sm90 kernel against the float32 reference, on a Hopper GPU (marked `gpu`).

Every shipped configuration (head dim, dtype, q_tile, gather engine) on random key lists and on
structured ones: dense tiles (loaded as contiguous TMA boxes), empty tiles, one key, runs of
consecutive keys, densities from 1% to 100%, a partial last query tile and key stage. Outputs
are poisoned with NaN before each run so that an unwritten element fails, and every run is
repeated to check that the result is bitwise reproducible.
"""

import math
import zlib

import pytest
import torch

import fgattn_cute as fg
from fgattn_cute.host.compile import KernelConfig, all_configs
from fgattn_cute.host.launch import run_fwd_sm90

pytestmark = pytest.mark.gpu

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIGS = all_configs() + [
    # One CTA per query tile (shipped only for the TMA-row engine at hdim 128), and more
    # stages than shipped.
    KernelConfig(128, "bfloat16", 128, "cpasync", 128, 3),
    KernelConfig(64, "bfloat16", 128, "cpasync", 128, 4),
    KernelConfig(128, "float16", 64, "hybrid", 128, 2),
    # Persistent CTAs, so few that each works through several query tiles (empty, dense,
    # one-key and partial ones among them): O in its own buffer, and O over Q (3 stages at
    # hdim 128); one CTA for every tile. The shipped configurations launch one CTA per SM,
    # more than this test's tiles, so these are what run the hand-over between tiles.
    KernelConfig(128, "bfloat16", 128, "cpasync", 128, 2, max_ctas=3),
    KernelConfig(128, "float16", 128, "cpasync", 128, 3, max_ctas=4),
    KernelConfig(128, "bfloat16", 64, "tma", 128, 2, max_ctas=2),
    KernelConfig(128, "bfloat16", 128, "hybrid", 128, 2, max_ctas=3),
    KernelConfig(128, "float16", 64, "cpasync", 128, 2, max_ctas=2),
    KernelConfig(64, "bfloat16", 128, "hybrid", 128, 3, max_ctas=5),
    KernelConfig(64, "float16", 64, "cpasync", 128, 3, max_ctas=1),
]


def _structured_mask(B, H, T, Sk, gen, device):
    """Per-tile densities from 1% to 100%, runs of consecutive keys, and fixed special tiles."""
    density = torch.tensor([0.01, 0.05, 0.2, 0.5, 0.9, 1.0], device=device)
    pick = torch.randint(0, len(density), (B, H, T, 1), generator=gen, device=device)
    mask = torch.rand(B, H, T, Sk, generator=gen, device=device) < density[pick]
    starts = torch.randint(0, Sk, (B, H, T, 1), generator=gen, device=device)
    lengths = torch.randint(100, 400, (B, H, T, 1), generator=gen, device=device)
    keys = torch.arange(Sk, device=device)
    runs = (keys >= starts) & (keys < starts + lengths)
    use_runs = torch.rand(B, H, T, 1, generator=gen, device=device) < 0.3
    mask = torch.where(use_runs, runs, mask)
    mask[0, 0, 0] = False  # empty tile
    if T > 1:
        mask[0, 0, 1] = True  # dense tile
    if T > 2:
        mask[0, 0, 2] = False
        mask[0, 0, 2, Sk // 2] = True  # one key
    return mask


def _check(q, k, v, index, config, label):
    scale = q.shape[-1] ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:1] + q.shape[2:3] + q.shape[1:2], float("nan"), device=q.device)
    run_fwd_sm90(q, k, v, index.indices, index.counts, index.q_tile, scale, config=config,
                 out=out, lse=lse)
    again = torch.full_like(q, float("nan"))
    run_fwd_sm90(q, k, v, index.indices, index.counts, index.q_tile, scale, config=config,
                 out=again, lse=torch.empty_like(lse))
    torch.cuda.synchronize()
    ref_out, ref_lse = fg.reference.sparse_attention(q, k, v, index, scale, return_lse=True)
    assert not torch.isnan(out).any(), f"{label}: unwritten output elements"
    assert not torch.isnan(lse).any(), f"{label}: unwritten LSE elements"
    err = ((out.float() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)).item()
    assert err < 1e-2, f"{label}: relative error {err:.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), f"{label}: -inf LSE rows differ"
    assert (lse[~finite] == -math.inf).all(), f"{label}: empty tiles must give LSE -inf"
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    assert lse_err < 1e-3, f"{label}: LSE error {lse_err:.3e}"
    empty = (index.counts == 0).repeat_interleave(index.q_tile, dim=2)[..., : q.shape[1]]
    assert (out.transpose(1, 2)[empty] == 0).all(), f"{label}: empty tiles must give O = 0"
    assert torch.equal(out, again), f"{label}: two runs differ"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, vars(c).values())))
def test_against_reference(config):
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(repr(config).encode()))
    dtype = DTYPES[config.dtype]
    # seqlens that are not multiples of the tiles; seqlen_q != seqlen_k; B=2, H=3
    for B, H, Sq, Sk in ((2, 3, 333, 517), (1, 2, 128 * 3, 1000), (1, 1, 77, 45)):
        T = math.ceil(Sq / config.q_tile)
        q, k, v = (torch.randn(B, S, H, config.head_dim, generator=gen, device=device,
                               dtype=dtype) for S in (Sq, Sk, Sk))
        mask = _structured_mask(B, H, T, Sk, gen, device)
        index = fg.KeyIndex.from_mask(mask, q_tile=config.q_tile, seqlen_q=Sq)
        _check(q, k, v, index, config, f"structured B={B} H={H} Sq={Sq} Sk={Sk}")
        dense = fg.KeyIndex.dense(B, H, Sq, Sk, config.q_tile, device)
        _check(q, k, v, dense, config, f"dense B={B} H={H} Sq={Sq} Sk={Sk}")


@pytest.mark.parametrize("engine", ["cpasync", "tma", "hybrid"])
def test_public_api_and_strided_inputs(engine):
    """fg.sparse_attention on q/k/v that are views of one fused qkv tensor (strided)."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    B, S, H, D = 2, 700, 4, 128
    qkv = torch.randn(B, S, 3, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    T = math.ceil(S / 128)
    mask = torch.rand(B, H, T, S, generator=gen, device="cuda") < 0.25
    index = fg.KeyIndex.from_mask(mask, q_tile=128, seqlen_q=S)
    out, lse = fg.sparse_attention(q, k, v, index, return_lse=True, engine=engine)
    ref, ref_lse = fg.reference.sparse_attention(q, k, v, index, return_lse=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert (lse - ref_lse).abs().max().item() < 1e-3


def test_user_lists_with_garbage_padding():
    """from_indices lists: padding slots past each count hold anything; they never matter."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, S, H, D = 1, 500, 2, 64
    q, k, v = (torch.randn(B, S, H, D, generator=gen, device="cuda", dtype=torch.float16)
               for _ in range(3))
    T, cap = math.ceil(S / 128), 512
    counts = torch.randint(0, S + 1, (B, H, T), generator=gen, device="cuda").int()
    keys = torch.rand(B, H, T, S, generator=gen, device="cuda").argsort(-1)
    slot = torch.arange(cap, device="cuda")
    chosen = torch.where(slot[:S] < counts[..., None], keys, S + keys).sort(-1).values
    indices = torch.randint(-10**6, 10**6, (B, H, T, cap), generator=gen, device="cuda").int()
    indices[..., :S] = torch.where(chosen < S, chosen, indices[..., :S]).int()
    index = fg.KeyIndex.from_indices(indices, counts, 128, S, S)
    for engine in ("cpasync", "tma", "hybrid"):
        out = fg.sparse_attention(q, k, v, index, engine=engine)
        ref = fg.reference.sparse_attention(q, k, v, index)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, engine


@pytest.mark.parametrize("head_dim", [128, 64])
def test_current_stream_and_no_host_sync(head_dim):
    """The launch runs on torch's current stream and can be captured in a CUDA graph. The
    CTAs are persistent: 256 query tiles for at most one CTA per SM, so CTAs take further
    tiles from the counter, which each replay must zero again (the output is poisoned between
    replays)."""
    from fgattn_cute.host.launch import config_for

    gen = torch.Generator(device="cuda").manual_seed(5)
    B, S, H, D = 1, 4096, 8, head_dim
    q, k, v = (torch.randn(B, S, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    assert 0 < config_for(q, 128).max_ctas < B * H * (S // 128)
    mask = torch.rand(B, H, S // 128, S, generator=gen, device="cuda") < 0.3
    index = fg.KeyIndex.from_mask(mask, q_tile=128, seqlen_q=S)
    expected = fg.sparse_attention(q, k, v, index)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fg.sparse_attention(q, k, v, index)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fg.sparse_attention(q, k, v, index)
    for _ in range(2):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)
