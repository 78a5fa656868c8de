"""fgattn processors in diffusers' Wan, HunyuanVideo and CogVideoX transformers.

Tiny randomly initialised models built from their configs (nothing downloaded). On CPU the
sparse path runs fg.sparse_attention's float32 reference; the GPU tests (marked ``gpu``) run the
CuTe kernel in bf16.
"""

import functools
import types

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)

import fgattn_cute as fg  # noqa: E402
from fgattn_cute.integrations import diffusers as fgd  # noqa: E402

FAMILIES = ["wan", "hunyuan", "cogvideox"]
needs_predict = pytest.mark.skipif(  # fg.predict lands separately
    not hasattr(fg.predict, "SparsityCache"), reason="fg.predict has no SparsityCache yet")
N_LAYERS = {"wan": 2, "hunyuan": 2, "cogvideox": 2}


def _build(family, head_dim=64, seed=0):
    torch.manual_seed(seed)
    if family == "wan":
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
            in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2,
            rope_max_seq_len=64,
        )
    elif family == "hunyuan":
        rope = {64: (16, 24, 24), 128: (16, 56, 56)}[head_dim]
        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
            patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
            rope_axes_dim=rope, guidance_embeds=False,
        )
    else:
        model = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
            time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=12,
            sample_height=12, sample_frames=9, patch_size=2, max_text_seq_length=10,
            use_rotary_positional_embeddings=True,
        )
    return model.eval()


