"""The compiled backends: libraries of torch ops built from ``csrc/``, one record of :data:`LIBRARIES` each.

``"cpp"`` (``avkernels._C_cpu``) defines the schema of every op (``TORCH_LIBRARY(avkernels, ...)`` in
``csrc/cpu/library.cpp``) and registers its CPU kernels; ``"cuda"`` (``avkernels._C_cuda``) registers CUDA kernels
of the same ops, so it needs the first. They are libraries of torch ops, not Python bindings: loading one runs its
registrations, nothing more. This module loads them, registers fakes and autograd on the ops from their declarations
(:func:`avkernels.ops.declaration.define_library_ops`), and registers each backend with a precise reason when it
cannot run. Everything it does for a backend comes from the backend's record; no code here names one.

**When a library is settled: once, at import**, in the order of :data:`LIBRARIES`:

1. the build of these sources in the build cache (``$TORCH_EXTENSIONS_DIR``, default
   ``~/.cache/torch_extensions/<python>_<device>``), a folder named by the content of ``csrc/``, the torch version and
   the build flags, never by a path: every install, reinstall and checkout of the same sources shares one build;
2. else the prebuilt module the install compiled (``pip install --no-build-isolation``, ``make install``), if it
   imports (after the cache, because a prebuilt library cannot tell whether it was built from these sources);
3. else, for a record with ``build_on_import`` (cpp), :func:`build` compiles it now (one line on stderr saying why
   and how long it took), unless ``$AVKERNELS_JIT_BUILD=0`` or the machine has no compiler or ninja: then the backend
   is unavailable with that reason, and one warning says that its calls run on the reference backend.

After import, whether a backend can run is a dictionary lookup that never builds, so ``torch.compile(...,
fullgraph=True)`` and ``torch.export`` can trace dispatch from the very first call. :func:`build` (also
``avkernels.build`` and ``python -m avkernels build``) is the explicit entry point, for the cuda library or after
``$AVKERNELS_JIT_BUILD=0``. torch registers a namespace's ops once per process, so a library loaded in a process
stays loaded: a new build takes effect in a new process.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch

from avkernels.dispatch import OPS, BackendInfo, Inputs, OpImpl, dtype_reason, register_backend, register_impl
from avkernels.ops import declaration

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILD_CONFIG = os.path.join(_PACKAGE_DIR, "_build_config.py")
# Where csrc/ is: inside the package in a non-editable install (setup.py copies it there), beside it in a checkout.
_SOURCE_ROOTS = (_PACKAGE_DIR, os.path.dirname(_PACKAGE_DIR))
JIT_ENV_VAR = "AVKERNELS_JIT_BUILD"
# The dtypes the kernels compute in: csrc/cpu checks them again (checks.h), csrc/cuda in binding.cpp.
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_MAX_STAGES = 8  # kMaxGateCandidates in csrc/cuda/softmax_mix.cuh


def _nothing_missing() -> Optional[str]:
    return None


def _cxx_missing() -> Optional[str]:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0] if compiler.strip() else "c++") is None:
        return f"a C++ compiler ({compiler!r} was not found; set $CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja (not installed: `pip install ninja`)"
    return None


def _cuda_toolkit_missing() -> Optional[str]:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "the CUDA toolkit (not found: set CUDA_HOME or put nvcc on PATH)"
    return _cxx_missing()


def _torch_without_cuda() -> Optional[str]:
    return "this torch has no CUDA support" if torch.version.cuda is None else None


def _no_cuda_device() -> Optional[str]:
    return None if torch.cuda.is_available() else "no CUDA device is visible"


def _at_most_cuda_stages(inputs: Inputs) -> Optional[str]:
    if inputs.sizes["T"] > _CUDA_MAX_STAGES:
        return f"the cuda stage gate takes at most {_CUDA_MAX_STAGES} stages, got {inputs.sizes['T']}"
    return None


@dataclass(frozen=True)
class NativeLibrary:
    """One compiled backend: where its library comes from, what it needs, what it runs.

    Attributes:
        backend: the backend's name.
        config: the prefix of its entries in ``avkernels/_build_config.py`` (``CPU`` -> ``CPU_MODULE``,
            ``CPU_SOURCES``, ``CPU_CXX_FLAGS``, ...), which ``setup.py`` reads too.
        device_type: the tensors it runs; ``preference`` its rank there for ``backend=None``.
        needs: the backend whose library defines the ops this one registers kernels of (settled first).
        build_on_import: compile it at import when neither a prebuilt nor a cached build exists.
        toolchain_missing: what compiling it needs that this machine lacks, or ``None``.
        torch_lacks: why this torch cannot run it at all (then nothing is loaded or built), or ``None``.
        device_missing: why it is loaded but cannot run in this process, or ``None``.
        limits: op -> :attr:`OpImpl.supports`, for the ops whose sizes it limits.
    """

    backend: str
    config: str
    device_type: str
    preference: int
    needs: Optional[str] = None
    build_on_import: bool = False
    toolchain_missing: Callable[[], Optional[str]] = _cxx_missing
    torch_lacks: Callable[[], Optional[str]] = _nothing_missing
    device_missing: Callable[[], Optional[str]] = _nothing_missing
    limits: Mapping[str, Callable[[Inputs], Optional[str]]] = field(default_factory=dict)


LIBRARIES = (
    NativeLibrary("cpp", "CPU", "cpu", preference=0, build_on_import=True),
    # After triton on CUDA (rank 1): the Triton kernels are the tuned ones there; these are the no-JIT alternative.
    NativeLibrary("cuda", "CUDA", "cuda", preference=1, needs="cpp", toolchain_missing=_cuda_toolkit_missing,
                  torch_lacks=_torch_without_cuda, device_missing=_no_cuda_device,
                  limits={"stage_gate": _at_most_cuda_stages}),
)

# backend -> the file of its library in use; -> every library loaded into this process, refused ones included
# (torch keeps a library's registrations: another of the same backend cannot be loaded after it); -> why it has none;
# -> why the install's prebuilt library did not import.
_LIBRARIES: Dict[str, str] = {}
_IN_PROCESS: Dict[str, str] = {}
_REASONS: Dict[str, str] = {}
_NO_PREBUILT: Dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def _config() -> dict:
    return runpy.run_path(_BUILD_CONFIG)


def _record(backend: str) -> NativeLibrary:
    for lib in LIBRARIES:
        if lib.backend == backend:
            return lib
    raise ValueError(f"backend: expected one of {', '.join(repr(lib.backend) for lib in LIBRARIES)}, got {backend!r}")


def _module(lib: NativeLibrary) -> str:
    return _config()[f"{lib.config}_MODULE"]


def _sources(root: str, patterns) -> List[str]:
    return sorted({p for pattern in patterns for p in glob.glob(os.path.join(root, pattern), recursive=True)})


def _source_root(lib: NativeLibrary) -> Optional[str]:
    return next((root for root in _SOURCE_ROOTS if _sources(root, _config()[f"{lib.config}_SOURCES"])), None)


def _flags(lib: NativeLibrary, kind: str) -> List[str]:
    config = _config()
    flags = list(config.get(f"{lib.config}_{kind}_FLAGS", ()))
    if kind == "CXX" and config["uses_stable_abi"](lib.config, torch.__version__, os.environ):
        flags += config[f"{lib.config}_STABLE_ABI_FLAGS"]
    return flags


def build_directory(backend: str = "cpp", root: Optional[str] = None) -> str:
    """The cache folder of ``backend``'s build of the sources under ``root`` (default: this install's), named by
    what the binary depends on: the content of every shipped source file (by its path inside ``csrc/``), the torch
    version, the Python ABI and the build flags. A different copy of the same sources has the same folder."""
    from torch.utils import cpp_extension

    lib = _record(backend)
    root = root or _source_root(lib)
    if root is None:
        raise RuntimeError(f"{_module(lib)}: no sources in {' or '.join(_SOURCE_ROOTS)} (csrc/ missing)")
    digest = hashlib.sha256(f"{torch.__version__}\0{sys.implementation.cache_tag}".encode())
    for path in _sources(root, _config()["SHIPPED_SOURCES"]):
        digest.update(f"\0{os.path.relpath(path, root).replace(os.sep, '/')}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    for kind in ("CXX", "LINK", "NVCC"):
        digest.update(repr(_flags(lib, kind)).encode())
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    name = f"avkernels-{lib.backend}-torch{torch.__version__}-{digest.hexdigest()[:16]}".replace("+", "_")
    return os.path.join(cache, name)


def _built_file(lib: NativeLibrary, directory: str) -> str:
    from torch.utils import cpp_extension

    return os.path.join(directory, _module(lib).replace(".", "_") + cpp_extension.LIB_EXT)


@contextlib.contextmanager
def _exclusive(directory: str) -> Iterator[None]:
    """One process at a time builds into ``directory``; the others wait, then find the build (a lock the system
    drops if the holder dies, unlike a lock file)."""
    os.makedirs(directory, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(os.path.join(directory, "lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Run in a child process: it compiles (and loads, which is harmless there), while this process loads the finished
# file from the cache folder, and can rebuild a library it has loaded already.
_COMPILE = "import json, sys\nfrom torch.utils import cpp_extension\ncpp_extension.load(**json.loads(sys.argv[1]))\n"


def _compile(lib: NativeLibrary, root: str, directory: str, why: str, verbose: bool) -> None:
    """Compiles into ``directory/build`` and moves the library to ``directory``, printing one line: why, how long."""
    work = os.path.join(directory, "build")
    os.makedirs(work, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(work, "lock"))  # torch's own lock, left by a killed build (we hold ours)
    name = _module(lib).replace(".", "_")
    options = dict(
        name=name,
        sources=_sources(root, _config()[f"{lib.config}_SOURCES"]),
        extra_include_paths=[os.path.join(root, _config()["INCLUDE_DIR"])],
        extra_cflags=_flags(lib, "CXX"),
        # load() links libtorch_python into every build; the library uses none of it (only torch ops), and without
        # the dependency a C++ program can load it too.
        extra_ldflags=(["-Wl,--as-needed"] if sys.platform.startswith("linux") else []) + _flags(lib, "LINK"),
        extra_cuda_cflags=_flags(lib, "NVCC") or None,
        build_directory=work,
        verbose=verbose,
        is_python_module=False,
    )
    log = os.path.join(directory, "build.log")
    print(f"avkernels: building {_module(lib)} for torch {torch.__version__} ({why}) ...", end="",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(options)], stdin=subprocess.DEVNULL,
                              stdout=None if verbose else out, stderr=None if verbose else subprocess.STDOUT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        print(f" failed after {seconds:.0f} s (log: {log})", file=sys.stderr, flush=True)
        with open(log) as f:
            lines = [line.strip() for line in f if line.strip()]
        # The compiler's or linker's first error, not the Python traceback around it.
        first = next((line for line in lines if re.search(r"(^|: )(fatal )?error: ", line)),
                     lines[-1] if lines else "no output")
        raise RuntimeError(f"its build failed: {first} (whole log: {log})")
    temporary = _built_file(lib, directory) + f".{os.getpid()}"
    shutil.copyfile(_built_file(lib, work), temporary)
    os.replace(temporary, _built_file(lib, directory))  # atomic: a library in the cache folder is a finished one
    print(f" done in {seconds:.0f} s", file=sys.stderr, flush=True)


def _loaded(lib: NativeLibrary, path: str) -> None:
    """A library's ops are registered in torch now: register what Python adds to them, and use the backend."""
    _IN_PROCESS[lib.backend] = path
    if lib.needs is None:  # it defines the ops
        mismatch = declaration.library_schema_mismatch()
        if mismatch is not None:
            _REASONS[lib.backend] = (
                f"{path} does not define the ops this avkernels declares ({mismatch}): it was built from other "
                f"sources; rebuild it (`python -m avkernels build {lib.backend}`, or `python setup.py build_ext "
                "--inplace` in a checkout)"
            )
            return
        declaration.define_library_ops()
    _LIBRARIES[lib.backend] = path
    _REASONS.pop(lib.backend, None)


