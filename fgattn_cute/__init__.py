"""fgattn-cute: fine-grained (M x 1) sparse attention for video diffusion transformers."""

from . import predict, reference
from .host.key_index import KeyIndex, PackedKeyIndex

__version__ = "0.1.0"

__all__ = ["KeyIndex", "PackedKeyIndex", "__version__", "predict", "reference"]
