"""Compile checks for the "cuda" backend's sources (csrc/cuda), runnable without a GPU.

* Every ``csrc/cuda/*.cu`` file compiles with nvcc for sm_80 and sm_90, with the flags torch's CUDAExtension adds
  (``__CUDA_NO_HALF_CONVERSIONS__`` and friends) and setup.py's own, so a syntax or type error fails CI even where
  torch has no CUDA and the extension is never built.
* ptxas's resource report (``-Xptxas -v``, what ``cuobjdump -res-usage`` prints for the object) must show no
  register spills in any instantiated kernel, for both architectures; the registers per kernel are printed.
* ``csrc/cuda/binding.cpp`` (the thin torch binding) gets ``g++ -fsyntax-only`` against torch's headers. A CPU
  build of torch ships the c10/cuda headers but not the cmake-generated ``c10/cuda/impl/cuda_cmake_macros.h``; the
  test supplies an empty one in a temporary directory. Only syntax and types are checked: nothing is linked.

The compiles run in parallel (two at a time) into a fresh temporary directory: nothing is cached between runs.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
BINDING = CSRC / "cuda" / "binding.cpp"
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


def _run(command):
    done = subprocess.run(command, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Compiles every .cu file (and checks the binding) once, two jobs at a time; maps a name to (rc, output)."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = {source.name: _nvcc_command(source, out_dir) for source in CU_FILES}
    if BINDING.exists() and shutil.which("g++"):
        shim = out_dir / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        jobs[BINDING.name] = _binding_command(out_dir / "shim")
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
    assert {"tanh_attention.cu", "gate.cu"} <= names, f"expected kernel sources in csrc/cuda, found {sorted(names)}"


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
        "softmax_gate_forward_kernel",
        "softmax_gate_backward_rows_kernel",
    ):
        # Itanium mangling of the storage types: float, double, __half, __nv_bfloat16.
        for dtype in ("f", "d", "6__half", "13__nv_bfloat16"):
            assert any(n.startswith(f"{kernel}<{dtype}") for n in names), f"{kernel} not instantiated for {dtype}"


@pytest.mark.skipif(not BINDING.exists() or shutil.which("g++") is None, reason="needs csrc/cuda/binding.cpp and g++")
def test_binding_is_valid_cpp_against_torch_headers(builds):
    returncode, output = builds[BINDING.name]
    errors = [line for line in output.splitlines() if "error" in line]
    assert returncode == 0 and not errors, f"g++ -fsyntax-only failed on csrc/cuda/binding.cpp:\n{output[-6000:]}"
