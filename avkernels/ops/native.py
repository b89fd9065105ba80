"""The compiled backends: ``"cpp"`` (``avkernels._C_cpu``, CPU tensors) and ``"cuda"`` (``avkernels._C_cuda``).

Both libraries are optional and built from ``csrc/`` by ``pip install`` (see ``setup.py``). They are libraries of
torch ops, not Python bindings: ``avkernels._C_cpu`` defines the schema of every op (``TORCH_LIBRARY(avkernels,
...)`` in ``csrc/cpu/library.cpp``) and registers its CPU kernels; ``avkernels._C_cuda`` registers the CUDA kernels
of the same ops, so it is loaded after it. Importing one runs those registrations, nothing more. This module loads
whichever were built, registers fakes and autograd on the ops from their declarations
(:func:`avkernels.ops.declaration.define_library_ops`), and registers the two backends with a precise reason when
one cannot run. A backend's :class:`~avkernels.backends.OpImpl` carries no Python kernels: the public functions call
``torch.ops.avkernels.<op>`` and torch's dispatcher picks the CPU or CUDA kernel.

:func:`build_jit` compiles a library in-process with ``torch.utils.cpp_extension.load`` (for development: no
reinstall needed after editing ``csrc/``) and makes its backend available at once. The cpp backend calls it by itself
the first time dispatch asks whether it can run (never at import) when no prebuilt ``avkernels._C_cpu`` imports, as
after ``pip install .`` with build isolation: one line on stderr while it compiles, a cache shared by later processes,
and on failure a warning, once, that CPU calls run on the reference backend. ``AVKERNELS_JIT_BUILD=0`` turns it off.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import os
import runpy
import shutil
import sys
import threading
import warnings
from typing import Dict, List, Optional

import torch

from avkernels.backends import OPS, BackendInfo, Inputs, OpImpl, dtype_reason, register_backend, register_impl
from avkernels.ops import declaration

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILD_CONFIG = os.path.join(_PACKAGE_DIR, "_build_config.py")
# Where csrc/ is: inside the package in a non-editable install (setup.py copies it there), beside it in a checkout.
_SOURCE_ROOTS = (_PACKAGE_DIR, os.path.dirname(_PACKAGE_DIR))
JIT_ENV_VAR = "AVKERNELS_JIT_BUILD"

# backend name -> the file of its loaded op library, or the reason it could not be loaded.
_LIBRARIES: Dict[str, str] = {}
_IMPORT_ERRORS: Dict[str, str] = {}
_MODULE_NAMES = {"cpp": "avkernels._C_cpu", "cuda": "avkernels._C_cuda"}
# Why the build on first use of the cpp backend did not give a module; None until it has been tried.
_JIT_FAILURE: Optional[str] = None
_JIT_TRIED = False
_JIT_LOCK = threading.Lock()


def _load(backend: str) -> None:
    """Imports a prebuilt library: the import runs its op registrations (the module itself is empty)."""
    if backend == "cuda" and "cpp" not in _LIBRARIES:
        return  # it registers kernels of the ops that avkernels._C_cpu defines (_not_built says so)
    try:
        module = importlib.import_module(_MODULE_NAMES[backend])
    except ImportError as exc:  # not built here, built against another torch, or a failed build
        _IMPORT_ERRORS[backend] = str(exc)
        return
    _loaded(backend, module.__file__)


def _loaded(backend: str, path: str) -> None:
    """A library's ops are registered in torch now: register what Python adds to them, and use the backend."""
    if backend == "cpp":
        mismatch = declaration.library_schema_mismatch()
        if mismatch is not None:
            _IMPORT_ERRORS[backend] = (
                f"{path} does not define the ops this avkernels declares ({mismatch}): it was built from other "
                "sources; rebuild it (`python setup.py build_ext --inplace` also removes older builds beside it)"
            )
            return
        declaration.define_library_ops()
    _LIBRARIES[backend] = path
    _IMPORT_ERRORS.pop(backend, None)
    if backend == "cpp" and "cuda" not in _LIBRARIES:
        _load("cuda")  # its kernels could not be registered without the schemas


def _not_built(backend: str) -> Optional[str]:
    if backend in _LIBRARIES:
        return None
    if backend == "cuda" and torch.version.cuda is None:
        return "avkernels._C_cuda was not built: this torch has no CUDA support"
    if backend == "cuda" and "cpp" not in _LIBRARIES:
        return "avkernels._C_cuda needs avkernels._C_cpu, which defines the ops, and the cpp backend is unavailable"
    reason = f"{_MODULE_NAMES[backend]} was not built ({_IMPORT_ERRORS.get(backend, 'unknown reason')})"
    if backend == "cpp" and _JIT_FAILURE is not None:
        return f"{reason}, and {_JIT_FAILURE}"
    return (
        f"{reason}; reinstall with a C++ compiler (`pip install --no-build-isolation -e .`) or call "
        f"avkernels.ops.native.build_jit({backend!r})"
    )


