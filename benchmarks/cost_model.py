"""A static cost model of the Triton kernels on an H100/H200 (sm_90), read from their SASS.

    python benchmarks/cost_model.py            # writes benchmarks/results/gpu-cost-model.{md,json}

No GPU is needed (about a minute of ahead-of-time compiles on 2 cores, cached in ``--cache-dir``). It covers every
``tanh_attention`` launch at the official shape (the dense JCA block's call, B 64, in fp32 at both matmul
precisions, bf16 and fp16, training, inference and backward) and at the long shape (B 8, Mq = N = 4096,
D = E = 64, bf16), and the ``gate`` and ``stage_gate`` launches of DCA/GRJCA at the official shape. For each, the
model

1. captures the launch exactly as the launcher makes it: the real launchers of ``avkernels.ops.triton.tanh_attention``
   run on CPU tensors with the real layouts (for the official shape, recorded from a running ``JCA`` block) while
   the kernel objects are replaced by a recorder, and Triton's own argument binder (an internal API of triton
   3.9, the version the table was made with) turns the arguments into the specialisation the GPU would compile
   (integer arguments equal to 1 become constants, multiples of 16 and aligned pointers carry a divisibility hint:
   both change the generated loads);
2. compiles that specialisation ahead of time for sm_90 and disassembles it (``cuobjdump -sass``), with
   registers from ``-res-usage`` and shared memory from the compiled kernel;
3. counts dynamic instructions: the main loop's body (the code between a backward branch and its target) runs
   ``ceil(loop extent / block)`` times per program, everything else once; a warp instruction is 32 lanes, and a
   warpgroup MMA (``HGMMA``) is issued by each of the group's four warps;
4. turns the counts into per-element figures (per map element; per feature element for the gates) and a time:
   per pipe, the busiest SM's share of the grid divided by that pipe's rate, the instruction issue (one warp
   instruction per scheduler and clock), and the HBM traffic divided by the bandwidth; the largest is the
   prediction and its pipe the bound.

Rates (``HW``): bf16/fp16 dense MMA 790 TFLOP/s (measured on an H200), TF32 half of that (NVIDIA's 2:1 ratio),
HBM 4.3 TB/s, 132 SMs at 1.98 GHz, and per SM and clock the lanes of NVIDIA's throughput table for compute
capability 9.0 (CUDA C++ Programming Guide, "Arithmetic Instructions"): 16 for MUFU (exp2, reciprocal, tanh) and
for the older conversions (I2F/F2I/F2F), 128 for fp32 add/mul/fma, 64 for integer multiply-add (IMAD, on the
FMA-heavy pipe, which fp32 shares with the FMA-lite pipe), 64 for the other integer, compare, select and logic
instructions (the ALU pipe, with ``I2FP``/``F2FP``, the ALU conversions of sm_86+), 32 for shuffles and load/store
issue, and 4 warp instructions issued per clock (one per scheduler). The pipe assignment (IMAD and fp32 on the FMA
pipes, the rest of integer and logic on the ALU) is NVIDIA's description of GH100's pipes. Only the MUFU rate and
the tensor/HBM figures were given with the task; the other lanes are this file's reading of NVIDIA's table and the
likeliest to need correcting once a GPU has timed the kernels (scripts/gpu_check.sh sets the predictions beside the
measured kernel times).

What it leaves out: latency (a kernel with few resident warps may not reach a pipe's rate), L2 and shared-memory
bandwidth (the L1/L2 traffic is reported, not timed), launch overhead (a few microseconds), and branches inside the
loop (counted as taken: the launched variants have none on their hot path). It is a floor per pipe, so a
measured time well above the prediction points at latency or at a pipe the model does not see.

Checked against the CPU-measurable parts in tests/test_cost_model.py: the FLOP and byte counts are
:mod:`avkernels.flops`'s, the MMA FLOPs read from the SASS cover the arithmetic the kernels must do (exactly, at the
official shape), and the launches in the committed table are the ones the launchers make now.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
STEM = "gpu-cost-model"

HW = {
    "name": "H100/H200 SXM (sm_90)",
    "sms": 132,
    "clock_hz": 1.98e9,
    "hbm_bytes_per_s": 4.3e12,
    "mma_flops_per_s": {"bf16": 790e12, "f16": 790e12, "tf32": 395e12},
    # lanes per SM per clock (NVIDIA's throughput table for cc 9.0); "issue": warp instructions per SM per clock
    # "fma": the FMA-heavy and FMA-lite pipes together (fp32 on either, IMAD on the heavy one only: see ``predict``)
    "lanes_per_clock": {"mufu": 16, "conv": 16, "fma": 128, "fp64": 64, "alu": 64, "shfl": 32, "lsu": 32},
    "issue_per_clock": 4,
    "registers_per_sm": 65536,
    "shared_bytes_per_sm": 233472,  # 228 KiB
    "shared_reserved_per_block": 1024,
    "max_warps_per_sm": 64,
    "max_blocks_per_sm": 32,
}

PIPES = {
    "tensor": ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA"),
    "mufu": ("MUFU",),
    "conv": ("I2F", "F2I", "F2F", "FRND"),
    "fp32": ("FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I", "HADD2", "HMUL2", "HFMA2", "FSWZADD"),
    "imad": ("IMAD", "IMUL", "IDP"),
    "fp64": ("DADD", "DMUL", "DFMA"),
    "alu": ("IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "ISETP", "FSETP",
            "HSETP2", "DSETP", "FSEL", "SEL", "LEA", "IABS", "PRMT", "FMNMX", "IMNMX", "VIADD", "VIADDMNMX", "VIMNMX",
            "I2FP", "F2FP", "F2IP", "PLOP3", "P2R", "R2P", "SGXT", "BMSK", "IDP", "MOV", "POPC", "FLO",
            "BREV", "I2I", "I2IP", "FCHK", "IMNMX", "LEA"),
    "shfl": ("SHFL",),
    "lsu": ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LD", "ST", "ATOM", "ATOMG", "ATOMS", "RED",
            "REDG", "LDL", "STL"),
}
_PIPE_OF = {op: pipe for pipe, ops in PIPES.items() for op in ops}
GLOBAL_LOADS = ("LDG", "LDGSTS", "LD")
GLOBAL_STORES = ("STG", "ST", "RED", "REDG", "ATOMG")
# Philox-4x32-10 makes 20 unsigned 32x32 -> 64-bit products per call (two per round). In tanh_attention's main loops
# nothing else multiplies unsigned words: the inference variants, without dropout, have none there, only a few
# integer divisions outside the loop (tests/test_cost_model.py checks it on the table).
PHILOX_MULTIPLIES = ("IMAD.WIDE.U32", "IMAD.HI.U32")
PHILOX_MULTIPLIES_PER_CALL = 20
# HMMA shapes (per warp) by their SASS spelling
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}

OFFICIAL = {"name": "official", "batch": 64, "dims": (512, 512), "seq_len": 16,
            "text": "one modality of the dense JCA block: B 64, Mq = d = 1024, N = d_m = 512, D = E = L = 16, "
                    "tanh_relu, dropout 0.6 (training) or none (inference)"}
LONG = {"name": "long", "batch": 8, "mq": 4096, "n": 4096, "d": 64,
        "text": "B 8, Mq = N = 4096, D = E = 64, bf16, no dropout, no epilogue (the shape of the flash-attention "
                "comparison)"}
# dtype labels: (torch dtype name, float32 matmul precision that selects the dot precision)
OFFICIAL_DTYPES = (("fp32-tf32x3", "float32", "highest"), ("fp32-tf32", "float32", "high"),
                   ("bf16", "bfloat16", "highest"), ("fp16", "float16", "highest"))
CALLS_PER_STEP = {"JCA": 2, "RJCA": 4, "DCA": 4, "GRJCA": 4}  # modalities x iterations, official settings


# ------------------------------------------------------------------------------------------------------------------
# SASS
# ------------------------------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`?\(?\.L_x_\d+\)?`?\s*)?(0x[0-9a-f]+)")


def parse_sass(text: str) -> List[dict]:
    """Instructions of a ``cuobjdump -sass`` listing: address, opcode with modifiers, operands, branch target."""
    out = []
    for line in text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        body = _PREDICATE.sub("", m.group(2).strip())
        opcode, _, operands = body.partition(" ")
        target = _TARGET.search(body)
        out.append({"address": int(m.group(1), 16), "opcode": opcode, "operands": operands,
                    "target": int(target.group(1), 16) if target and opcode.startswith("BRA") else None})
    return out


def loops(instructions: List[dict]) -> List[tuple]:
    """``(start, end)`` address ranges closed by a backward branch (the trap loop after EXIT, a branch to itself,
    is not a loop)."""
    return sorted((i["target"], i["address"]) for i in instructions
                  if i["target"] is not None and i["target"] < i["address"])


def _access_bytes(opcode: str) -> int:
    width = 4
    for mod in opcode.split(".")[1:]:
        width = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}.get(mod, width)
    return width


def _mma_flops(opcode: str) -> tuple:
    """(FLOPs per issuing warp, operand type) of one MMA instruction."""
    mods = opcode.split(".")
    base, kind = mods[0], mods[-1].lower()
    kind = {"bf16": "bf16", "f16": "f16", "tf32": "tf32"}.get(kind, kind)
    if base.endswith("GMMA"):  # warpgroup MMA: M x N x K for the group of four warps
        m, n, k = map(int, re.search(r"(\d+)x(\d+)x(\d+)", opcode).groups())
        return 2 * m * n * k / 4, kind
    shape = next((s for s in mods[1:] if s in _HMMA_SHAPES), None)
    if shape is None:
        raise ValueError(f"unknown MMA shape in {opcode}")
    m, n, k = _HMMA_SHAPES[shape]
    return 2 * m * n * k, kind


def count(instructions: List[dict], trips: int) -> dict:
    """Dynamic counts per warp of one program: instructions inside the (single) main loop run ``trips`` times.

    Returns warp instructions per pipe and in all, MMA FLOPs by operand type (per warp's share), and global bytes
    loaded and stored (32 lanes each, as if every lane were active: an upper bound at masked tails)."""
    ranges = loops(instructions)
    if len(ranges) > 1:
        nested = [r for r in ranges if any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in ranges)]
        raise ValueError(f"{len(ranges)} loops ({len(nested)} nested): the model handles one main loop")
    start, end = ranges[0] if ranges else (None, None)
    pipes, mma, ops = Counter(), Counter(), Counter()
    loaded = stored = total = 0.0
    for ins in instructions:
        times = trips if start is not None and start <= ins["address"] <= end else 1
        opcode = ins["opcode"]
        base = opcode.split(".")[0]
        total += times
        ops[base] += times
        pipe = _PIPE_OF.get(base)
        if base == "MUFU" or opcode in PHILOX_MULTIPLIES:
            ops[opcode] += times
        if pipe:
            pipes[pipe] += times
        if pipe == "tensor":
            flops, kind = _mma_flops(opcode)
            mma[kind] += flops * times
        if base in GLOBAL_LOADS:
            loaded += 32 * _access_bytes(opcode) * times
        elif base in GLOBAL_STORES:
            stored += 32 * _access_bytes(opcode) * times
    return {"warp_instructions": total, "pipes": dict(pipes), "mma_flops": dict(mma), "global_load_bytes": loaded,
            "global_store_bytes": stored, "loop": [start, end], "opcodes": dict(ops)}


# ------------------------------------------------------------------------------------------------------------------
# Launch capture and compilation
# ------------------------------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.kernel, tuple(grid), args, kwargs))


@contextlib.contextmanager
def recording(module, sink):
    names = [n for n in dir(module) if n.startswith("_tanh_attention_") and n.endswith("_kernel")]
    saved = {n: getattr(module, n) for n in names}
    for n in names:
        setattr(module, n, _Recorder(saved[n], sink))
    try:
        yield
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def _layout(t):
    """A tensor's shape and the order of its axes from outermost to innermost in memory."""
    return {"shape": list(t.shape), "order": sorted(range(t.dim()), key=lambda a: -t.stride(a))}


def _alloc(layout, batch, dtype):
    import torch

    shape = [batch] + layout["shape"][1:]
    order = layout["order"]
    return torch.empty([shape[a] for a in order], dtype=dtype).permute([order.index(a) for a in range(len(order))])


def record_block_calls(dims, seq_len):
    """The ``tanh_attention`` calls of one JCA training step (forward and backward) on the reference backend: the
    layouts of ``q``, ``k``, ``v`` and of the gradient that reaches the op, and the call's arguments."""
    import torch

    import avkernels
    from avkernels.nn import blocks

    calls, real = [], blocks.tanh_attention

    def recorder(q, k, v, **kwargs):
        o = real(q, k, v, **{**kwargs, "backend": "reference"})
        entry = {"q": _layout(q), "k": _layout(k), "v": _layout(v), "kwargs": {k_: v_ for k_, v_ in kwargs.items()
                                                                              if k_ != "backend"}}
        o.register_hook(lambda g: entry.__setitem__("do", _layout(g)))
        calls.append(entry)
        return o

    blocks.tanh_attention = recorder
    try:
        torch.manual_seed(0)
        model = avkernels.JCA(dims, seq_len).train()
        features = [torch.randn(2, seq_len, d, requires_grad=True) for d in dims]
        sum(o.sum() for o in model(*features)).backward()
    finally:
        blocks.tanh_attention = real
    return calls


def capture_launches(call, batch, dtype_name, precision, train: bool, backward: bool):
    """The kernel launches of one ``tanh_attention`` call (forward, or backward) as the launchers make them."""
    import torch

    from avkernels.ops.triton import tanh_attention as module

    dtype = getattr(torch, dtype_name)
    q, k, v = (_alloc(call[name], batch, dtype) for name in "qkv")
    kw = call["kwargs"]
    p = kw.get("dropout_p", 0.0) if train and kw.get("training", False) else 0.0
    activation = kw.get("activation") or "none"
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    sink = []
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with recording(module, sink):
            if backward:
                do = _alloc(call["do"], batch, dtype)
                o = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=dtype)
                module.backward(do, q, k, v, o, 1234, scale, p, activation, "tanh", 0.0)
            else:
                module.forward(q, k, v, 1234, scale, p, activation, False, "tanh", 0.0)
    finally:
        torch.set_float32_matmul_precision(previous)
    sizes = {"B": q.shape[0], "Mq": q.shape[1], "N": k.shape[1], "D": q.shape[2], "E": v.shape[2],
             "itemsize": q.element_size(), "shared_v": v.shape[0] == 1 and q.shape[0] > 1, "dropout_p": p,
             "activation": activation}
    return sink, sizes


