"""Run the self-attention of diffusers video transformers through ``fg.sparse_attention``.

    from fgattn_cute.integrations import diffusers as fgd

    handle = fgd.enable(pipe, predictor=my_predictor)      # or cache=..., or neither (dense)
    video = pipe(prompt, callback_on_step_end=handle.step_callback).frames[0]
    fgd.disable(pipe)                                       # the exact original processors again

Supported (diffusers 0.42): ``WanTransformer3DModel`` (every block's ``attn1``),
``HunyuanVideoTransformer3DModel`` (the dual-stream ``transformer_blocks[i].attn`` and the
single-stream ``single_transformer_blocks[i].attn``; the text-only token refiner is untouched) and
``CogVideoXTransformer3DModel`` (every block's ``attn1``). Each installed processor reproduces the
model's default processor (``WanAttnProcessor``, ``HunyuanVideoAttnProcessor2_0``,
``CogVideoXAttnProcessor2_0``) step by step: projections, QK norms, rotary embeddings, the joint
text + video sequence, output projections. Only the attention call differs.

Layers and the sparsity source
------------------------------
The processed layers are numbered 0, 1, ... in model order (HunyuanVideo: the dual-stream blocks,
then the single-stream ones); ``handle.layer_names[i]`` names them. For every call a processor
asks ``cache.get(layer_id, step, q, k)`` for a ``KeyIndex``; ``None`` means "run this call dense"
(the model's own attention call, unchanged). ``q`` and ``k`` are the VIDEO tokens' queries and
keys, [B, S_video, H, D] (after norms and rotary embedding), and the index must cover them:
batch B, heads H, ``seqlen_q = seqlen_k = S_video``, ``q_tile`` equal to ``enable(q_tile=...)``.
``enable(predictor=f)`` without a cache wraps ``f(q, k) -> KeyIndex`` in
``fg.predict.SparsityCache(predictor=f)`` with its defaults (each layer predicted at its first
call of a generation and reused for every later step); pass your own ``cache`` for another
schedule, e.g. ``fg.predict.SparsityCache(f, recalibrate_at={10, 25}, dense_steps=5)``. Neither:
every call runs dense (the processors are installed, ready for a cache: ``handle.cache = ...``).

A predictor for the video tokens, e.g.
``functools.partial(fg.predict.pooled_top_p, q_tile=128, p=0.9, capacity=...)``, needs no
``always_keep`` for the text: the processors add the text keys themselves (below).

Joint attention (HunyuanVideo: [video | text]; CogVideoX: [text | video])
----------------------------------------------------------------------------
Text tokens are never dropped and text queries never lose keys:

- video queries run through ``fg.sparse_attention`` over ALL keys (video + text) with the
  predicted video-key lists, to which every (valid) text key is added (``join_text_keys``): the
  text keys are ``always_keep``; the predictor only decides among video keys;
- text queries (a few hundred rows) run dense, with the model's own attention call and mask, and
  are concatenated back in place. So no query tile straddles the text / video boundary, and the
  text rows are exact.

The join writes new lists of capacity round_up(index capacity + n_text, 128) on every sparse
call (sync-free tensor ops, about one pass over the lists, like ``SparsityCache``'s unpack); Wan
has no text in its self-attention and uses the cache's index as it is.

HunyuanVideo passes a key-padding mask (bool [B, 1, 1, N], False on padded text tokens): padded
text keys are left out of the joined lists, as the mask drops them in the dense model. The video
part of that mask is assumed all True (it is in diffusers' HunyuanVideo, which pads only the
text); other mask shapes raise a ValueError on the sparse path. CogVideoX with an
``attention_mask`` (not passed by its blocks) and Wan's cross-attention (``attn2``, text and image
keys) always run the original processor.

The denoising step counter
--------------------------
``handle.step`` (starts at 0) is what the cache sees as ``step``. Either pass
``callback_on_step_end=handle.step_callback`` to the pipeline (it sets ``step = i + 1`` after step
``i`` and back to 0 after the pipeline's last step), or set ``handle.step = i`` yourself before
each step when you call the transformer directly; ``handle.reset()`` sets it to 0 (call it before
a new generation when the previous one stopped early, e.g. an interrupted pipeline). Classifier-free
guidance that calls the transformer twice per step (Wan, HunyuanVideo) calls the cache twice with
the same step; CogVideoX batches both into one call (B = 2).

Not supported on the sparse path: context parallelism (a processor with a ``_parallel_config``)
and autograd through the CuTe kernel (forward only).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoTransformer3DModel,
)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel

from ..host.key_index import CAPACITY_ALIGN, KeyIndex
from ..interface import BACKENDS
from .torch_op import sparse_attention_op

__all__ = [
    "FGAttentionHandle",
    "FGCogVideoXAttnProcessor",
    "FGHunyuanVideoAttnProcessor",
    "FGWanAttnProcessor",
    "disable",
    "enable",
    "join_text_keys",
]

_HANDLE_ATTR = "_fgattn_handle"


# --------------------------------------------------------------------------- index helpers


def _text_list(text_valid, n_text, batch, device):
    """(sorted valid text positions int32 [B, n_text] packed left, counts int32 [B]). No sync."""
    if text_valid is None:
        pos = torch.arange(n_text, dtype=torch.int32, device=device).expand(batch, n_text)
        return pos, torch.full((batch,), n_text, dtype=torch.int32, device=device)
    slot = torch.cumsum(text_valid, dim=1, dtype=torch.int32) - 1
    target = torch.where(text_valid, slot, n_text).long()
    pos = torch.arange(n_text, dtype=torch.int32, device=device).expand(batch, n_text)
    buf = torch.zeros(batch, n_text + 1, dtype=torch.int32, device=device)
    buf.scatter_(1, target, pos)
    return buf[:, :n_text], text_valid.sum(dim=1, dtype=torch.int32)


def join_text_keys(index, n_text, text_valid=None, text_first=False):
    """Extend a video ``KeyIndex`` (seqlen_q = seqlen_k = S_video) to a joint key sequence of
    S_video + n_text keys in which every valid text key is kept by every query tile.

    ``text_first=False``: keys are [video | text] (HunyuanVideo), text key t is S_video + t.
    ``text_first=True``: keys are [text | video] (CogVideoX), video key j becomes n_text + j.
    ``text_valid``: None (every text key valid) or bool [B, n_text] (False: a padded text key,
    left out). Returns a trusted ``KeyIndex`` (seqlen_q = S_video, seqlen_k = S_video + n_text,
    the same q_tile), capacity round_up(index.capacity + n_text, 128). Tensor ops only, no host
    synchronisation; ``index`` must hold valid lists (trusted, or validated before).
    """
    if n_text == 0:
        return index
    b, h, t, cap_v = index.indices.shape
    s_video = index.seqlen_k
    device = index.device
    cap = -(-(cap_v + n_text) // CAPACITY_ALIGN) * CAPACITY_ALIGN
    counts_v = index.counts
    text_pos, text_count = _text_list(text_valid, n_text, b, device)  # [B, n_text], [B]
    out = torch.zeros(b, h, t, cap, dtype=torch.int32, device=device)
    slot_v = torch.arange(cap_v, dtype=torch.int32, device=device)
    slot_t = torch.arange(n_text, dtype=torch.int32, device=device)
    keep_v = slot_v < counts_v.unsqueeze(-1)  # [B, H, T, cap_v]
    drop_v = ~keep_v
    if not text_first:
        video = out[..., :cap_v]
        video.copy_(index.indices)
        video.masked_fill_(drop_v, 0)
        # text key j of batch b goes to slot counts_v + j; padded ones are dumped into the last
        # slot, as 0. When any is dumped (j >= text_count), the row holds at most
        # cap_v + n_text - 1 < cap keys, so the last slot is padding.
        keep_t = (slot_t < text_count.view(b, 1)).view(b, 1, 1, n_text)
        target = torch.where(keep_t, counts_v.unsqueeze(-1) + slot_t, cap - 1).long()
        values = torch.where(keep_t, (text_pos + s_video).view(b, 1, 1, n_text), 0)
        out.scatter_(3, target, values.expand(b, h, t, n_text).contiguous())
    elif text_valid is None:
        out[..., :n_text] = slot_t
        video = out[..., n_text:n_text + cap_v]
        video.copy_(index.indices)
        video.add_(n_text)
        video.masked_fill_(drop_v, 0)
    else:
        text = torch.where(slot_t < text_count.view(b, 1), text_pos, 0)
        out[..., :n_text] = text.view(b, 1, 1, n_text)
        # video entry s goes to slot text_count + s; the padding ones to the last slot, as 0 (a
        # row with padding holds at most n_text + cap_v - 1 < cap keys).
        target = torch.where(keep_v, text_count.view(b, 1, 1, 1) + slot_v, cap - 1).long()
        values = (index.indices + n_text).masked_fill_(drop_v, 0)
        out.scatter_(3, target, values)
    counts = counts_v + text_count.view(b, 1, 1)
    return KeyIndex._trusted_new(out, counts, index.q_tile, index.seqlen_q, s_video + n_text)


def _text_key_padding(attention_mask, batch, n_total, n_video):
    """bool [B, n_text] (True: a valid text key) from a key-padding mask, or None."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dtype != torch.bool or not (
        (m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1) or m.dim() == 2
    ) or m.shape[0] != batch or m.shape[-1] != n_total:
        raise ValueError(
            f"attention_mask: the sparse path takes a bool key-padding mask [B, 1, 1, N] or "
            f"[B, N] with B={batch}, N={n_total}, got {m.dtype} {tuple(m.shape)}"
        )
    return m.reshape(batch, n_total)[:, n_video:]


