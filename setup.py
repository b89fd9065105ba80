"""Build script: the Python package, plus the optional C++ (CPU) and CUDA extensions from ``csrc/``.

A non-editable install (a wheel, ``pip install .``, ``pip install git+URL``) also carries ``csrc/`` inside the package
(``avkernels/csrc/``): pip's default isolated build has no torch, so no extension is built there, and the library then
compiles the CPU extension against the installed torch when it is first imported, once per sources and torch (a build
cache keyed by their content: ``avkernels/ops/native.py``).

The extensions are built with ``torch.utils.cpp_extension`` when a compiler is there (and, for CUDA, when torch has
CUDA and nvcc is found). A missing toolchain or a failed compile never fails the install: the library then runs on
the backends it has (``avkernels.backends()`` lists them). ``AVKERNELS_NO_EXTENSIONS=1`` skips both builds.
"""

import glob
import importlib.machinery
import os
import runpy
import sys
import time
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))  # ninja needs absolute include paths
# Compiler settings and source lists shared with avkernels.ops.native, read without importing the package.
CONFIG = runpy.run_path(os.path.join(HERE, "avkernels", "_build_config.py"))


def _sources(patterns):
    return sorted(
        {path for pattern in patterns for path in glob.glob(os.path.join(HERE, pattern), recursive=True)}
    )


class BuildPyWithSources(build_py):
    """Also copies the kernel sources into the package, so that an install whose build had no torch (or whose
    prebuilt extension does not match the torch installed later) can compile them when it is imported."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install compiles from the checkout's csrc/
        for source in _sources(CONFIG["SHIPPED_SOURCES"]):
            target = os.path.join(self.build_lib, "avkernels", os.path.relpath(source, HERE))
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)


def _extensions():
    if os.environ.get("AVKERNELS_NO_EXTENSIONS", "0") == "1":
        return [], {}, {}
    try:
        import torch
        from torch.utils import cpp_extension as cpp_extension_module
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        warnings.warn(f"avkernels: torch is not importable at build time ({exc}); building without extensions "
                      "(avkernels compiles the CPU one against the installed torch when first imported)")
        return [], {}, {}

    class OptionalBuildExtension(BuildExtension):
        """Builds each extension if it can; a failure is reported and skipped, never fatal.

        A failed extension is dropped from the list once all are built, so the later steps (the in-place copy of
        ``build_ext --inplace``, the output mapping of an editable install) do not look for its missing binary.
        """

        def build_extension(self, ext):
            started = time.monotonic()
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must leave a usable install
                self._failed = getattr(self, "_failed", set()) | {ext.name}
                warnings.warn(f"avkernels: could not build {ext.name}; its backend will be unavailable: {exc}")
                return
            # Like every build of the kernels (avkernels/ops/native.py), one line: why, and how long it took.
            print(f"avkernels: built {ext.name} for torch {torch.__version__} (the install's build had torch) in "
                  f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

        def build_extensions(self):
            super().build_extensions()
            self.extensions = [ext for ext in self.extensions if ext.name not in getattr(self, "_failed", set())]

        def copy_extensions_to_source(self):
            """``build_ext --inplace``: also removes older builds of the same modules under another file suffix.
            Python imports ``_C_cpu.cpython-3xx-<platform>.so`` before ``_C_cpu.abi3.so``, so the pybind11 module
            of earlier versions would shadow the library copied beside it now."""
            super().copy_extensions_to_source()
            for ext in self.extensions:
                target = os.path.join(HERE, self.get_ext_filename(ext.name))
                suffix = next(s for s in importlib.machinery.EXTENSION_SUFFIXES if target.endswith(s))
                for other in importlib.machinery.EXTENSION_SUFFIXES:
                    stale = target[: -len(suffix)] + other
                    if other != suffix and os.path.exists(stale):
                        os.remove(stale)

    # Libraries of torch ops (TORCH_LIBRARY), with an empty Python module so that `import` loads them: they use no
    # Python API beyond that stub, hence the limited API, no pybind11 and no libtorch_python, and a C++ program
    # can dlopen them (examples/aoti).
    ext_modules = []
    cpu_sources = _sources(CONFIG["CPU_SOURCES"])
    if cpu_sources:
        ext_modules.append(
            CppExtension(
                CONFIG["CPU_MODULE"],
                cpu_sources,
                include_dirs=[os.path.join(HERE, CONFIG["INCLUDE_DIR"])],
                extra_compile_args={"cxx": list(CONFIG["CPU_CXX_FLAGS"]) + (
                    list(CONFIG["CPU_STABLE_ABI_FLAGS"])
                    if CONFIG["uses_stable_abi"]("CPU", torch.__version__, os.environ) else [])},
                extra_link_args=list(CONFIG["CPU_LINK_FLAGS"]),
                py_limited_api=True,
            )
        )
    cuda_sources = _sources(CONFIG["CUDA_SOURCES"])
    if cuda_sources and torch.version.cuda is not None and CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CONFIG["CUDA_DEFAULT_ARCHS"])
        ext_modules.append(
            CUDAExtension(
                CONFIG["CUDA_MODULE"],
                cuda_sources,
                include_dirs=[os.path.join(HERE, CONFIG["INCLUDE_DIR"])],
                extra_compile_args={"cxx": list(CONFIG["CUDA_CXX_FLAGS"]), "nvcc": list(CONFIG["CUDA_NVCC_FLAGS"])},
                py_limited_api=True,
            )
        )
    # The wheel's tag: the limited API of the oldest Python torch compiles the extensions for (-DPy_LIMITED_API),
    # e.g. cp310-abi3, so that pip installs it on that Python and every later one. A torch that does not say (older
    # than 2.6) compiles them without Py_LIMITED_API: then the wheel keeps its interpreter tag.
    limited = getattr(cpp_extension_module, "min_supported_cpython", None)
    wheel_options = {}
    if ext_modules and limited is not None:
        wheel_options = {"bdist_wheel": {"py_limited_api": f"cp3{(int(limited, 16) >> 16) & 0xFF}"}}
    return ext_modules, {"build_ext": OptionalBuildExtension}, wheel_options


ext_modules, cmdclass, options = _extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

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
    # triton: the range the Triton backend is tested with, 3.6 (pinned by torch 2.11) to 3.9 (torch 2.13); an older
    # one makes the backend unavailable with the reason (avkernels/ops/triton/_compat.py). The test extra pins the
    # newest for the main environment; `make test` also runs the Triton tests with 3.6 in a venv of their own
    # (scripts/test_oldest_triton.sh).
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        # What the example scripts need beyond the library (make demo installs it; each script that needs a missing
        # one says so in one line, examples/prelude.py).
        "examples": ["matplotlib"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest", "pytest-benchmark", "scipy", "matplotlib", "triton==3.9.0", "onnx", "onnxscript", "onnxruntime"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