def specialise(kernel, args, kwargs, arch=90):
    """Triton's own binding of launch arguments to a compile specialisation (what ``kernel[grid](...)`` compiles
    on a GPU of ``arch``): ``(signature, constexprs, attrs, options)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _tool(name):
    from_env = os.environ.get(name.upper())
    candidates = ([from_env] if from_env else []) + sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    candidates.append(shutil.which(name) or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"{name} not found (CUDA toolkit bin/ or the triton wheel's backends/nvidia/bin)")


def compile_sass(kernel, signature, constexprs, attrs, options, cache_dir, arch=90):
    """SASS, registers, shared memory and warps of one specialisation, cached by everything that determines them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas")}
    key_text = json.dumps([kernel.cache_key, triton.__version__, arch, signature, {str(k): str(v) for k, v in
                           constexprs.items()}, {str(k): v for k, v in attrs.items()}, opts], sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"{kernel.__name__}-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=opts)
    cuobjdump = _tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    result = {"sass": sass, "registers": int(found.group(1)), "stack": int(found.group(2)),
              "local": int(found.group(4)), "shared": max(int(compiled.metadata.shared), int(found.group(3))),
              "num_warps": int(compiled.metadata.num_warps), "triton": triton.__version__}
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f)
    return result


# ------------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------------