def _load_file(lib: NativeLibrary, path: str) -> None:
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        raise RuntimeError(f"{path} does not load ({exc.__cause__ or exc}); rebuild it with "
                           f"`python -m avkernels build {lib.backend} --force`") from None
    _loaded(lib, path)
    if lib.backend not in _LIBRARIES:
        raise RuntimeError(_REASONS[lib.backend])


def _blocker(lib: NativeLibrary) -> Optional[str]:
    """Why ``lib`` cannot be loaded in this process whatever is built: its torch, or the library it needs."""
    if lib.torch_lacks() is not None:
        return lib.torch_lacks()
    if lib.needs is not None and lib.needs not in _LIBRARIES:
        needed = _record(lib.needs)
        return f"it needs {_module(needed)}, which defines the ops, and the {needed.backend} backend is unavailable"
    return None


def _load_cached(lib: NativeLibrary) -> bool:
    """Loads the cached build of exactly these sources if there is one: it comes first, since a prebuilt library
    may have been built from other sources (an edited checkout) and cannot say so before it is loaded."""
    root = _source_root(lib)
    if root is None or not os.path.exists(_built_file(lib, build_directory(lib.backend, root))):
        return False
    _load_file(lib, _built_file(lib, build_directory(lib.backend, root)))
    return True


