"""Training-free predictors of the kept keys, each returning a ``KeyIndex``, and a cache that
reuses their result across denoising steps.

- ``calibrate(q, k, q_tile=128, threshold=0.5, ...)``: exact. Tile t keeps key j when the
  largest softmax probability any of its queries gives j is >= threshold / seqlen_k. About two
  float32 Q K^T passes: run it at a few steps and reuse the index.
- ``pooled_top_p(q, k, q_tile=128, p=0.9, ...)``: cheap. Tile t scores its mean query against
  every key and keeps the smallest set of keys holding mass p (sort-free selection).
- ``SparsityCache(predictor, recalibrate_at, dense_steps, compact=True, max_bytes=None)``:
  per-layer reuse across denoising steps.

Both predictors take ``always_keep`` (key ids or a bool [seqlen_k] mask every tile keeps, e.g.
text tokens) and ``capacity`` (of the returned lists). Building blocks, exposed so that faster
implementations can replace them: ``query_lse``, ``tile_keep_mask``, ``tile_column_max_probs``
(calibrate's two passes; ``calibrate(..., lse_fn=, mask_fn=)``, e.g. ``lse_fn=kernel_lse``),
``tile_means``, ``pooled_probs``, ``top_p_mask`` / ``top_p_select`` (pooled_top_p's;
``pooled_top_p(..., select_fn=)``, e.g. ``compiled_top_p_select()``, the latter compiled).
"""

from .cache import SparsityCache, SparsityCacheFull
from .exact import calibrate, kernel_lse, query_lse, tile_column_max_probs, tile_keep_mask
from .pooled import (
    compiled_top_p_select,
    pooled_probs,
    pooled_top_p,
    tile_means,
    top_p_mask,
    top_p_select,
)

__all__ = [
    "SparsityCache",
    "SparsityCacheFull",
    "calibrate",
    "compiled_top_p_select",
    "kernel_lse",
    "pooled_probs",
    "pooled_top_p",
    "query_lse",
    "tile_column_max_probs",
    "tile_keep_mask",
    "tile_means",
    "top_p_mask",
    "top_p_select",
]