# --------------------------------------------------------------------------- the handle


class _EveryCall:
    """The cache used when ``fg.predict.SparsityCache`` is not available: predicts every call."""

    def __init__(self, predictor):
        self.predictor = predictor

    def get(self, layer_id, step, q, k):
        return self.predictor(q, k)


def _default_cache(predictor):
    from .. import predict

    cache_cls = getattr(predict, "SparsityCache", None)
    return _EveryCall(predictor) if cache_cls is None else cache_cls(predictor=predictor)


class FGAttentionHandle:
    """What ``enable`` returns: the installed processors and their shared state.

    Attributes you may read or set: ``step`` (the denoising step the cache sees), ``cache`` (the
    sparsity source; None: dense), ``backend``, ``q_tile``, ``timer`` (None, or a callable giving
    a context manager entered around every self-attention computation: for benchmarks),
    ``dense_fn`` (None, or ``f(q, k, v) -> out`` in [B, S, H, D], used instead of the model's
    attention call where a call runs dense without a mask: for benchmarks). Read-only:
    ``layer_names`` (layer id -> module name), ``transformer``.
    """

    def __init__(self, transformer, cache, q_tile, backend, dense_fn):
        self.transformer = transformer
        self.cache = cache
        self.q_tile = q_tile
        self.backend = backend
        self.dense_fn = dense_fn
        self.timer = None
        self.step = 0
        self.layer_names = []
        self._originals = []  # (attention module, its original processor)

    @property
    def enabled(self):
        return getattr(self.transformer, _HANDLE_ATTR, None) is self

    def reset(self):
        """Back to step 0 (a new generation)."""
        self.step = 0

    def step_callback(self, pipe, i, t, callback_kwargs):
        """A pipeline ``callback_on_step_end``: after step ``i`` the next is ``i + 1``; after the
        last (``pipe.num_timesteps``) back to 0. Returns ``callback_kwargs`` unchanged."""
        self.step = i + 1
        total = getattr(pipe, "num_timesteps", None)
        if isinstance(total, int) and self.step >= total:
            self.step = 0
        return callback_kwargs

    def disable(self):
        """Restore the original processors (the same objects)."""
        if not self.enabled:
            return
        for module, original in self._originals:
            module.set_processor(original)
        delattr(self.transformer, _HANDLE_ATTR)

    def _timed(self):
        return self.timer() if self.timer is not None else contextlib.nullcontext()

    def _index(self, layer_id, q, k):
        if self.cache is None:
            return None
        index = self.cache.get(layer_id, self.step, q, k)
        if index is None:
            return None
        if not isinstance(index, KeyIndex):
            raise TypeError(
                f"cache.get(layer {layer_id}): expected a fgattn_cute.KeyIndex or None, got "
                f"{type(index).__name__}"
            )
        b, s, h, _ = q.shape
        if (index.batch, index.heads, index.seqlen_q, index.seqlen_k) != (b, h, s, k.shape[1]):
            raise ValueError(
                f"cache.get(layer {layer_id}): expected an index for the video tokens, batch "
                f"{b}, heads {h}, seqlen_q = seqlen_k = {s}; got {index!r}"
            )
        if index.q_tile != self.q_tile:
            raise ValueError(
                f"cache.get(layer {layer_id}): expected q_tile {self.q_tile} (enable's q_tile), "
                f"got an index with q_tile {index.q_tile}"
            )
        return index.validate()  # a no-op for builder-made (trusted) indexes