def occupancy(registers: int, shared: int, warps: int, hw=HW) -> dict:
    per_warp = math.ceil(registers * 32 / 256) * 256  # registers are allocated per warp in units of 256
    by_registers = (hw["registers_per_sm"] // per_warp) // warps if per_warp else hw["max_blocks_per_sm"]
    by_shared = hw["shared_bytes_per_sm"] // (shared + hw["shared_reserved_per_block"])
    by_warps = hw["max_warps_per_sm"] // warps
    blocks = min(by_registers, by_shared, by_warps, hw["max_blocks_per_sm"])
    limiter = min((by_registers, "registers"), (by_shared, "shared memory"), (by_warps, "warps"))[1]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "fraction": blocks * warps /
            hw["max_warps_per_sm"], "limited_by": limiter}


def loop_trips(kernel_name: str, constexprs: dict, sizes: dict) -> int:
    """Iterations of each kernel's main loop: over N in steps of BLOCK_N (forward, dq), over Mq in steps of BLOCK_M
    (dk/dv). ``constexprs`` by argument name."""
    if kernel_name.endswith("dkdv_kernel"):
        return math.ceil(sizes["Mq"] / constexprs["BLOCK_M"])
    return math.ceil(sizes["N"] / constexprs["BLOCK_N"])


def reference_counts(kernel_name: str, sizes: dict) -> dict:
    """What a kernel must do at minimum, from the op's arithmetic and tensor sizes:

    ``flops``/``recompute_flops``: its share of :func:`avkernels.flops.tanh_attention_cost` (forward: ``S = q k^T``
    and ``P v``; dq: ``dP = do v^T`` and ``dq = dS k``, plus the recomputed ``S``; dk/dv: ``dv = P^T do`` and
    ``dk = dS^T q``). ``extra_recompute_flops``: what the split into two backward kernels adds (the dk/dv kernel
    recomputes ``S`` and ``dP`` too). ``bytes``: every tensor the kernel touches, once (``dv`` in the fp32 buffer
    the launcher gives it). ``op_bytes``: its share of the op's minimal traffic. ``transcendentals`` likewise, with
    the dk/dv kernel's second recomputation of the map's tanh in ``extra_transcendentals``."""
    b, mq, n, d, e, item = (sizes[k] for k in ("B", "Mq", "N", "D", "E", "itemsize"))
    elements = b * mq * n
    bv = 1 if sizes["shared_v"] else b
    q, k, v, o = b * mq * d, b * n * d, bv * n * e, b * mq * e
    relu = sizes["activation"] == "tanh_relu"
    if kernel_name.endswith("fwd_kernel"):
        return {"flops": 2 * elements * (d + e), "recompute_flops": 0, "extra_recompute_flops": 0,
                "transcendentals": elements + (o if relu else 0), "extra_transcendentals": 0,
                "bytes": item * (q + k + v + o), "op_bytes": item * (q + k + v + o)}
    grad_out = o * (2 if relu else 1)  # do, and o for the epilogue's derivative
    if kernel_name.endswith("dq_kernel"):
        return {"flops": 2 * elements * (e + d), "recompute_flops": 2 * elements * d, "extra_recompute_flops": 0,
                "transcendentals": elements, "extra_transcendentals": 0, "bytes": item * (grad_out + q + k + v + q),
                "op_bytes": item * (grad_out + q + k + v + q)}
    dv_buffer = 4 * b * n * e
    return {"flops": 2 * elements * (e + d), "recompute_flops": 0, "extra_recompute_flops": 2 * elements * (d + e),
            "transcendentals": 0, "extra_transcendentals": elements,
            "bytes": item * (grad_out + q + k + v + k) + dv_buffer, "op_bytes": item * (k + v)}


