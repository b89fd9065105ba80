"""The dropout generator in Triton: the Philox stream of csrc/common/philox.h, which the cpp and cuda backends draw
too, so that every fused backend keeps the same map elements for the same seed (SPEC 1)."""

import triton
import triton.language as tl


@triton.jit
def dropout_uniform(seed, row, j, N):
    """The dropout generator's uniform for map row ``row`` (``b * Mq + i``, int64) and column ``j`` of a map with
    ``N`` columns: word ``j % 4`` of the Philox call with counter ``row * ceil(N / 4) + j // 4``. Any tiling of the
    map draws the same numbers, which is how backward redraws the forward's mask; four neighbouring keys share one
    call, which on CPU makes the draw four times cheaper than one call per element (tl.rand)."""
    w0, w1, w2, w3 = tl.randint4x(seed, row * ((N + 3) // 4) + j // 4)
    word = j % 4
    return tl.uint_to_uniform_float(tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3))))


@triton.jit
def keep_mask(seed, row_base, i, j, N, dropout_p):
    """Dropout keep-mask at map positions ``(i, j)`` of one batch element (``i``, ``j`` broadcastable index tiles,
    ``row_base = b * Mq`` as int64)."""
    return dropout_uniform(seed, row_base + i, j, N) >= dropout_p