class _FGProcessor:
    """Shared state of the installed processors."""

    def __init__(self, handle, layer_id, original):
        self._handle = handle
        self.layer_id = layer_id
        self.original = original
        # diffusers' set_attention_backend sets these on whichever processor is installed.
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _video_index(self, q_video, k_video):
        index = self._handle._index(self.layer_id, q_video, k_video)
        if index is not None and self._parallel_config is not None:
            raise RuntimeError(
                "fgattn: the sparse path does not support context parallelism "
                "(the processor has a _parallel_config)"
            )
        return index

    def _sparse(self, q, k, v, index):
        # through the custom op, so that torch.compile keeps the transformer in one graph
        # around it (the cache and predictor, plain Python, may still break the graph)
        return sparse_attention_op(q, k, v, index, backend=self._handle.backend)


# --------------------------------------------------------------------------- Wan


def _wan_rotary(x, freqs_cos, freqs_sin):
    """Wan's rotary embedding on [B, S, H, D]: interleaved pairs (x[2i], x[2i+1]) rotated by
    the angle whose cos is freqs_cos[..., 2i] and sin freqs_sin[..., 2i+1]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class FGWanAttnProcessor(_FGProcessor):
    """Wan self-attention (``attn1``) with fg.sparse_attention; anything else (cross-attention,
    image keys, a mask) goes to the original ``WanAttnProcessor``."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        rotary_emb=None,
    ):
        if (
            encoder_hidden_states is not None
            or attention_mask is not None
            or attn.add_k_proj is not None
            or attn.is_cross_attention
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 rotary_emb)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)

        index = self._video_index(query, key)
        with self._handle._timed():
            if index is not None:
                hidden_states = self._sparse(query, key, value, index)
            elif self._handle.dense_fn is not None:
                hidden_states = self._handle.dense_fn(query, key, value)
            else:
                hidden_states = dispatch_attention_fn(
                    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    backend=self._attention_backend, parallel_config=self._parallel_config,
                )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