def _import_prebuilt(lib: NativeLibrary) -> bool:
    """Imports the install's prebuilt library (the import runs its op registrations); records why not."""
    try:
        module = importlib.import_module(_module(lib))
    except ImportError as exc:  # not built by the install, built against another torch, or a failed build
        if isinstance(exc, ModuleNotFoundError) and exc.name == _module(lib):
            _NO_PREBUILT[lib.backend] = "no prebuilt library in the package"
        else:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _NO_PREBUILT[lib.backend] = f"the prebuilt one does not import ({detail})"
        return False
    _loaded(lib, module.__file__)
    return True


def _from_cache(lib: NativeLibrary, why: str, *, compile: bool, force: bool = False, verbose: bool = False) -> str:
    """The cached build of these sources, compiled first (saying ``why``) if there is none or ``force``, and loaded
    unless this process has loaded the backend's library already. Raises RuntimeError saying what is missing."""
    root = _source_root(lib)
    if root is None:
        raise RuntimeError("its sources are not installed (no csrc/ in the package or beside it)")
    directory = build_directory(lib.backend, root)
    target = _built_file(lib, directory)
    if force or not os.path.exists(target):
        if not compile:
            raise RuntimeError(f"no build of these sources for this torch in {directory}")
        missing = lib.toolchain_missing()
        if missing is not None:
            raise RuntimeError(f"building it needs {missing}")
        with _exclusive(directory):
            if force or not os.path.exists(target):  # another process may have built it while this one waited
                _compile(lib, root, directory, why, verbose)
    if lib.backend in _LIBRARIES:
        return target  # rebuilt while loaded: used from the next process on
    if lib.backend in _IN_PROCESS:
        raise RuntimeError(f"{target} is built, but this process has loaded {_IN_PROCESS[lib.backend]}, which it "
                           "refused; the build is used from the next process on")
    _load_file(lib, target)
    return target


