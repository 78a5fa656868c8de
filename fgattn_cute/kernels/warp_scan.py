"""Warp-level scans and reductions shared by the kernels."""

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


@cute.jit
def warp_allreduce(value, op, lanes: int = 32):
    """op-reduce `value` over each group of `lanes` consecutive lanes (a power of two) by xor
    butterflies; every lane of a group ends with the same result when op is commutative (a
    butterfly's two lanes combine the same two values)."""
    for offset in [lanes >> k for k in range(1, lanes.bit_length())]:  # lanes / 2, ..., 1
        value = op(value, cute.arch.shuffle_sync_bfly(value, offset))
    return value