# --------------------------------------------------------------------------- HunyuanVideo


class FGHunyuanVideoAttnProcessor(_FGProcessor):
    """HunyuanVideo joint attention ([video | text]) with fg.sparse_attention for the video
    queries; text queries dense (see the module docstring)."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        joint_in = attn.add_q_proj is None and encoder_hidden_states is not None
        if joint_in:  # single-stream block: text rides along in the same projections
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        n_video = hidden_states.shape[1] - (encoder_hidden_states.shape[1] if joint_in else 0)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # on the video tokens only
            if joint_in:
                query = torch.cat([
                    apply_rotary_emb(query[:, :n_video], image_rotary_emb, sequence_dim=1),
                    query[:, n_video:],
                ], dim=1)
                key = torch.cat([
                    apply_rotary_emb(key[:, :n_video], image_rotary_emb, sequence_dim=1),
                    key[:, n_video:],
                ], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            enc_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                enc_query = attn.norm_added_q(enc_query)
            if attn.norm_added_k is not None:
                enc_key = attn.norm_added_k(enc_key)
            query = torch.cat([query, enc_query], dim=1)
            key = torch.cat([key, enc_key], dim=1)
            value = torch.cat([value, enc_value], dim=1)

        hidden_states = self._attention(query, key, value, attention_mask, n_video)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1]:],
            )
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def _dense(self, query, key, value, attention_mask):
        if attention_mask is None and self._handle.dense_fn is not None:
            return self._handle.dense_fn(query, key, value)
        return dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )

    def _attention(self, query, key, value, attention_mask, n_video):
        b, n_total = query.shape[:2]
        n_text = n_total - n_video
        index = self._video_index(query[:, :n_video], key[:, :n_video])
        with self._handle._timed():
            if index is None:
                return self._dense(query, key, value, attention_mask)
            text_valid = _text_key_padding(attention_mask, b, n_total, n_video)
            joint = join_text_keys(index, n_text, text_valid, text_first=False)
            out = self._sparse(query[:, :n_video], key, value, joint)
            if n_text == 0:
                return out
            text_rows = self._dense(query[:, n_video:], key, value, attention_mask)
            return torch.cat([out, text_rows.to(out.dtype)], dim=1)


# --------------------------------------------------------------------------- CogVideoX


class FGCogVideoXAttnProcessor(_FGProcessor):
    """CogVideoX joint attention ([text | video]) with fg.sparse_attention for the video
    queries; text queries dense. With an ``attention_mask`` it runs the original processor."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 image_rotary_emb)
        n_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # [B, H, N, D], as the original
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, n_text:] = apply_rotary_emb(query[:, :, n_text:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, n_text:] = apply_rotary_emb(key[:, :, n_text:], image_rotary_emb)

        hidden_states = self._attention(query, key, value, n_text)  # [B, N, H, D]
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [n_text, hidden_states.size(1) - n_text], dim=1
        )
        return hidden_states, encoder_hidden_states

    def _dense(self, query, key, value):
        """[B, H, S, D] in, [B, S, H, D] out."""
        if self._handle.dense_fn is not None:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            return self._handle.dense_fn(q, k, v)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2)

    def _attention(self, query, key, value, n_text):
        q_video = query[:, :, n_text:].transpose(1, 2)  # [B, S_video, H, D] views
        k_all, v_all = key.transpose(1, 2), value.transpose(1, 2)
        index = self._video_index(q_video, k_all[:, n_text:])
        with self._handle._timed():
            if index is None:
                return self._dense(query, key, value)
            joint = join_text_keys(index, n_text, None, text_first=True)
            out = self._sparse(q_video, k_all, v_all, joint)
            if n_text == 0:
                return out
            text_rows = self._dense(query[:, :, :n_text], key, value)
            return torch.cat([text_rows.to(out.dtype), out], dim=1)


