"""fgattn-cute: fine-grained (M x 1) sparse attention for video diffusion transformers.

    import fgattn_cute as fg
    index = fg.KeyIndex.from_mask(mask, q_tile=128, seqlen_q=S)
    out = fg.sparse_attention(q, k, v, index)

See README.md and the docstrings of ``KeyIndex`` and ``sparse_attention``.
"""

from . import predict, reference
from .host.key_index import KeyIndex, PackedKeyIndex
from .interface import sparse_attention

__version__ = "0.1.0"

__all__ = [
    "KeyIndex",
    "PackedKeyIndex",
    "__version__",
    "predict",
    "reference",
    "sparse_attention",
]
