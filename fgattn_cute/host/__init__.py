"""Host-side pieces: the kept-key index buffers (and, with the kernel, its compile cache and
launch glue)."""

from .key_index import CAPACITY_ALIGN, KeyIndex, PackedKeyIndex

__all__ = ["CAPACITY_ALIGN", "KeyIndex", "PackedKeyIndex"]