def _cpp_unavailable() -> Optional[str]:
    if "cpp" not in _LIBRARIES and not _JIT_TRIED:
        if torch.compiler.is_compiling():
            # Dynamo must not trace a compiler run: run it eagerly, once, behind a graph break.
            torch.compiler.disable(_build_on_first_use)()
        else:
            _build_on_first_use()
    return _not_built("cpp")


def _build_on_first_use() -> None:
    """Compiles avkernels._C_cpu against the installed torch when no prebuilt one imports (an install from pip's
    isolated build, which has no torch, or a wheel built for another torch). Tried once per process; a failure
    leaves the reason in backend_status() and a warning, and the reference backend runs the calls."""
    global _JIT_FAILURE, _JIT_TRIED
    with _JIT_LOCK:
        if _JIT_TRIED or "cpp" in _LIBRARIES:
            return
        try:
            _JIT_FAILURE = _jit_obstacle()
            if _JIT_FAILURE is None:
                try:
                    build_jit("cpp", verbose=False, announce=True)
                except Exception as exc:  # noqa: BLE001 - a failed compile must leave the reference usable
                    detail = str(exc).strip().splitlines()
                    _JIT_FAILURE = f"its build on first use failed ({detail[0] if detail else type(exc).__name__})"
        finally:
            _JIT_TRIED = True
    if "cpp" not in _LIBRARIES:
        warnings.warn(
            f"avkernels: the fused cpp backend is unavailable: {_not_built('cpp')}. CPU calls fall back to the "
            "slower reference backend (avkernels.backend_status() says why).",
            RuntimeWarning,
            stacklevel=2,
        )


def _jit_obstacle() -> Optional[str]:
    """Why the build on first use cannot be tried here, or None."""
    if os.environ.get(JIT_ENV_VAR, "1") == "0":
        return f"the build on first use is turned off (${JIT_ENV_VAR}=0)"
    if _source_root("cpp", _config()) is None:
        return "its sources are not installed (no csrc/ in the package or beside it)"
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0] if compiler.strip() else "c++") is None:
        return f"its build on first use needs a C++ compiler, and {compiler!r} was not found (set $CXX)"
    if not cpp_extension.is_ninja_available():
        return "its build on first use needs ninja, which is not installed (`pip install ninja`)"
    return None


def _config() -> dict:
    return runpy.run_path(_BUILD_CONFIG)


def _sources(root: str, patterns) -> List[str]:
    return sorted({p for pattern in patterns for p in glob.glob(os.path.join(root, pattern), recursive=True)})


def _source_root(backend: str, cfg: dict) -> Optional[str]:
    patterns = cfg["CPU_SOURCES" if backend == "cpp" else "CUDA_SOURCES"]
    return next((root for root in _SOURCE_ROOTS if _sources(root, patterns)), None)


def _build_directory(backend: str, root: str, cfg: dict) -> str:
    """One cache folder per install, sources, flags, torch and Python: a match is a finished build, reused as it is,
    and an upgrade of torch or of avkernels compiles into a new folder instead of loading a stale binary."""
    from torch.utils import cpp_extension

    # The root too: ninja's build file names the sources by absolute path, so two installs sharing a folder would
    # take turns recompiling.
    digest = hashlib.sha256(f"{torch.__version__}\0{os.path.abspath(root)}".encode())
    for path in _sources(root, cfg["SHIPPED_SOURCES"]):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    prefix = "CPU" if backend == "cpp" else "CUDA"
    for key in (f"{prefix}_CXX_FLAGS", f"{prefix}_LINK_FLAGS", f"{prefix}_NVCC_FLAGS"):
        digest.update(repr(cfg.get(key)).encode())
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{digest.hexdigest()[:12]}"
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return os.path.join(cache, f"avkernels_{backend}-{tag}".replace("+", "_"))


# The dtypes the kernels compute in: csrc/cpu checks them again (checks.h), csrc/cuda in binding.cpp.
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_MAX_STAGES = 8  # kMaxGateCandidates in csrc/cuda/softmax_mix.cuh


def _cpp_inputs(inputs: Inputs) -> Optional[str]:
    if inputs.device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {inputs.device.type} tensors"
    return dtype_reason(inputs.dtype, _NATIVE_DTYPES, "cpp")


def _cuda_unavailable() -> Optional[str]:
    reason = _not_built("cuda")
    if reason is None and not torch.cuda.is_available():
        reason = "avkernels._C_cuda is built but no CUDA device is visible"
    return reason


def _cuda_inputs(inputs: Inputs) -> Optional[str]:
    if inputs.device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {inputs.device.type} tensors"
    return dtype_reason(inputs.dtype, _NATIVE_DTYPES, "cuda")


