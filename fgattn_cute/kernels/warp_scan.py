"""Warp-level scans shared by the kernels."""

import cutlass.cute as cute
from cutlass import Int32


@cute.jit
def warp_inclusive_sum(value, lane: Int32):
    """Inclusive prefix sum of `value` over the lanes of a full warp (5 shuffles up); lane 31
    holds the warp's total."""
    for offset in (1, 2, 4, 8, 16):
        up = cute.arch.shuffle_sync_up(value, offset)
        if lane >= offset:
            value += up
    return value
