"""The maps of ``tanh_attention`` (SPEC 1) in Triton: each map's value on a tile of scores and its derivative from
the value. The kernels of :mod:`avkernels.ops.triton.tanh_attention` take the map as a ``tl.constexpr`` (``MAP``) and
call these two functions, the only code that differs between maps; a new map is one more branch in each.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x, FAST: tl.constexpr):
    if FAST:
        # The SFU's tanh (sm_75+): one MUFU.TANH instead of an exp, a division and selects; relative error about
        # 2**-11, below the rounding of the fp16/bf16 outputs it is used for (see tanh_attention._fast_tanh).
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        # exp of -2|x| is in (0, 1]: it never overflows, and (1 - t) / (1 + t) never cancels catastrophically,
        # unlike 2 * sigmoid(2x) - 1 for large |x|. Absolute error: a few ulps of 1.
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x < 0, -y, y)


@triton.jit
def map_value(s, scale, bias, MAP: tl.constexpr, FAST: tl.constexpr):
    """The map of the scores ``s = q k^T``: ``tanh(scale s)`` or ``sigmoid(scale s + bias)``."""
    if MAP == "sigmoid":
        x = s * scale + bias
        if FAST:
            return 0.5 + 0.5 * tanh(0.5 * x, True)
        else:
            # exp(-x) overflows to inf for very negative x, which gives the right limit 0.
            return 1.0 / (1.0 + tl.exp(-x))
    else:
        return tanh(s * scale, FAST)


@triton.jit
def map_slope(c, MAP: tl.constexpr):
    """The derivative of the map with respect to its argument, from the map's value ``c``."""
    if MAP == "sigmoid":
        return c * (1.0 - c)
    else:
        return 1.0 - c * c