# --------------------------------------------------------------------------- enable / disable


def _transformer_of(pipe_or_transformer):
    model = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(model, torch.nn.Module):
        return model
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer
    raise TypeError(
        f"pipe_or_transformer: expected a diffusers pipeline with .transformer or a "
        f"transformer model, got {type(pipe_or_transformer).__name__}"
    )


def _self_attention_modules(transformer):
    """[(name, attention module, expected original processor class, our processor class)]."""
    if isinstance(transformer, WanTransformer3DModel):
        return [(f"blocks.{i}.attn1", blk.attn1, WanAttnProcessor, FGWanAttnProcessor)
                for i, blk in enumerate(transformer.blocks)]
    if isinstance(transformer, HunyuanVideoTransformer3DModel):
        hv = (HunyuanVideoAttnProcessor2_0, FGHunyuanVideoAttnProcessor)
        out = [(f"transformer_blocks.{i}.attn", blk.attn, *hv)
               for i, blk in enumerate(transformer.transformer_blocks)]
        out += [(f"single_transformer_blocks.{i}.attn", blk.attn, *hv)
                for i, blk in enumerate(transformer.single_transformer_blocks)]
        return out
    if isinstance(transformer, CogVideoXTransformer3DModel):
        return [(f"transformer_blocks.{i}.attn1", blk.attn1, CogVideoXAttnProcessor2_0,
                 FGCogVideoXAttnProcessor) for i, blk in enumerate(transformer.transformer_blocks)]
    raise TypeError(
        f"pipe_or_transformer: expected a WanTransformer3DModel, HunyuanVideoTransformer3DModel "
        f"or CogVideoXTransformer3DModel (or a pipeline holding one), got "
        f"{type(transformer).__name__}"
    )