def predict(compiled, grid, trips: int, elements: int, ref: dict, needed_mma: int, hw=HW) -> dict:
    """Counts per element (of the map, or of a gate's features) and per-pipe times of one launch: ``trips``
    iterations of its main loop per program, ``ref`` the minimal counts (:func:`reference_counts`)."""
    c = count(parse_sass(compiled["sass"]), trips)
    transcendentals = ref["transcendentals"] + ref.get("extra_transcendentals", 0)
    warps, programs = compiled["num_warps"], int(math.prod(grid))
    per_sm = math.ceil(programs / hw["sms"])  # programs on the busiest SM
    clock = hw["clock_hz"]
    lanes_of = {pipe: per_sm * warps * c["pipes"].get(pipe, 0) * 32 for pipe in PIPES}
    times = {pipe: lanes_of[pipe] / rate / clock for pipe, rate in hw["lanes_per_clock"].items() if pipe in PIPES}
    # fp32 runs on the FMA-heavy and FMA-lite pipes (half the rate each), IMAD on the heavy one only: the pair needs
    # at least the IMAD on the heavy pipe, and at least all of it spread over both.
    half = hw["lanes_per_clock"]["fma"] / 2
    times["fma"] = max(lanes_of["imad"] / half, (lanes_of["imad"] + lanes_of["fp32"]) / (2 * half)) / clock
    times["issue"] = per_sm * warps * c["warp_instructions"] / hw["issue_per_clock"] / clock
    times["tensor"] = sum(per_sm * warps * flops / (hw["mma_flops_per_s"][kind] / hw["sms"])
                          for kind, flops in c["mma_flops"].items())
    times["hbm"] = ref["bytes"] / hw["hbm_bytes_per_s"]
    bound = max(times, key=times.get)
    total = programs * warps
    per_element = {
        "mufu": total * c["pipes"].get("mufu", 0) * 32 / elements,
        "mma_flops": total * sum(c["mma_flops"].values()) / elements,
        "fp32": total * c["pipes"].get("fp32", 0) * 32 / elements,
        "imad": total * c["pipes"].get("imad", 0) * 32 / elements,
        "alu": total * c["pipes"].get("alu", 0) * 32 / elements,
        "conv": total * c["pipes"].get("conv", 0) * 32 / elements,
        "lsu": total * c["pipes"].get("lsu", 0) * 32 / elements,
        "warp_instructions": total * c["warp_instructions"] / elements,
        "global_bytes": total * (c["global_load_bytes"] + c["global_store_bytes"]) / elements,
        "philox_calls": total * 32 * sum(c["opcodes"].get(op, 0) for op in PHILOX_MULTIPLIES)
        / PHILOX_MULTIPLIES_PER_CALL / elements,
    }
    return {
        "grid": programs, "num_warps": warps, "loop_trips": trips, "registers": compiled["registers"],
        "shared_bytes": compiled["shared"], "spills": compiled["local"] + compiled["stack"],
        "occupancy": occupancy(compiled["registers"], compiled["shared"], warps, hw),
        "per_element": per_element,
        "mma_flops_total": total * sum(c["mma_flops"].values()),
        "mma_flops_needed": needed_mma,
        "mma_executed_over_needed": total * sum(c["mma_flops"].values()) / needed_mma if needed_mma else None,
        "mufu_per_tanh": total * c["pipes"].get("mufu", 0) * 32 / transcendentals if transcendentals else None,
        "mma_kinds": sorted(c["mma_flops"]),
        "mufu_ops": {k: total * v * 32 for k, v in c["opcodes"].items() if k.startswith("MUFU.")},
        "l2_bytes": total * (c["global_load_bytes"] + c["global_store_bytes"]),
        "times_s": times, "predicted_s": times[bound], "bound": bound, **ref,
    }


