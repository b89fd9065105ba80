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

CUDA_MODULE = "avkernels._C_cuda"
CUDA_SOURCES = ("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
CUDA_CXX_FLAGS = ("-O3",)
CUDA_NVCC_FLAGS = ("-O3", "-lineinfo")
CUDA_DEFAULT_ARCHS = "8.0;9.0"
