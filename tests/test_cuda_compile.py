"""Compile checks for the "cuda" backend's sources (csrc/cuda), runnable without a GPU.

* Every ``csrc/cuda/*.cu`` file compiles with nvcc for sm_80 and sm_90, with the flags torch's CUDAExtension adds
  (``__CUDA_NO_HALF_CONVERSIONS__`` and friends) and setup.py's own, so a syntax or type error fails CI even where
  torch has no CUDA and the extension is never built.
* ptxas's resource report (``-Xptxas -v``: the numbers ``cuobjdump -res-usage`` prints for the object, without
  needing cuobjdump, which a minimal CUDA install lacks) must show no register spills in any instantiated kernel,
  for both architectures; the registers per kernel are printed (``pytest -s``).
* ``csrc/cuda/binding.cpp`` (the thin torch binding) gets ``g++ -fsyntax-only`` against torch's headers. A CPU
  build of torch ships the c10/cuda headers but not the cmake-generated ``c10/cuda/impl/cuda_cmake_macros.h``; the
  test supplies an empty one in a temporary directory. Only syntax and types are checked: nothing is linked.
* The kernels' own code also runs, on the CPU: the .cu files are compiled by g++ against the stand-in CUDA headers
  of ``csrc/cuda/emulation`` (blocks run one after another, each thread of a block an OS thread; see
  ``emulation/cuda_runtime.h``) and their results, float32 and float64, are compared with the fp64 reference,
  and the dropout mask with Triton's ``tl.rand``. This validates indexing, tiling, edge masking, Philox offsets
  and reductions where no GPU exists; tests/test_cuda_backend.py tests the real build on a GPU.

The compiles run in parallel (two at a time) into a fresh temporary directory: nothing is cached between runs.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from avkernels import reference
from dropout_oracle import triton_dropout_uniform

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
BINDING = CSRC / "cuda" / "binding.cpp"
EMULATION = CSRC / "cuda" / "emulation"
EMULATED_LIBRARY = "libavkernels_cuda_emulated.so"
ARCHS = ("80", "90")


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _nvcc_command(source: Path, out_dir: Path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the defines every CUDAExtension compile gets

    arch_flags = [f for arch in ARCHS for f in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return [
        NVCC, *COMMON_NVCC_FLAGS, *arch_flags, "-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v",
        "-I", str(CSRC), "-c", str(source), "-o", str(out_dir / (source.stem + ".o")),
    ]  # fmt: skip


def _binding_command(shim_dir: Path):
    from torch.utils.cpp_extension import include_paths

    cuda_include = Path(NVCC).resolve().parents[1] / "include"
    includes = [shim_dir, *include_paths(), cuda_include, sysconfig.get_paths()["include"], CSRC]
    return ["g++", "-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in includes], str(BINDING)]


def _split_top_level(text):
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def _rewrite_launches(source: str) -> str:
    """Turns `kernel<T><<<grid, block, smem, stream>>>(args);` into
    `emu::launch(dim3(grid), dim3(block), [&] { kernel<T>(args); });` (see emulation/cuda_runtime.h)."""
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)<<<(.*?)>>>\((.*?)\);\s*\n", re.S)

    def to_call(match):
        grid, block = _split_top_level(match.group(2))[:2]
        return f"emu::launch(dim3({grid}), dim3({block}), [&] {{ {match.group(1)}({match.group(3)}); }});\n"

    rewritten, count = launch.subn(to_call, source)
    assert count == source.count("<<<"), "a kernel launch was not recognised by the emulation rewrite"
    return rewritten


def _emulation_command(out_dir: Path):
    sources = []
    for source in CU_FILES:
        rewritten = out_dir / (source.stem + ".cpp")
        rewritten.write_text(_rewrite_launches(source.read_text()))
        sources.append(str(rewritten))
    return [
        "g++", "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{EMULATION}", f"-I{CSRC}", *sources,
        str(EMULATION / "harness.cpp"), "-o", str(out_dir / EMULATED_LIBRARY), "-lpthread",
    ]  # fmt: skip


def _run(command):
    done = subprocess.run(command, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_build")


@pytest.fixture(scope="module")
def builds(build_dir):
    """Compiles every .cu file, checks the binding and builds the CPU emulation once, two jobs at a time.

    Returns a dict from the job's name (file name, or the emulated library's) to (return code, compiler output).
    """
    out_dir = build_dir
    jobs = {source.name: _nvcc_command(source, out_dir) for source in CU_FILES}
    if BINDING.exists() and shutil.which("g++"):
        shim = out_dir / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        jobs[BINDING.name] = _binding_command(out_dir / "shim")
    if shutil.which("g++"):
        emulation_dir = out_dir / "emulation"
        emulation_dir.mkdir()
        jobs[EMULATED_LIBRARY] = _emulation_command(emulation_dir)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    return results


def _resource_usage(ptxas_output: str):
    """Parses ptxas -v into {(kernel, arch): {"registers", "spill_stores", "spill_loads", "stack"}}."""
    usage, kernel, arch = {}, None, None
    for line in ptxas_output.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if entry:
            kernel, arch = entry.groups()
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame and kernel:
            usage.setdefault((kernel, arch), {}).update(
                stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3))
            )
        registers = re.search(r"Used (\d+) registers", line)
        if registers and kernel:
            usage.setdefault((kernel, arch), {})["registers"] = int(registers.group(1))
    return usage


def _readable(mangled: str) -> str:
    """`..._tanh_attention_cu_<hash>NN<name>I<args>E...` -> `<name><args>`, enough to tell instantiations apart."""
    match = re.search(r"\d+([a-z_]+_kernel)I(.*?)EEvN?S?", mangled)
    return f"{match.group(1)}<{match.group(2)}>" if match else mangled


def test_cuda_sources_exist():
    names = {p.name for p in CU_FILES}
    assert {"tanh_attention.cu", "softmax_mix.cu"} <= names, f"expected kernel sources in csrc/cuda, found {sorted(names)}"


def test_setup_globs_only_the_binding_as_cpp():
    # setup.py feeds csrc/cuda/*.cpp to the host compiler of the CUDA extension: only the torch binding belongs there.
    cpp_files = [Path(p).name for p in glob.glob(str(CSRC / "cuda" / "*.cpp"))]
    assert cpp_files == ["binding.cpp"], cpp_files


@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_cu_file_compiles_for_sm80_and_sm90(builds, source):
    returncode, output = builds[source]
    assert returncode == 0, f"nvcc failed on csrc/cuda/{source}:\n{output[-6000:]}"
    assert "warning" not in output.lower(), f"nvcc warned on csrc/cuda/{source}:\n{output[-6000:]}"


@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_kernels_do_not_spill(builds, source):
    returncode, output = builds[source]
    if returncode != 0:
        pytest.fail(f"csrc/cuda/{source} did not compile (see test_cu_file_compiles_for_sm80_and_sm90)")
    usage = _resource_usage(output)
    kernels = {kernel for kernel, _ in usage}
    assert kernels, f"ptxas reported no kernels for {source}:\n{output[-3000:]}"
    for kernel in kernels:
        assert {arch for k, arch in usage if k == kernel} == {f"sm_{a}" for a in ARCHS}, kernel
    print(f"\n{source}: registers / spill stores / spill loads per kernel")
    for (kernel, arch), info in sorted(usage.items(), key=lambda item: (_readable(item[0][0]), item[0][1])):
        print(f"  {arch} {_readable(kernel):70s} {info['registers']:4d} regs  "
              f"{info['spill_stores']} / {info['spill_loads']} B spilled")  # fmt: skip
    spilled = {
        f"{_readable(k)} {arch}": (info["spill_stores"], info["spill_loads"])
        for (k, arch), info in usage.items()
        if info["spill_stores"] or info["spill_loads"]
    }
    assert not spilled, f"kernels spill registers to local memory (stores, loads in bytes): {spilled}"


def test_every_dtype_is_instantiated(builds):
    usage = {}
    for source in CU_FILES:
        usage.update(_resource_usage(builds[source.name][1]))
    names = {_readable(kernel) for kernel, _ in usage}
    for kernel in (
        "tanh_attention_forward_kernel",
        "tanh_attention_backward_dq_kernel",
        "tanh_attention_backward_dkdv_kernel",
        "softmax_mix_forward_kernel",
        "softmax_mix_backward_rows_kernel",
    ):
        # Itanium mangling of the storage types: float, double, __half, __nv_bfloat16.
        for dtype in ("f", "d", "6__half", "13__nv_bfloat16"):
            assert any(n.startswith(f"{kernel}<{dtype}") for n in names), f"{kernel} not instantiated for {dtype}"


@pytest.mark.skipif(not BINDING.exists() or shutil.which("g++") is None, reason="needs csrc/cuda/binding.cpp and g++")
def test_binding_is_valid_cpp_against_torch_headers(builds):
    returncode, output = builds[BINDING.name]
    errors = [line for line in output.splitlines() if "error" in line]
    assert returncode == 0 and not errors, f"g++ -fsyntax-only failed on csrc/cuda/binding.cpp:\n{output[-6000:]}"


# ----------------------------------------------------------------------------------------------------------------
# The kernels' code run on the CPU (csrc/cuda/emulation)
# ----------------------------------------------------------------------------------------------------------------

EMULATION_TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}  # max error relative to max(1, max |reference|)


@pytest.fixture(scope="module")
def emulated(builds, build_dir):
    if EMULATED_LIBRARY not in builds:
        pytest.skip("g++ not found: cannot build the CPU emulation of the CUDA kernels")
    returncode, output = builds[EMULATED_LIBRARY]
    assert returncode == 0, f"the CPU emulation of csrc/cuda did not build:\n{output[-6000:]}"
    return ctypes.CDLL(str(build_dir / "emulation" / EMULATED_LIBRARY))


def _pointer(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


def _strides(t):
    return (ctypes.c_int64 * 3)(*(t.stride() if t is not None else (0, 0, 0)))


def _int64s(*values):
    return (ctypes.c_int64 * len(values))(*values)


def _assert_close(ours, expected, name, dtype):
    assert ours.shape == expected.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    if ours.numel() == 0:
        return
    error = (ours.double() - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    assert error <= EMULATION_TOLERANCE[dtype], f"{name} ({dtype}): relative error {error:.2e}"


def _emulated_attention(lib, q, k, v, dout, scale, p, activation, seed, deterministic, map_bias=None):
    """map_bias None: the tanh map; a float: the sigmoid map with that bias."""
    batch, queries, head_dim = q.shape
    keys, value_dim = k.shape[1], v.shape[2]
    is_double = int(q.dtype == torch.float64)
    sizes = _int64s(batch, queries, keys, head_dim, value_dim)
    shared = int(v.shape[0] == 1)
    common = (_pointer(q), _strides(q), _pointer(k), _strides(k), _pointer(v), _strides(v), sizes, shared,
              ctypes.c_double(scale), ctypes.c_double(p), ctypes.c_uint64(seed), activation,
              int(map_bias is not None), ctypes.c_double(map_bias or 0.0))  # fmt: skip
    o = torch.empty(batch, queries, value_dim, dtype=q.dtype)
    mask = torch.empty(batch, queries, keys, dtype=torch.bool) if p > 0 else None
    assert lib.emu_tanh_attention_forward(is_double, *common, _pointer(o), _pointer(mask)) == 0
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype) for x in (q, k, v))
    saved_o = o if activation else None
    status = lib.emu_tanh_attention_backward(
        is_double, *common, _pointer(dout), _strides(dout), _pointer(saved_o), _strides(saved_o),
        _pointer(dq), _pointer(dk), _pointer(dv), int(deterministic),
    )  # fmt: skip
    assert status == 0
    return o, mask, dq, dk, dv


EMULATED_ATTENTION_CASES = [
    # (B, Mq, N, D, E), dtype, activation, dropout_p, shared v, deterministic[, sigmoid map's bias]
    ((2, 37, 53, 16, 16), torch.float32, 1, 0.3, False, True),
    ((2, 37, 53, 16, 16), torch.float32, 1, 0.3, False, True, -1.5),
    ((2, 131, 17, 100, 9), torch.float64, 0, 0.25, True, False, 0.0),  # sigmoid, atomic dv path
    ((3, 65, 67, 33, 70), torch.float32, 0, 0.0, True, True),  # several tiles, E over one chunk
    ((2, 131, 17, 100, 9), torch.float64, 1, 0.25, True, False),  # atomic dv path
    ((1, 5, 300, 7, 130), torch.float64, 0, 0.5, False, True),
    ((1, 1, 1, 1, 1), torch.float32, 0, 0.5, False, True),
    ((2, 0, 5, 3, 4), torch.float32, 0, 0.0, True, True),
    ((2, 5, 0, 3, 4), torch.float32, 1, 0.2, False, True),
]


@pytest.mark.parametrize("case", EMULATED_ATTENTION_CASES,
                         ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-act{c[2]}-p{c[3]}" + ("-sigmoid" if len(c) > 6 else ""))
def test_emulated_tanh_attention_matches_reference(emulated, case):
    (batch, queries, keys, head_dim, value_dim), dtype, activation, p, shared, deterministic = case[:6]
    map_bias = case[6] if len(case) > 6 else None
    q = torch.randn(batch, 2 * queries, head_dim, dtype=dtype)[:, ::2]  # strided rows
    k = torch.randn(batch, head_dim, keys, dtype=dtype).transpose(1, 2)  # unit stride along keys
    v = torch.randn(1 if shared else batch, keys, value_dim, dtype=dtype)
    dout = torch.randn(batch, value_dim, queries, dtype=dtype).transpose(1, 2)
    scale, seed = 1 / math.sqrt(head_dim), 12345
    o, mask, dq, dk, dv = _emulated_attention(emulated, q, k, v, dout, scale, p, activation, seed, deterministic,
                                              map_bias)

    leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    maps = {} if map_bias is None else {"map": "sigmoid", "map_bias": map_bias}
    expected, _ = reference.tanh_attention(*leaves, scale, p, "tanh_relu" if activation else None, dropout_mask=mask,
                                           **maps)
    expected.backward(dout.double())
    for name, ours, ref in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), (expected, *[x.grad for x in leaves])):
        _assert_close(ours, ref.detach(), name, dtype)
    if mask is not None and mask.numel():
        keep = triton_dropout_uniform(seed, 0, batch * queries, keys) >= torch.tensor(p, dtype=torch.float32)
        assert torch.equal(mask.view(-1, keys), keep), "the keep-mask differs from the Triton kernels' generator"


def _emulated_gate(lib, candidates, first_logit_candidate, weight, bias, tau, dout, dgates):
    count = len(candidates)
    batch, length, features = candidates[0].shape
    is_double = int(weight.dtype == torch.float64)
    pointers = (ctypes.c_void_p * count)(*[c.data_ptr() for c in candidates])
    strides = _int64s(*[s for c in candidates for s in c.stride()])
    inputs = (is_double, count, first_logit_candidate, pointers, strides, _int64s(batch, length, features),
              _pointer(weight), _int64s(*weight.stride()))  # fmt: skip
    out = torch.empty(batch, length, features, dtype=weight.dtype)
    gates = torch.empty(batch, length, count, dtype=weight.dtype)
    status = lib.emu_softmax_mix_forward(
        *inputs, _pointer(bias), ctypes.c_int64(bias.stride(0)), ctypes.c_double(tau), _pointer(out), _pointer(gates)
    )
    assert status == 0
    d_candidates = torch.empty(count, batch, length, features, dtype=weight.dtype)
    d_weight, d_bias = torch.empty_like(weight), torch.empty(count, dtype=weight.dtype)
    status = lib.emu_softmax_mix_backward(
        *inputs, ctypes.c_double(tau), _pointer(dout), _strides(dout), _pointer(dgates), _strides(dgates),
        _pointer(gates), _strides(gates), _pointer(out), _strides(out), _pointer(d_candidates), _pointer(d_weight),
        _pointer(d_bias),
    )  # fmt: skip
    assert status == 0
    return out, gates, d_candidates, d_weight, d_bias


@pytest.mark.parametrize(
    "shape, dtype", [((2, 16, 512), torch.float32), ((3, 7, 37), torch.float64), ((2, 3, 0), torch.float32)]
)
def test_emulated_gate_matches_reference(emulated, shape, dtype):
    batch, length, features = shape
    attended = torch.randn(batch, length, 2 * features, dtype=dtype)[:, :, ::2]
    unattended = torch.randn(length, batch, features, dtype=dtype).transpose(0, 1)
    weight, bias = 0.1 * torch.randn(2, features, dtype=dtype), torch.randn(2, dtype=dtype)
    dout, dg = torch.randn(batch, length, features, dtype=dtype), torch.randn(batch, length, 2, dtype=dtype)
    out, g, d_candidates, d_weight, d_bias = _emulated_gate(emulated, [unattended, attended], 1, weight, bias, 0.1,
                                                            dout, dg)  # fmt: skip
    leaves = [x.double().requires_grad_(True) for x in (attended, unattended, weight, bias)]
    ref_out, ref_g = reference.gate(*leaves, 0.1)
    torch.autograd.backward([ref_out, ref_g], [dout.double(), dg.double()])
    ours = (out, g, d_candidates[1], d_candidates[0], d_weight, d_bias)
    expected = (ref_out, ref_g, *[x.grad for x in leaves])
    for name, a, b in zip(("out", "g", "d_attended", "d_unattended", "d_weight", "d_bias"), ours, expected):
        _assert_close(a, b.detach(), name, dtype)


@pytest.mark.parametrize(
    "n_stages, shape, dtype",
    [(3, (5, 3, 300), torch.float32), (8, (3, 7, 37), torch.float64), (1, (1, 1, 1), torch.float32)],
)
def test_emulated_stage_gate_matches_reference(emulated, n_stages, shape, dtype):
    batch, length, features = shape
    stages = [torch.randn(batch, length, features, dtype=dtype) for _ in range(n_stages)]
    stages[0] = torch.randn(batch, features, length, dtype=dtype).transpose(1, 2)
    weight = 0.05 * torch.randn(n_stages, n_stages * features, dtype=dtype)
    bias = torch.randn(n_stages, dtype=dtype)
    dout, ds = torch.randn(batch, length, features, dtype=dtype), torch.randn(batch, length, n_stages, dtype=dtype)
    out, s, d_stages, d_weight, d_bias = _emulated_gate(emulated, stages, 0, weight, bias, 0.1, dout, ds)
    leaves = [x.double().requires_grad_(True) for x in (*stages, weight, bias)]
    ref_out, ref_s = reference.stage_gate(leaves[:-2], leaves[-2], leaves[-1], 0.1)
    torch.autograd.backward([ref_out, ref_s], [dout.double(), ds.double()])
    expected = (ref_out, ref_s, torch.stack([x.grad for x in leaves[:-2]]), leaves[-2].grad, leaves[-1].grad)
    ours = (out, s, d_stages, d_weight, d_bias)
    for name, a, b in zip(("out", "s", "d_stages", "d_weight", "d_bias"), ours, expected):
        _assert_close(a, b.detach(), name, dtype)