def scenarios():
    """Every (shape, dtype label, kernel launch) the model covers: the official dense block's call in four
    precisions (training forward, inference forward, backward) and the long shape in bf16."""
    calls = record_block_calls(OFFICIAL["dims"], OFFICIAL["seq_len"])
    call = calls[0]
    same = all(json.dumps(c, sort_keys=True, default=str) == json.dumps(call, sort_keys=True, default=str)
               for c in calls[1:])
    out = []
    for label, dtype, precision in OFFICIAL_DTYPES:
        for mode, train, backward in (("train", True, False), ("inference", False, False), ("backward", True, True)):
            launches, sizes = capture_launches(call, OFFICIAL["batch"], dtype, precision, train, backward)
            out += [("official", label, mode, launch, sizes) for launch in launches]
    long_call = {"q": {"shape": [1, LONG["mq"], LONG["d"]], "order": [0, 1, 2]},
                 "k": {"shape": [1, LONG["n"], LONG["d"]], "order": [0, 1, 2]},
                 "v": {"shape": [1, LONG["n"], LONG["d"]], "order": [0, 1, 2]},
                 "do": {"shape": [1, LONG["mq"], LONG["d"]], "order": [0, 1, 2]}, "kwargs": {}}
    for backward in (False, True):
        launches, sizes = capture_launches(long_call, LONG["batch"], "bfloat16", "highest", False, backward)
        out += [("long", "bf16", "backward" if backward else "forward", launch, sizes) for launch in launches]
    return out, {"official_calls_identical": same, "official_calls_per_block": len(calls),
                 "official_layouts": {k: call[k] for k in ("q", "k", "v", "do")}}


GATES = {"gate": {"stages": 2, "first": 1, "models": "DCA (once per modality), GRJCA (per iteration and modality)"},
         "stage_gate": {"stages": 2, "first": 0, "models": "GRJCA (once per modality)"}}
GATE_DTYPES = (("fp32", "float32"), ("bf16", "bfloat16"))


def gate_cost_counts(op: str, sizes: dict, backward: bool) -> dict:
    """:mod:`avkernels.flops`'s counts of one gate call: the gate kernels' minimal work (they do no matrix
    products beyond the logits, and read and write each tensor once)."""
    from avkernels.flops import gate_cost, stage_gate_cost

    mode = "backward" if backward else "forward"
    b, length, d, item = sizes["B"], sizes["L"], sizes["d"], sizes["itemsize"]
    cost = (gate_cost(b, length, d, mode=mode, itemsize=item) if op == "gate"
            else stage_gate_cost(b, length, d, sizes["T"], mode=mode, itemsize=item))
    return {**cost.as_dict(), "op_bytes": cost.bytes}


def capture_gate_launches(op: str, dtype_name: str, backward: bool, batch: int, seq_len: int, dim: int):
    """The launches of one ``gate``/``stage_gate`` call at the official shape, as the launchers make them on an
    sm_90 GPU (the backward's grid-stride loop runs two programs per SM)."""
    import torch

    from avkernels.ops.triton import softmax_mix as module

    dtype = getattr(torch, dtype_name)
    spec = GATES[op]
    t, first = spec["stages"], spec["first"]
    stages = [torch.empty(batch, seq_len, dim, dtype=dtype) for _ in range(t)]
    weight = torch.empty(t, (t - first) * dim, dtype=dtype)
    bias = torch.empty(t, dtype=dtype)
    sink, saved = [], {n: getattr(module, n) for n in ("_softmax_mix_fwd_kernel", "_softmax_mix_bwd_kernel",
                                                       "_backward_programs")}
    module._softmax_mix_fwd_kernel = _Recorder(saved["_softmax_mix_fwd_kernel"], sink)
    module._softmax_mix_bwd_kernel = _Recorder(saved["_softmax_mix_bwd_kernel"], sink)
    module._backward_programs = lambda device, n_blocks: min(n_blocks, 2 * HW["sms"])
    try:
        if backward:
            out = torch.empty_like(stages[0])
            s = torch.empty(batch, seq_len, t, dtype=dtype)
            module.softmax_mix_backward(torch.empty_like(out), torch.empty_like(s), stages, weight, s, out, 0.1,
                                        first=first, stacked=first == 0)
        else:
            module.softmax_mix_forward(stages, weight, bias, 0.1, first=first)
    finally:
        for n, v in saved.items():
            setattr(module, n, v)
    sizes = {"B": batch, "L": seq_len, "d": dim, "T": t, "itemsize": stages[0].element_size()}
    return sink, sizes