def _cuda_stage_gate(inputs: Inputs) -> Optional[str]:
    if inputs.sizes["T"] > _CUDA_MAX_STAGES:
        return f"the cuda stage gate takes at most {_CUDA_MAX_STAGES} stages, got {inputs.sizes['T']}"
    return None


def _register_impls(backend: str) -> None:
    """The kernels are the ops' own (TORCH_LIBRARY_IMPL), looked up by torch at call time, so that
    :func:`build_jit` can supply them later; only the size limits are the backend's."""
    for op in OPS:
        supports = _cuda_stage_gate if (backend, op) == ("cuda", "stage_gate") else None
        register_impl(op, backend, OpImpl(supports=supports))


def build_jit(backend: str = "cpp", verbose: bool = True, announce: bool = False) -> str:
    """Compile ``backend``'s extension from ``csrc/`` with ``torch.utils.cpp_extension.load`` and use it.

    The same sources and flags as ``setup.py`` (both read ``avkernels/_build_config.py``), from a checkout's
    ``csrc/`` or the copy a non-editable install carries in the package. The build is cached under
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), one folder per sources, flags and torch version;
    a cached one is loaded without compiling. The cpp backend calls this by itself on first use when no prebuilt
    extension imports (``$AVKERNELS_JIT_BUILD=0`` turns that off).

    Args:
        backend: ``"cpp"`` or ``"cuda"``.
        verbose: print the compiler commands.
        announce: print one line to stderr before a compile that is not cached.
    Returns:
        The file of the loaded library; from now on the backend is available in this process (a library of torch
        ops: ``torch.ops.load_library`` loads it, and a C++ program can dlopen it).
    Raises:
        ValueError: unknown backend.  RuntimeError: no sources here, the compiler failed, or (``"cuda"``) the
        ``cpp`` library, which defines the ops, is not loaded.
    """
    if backend not in _MODULE_NAMES:
        raise ValueError(f"backend: expected 'cpp' or 'cuda', got {backend!r}")
    from torch.utils import cpp_extension

    cfg = _config()
    prefix = "CPU" if backend == "cpp" else "CUDA"
    root = _source_root(backend, cfg)
    if root is None:
        raise RuntimeError(f"build_jit({backend!r}): no sources in {' or '.join(_SOURCE_ROOTS)} (csrc/ missing)")
    if backend == "cuda" and cpp_extension.CUDA_HOME is None:
        raise RuntimeError("build_jit('cuda'): no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if backend == "cuda" and "cpp" not in _LIBRARIES:
        raise RuntimeError("build_jit('cuda'): the cpp library defines the ops; build or install it first")
    if backend in _LIBRARIES:
        # torch registers a namespace's ops once per process: a new build takes effect in a new process.
        raise RuntimeError(f"build_jit({backend!r}): {_LIBRARIES[backend]} is already loaded in this process")
    name = cfg[f"{prefix}_MODULE"].replace(".", "_")
    build_directory = _build_directory(backend, root, cfg)
    os.makedirs(build_directory, exist_ok=True)
    if announce and not glob.glob(os.path.join(build_directory, f"{name}*.so")):
        what = "C++ CPU" if backend == "cpp" else "CUDA"
        print(
            f"avkernels: compiling the {what} kernels for torch {torch.__version__} (first use, ~1-2 min; cached in "
            f"{build_directory})",
            file=sys.stderr,
            flush=True,
        )
    path = cpp_extension.load(
        name=name,
        sources=_sources(root, cfg[f"{prefix}_SOURCES"]),
        extra_include_paths=[os.path.join(root, cfg["INCLUDE_DIR"])],
        extra_cflags=list(cfg[f"{prefix}_CXX_FLAGS"]),
        # load() links libtorch_python into every build; the library uses none of it (only torch ops), and without
        # the dependency a C++ program can load it too.
        extra_ldflags=(["-Wl,--as-needed"] if sys.platform.startswith("linux") else [])
        + list(cfg.get(f"{prefix}_LINK_FLAGS", ())),
        extra_cuda_cflags=list(cfg.get("CUDA_NVCC_FLAGS", ())) if backend == "cuda" else None,
        build_directory=build_directory,
        verbose=verbose,
        is_python_module=False,  # loaded with torch.ops.load_library: a library of ops, not a module
    )
    _loaded(backend, path)
    if backend not in _LIBRARIES:
        raise RuntimeError(f"build_jit({backend!r}): {_IMPORT_ERRORS[backend]}")
    return path


_load("cpp")  # and, once its ops are defined, cuda's kernels of them (_loaded)
register_backend(BackendInfo("cpp", _cpp_unavailable, _cpp_inputs, preference={"cpu": 0}))
# After triton on CUDA: the Triton kernels are the tuned ones there; these are the no-JIT alternative.
register_backend(BackendInfo("cuda", _cuda_unavailable, _cuda_inputs, preference={"cuda": 1}))
_register_impls("cpp")
_register_impls("cuda")