def enable(pipe_or_transformer, predictor=None, cache=None, q_tile=128, backend="auto",
           layers=None, *, dense_fn=None):
    """Install fgattn self-attention processors; returns a ``FGAttentionHandle``.

    Args:
        pipe_or_transformer: a diffusers pipeline (its ``.transformer`` is used; Wan 2.2's
            ``transformer_2`` is not touched) or a supported transformer model.
        predictor: ``f(q, k) -> KeyIndex`` on the video tokens ([B, S_video, H, D]); wrapped
            in ``fg.predict.SparsityCache(predictor=f)``. Give a predictor or a cache, not both.
        cache: an object with ``get(layer_id, step, q, k) -> KeyIndex | None`` (None: dense).
            With neither ``predictor`` nor ``cache`` every call runs dense.
        q_tile: the query tile of the indexes the cache returns (checked on every call).
        backend: passed to ``fg.sparse_attention`` ("auto", "cute", "reference").
        layers: None (every self-attention layer) or an iterable of layer ids to install on; the
            others keep their original processors.
        dense_fn: optional ``f(q, k, v) -> out`` ([B, S, H, D]) for the unmasked dense calls.

    Raises TypeError for an unsupported model or an attention layer whose processor is not the
    model's default one (e.g. fused CogVideoX projections: its math would differ), ValueError for
    bad arguments or when fgattn is already enabled on this transformer.
    """
    transformer = _transformer_of(pipe_or_transformer)
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise ValueError("pipe_or_transformer: fgattn is already enabled on it; disable() first")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if isinstance(q_tile, bool) or not isinstance(q_tile, int) or q_tile < 1:
        raise ValueError(f"q_tile: expected a positive int, got {q_tile!r}")
    if predictor is not None and not callable(predictor):
        raise TypeError(f"predictor: expected a callable (q, k) -> KeyIndex, got "
                        f"{type(predictor).__name__}")
    if cache is not None and not callable(getattr(cache, "get", None)):
        raise TypeError(f"cache: expected an object with get(layer_id, step, q, k), got "
                        f"{type(cache).__name__}")
    if cache is not None and predictor is not None:
        raise ValueError("predictor, cache: pass one of them (a cache holds its own predictor)")
    if cache is None and predictor is not None:
        cache = _default_cache(predictor)

    found = _self_attention_modules(transformer)
    if layers is not None and not hasattr(layers, "__iter__"):
        raise TypeError(f"layers: expected None or an iterable of layer ids, got "
                        f"{type(layers).__name__}")
    chosen = range(len(found)) if layers is None else list(dict.fromkeys(layers))
    for layer_id in chosen:
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not (
            0 <= layer_id < len(found)
        ):
            raise ValueError(f"layers: expected layer ids in [0, {len(found)}), got {layer_id!r}")
    chosen = sorted(chosen)
    for layer_id in chosen:
        name, module, expected, _ = found[layer_id]
        if type(module.processor) is not expected:
            raise TypeError(
                f"{name}: expected its default processor {expected.__name__}, found "
                f"{type(module.processor).__name__}; fgattn reproduces only the default one"
            )
        if getattr(module.processor, "_parallel_config", None) is not None:
            raise ValueError(f"{name}: context parallelism is not supported by fgattn")

    handle = FGAttentionHandle(transformer, cache, q_tile, backend, dense_fn)
    handle.layer_names = [name for name, *_ in found]
    for layer_id in chosen:
        _, module, _, proc_cls = found[layer_id]
        original = module.processor
        handle._originals.append((module, original))
        module.set_processor(proc_cls(handle, layer_id, original))
    setattr(transformer, _HANDLE_ATTR, handle)
    return handle


def disable(pipe_or_transformer):
    """Restore the original processors (the very objects ``enable`` found). A no-op when fgattn
    is not enabled."""
    transformer = _transformer_of(pipe_or_transformer)
    handle = getattr(transformer, _HANDLE_ATTR, None)
    if handle is not None:
        handle.disable()