def gate_scenarios():
    out = []
    for op in GATES:
        for label, dtype in GATE_DTYPES:
            for backward in (False, True):
                launches, sizes = capture_gate_launches(op, dtype, backward, OFFICIAL["batch"], OFFICIAL["seq_len"],
                                                        OFFICIAL["dims"][0])
                out += [(op, label, "backward" if backward else "forward", launch, sizes) for launch in launches]
    return out


def build_gates(cache_dir: str, verbose: bool = True) -> List[dict]:
    rows = []
    for op, label, mode, (kernel, grid, args, kwargs), sizes in gate_scenarios():
        signature, constexprs, attrs, options = specialise(kernel, args, kwargs)
        compiled = compile_sass(kernel, signature, constexprs, attrs, options, cache_dir)
        named = {kernel.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
        ref = gate_cost_counts(op, sizes, mode == "backward")
        rows_total = sizes["B"] * sizes["L"]
        n_blocks = math.ceil(rows_total / int(named["BLOCK_R"]))
        trips = math.ceil(n_blocks / grid[0]) if mode == "backward" else 1
        row = {"shape": "official", "op": op, "dtype": label, "mode": mode, "kernel": kernel.__name__,
               "sizes": sizes, "constexprs": {k: str(v) for k, v in named.items()},
               **predict(compiled, grid, trips, rows_total * sizes["d"], ref, 0)}
        row["per_element"].pop("philox_calls")  # no dropout in the gates
        rows.append(row)
        if verbose:
            print(f"{op:10s} {label:5s} {mode:9s} {kernel.__name__:26s} {row['predicted_s'] * 1e6:8.2f} us "
                  f"{row['bound']}", flush=True)
    return rows


def build(cache_dir: str, verbose: bool = True) -> dict:
    import triton

    rows = []
    launches, info = scenarios()
    for shape, label, mode, (kernel, grid, args, kwargs), sizes in launches:
        signature, constexprs, attrs, options = specialise(kernel, args, kwargs)
        compiled = compile_sass(kernel, signature, constexprs, attrs, options, cache_dir)
        named = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()}
        ref = reference_counts(kernel.__name__, sizes)
        products = 3 if named.get("PRECISION") == "tf32x3" else 1  # TF32x3: three products per dot
        needed = products * (ref["flops"] + ref["recompute_flops"] + ref["extra_recompute_flops"])
        row = {"shape": shape, "dtype": label, "mode": mode, "kernel": kernel.__name__,
               "sizes": sizes, "constexprs": {k: str(v) for k, v in named.items()},
               **predict(compiled, grid, loop_trips(kernel.__name__, named, sizes),
                         sizes["B"] * sizes["Mq"] * sizes["N"], ref, needed)}
        rows.append(row)
        if verbose:
            print(f"{shape:8s} {label:12s} {mode:9s} {kernel.__name__:34s} {row['predicted_s'] * 1e6:8.1f} us "
                  f"{row['bound']}", flush=True)
    return {"hardware": HW, "triton": triton.__version__, "arch": "sm_90", "scenarios": {"official": OFFICIAL["text"],
            "long": LONG["text"]}, **info, "kernels": rows, "gate_kernels": build_gates(cache_dir, verbose)}


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------

def _us(s):
    return f"{s * 1e6:.1f}"