def _inputs(family, batch=1, frames=3, hw=12, n_text=10, head_dim=64, seed=1, device="cpu",
            dtype=torch.float32):
    """The model's forward kwargs and its number of video tokens."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    n_video = frames * (hw // 2) ** 2
    timestep = torch.full((batch,), 500, device=device)
    if family == "wan":
        kw = dict(hidden_states=rand(batch, 4, frames, hw, hw), timestep=timestep,
                  encoder_hidden_states=rand(batch, n_text, 32))
    elif family == "hunyuan":
        mask = torch.ones(batch, n_text, dtype=torch.int64)
        for b in range(batch):  # padded text: the last 3 + b tokens of each prompt
            mask[b, n_text - 3 - b:] = 0
        kw = dict(hidden_states=rand(batch, 4, frames, hw, hw), timestep=timestep,
                  encoder_hidden_states=rand(batch, n_text, 32),
                  encoder_attention_mask=mask.to(device), pooled_projections=rand(batch, 16))
    else:
        angles = torch.rand(n_video, head_dim // 2, generator=g).mul(6.0).repeat_interleave(2, -1)
        rotary = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
        kw = dict(hidden_states=rand(batch, frames, 4, hw, hw), timestep=timestep,
                  encoder_hidden_states=rand(batch, n_text, 32), image_rotary_emb=rotary)
    return kw, n_video


@torch.no_grad()
def _run(model, kw):
    return model(**kw, return_dict=False)[0]


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


class RecordingCache:
    """A SparsityCache-like object: records its calls; ``make(q, k)`` gives the index."""

    def __init__(self, make):
        self.make = make
        self.calls = []

    def get(self, layer_id, step, q, k):
        self.calls.append((layer_id, step, tuple(q.shape), tuple(k.shape)))
        return self.make(q, k)


def dense_predictor(q_tile):
    def predict(q, k):
        b, s, h, _ = q.shape
        return fg.KeyIndex.dense(b, h, s, k.shape[1], q_tile, q.device)
    return predict


def random_predictor(q_tile, keep, seed=0):
    """A random M x 1 index keeping about ``keep`` of the keys (every tile keeps key 0)."""
    g = torch.Generator().manual_seed(seed)

    def predict(q, k):
        b, s, h, _ = q.shape
        n_tiles = -(-s // q_tile)
        mask = torch.rand(b, h, n_tiles, k.shape[1], generator=g) < keep
        mask[..., 0] = True
        return fg.KeyIndex.from_mask(mask.to(q.device), q_tile, s)
    return predict


def seeded_predictor(q_tile, keep):
    """A random index that depends only on the shapes (the same on every call)."""
    def predict(q, k):
        b, s, h, _ = q.shape
        g = torch.Generator().manual_seed(s * 1000 + h)
        mask = torch.rand(b, h, -(-s // q_tile), k.shape[1], generator=g) < keep
        mask[..., 0] = True
        return fg.KeyIndex.from_mask(mask.to(q.device), q_tile, s)
    return predict


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("family", FAMILIES)
def test_installed_without_predictor_is_the_original_exactly(family):
    model = _build(family)
    kw, _ = _inputs(family)
    ref = _run(model, kw)
    handle = fgd.enable(model, backend="reference")
    assert handle.cache is None
    out = _run(model, kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    fgd.disable(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("q_tile", [32, 128])
def test_dense_index_matches_original(family, q_tile):
    model = _build(family)
    kw, n_video = _inputs(family)
    ref = _run(model, kw)
    cache = RecordingCache(dense_predictor(q_tile))
    fgd.enable(model, cache=cache, q_tile=q_tile, backend="reference")
    out = _run(model, kw)
    fgd.disable(model)
    assert _rel(out, ref) < 1e-3
    # every self-attention layer asked, with the video tokens only, [B, S_video, H, D]
    assert [c[0] for c in cache.calls] == list(range(N_LAYERS[family]))
    assert all(c[2] == (1, n_video, 2, 64) and c[3] == (1, n_video, 2, 64) for c in cache.calls)


def test_hunyuan_padded_text_per_batch_dense_index_matches_original():
    model = _build("hunyuan")
    kw, _ = _inputs("hunyuan", batch=2)  # prompts padded by 3 and 4 tokens
    ref = _run(model, kw)
    fgd.enable(model, predictor=dense_predictor(32), q_tile=32, backend="reference")
    out = _run(model, kw)
    fgd.disable(model)
    assert _rel(out, ref) < 1e-3
    # unmasking the padded keys on the sparse path would change the output: it is honoured
    kw_unpadded = dict(kw, encoder_attention_mask=torch.ones_like(kw["encoder_attention_mask"]))
    assert _rel(_run(model, kw_unpadded), ref) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_predictor_runs_and_is_close_when_most_keys_kept(family):
    model = _build(family)
    kw, _ = _inputs(family, batch=2)
    ref = _run(model, kw)
    fgd.enable(model, predictor=random_predictor(32, keep=0.95), q_tile=32, backend="reference")
    out_most = _run(model, kw)
    fgd.disable(model)
    fgd.enable(model, predictor=random_predictor(32, keep=0.3), q_tile=32, backend="reference")
    out_third = _run(model, kw)
    fgd.disable(model)
    assert torch.isfinite(out_most).all() and torch.isfinite(out_third).all()
    assert _rel(out_most, ref) < 0.05
    assert _rel(out_third, ref) > _rel(out_most, ref)  # the index is really used


@pytest.mark.parametrize("family", FAMILIES)
def test_enable_disable_round_trip(family):
    model = _build(family)
    kw, _ = _inputs(family)
    before = _processors(model)
    ref = _run(model, kw)
    pipe = types.SimpleNamespace(transformer=model)  # a pipeline-like object
    handle = fgd.enable(pipe, predictor=random_predictor(32, keep=0.5), q_tile=32,
                        backend="reference")
    assert handle.enabled and handle.transformer is model
    during = _processors(model)
    replaced = [n for n in before if during[n] is not before[n]]
    assert replaced == [name for name in handle.layer_names]
    assert all(isinstance(during[n], fgd._FGProcessor) for n in replaced)
    assert _rel(_run(model, kw), ref) > 1e-4
    with pytest.raises(ValueError, match="already enabled"):
        fgd.enable(model)
    fgd.disable(pipe)
    assert not handle.enabled
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    torch.testing.assert_close(_run(model, kw), ref, rtol=0, atol=0)
    fgd.disable(model)  # a no-op now
    # and again
    fgd.enable(model, predictor=dense_predictor(128), backend="reference")
    handle.disable()  # the old handle is stale: does nothing
    assert isinstance(model.blocks[0].attn1.processor if family == "wan"
                      else model.transformer_blocks[0].attn.processor if family == "hunyuan"
                      else model.transformer_blocks[0].attn1.processor, fgd._FGProcessor)
    fgd.disable(model)
    assert all(_processors(model)[n] is before[n] for n in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_of_the_transformer_matches_eager(family):
    """The sparse call is the custom op: torch.compile traces the model around it."""
    torch._dynamo.reset()
    model = _build(family)
    kw, _ = _inputs(family)
    cache = RecordingCache(seeded_predictor(32, keep=0.5))
    fgd.enable(model, cache=cache, q_tile=32, backend="reference")
    eager = _run(model, kw)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        out = compiled(**kw, return_dict=False)[0]
    fgd.disable(model)
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert len(cache.calls) == 2 * N_LAYERS[family]
    assert _rel(out, _run(model, kw)) > 1e-4  # and the sparse path was used


def test_wan_cross_attention_untouched():
    model = _build("wan")
    cross = [blk.attn2.processor for blk in model.blocks]
    handle = fgd.enable(model, predictor=dense_predictor(32), q_tile=32, backend="reference")
    assert handle.layer_names == ["blocks.0.attn1", "blocks.1.attn1"]
    assert [blk.attn2.processor for blk in model.blocks] == cross
    assert all(type(p).__name__ == "WanAttnProcessor" for p in cross)
    # a self-attention processor handed a cross-attention call defers to the original
    proc = model.blocks[0].attn1.processor
    attn2 = model.blocks[0].attn2
    x, ctx = torch.randn(1, 20, 128), torch.randn(1, 7, 128)
    with torch.no_grad():
        torch.testing.assert_close(proc(attn2, x, ctx), cross[0](attn2, x, ctx), rtol=0, atol=0)
    fgd.disable(model)


def test_layers_subset():
    model = _build("hunyuan")
    kw, _ = _inputs("hunyuan")
    cache = RecordingCache(dense_predictor(32))
    handle = fgd.enable(model, cache=cache, q_tile=32, layers=[1], backend="reference")
    assert handle.layer_names == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert type(model.transformer_blocks[0].attn.processor).__name__ == (
        "HunyuanVideoAttnProcessor2_0")
    assert isinstance(model.single_transformer_blocks[0].attn.processor, fgd._FGProcessor)
    _run(model, kw)
    assert [c[0] for c in cache.calls] == [1]
    fgd.disable(model)
    with pytest.raises(ValueError, match="layers"):
        fgd.enable(model, layers=[2])
    with pytest.raises(ValueError, match="layers"):
        fgd.enable(model, layers=["0"])
    with pytest.raises(TypeError, match="layers"):
        fgd.enable(model, layers=1)
    assert not hasattr(model, "_fgattn_handle")


def test_step_counter_and_pipeline_callback():
    model = _build("wan")
    kw, _ = _inputs("wan")
    cache = RecordingCache(lambda q, k: None)  # dense at every step
    handle = fgd.enable(model, cache=cache, backend="reference")
    pipe = types.SimpleNamespace(transformer=model, num_timesteps=3)
    seen = []
    for _ in range(2):  # two generations of 3 steps
        for i in range(3):
            _run(model, kw)
            seen.append(handle.step)
            assert handle.step_callback(pipe, i, 999 - i, {"latents": 1}) == {"latents": 1}
    assert seen == [0, 1, 2, 0, 1, 2]
    assert [c[1] for c in cache.calls] == [s for s in seen for _ in range(2)]
    handle.step = 7
    _run(model, kw)
    assert cache.calls[-1][1] == 7
    handle.reset()
    assert handle.step == 0
    fgd.disable(model)


@needs_predict
def test_predictor_is_wrapped_in_a_sparsity_cache():
    model = _build("wan")
    kw, _ = _inputs("wan")
    calls = []

    def predictor(q, k):
        calls.append(q.shape)
        return dense_predictor(128)(q, k)

    handle = fgd.enable(model, predictor=predictor, backend="reference")
    assert isinstance(handle.cache, fg.predict.SparsityCache)
    for step in range(3):
        handle.step = step
        _run(model, kw)
    fgd.disable(model)
    assert len(calls) == 2  # once per layer, reused at the later steps
    assert handle.cache.stats["reused"] == 4


@needs_predict
@pytest.mark.parametrize("family", FAMILIES)
def test_fg_predict_through_sparsity_cache(family):
    """The real predictors, scheduled by SparsityCache: dense first step, then predicted."""
    model = _build(family)
    kw, _ = _inputs(family, batch=2)
    ref = _run(model, kw)
    q_tile = 32
    densities = []

    def recorded(predictor):
        def predict(q, k):
            index = predictor(q, k)
            densities.append(float(index.density()))
            return index
        return predict

    cache = fg.predict.SparsityCache(
        recorded(functools.partial(fg.predict.pooled_top_p, q_tile=q_tile, p=0.95)),
        recalibrate_at={2}, dense_steps=1,
    )
    handle = fgd.enable(model, cache=cache, q_tile=q_tile, backend="reference")
    outs = []
    for step in range(4):
        handle.step = step
        outs.append(_run(model, kw))
    handle.reset()
    handle.disable()
    torch.testing.assert_close(outs[0], ref, rtol=0, atol=0)  # a dense step
    for out in outs[1:]:
        assert torch.isfinite(out).all() and _rel(out, ref) < 0.1
    stats = cache.stats
    assert stats["dense"] == N_LAYERS[family]
    assert stats["predictor_calls"] == 2 * N_LAYERS[family]  # step 1, and again at step 2
    assert stats["reused"] == N_LAYERS[family]  # step 3
    assert max(densities) < 0.97  # keys were dropped

    densities.clear()
    cache = fg.predict.SparsityCache(
        recorded(functools.partial(fg.predict.calibrate, q_tile=q_tile, threshold=1.5)))
    fgd.enable(model, cache=cache, q_tile=q_tile, backend="reference")
    out = _run(model, kw)
    fgd.disable(model)
    assert torch.isfinite(out).all() and _rel(out, ref) < 0.1
    assert len(densities) == N_LAYERS[family] and max(densities) < 1.0


def test_bad_indexes_and_arguments():
    model = _build("wan")
    kw, n_video = _inputs("wan")
    fgd.enable(model, predictor=dense_predictor(64), q_tile=128, backend="reference")
    with pytest.raises(ValueError, match="q_tile"):
        _run(model, kw)
    fgd.disable(model)
    wrong = RecordingCache(lambda q, k: fg.KeyIndex.dense(1, 2, n_video + 1, n_video, 128))
    fgd.enable(model, cache=wrong, backend="reference")
    with pytest.raises(ValueError, match="video tokens"):
        _run(model, kw)
    fgd.disable(model)
    fgd.enable(model, cache=RecordingCache(lambda q, k: "dense"), backend="reference")
    with pytest.raises(TypeError, match="KeyIndex"):
        _run(model, kw)
    fgd.disable(model)
    with pytest.raises(ValueError, match="backend"):
        fgd.enable(model, backend="fast")
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        fgd.enable(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cache"):
        fgd.enable(model, cache=object())
    assert not hasattr(model, "_fgattn_handle")


def test_non_default_processor_is_refused():
    model = _build("cogvideox")
    model.fuse_qkv_projections()  # FusedCogVideoXAttnProcessor2_0: other math
    with pytest.raises(TypeError, match="default processor"):
        fgd.enable(model)
    assert not hasattr(model, "_fgattn_handle")


def test_timer_and_dense_fn_hooks():
    model = _build("wan")
    kw, _ = _inputs("wan")
    ref = _run(model, kw)
    entered = []

    class Timer:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    def sdpa_bshd(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    handle = fgd.enable(model, backend="reference", dense_fn=sdpa_bshd)
    handle.timer = Timer
    out = _run(model, kw)
    fgd.disable(model)
    assert len(entered) == 2
    assert _rel(out, ref) < 1e-5


# ----------------------------------------------------------------------------- join_text_keys


def _expected_joint_mask(video_mask, n_text, text_valid, text_first):
    b, h, t, sv = video_mask.shape
    text = (torch.ones(b, n_text, dtype=torch.bool) if text_valid is None else text_valid)
    text = text.view(b, 1, 1, n_text).expand(b, h, t, n_text)
    parts = [text, video_mask] if text_first else [video_mask, text]
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n_text", [0, 1, 7, 130])
def test_join_text_keys(text_first, padded, n_text):
    g = torch.Generator().manual_seed(n_text)
    b, h, sv, m = 2, 3, 150, 32
    t = -(-sv // m)
    video_mask = torch.rand(b, h, t, sv, generator=g) < 0.4
    video_mask[0, 0, 0] = False  # an empty row
    video_mask[1, 2, 1] = True  # a full row
    index = fg.KeyIndex.from_mask(video_mask, m, sv, capacity=sv)
    text_valid = None
    if padded and n_text:
        text_valid = torch.rand(b, n_text, generator=g) < 0.6
        text_valid[0] = True  # a batch with no padding
    joint = fgd.join_text_keys(index, n_text, text_valid, text_first)
    assert joint.trusted and joint.seqlen_q == sv and joint.seqlen_k == sv + n_text
    assert joint.capacity % 128 == 0 and joint.capacity >= index.capacity + n_text
    fresh = fg.KeyIndex(joint.indices.clone(), joint.counts.clone(), m, sv, sv + n_text)
    fresh.validate()  # sorted, in range, counts within capacity
    expected = _expected_joint_mask(video_mask, n_text, text_valid, text_first)
    assert torch.equal(joint.to_mask(), expected)
    assert torch.equal(joint.counts, expected.sum(-1, dtype=torch.int32))
    slot = torch.arange(joint.capacity)
    assert (joint.indices[slot >= joint.counts.unsqueeze(-1)] == 0).all()  # padding is 0


# ----------------------------------------------------------------------------- GPU (Hopper)


def _gpu_model_and_inputs(family, head_dim):
    model = _build(family, head_dim=head_dim).to("cuda", torch.bfloat16)
    kw, n_video = _inputs(family, batch=2, frames=3, hw=32, n_text=24, head_dim=head_dim,
                          device="cuda", dtype=torch.bfloat16)
    return model, kw, n_video


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_dim,q_tile", [(64, 128), (128, 64)])
def test_gpu_dense_index_matches_original(family, head_dim, q_tile):
    model, kw, _ = _gpu_model_and_inputs(family, head_dim)
    ref = _run(model, kw)
    fgd.enable(model, predictor=dense_predictor(q_tile), q_tile=q_tile, backend="cute")
    out = _run(model, kw)
    fgd.disable(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel(out, ref) < 2e-2
    torch.testing.assert_close(_run(model, kw), ref, rtol=0, atol=0)  # restored


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_sparse_matches_reference_backend(family):
    model, kw, _ = _gpu_model_and_inputs(family, 64)
    fgd.enable(model, predictor=random_predictor(128, keep=0.3), backend="cute")
    out = _run(model, kw)
    fgd.disable(model)
    fgd.enable(model, predictor=random_predictor(128, keep=0.3), backend="reference")
    ref = _run(model, kw)  # same random indexes (same seed, same call order)
    fgd.disable(model)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_sparse_close_when_most_keys_kept(family):
    model, kw, _ = _gpu_model_and_inputs(family, 64)
    ref = _run(model, kw)
    fgd.enable(model, predictor=random_predictor(128, keep=0.95), backend="auto")
    out = _run(model, kw)
    fgd.disable(model)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 0.06
