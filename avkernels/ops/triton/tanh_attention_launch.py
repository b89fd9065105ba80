"""Launch configurations of the Triton tanh_attention kernels (avkernels/ops/triton/tanh_attention.py): tile sizes,
warps and pipeline stages per size class and dot precision, read by the launchers and by the ahead-of-time compile
lists of the tests (tests/triton_aot.py), so that what is compiled without a GPU is what runs on one."""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch


class LaunchConfig(NamedTuple):
    """Tile sizes, warps and pipeline stages of one size class. ``block_rows`` is the program's own axis (Mq in the
    forward and dq kernels, N in the dk/dv kernel), ``block_loop`` the axis it loops over."""

    block_rows: int
    block_loop: int
    num_warps: int
    num_stages: int


# Keyed by (head block, head loops). Heads up to the widest block without loops take the power of two covering
# max(D, E) (at least 16, the smallest MMA); wider heads take the entry with loops and go through D and E in chunks of
# its block. At small heads the work per map element is one MMA step and one tanh, so tall tiles over 8 warps keep
# many tanh in flight; wider heads spend the registers on operand tiles and accumulators instead. Every entry
# compiles without register spills for sm_80 and sm_90 (tests/test_triton_compile.py with AVKERNELS_AOT_FULL=1).
_CONFIGS: Dict[Tuple[int, bool], LaunchConfig] = {
    (16, False): LaunchConfig(block_rows=128, block_loop=32, num_warps=8, num_stages=2),
    (32, False): LaunchConfig(block_rows=64, block_loop=16, num_warps=8, num_stages=2),
    (64, False): LaunchConfig(block_rows=64, block_loop=16, num_warps=8, num_stages=1),
    (32, True): LaunchConfig(block_rows=64, block_loop=32, num_warps=8, num_stages=1),
}
# TF32x3 (fp32 inputs at torch's default "highest" precision) keeps the split operands live: half-height tiles, and
# heads looped from 32 on. At the smallest head, 4 warps (up to 255 registers per thread): with 8 the dropout
# variants of the backward kernels, which keep the four Philox words of each key live, spilled 16-24 bytes.
_CONFIGS_TF32X3: Dict[Tuple[int, bool], LaunchConfig] = {
    (16, False): LaunchConfig(block_rows=64, block_loop=16, num_warps=4, num_stages=2),
    (32, False): LaunchConfig(block_rows=64, block_loop=16, num_warps=8, num_stages=1),
    (32, True): LaunchConfig(block_rows=64, block_loop=16, num_warps=8, num_stages=1),
}


def dq_config(cfg: LaunchConfig, dropout: bool) -> LaunchConfig:
    """The dq kernel's launch: with dropout it holds the Philox words, the dropout product and the select that clears
    the columns past N at once, which at the tall tiles of the smallest head spilled 16-24 bytes on sm_80 (triton
    3.6). It takes one warpgroup's 64 rows there (4 warps: with 8, both warpgroups would compute the same 64-row
    tile, tests/test_cost_model.py)."""
    if not dropout or cfg.block_rows <= 64:
        return cfg
    return cfg._replace(block_rows=64, num_warps=4)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 follows torch's matmul setting ("highest", the default, gets "tf32x3", three
    TF32 products that round like fp32; "high"/"medium" get one TF32 product); fp16/bf16 values are exact in TF32."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def configs(precision: str) -> Dict[Tuple[int, bool], LaunchConfig]:
    return _CONFIGS_TF32X3 if precision == "tf32x3" else _CONFIGS