def render(model: dict) -> str:
    hw = model["hardware"]
    lines = [
        "# Static cost model of the Triton tanh_attention kernels on sm_90 (H100/H200)", "",
        f"Generated by `python benchmarks/cost_model.py` (triton {model['triton']}, compiled ahead of time for "
        f"{model['arch']}, no GPU); method and caveats in that file's docstring. Rates: MMA bf16/fp16 "
        f"{hw['mma_flops_per_s']['bf16'] / 1e12:.0f} TFLOP/s, TF32 {hw['mma_flops_per_s']['tf32'] / 1e12:.0f}, "
        f"HBM {hw['hbm_bytes_per_s'] / 1e12:.1f} TB/s, {hw['sms']} SMs at {hw['clock_hz'] / 1e9:.2f} GHz, lanes per "
        f"SM and clock: " + ", ".join(f"{k} {v}" for k, v in hw["lanes_per_clock"].items())
        + f", {hw['issue_per_clock']} warp instructions issued.", "",
        "Shapes:", "",
        f"- **official**: {model['scenarios']['official']}; layouts recorded from a running JCA block "
        f"(q = Q^T and v = V^T are transposed views, the gradient reaching the op is a transposed view too).",
        f"- **long**: {model['scenarios']['long']}.", "",
        "dtype labels: `fp32-tf32x3` is fp32 at torch's default matmul precision (\"highest\": three TF32 products), "
        "`fp32-tf32` at \"high\"; bf16/fp16 tiles are computed in fp32 with TF32 products (the kernels upcast after "
        "the load).", "",
        "## Counts per map element (dynamic, from the SASS)", "",
        "MUFU: special-function lanes (exp2, reciprocal); MMA: tensor-core FLOPs executed (TF32x3 runs three "
        "products, and the 2 (D + E) of one forward pass is the minimum); FP32, IMAD (integer multiply-add) and "
        "ALU (other integer, compare, select, logic) lanes: the dropout generator's multiplies are IMAD, its mixing "
        "ALU; L2 B: bytes the loads and stores request from L2 (an upper bound at "
        "masked tails); occupancy: resident warps per SM of 64, from registers and shared memory.", "",
        "| shape | dtype | mode | kernel | grid x warps | regs | smem KB | occupancy | MUFU | MMA FLOP (x needed) "
        "| FP32 | IMAD | ALU | conv | LSU | L2 B | instr (warp) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in model["kernels"]:
        pe, occ = r["per_element"], r["occupancy"]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['mode']} | `{r['kernel'].replace('_tanh_attention_', '')}` | "
            f"{r['grid']} x {r['num_warps']} | {r['registers']} | {r['shared_bytes'] / 1024:.0f} | "
            f"{occ['warps_per_sm']} ({occ['limited_by']}) | {pe['mufu']:.2f} | {pe['mma_flops']:.0f} "
            f"({r['mma_executed_over_needed']:.2f}) | "
            f"{pe['fp32']:.1f} | {pe['imad']:.1f} | {pe['alu']:.1f} | {pe['conv']:.2f} | {pe['lsu']:.2f} | "
            f"{pe['global_bytes']:.2f} | {pe['warp_instructions']:.3f} |")
    lines += ["", "## Predicted time per kernel (microseconds) and bound", "",
              "Each column is the busiest SM's work on that pipe at its rate (HBM: the kernel's tensors once, at the "
              "bandwidth); the prediction is the largest.", "",
              "| shape | dtype | mode | kernel | MUFU | MMA | FMA (fp32 + IMAD) | ALU | conv | LSU | issue | HBM | "
              "**predicted** "
              "| bound | useful TFLOP/s at prediction |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in model["kernels"]:
        t = r["times_s"]
        tflops = r["flops"] / r["predicted_s"] / 1e12
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['mode']} | `{r['kernel'].replace('_tanh_attention_', '')}` | "
            + " | ".join(_us(t[p]) for p in ("mufu", "tensor", "fma", "alu", "conv", "lsu", "issue", "hbm"))
            + f" | **{_us(r['predicted_s'])}** | {r['bound']} | {tflops:.0f} |")
    lines += ["", "## Per call and per training step (tanh_attention kernels only)", "",
              "| shape | dtype | forward (training mode) | forward (inference) | backward | JCA step (2 calls) | "
              "RJCA/DCA/GRJCA step (4 calls) |", "|---|---|---|---|---|---|---|"]
    groups = {}
    for r in model["kernels"]:
        key = (r["shape"], r["dtype"])
        part = "backward" if not r["kernel"].endswith("fwd_kernel") else (
            "inference" if r["mode"] in ("inference",) else "forward")
        groups.setdefault(key, Counter())[part] += r["predicted_s"]
    for (shape, label), g in groups.items():
        step = g["forward"] + g["backward"]
        inference = _us(g["inference"]) if "inference" in g else "-"
        lines.append(f"| {shape} | {label} | {_us(g['forward'])} | {inference} | {_us(g['backward'])} | "
                     f"{_us(2 * step) if shape == 'official' else '-'} | "
                     f"{_us(4 * step) if shape == 'official' else '-'} |")
    lines += render_gates(model)
    lines += ["", "## Reading", ""] + findings(model) + [""]
    return "\n".join(lines)