def _settle(lib: NativeLibrary) -> None:
    """Loads ``lib``'s library at import, from the first of the places in the module docstring that has it."""
    module = _module(lib)
    blocker = _blocker(lib)
    if blocker is not None:
        _REASONS[lib.backend] = f"{module} was not built: {blocker}"
        return
    enabled = os.environ.get(JIT_ENV_VAR, "1") != "0"
    try:
        if not (_load_cached(lib) or _import_prebuilt(lib)):
            why = f"{_NO_PREBUILT[lib.backend]}, and no build of these sources in the cache"
            _from_cache(lib, why, compile=lib.build_on_import and enabled)
    except RuntimeError as exc:
        off = f"; the build at import is turned off (${JIT_ENV_VAR}=0)" if lib.build_on_import and not enabled else ""
        _REASONS[lib.backend] = (f"{module} was not built: {_NO_PREBUILT.get(lib.backend, 'no library')}, and "
                                 f"{exc}{off}; build it with `python -m avkernels build {lib.backend}`")
    if lib.build_on_import and lib.backend not in _LIBRARIES:
        warnings.warn(
            f"avkernels: the fused {lib.backend} backend is unavailable: {_REASONS[lib.backend]}. "
            f"{lib.device_type.upper()} calls fall back to the slower reference backend "
            "(avkernels.backend_status() says why).",
            RuntimeWarning,
            stacklevel=2,
        )


