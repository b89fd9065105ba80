"""Build script: the Python package, plus the optional C++ (CPU) and CUDA extensions from ``csrc/``.

The extensions are built with ``torch.utils.cpp_extension`` when a compiler is there (and, for CUDA, when torch has
CUDA and nvcc is found). A missing toolchain or a failed compile never fails the install: the library then runs on
the backends it has (``avkernels.backends()`` lists them). ``AVKERNELS_NO_EXTENSIONS=1`` skips both builds.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))  # ninja needs absolute include paths


def _extensions():
    if os.environ.get("AVKERNELS_NO_EXTENSIONS", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        warnings.warn(f"avkernels: torch is not importable at build time ({exc}); building without extensions")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds each extension if it can; a failure is reported and skipped, never fatal."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must leave a usable install
                warnings.warn(f"avkernels: could not build {ext.name}; its backend will be unavailable: {exc}")

    ext_modules = []
    cpu_sources = sorted(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    if cpu_sources:
        ext_modules.append(
            CppExtension(
                "avkernels._C_cpu",
                cpu_sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                # -fopenmp: at::parallel_for is only parallel in code compiled with OpenMP (torch's CPU build uses
                # it; the extension then shares torch's libgomp). -ffp-contract=fast: let the ISA clones use FMA. No -std:
                # torch.utils.cpp_extension adds the standard its headers need (C++20 for torch >= 2.10).
                # No -march: the kernels carry their own AVX-512 / AVX2 / baseline clones (csrc/cpu/simd.h).
                extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast"]},
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_sources = sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    cuda_sources += sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
    if cuda_sources and torch.version.cuda is not None and CUDA_HOME is not None:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        ext_modules.append(
            CUDAExtension(
                "avkernels._C_cuda",
                cuda_sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            )
        )
    return ext_modules, {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="avkernels",
    version="0.1.0",
    description="Fused kernels for audio-visual fusion by joint cross-attention (JCA, RJCA, DCA, GRJCA)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["avkernels", "avkernels.*"]),
    python_requires=">=3.9",
    # torch is not pinned: an installed torch is never upgraded (install torch first, see the README).
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.3"],
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scipy", "matplotlib", "triton==3.9.0"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