def render_gates(model: dict) -> List[str]:
    rows = model.get("gate_kernels", [])
    if not rows:
        return []
    lines = ["", "## The gates at the official shape (B 64, L 16, d 512, T = 2)", "",
             "Counts per feature element (B x L x d); `gate` serves DCA and GRJCA's iterations, `stage_gate` "
             "GRJCA's stage gate.", "",
             "| op | dtype | mode | grid x warps | regs | occupancy | MUFU | FP32 | IMAD | ALU | LSU | L2 B | instr "
             "(warp) | issue us | HBM us | **predicted us** | bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pe, t = r["per_element"], r["times_s"]
        lines.append(f"| {r['op']} | {r['dtype']} | {r['mode']} | {r['grid']} x {r['num_warps']} | {r['registers']} | "
                     f"{r['occupancy']['warps_per_sm']} | {pe['mufu']:.2f} | {pe['fp32']:.1f} | {pe['imad']:.1f} | "
                     f"{pe['alu']:.1f} | "
                     f"{pe['lsu']:.2f} | {pe['global_bytes']:.1f} | {pe['warp_instructions']:.2f} | "
                     f"{t['issue'] * 1e6:.2f} | {t['hbm'] * 1e6:.2f} | **{r['predicted_s'] * 1e6:.2f}** | "
                     f"{r['bound']} |")
    return lines


def _name(r):
    return f"{r['shape']} {r['dtype']} {r['mode']} `{r['kernel'].replace('_tanh_attention_', '')}`"


def findings(model: dict) -> List[str]:
    """The conclusions the table supports, computed from it so that they stay true when it is regenerated."""
    rows = model["kernels"]
    out = []
    bounds = Counter(r["bound"] for r in rows)
    out.append("- **Bounds**: " + ", ".join(f"{pipe} {n}" for pipe, n in bounds.most_common())
               + f" of {len(rows)} kernels. Per kernel, with the runner-up:")
    for r in rows:
        second = sorted((v, k) for k, v in r["times_s"].items())[-2]
        out.append(f"  - {_name(r)}: {r['bound']} {_us(r['predicted_s'])} us (then {second[1]} {_us(second[0])} us)")
    forwards = {(r["dtype"], r["mode"]): r for r in rows
                if r["shape"] == "official" and r["kernel"].endswith("fwd_kernel")}
    for label in sorted({d for d, _ in forwards}):
        train, infer = forwards.get((label, "train")), forwards.get((label, "inference"))
        if train and infer:
            alu = train["per_element"]["alu"] - infer["per_element"]["alu"]
            imad = train["per_element"]["imad"] - infer["per_element"]["imad"]
            out.append(f"- **Dropout** ({label}, official forward): {alu:.0f} more ALU and {imad:.0f} more IMAD lanes "
                       f"per map element in training than in inference, {_us(train['predicted_s'])} us "
                       f"({train['bound']}-bound) against {_us(infer['predicted_s'])} us predicted.")
    for r in rows:
        if r["shape"] == "official" and r["dtype"] == "bf16":
            pe = r["per_element"]
            total = pe["warp_instructions"] * 32
            parts = {"FP32": pe["fp32"], "IMAD": pe["imad"], "ALU": pe["alu"], "MUFU": pe["mufu"], "LSU": pe["lsu"]}
            parts["other"] = total - sum(parts.values())
            out.append(f"- **Instruction mix** ({_name(r)}): {total:.0f} thread instructions per map element: "
                       + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + ".")
    mufu_share = [r["times_s"]["mufu"] / r["predicted_s"] for r in rows]
    issue_bound = [r for r in rows if r["bound"] == "issue"]
    text = (f"- **tanh (MUFU)**: {min(r['mufu_per_tanh'] for r in rows):.2f} to "
            f"{max(r['mufu_per_tanh'] for r in rows):.2f} MUFU operations per tanh (an exp2 and a reciprocal, plus "
            f"any replication, below); the MUFU pipe needs {min(mufu_share):.0%} to {max(mufu_share):.0%} of the "
            f"predicted time and bounds {bounds.get('mufu', 0)} of the kernels. A one-instruction `tanh.approx` "
            f"halves that pipe's work")
    if issue_bound:
        per_element = sorted(r["per_element"]["warp_instructions"] * 32 for r in issue_bound)
        text += (f"; in the issue-bound kernels what it saves is instructions: the exp2's argument, the division's "
                 f"refinement and the sign select around the two MUFU operations, each instruction per map element "
                 f"removed being 1/{per_element[0]:.0f} to 1/{per_element[-1]:.0f} of the predicted time.")
    out.append(text if issue_bound else text + ".")
    dropout = [r for r in rows if r["sizes"]["dropout_p"] > 0]
    if dropout:
        calls = {}
        for r in dropout:
            calls.setdefault(r["kernel"].replace("_tanh_attention_", ""), set()).add(
                round(r["per_element"]["philox_calls"], 2))
        out.append("- **Philox calls per map element** (dropout; one call yields four keys, so 0.25 is the least): "
                   + ", ".join(f"`{k}` {' / '.join(f'{v:.2f}' for v in sorted(vs))}" for k, vs in calls.items())
                   + ". That is one call per two adjacent columns in the forward and dq tiles and one per element in "
                     "dk/dv's transposed tile; drawing one call per four columns and spreading its four words would "
                     "cut the generator's work by that factor.")
    replicated = [r for r in rows if r["mma_executed_over_needed"] > 1.01 or r["mufu_per_tanh"] > 2.2]
    if replicated:
        out.append("- **Replicated work**: " + "; ".join(
            f"{_name(r)} executes {r['mma_executed_over_needed']:.2f}x the MMA FLOPs it needs and "
            f"{r['mufu_per_tanh']:.1f} MUFU per tanh" for r in replicated)
            + ". These launch 64-row tiles with 8 warps: the counts are those of both warpgroups computing the same "
              "64-row map tile (a warpgroup MMA covers 64 rows), its tanh included. 4 warps or 128-row tiles for that "
              "size class are worth compiling and timing.")
    gates = model.get("gate_kernels", [])
    if gates:
        slowest = max(gates, key=lambda r: r["predicted_s"])
        out.append(f"- **Gates**: every gate kernel is predicted at {_us(slowest['predicted_s'])} us or less "
                   f"({slowest['op']} {slowest['dtype']} {slowest['mode']}, {slowest['bound']}-bound), below the few "
                   f"microseconds of a kernel launch: at batch 64 they cost their launches, not their work.")
    low = [r for r in rows if r["occupancy"]["warps_per_sm"] <= 8]
    if low:
        out.append("- **Latency risk**: " + "; ".join(
            f"{_name(r)} ({r['registers']} registers: {r['occupancy']['warps_per_sm']} warps per SM)" for r in low)
            + ". With one 8-warp program per SM, MUFU and memory latency are hidden by that program alone; expect "
              "these to run above their prediction.")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "avkernels",
                                                             "cost-model"))
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # kernels must be JIT functions to compile
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default (triton 3.9 warns when unset)
    sys.path.insert(0, ROOT)
    model = build(args.cache_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{STEM}.json"), "w") as f:
        json.dump(model, f, indent=1, default=str)
    text = render(model)
    with open(os.path.join(args.out_dir, f"{STEM}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
