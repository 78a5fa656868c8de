"""Online softmax over wgmma accumulators, in base 2 with the softmax scale folded in.

Each thread of a consumer warpgroup holds 2 rows of the 64-row tile (rows r and r + 8 of its
warp's 16) and a quarter of each row's columns; the 4 threads of a quad share a row, so row
reductions finish with two butterfly shuffles.
"""

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Uint32

from fgattn_cute.kernels.carry import DslCarried
from fgattn_cute.kernels.layout import acc_rows_cols

LN2 = math.log(2.0)
# 2**f on [-0.5, 0.5], degree 5, fitted to the relative error: 2.4e-7 at most with float32
# Horner steps (about ex2.approx.f32's 2 ulp). Lowest degree first.
EXP2_POLY = (1.0000001192092896, 0.6931469440460205, 0.24022120237350464,
             0.05550713092088699, 0.009675510227680206, 0.0013276379322633147)
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: x + it is x rounded to an integer, in the low bits
EXP2_FMA_MIN = -125.0  # below, 2**x is clamped to 2**-125 (never a denormal or a wrapped exponent)
EXP2_FMA_MAX = 126.0  # with clamp_high: above, 2**x is clamped to 2**126


def exp2_fma(x: Float32, clamp_high: bool = False) -> Float32:
    """2**x for x <= 0 on the FMA and integer pipes instead of MUFU (about 10 instructions
    against one, where MUFU is the busier unit). x = j + f with j an integer and |f| <= 0.5;
    2**f by a polynomial; j added to the float's exponent field. Values below 2**-125 (and
    -inf) come out as about 2**-125, negligible in any row sum that holds its max's 1.0.
    clamp_high: x may be positive; above 126 (and +inf, NaN) the result is about 2**126, a
    finite stand-in for the overflow that MUFU would return as inf."""
    x = cute.arch.fmax(x, Float32(EXP2_FMA_MIN))
    if clamp_high:
        x = cute.arch.fmin(x, Float32(EXP2_FMA_MAX))
    rounded = x + Float32(ROUND_MAGIC)  # low bits: j = round(x), exactly
    f = x - (rounded - Float32(ROUND_MAGIC))
    poly = Float32(EXP2_POLY[-1])
    for c in reversed(EXP2_POLY[:-1]):
        poly = poly * f + Float32(c)
    # (bits of rounded) << 23 is j << 23 modulo 2**32: the magic's own bits shift out.
    bits = poly.bitcast(Uint32) + (rounded.bitcast(Uint32) << Uint32(23))
    return bits.bitcast(Float32)


@cute.jit
def finite_max(row_max: Float32) -> Float32:
    """row_max, or 0 for a row that has seen only -inf (masked or no) scores, so that
    exp2(s - it) is 0 for those scores rather than exp2(nan)."""
    return row_max if row_max != -Float32.inf else Float32(0.0)


class OnlineSoftmax(DslCarried):
    """Running row max and row sum of exp2(scale_log2 * s - scale_log2 * max)."""

    _dsl_fields = ("scale_log2", "row_max", "row_sum")

    def __init__(self, scale_log2: Float32, num_rows: int):
        self.scale_log2 = scale_log2
        self.num_rows = num_rows
        self.row_max = cute.make_rmem_tensor(num_rows, Float32)
        self.row_sum = cute.make_rmem_tensor(num_rows, Float32)
        self.row_max.fill(-Float32.inf)
        self.row_sum.fill(0.0)

    @cute.jit
    def step(self, acc_S: cute.Tensor) -> cute.Tensor:
        """Turn scores into unnormalised probabilities in place; return the factor for O."""
        s_rc = acc_rows_cols(acc_S)
        rescale = cute.make_rmem_tensor(self.num_rows, Float32)
        for r in cutlass.range_constexpr(self.num_rows):
            row = s_rc[r, None].load()
            new_max = row.reduce(cute.ReductionOp.MAX, self.row_max[r], 0)
            new_max = cute.arch.warp_reduction_max(new_max, threads_in_group=4)
            safe_max = finite_max(new_max)
            max_scaled = safe_max * self.scale_log2
            probs = cute.math.exp2(row * self.scale_log2 - max_scaled, fastmath=True)
            rescale[r] = cute.math.exp2(
                (self.row_max[r] - safe_max) * self.scale_log2, fastmath=True
            )
            self.row_sum[r] = probs.reduce(
                cute.ReductionOp.ADD, self.row_sum[r] * rescale[r], 0
            )
            self.row_max[r] = new_max
            s_rc[r, None].store(probs)
        return rescale

    @cute.jit
    def finish(self) -> cute.Tensor:
        """Sum the quad's partial row sums; return 1 / row_sum (0 for empty rows).

        Afterwards row_sum holds the natural-log LSE of each row (-inf for empty rows).
        """
        inv_sum = cute.make_rmem_tensor(self.num_rows, Float32)
        for r in cutlass.range_constexpr(self.num_rows):
            total = cute.arch.warp_reduction_sum(self.row_sum[r], threads_in_group=4)
            empty = total == 0.0 or total != total
            inv_sum[r] = Float32(0.0) if empty else cute.arch.rcp_approx(total)
            lse = (self.row_max[r] * self.scale_log2 + cute.math.log2(total, fastmath=True)) * LN2
            self.row_sum[r] = -Float32.inf if empty else lse
        return inv_sum


@cute.jit
def scale_rows(acc: cute.Tensor, factor: cute.Tensor):
    """Multiply each accumulator row of this thread by factor[row]."""
    acc_rc = acc_rows_cols(acc)
    for r in cutlass.range_constexpr(cute.size(factor)):
        acc_rc[r, None].store(acc_rc[r, None].load() * factor[r])


@cute.jit
def mask_columns(acc_S: cute.Tensor, tScS: cute.Tensor, valid: cutlass.Int32, tile_n: int):
    """Scores in columns at or past `valid` (padding slots, keys past the end) become -inf.
    tScS: the (row, col) coordinates of this thread's accumulator elements."""
    if valid < tile_n:
        s_rc = acc_rows_cols(acc_S)
        for c in cutlass.range_constexpr(cute.size(tScS, mode=[1])):
            if tScS[0, c][1] >= valid:
                for r in cutlass.range_constexpr(cute.size(tScS, mode=[0])):
                    s_rc[r, c] = -Float32.inf
