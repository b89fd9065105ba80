"""How the optional native extensions are compiled: one place read by ``setup.py`` (the install build) and by
:func:`avkernels.ops.native.build` (the build at import and ``python -m avkernels build``). Plain constants and no
imports, so that ``setup.py`` can read this file without importing the package. The build cache's key includes
every value here that changes the binary (the flags).

Paths are relative to the repository root. A non-editable install also carries ``csrc/`` inside the package
(``avkernels/csrc/``, copied by ``setup.py``), so the same patterns resolve against the installed package directory:
an install without a prebuilt extension (pip's isolated build has no torch) compiles it when first imported.
"""

INCLUDE_DIR = "csrc"  # holds common/philox.h, shared by both extensions

# Everything a build needs, copied into the package by setup.py (build_py) and listed in MANIFEST.in for the sdist.
SHIPPED_SOURCES = ("csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh")

CPU_MODULE = "avkernels._C_cpu"
CPU_SOURCES = ("csrc/cpu/*.cpp",)
# -fopenmp: at::parallel_for only runs in parallel in code compiled with OpenMP (the extension then shares torch's
# libgomp). -ffp-contract=fast lets the AVX2/AVX-512 clones fuse multiply-adds. No -march: the kernels carry their
# own per-ISA clones (csrc/cpu/simd.h), so the binary stays portable. No -std: torch.utils.cpp_extension adds the
# standard its headers require. -g0: no debug info, a faster build.
CPU_CXX_FLAGS = ("-O3", "-g0", "-fopenmp", "-ffp-contract=fast")
CPU_LINK_FLAGS = ("-fopenmp",)
# The CPU library on PyTorch's stable ABI (csrc/common/tensor_api.h) where the building torch has it (>= 2.10): added
# to CPU_CXX_FLAGS. TORCH_TARGET_VERSION=2.10 hides every stable API newer than 2.10, so the binary calls only C shims
# that torch 2.10 and every later torch provide. AVKERNELS_STABLE_ABI=0 builds the ATen variant instead (the one
# older torch gets), e.g. to compare the two.
STABLE_ABI_FROM = (2, 10)
CPU_STABLE_ABI_FLAGS = ("-DAVK_STABLE_ABI=1", "-DTORCH_TARGET_VERSION=0x020a000000000000")


def uses_stable_abi(prefix, torch_version, environ):
    """Whether the library of `prefix` ("CPU", "CUDA") is built on the stable ABI for torch `torch_version`. The
    CUDA library stays on ATen (csrc/cuda/binding.cpp)."""
    if prefix != "CPU" or environ.get("AVKERNELS_STABLE_ABI", "1") == "0":
        return False
    release = torch_version.split("+")[0].split(".")[:2]
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in release) >= STABLE_ABI_FROM


CUDA_MODULE = "avkernels._C_cuda"
CUDA_SOURCES = ("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
CUDA_CXX_FLAGS = ("-O3",)
CUDA_NVCC_FLAGS = ("-O3", "-lineinfo")
CUDA_DEFAULT_ARCHS = "8.0;9.0"
