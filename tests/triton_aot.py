"""Every Triton kernel variant the launchers of ``avkernels.ops.triton`` can launch on a GPU, for the ahead-of-time
compiles of tests/test_triton_compile.py: ``VARIANTS[module]()`` lists ``(kernel, signature, constexprs, compile
options)``. The lists read the launchers' own tables (block sizes, precisions, dtypes), so a new launch
configuration is compiled here without an edit; a new Triton op adds an entry.
"""

from typing import Dict, List, Tuple

import torch
import triton.language as tl

from avkernels.ops.tanh_attention import MAPS
from avkernels.ops.triton import softmax_mix as sm
from avkernels.ops.triton import tanh_attention as ta
from avkernels.ops.triton.gate import ATTENDED_STAGE

MAX_STAGES = 4  # GRJCA: T = iterations (+ 1 with stage_include_input); the stage gate is compiled for T <= this

_FLOAT_ARGS = ("scale_hi", "scale_lo", "bias_hi", "bias_lo", "keep_scale_hi", "keep_scale_lo", "dropout_p")
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _signature(kernel, pointer_types: Dict[str, str], constexprs: Dict) -> Dict[str, str]:
    """Triton signature of ``kernel``: pointers as given, the float scalars fp32, the ints (``tanh_relu`` included) i32
    (what the launcher passes for tensors under 2**31 elements per batch element)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def tanh_attention_variants() -> List[Tuple]:
    """One per kernel x dtype (fp32 with TF32x3 and with TF32 dots, fp16, bf16, each of the two with exact and fast
    tanh) x map x size class x dropout (x return_mask for the forward). The activation is a runtime flag, so each
    variant covers both. fp64 is interpreter-only (refused on CUDA by the launchers)."""
    specs = []
    variants = [(dtype, precision, fast, map) for dtype in _GPU_DTYPES
                for precision in (("tf32x3", "tf32") if dtype == torch.float32 else ("tf32",))
                for fast in ((False, True) if dtype in ta._HALF_DTYPES else (False,))
                for map in MAPS]
    fwd, bwd_dq = ta._tanh_attention_fwd_kernel, ta._tanh_attention_bwd_dq_kernel
    bwd_dkdv = ta._tanh_attention_bwd_dkdv_kernel
    for dtype, precision, fast, map in variants:
        ptr = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        for (head, loops), cfg in ta.configs(precision).items():
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            shared = dict(ACC=tl.float32, PRECISION=precision, BLOCK_D=head, BLOCK_E=head, HEAD_LOOPS=loops,
                          FAST_TANH=fast, MAP=map)
            rows_on_mq = dict(BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_loop)
            for dropout in (False, True):
                for return_mask in ((False, True) if dropout else (False,)):
                    consts = dict(shared, DROPOUT=dropout, RETURN_MASK=return_mask, **rows_on_mq)
                    pointers = {name: ptr for name in "QKVO"}
                    pointers["MASK"] = "*i1"
                    specs.append((fwd, _signature(fwd, pointers, consts), consts, options))
                dq_cfg = ta.dq_config(cfg, dropout)
                consts = dict(shared, DROPOUT=dropout, BLOCK_M=dq_cfg.block_rows, BLOCK_N=dq_cfg.block_loop)
                pointers = {name: ptr for name in ("DO", "O", "Q", "K", "V", "DQ")}
                dq_options = {"num_warps": dq_cfg.num_warps, "num_stages": dq_cfg.num_stages}
                specs.append((bwd_dq, _signature(bwd_dq, pointers, consts), consts, dq_options))
                consts = dict(shared, DROPOUT=dropout, BLOCK_M=cfg.block_loop, BLOCK_N=cfg.block_rows)
                pointers = {name: ptr for name in ("DO", "O", "Q", "K", "V", "DK")}
                pointers["DV"] = "*fp32"
                specs.append((bwd_dkdv, _signature(bwd_dkdv, pointers, consts), consts, options))
    return specs


def softmax_mix_variants(n_stages: int, first: int) -> List[Tuple[object, dict, dict, dict]]:
    """Forward and backward specialisations for ``n_stages`` stages, as ``(kernel, signature, constexprs, compile
    options)``: every dtype, with one-tile and multi-tile feature layouts (``d`` = 512, the official shape, and 4096).
    Signature entries of the stage tuples (``XS``, ``X_SB``, ...) are tuples of types, as Triton spells tuple
    arguments."""
    specs = []
    for dtype, ty in _TRITON_DTYPES.items():
        acc_ty = "fp64" if dtype == torch.float64 else "fp32"
        stage_ptrs = tuple("*" + ty for _ in range(n_stages))
        stage_ints = tuple("i32" for _ in range(n_stages))
        for d in (512, 4096):
            for backward in (False, True):
                cfg = sm.launch_config(n_stages, first, d, 1024, backward, fp64=dtype == torch.float64)
                constexprs = {
                    "T": n_stages, "FIRST": first, "ACC": sm._acc_dtype(dtype), "BLOCK_R": cfg.block_r,
                    "BLOCK_D": cfg.block_d, "BLOCK_T": cfg.block_t, "ONE_TILE": cfg.one_tile,
                }
                signature = {"XS": stage_ptrs, "X_SB": stage_ints, "X_SL": stage_ints, "X_SD": stage_ints,
                             "W": "*" + ty, "w_s0": "i32", "w_s1": "i32", "L": "i32", "d": "i32", "n_rows": "i32",
                             "tau": "fp64"}
                if backward:
                    signature.update({
                        "DOut": "*" + ty, "do_sb": "i32", "do_sl": "i32", "do_sd": "i32",
                        "DS": "*" + ty, "ds_sb": "i32", "ds_sl": "i32", "ds_st": "i32",
                        "S": "*" + ty, "Out": "*" + ty, "DXS": stage_ptrs,
                        "DW_partial": "*" + acc_ty, "DB_partial": "*" + acc_ty, "n_blocks": "i32",
                    })
                    kernel = sm._softmax_mix_bwd_kernel
                else:
                    signature.update({"Bias": "*" + ty, "bias_s": "i32", "Out": "*" + ty, "S": "*" + ty})
                    kernel = sm._softmax_mix_fwd_kernel
                signature.update({name: "constexpr" for name in constexprs})
                specs.append((kernel, signature, constexprs, {"num_warps": cfg.num_warps}))
    return specs


# module of avkernels.ops.triton -> its kernel variants
VARIANTS = {
    "tanh_attention": tanh_attention_variants,
    "gate": lambda: softmax_mix_variants(2, ATTENDED_STAGE),  # two stages, logits from the attended one
    "stage_gate": lambda: [spec for n in range(1, MAX_STAGES + 1) for spec in softmax_mix_variants(n, 0)],
}