def cpu_features() -> Dict[str, str]:
    """The cpp library's view of the CPU: ISA variant (``"isa"``), 16-bit hardware (``"f16c"``, ``"avx512_bf16"``,
    ``"amx_bf16"``: ``"true"``/``"false"``) and what computes 16-bit inputs (``"compute_16bit"``). The op
    ``torch.ops.avkernels.cpu_features()`` returns the items as ``"key=value"`` strings, since the stable ABI the
    library is built on has no dict return."""
    build("cpp")
    return dict(item.split("=", 1) for item in torch.ops.avkernels.cpu_features())


def build(backend: str = "cpp", *, force: bool = False, verbose: bool = False) -> str:
    """Make ``backend``'s library available in this process, compiling it if needed; returns its file.

    The explicit form of what import does for the cpp backend (see the module docstring): a loaded library is
    returned as it is; otherwise the cached build of these sources is loaded, or first compiled with
    ``torch.utils.cpp_extension`` from the same sources and flags as ``setup.py`` (``avkernels/_build_config.py``),
    printing one line to stderr with the reason and the time it took. Also ``python -m avkernels build``.

    Args:
        backend: ``"cpp"`` or ``"cuda"``.
        force: compile again even if the cache has a build, replacing it. A library loaded in this process stays
            loaded (torch registers the ops once per process): the new build is used from the next process on.
        verbose: show the compiler's commands and output.
    Returns:
        The library's file: a library of torch ops, which ``torch.ops.load_library`` loads and a C++ program can
        ``dlopen`` (with ``force``, the new build in the cache).
    Raises:
        ValueError: unknown backend.  RuntimeError: this torch cannot run it, no sources, no compiler, or the
        compiler failed.
    """
    lib = _record(backend)
    if backend in _LIBRARIES and not force:
        return _LIBRARIES[backend]
    blocker = _blocker(lib)
    if blocker is not None:
        raise RuntimeError(f"avkernels.build({backend!r}): {blocker}")
    why = "asked to rebuild" if force else f"{_NO_PREBUILT.get(backend, 'no library')} and none in the cache"
    try:
        return _from_cache(lib, why, compile=True, force=force, verbose=verbose)
    except RuntimeError as exc:
        if backend not in _LIBRARIES:
            _REASONS[backend] = f"{_module(lib)} was not built: {exc}"
        raise RuntimeError(f"avkernels.build({backend!r}): {exc}") from None


def _unavailable(lib: NativeLibrary) -> Optional[str]:
    """Runs on every dispatch, inside traced regions too: it only reads what import settled."""
    if lib.backend not in _LIBRARIES:
        return _REASONS.get(lib.backend) or f"the {lib.backend} library is not loaded"
    missing = lib.device_missing()
    return None if missing is None else f"{_LIBRARIES[lib.backend]} is loaded but {missing}"


def _input_reason(lib: NativeLibrary, inputs: Inputs) -> Optional[str]:
    if inputs.device.type != lib.device_type:
        return (f"the {lib.backend} backend runs on {lib.device_type.upper()} tensors, got {inputs.device.type} "
                "tensors")
    return dtype_reason(inputs.dtype, _NATIVE_DTYPES, lib.backend)


def _register(lib: NativeLibrary) -> None:
    """The kernels are the ops' own (TORCH_LIBRARY_IMPL), looked up by torch at call time: only the limits are the
    backend's."""
    register_backend(BackendInfo(lib.backend, functools.partial(_unavailable, lib),
                                 functools.partial(_input_reason, lib), preference={lib.device_type: lib.preference}))
    for op in OPS:
        register_impl(op, lib.backend, OpImpl(supports=lib.limits.get(op)))


for _lib in LIBRARIES:
    _settle(_lib)
    _register(_lib)
