"""The compiled backends: ``"cpp"`` (``avkernels._C_cpu``, CPU tensors) and ``"cuda"`` (``avkernels._C_cuda``).

Both extensions are optional and built from ``csrc/`` by ``pip install`` (see ``setup.py``); each exposes the same
functions (declared in ``csrc/cpu/ops.h``: ``tanh_attention_forward/backward``, ``gate_forward/backward``,
``stage_gate_forward/backward``). This module imports whichever were built, registers the two backends with a
precise reason when one cannot run, and adapts the extension functions to the :class:`~avkernels.backends.OpImpl`
signatures documented in :mod:`avkernels.ops.tanh_attention`, :mod:`~avkernels.ops.gate` and
:mod:`~avkernels.ops.stage_gate`: activation names become ints, ``deterministic`` comes from
``torch.are_deterministic_algorithms_enabled()``, and empty masks become ``None``.

:func:`build_jit` compiles an extension in-process with ``torch.utils.cpp_extension.load`` (for development: no
reinstall needed after editing ``csrc/``) and makes its backend available at once.
"""

from __future__ import annotations

import glob
import importlib
import os
import runpy
from types import ModuleType
from typing import Dict, Optional

import torch

from avkernels.backends import BackendInfo, Inputs, OpImpl, dtype_reason, register_backend, register_impl

_ACTIVATIONS = {"none": 0, "tanh_relu": 1}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BUILD_CONFIG = os.path.join(_REPO_ROOT, "avkernels", "_build_config.py")

# backend name -> the loaded extension module, or the reason it could not be imported.
_MODULES: Dict[str, ModuleType] = {}
_IMPORT_ERRORS: Dict[str, str] = {}
_MODULE_NAMES = {"cpp": "avkernels._C_cpu", "cuda": "avkernels._C_cuda"}


def _load(backend: str) -> None:
    try:
        _MODULES[backend] = importlib.import_module(_MODULE_NAMES[backend])
    except ImportError as exc:  # not built here (no compiler, no CUDA toolkit, or a failed build)
        _IMPORT_ERRORS[backend] = str(exc)


def _not_built(backend: str) -> Optional[str]:
    if backend in _MODULES:
        return None
    if backend == "cuda" and torch.version.cuda is None:
        return "avkernels._C_cuda was not built: this torch has no CUDA support"
    return (
        f"{_MODULE_NAMES[backend]} was not built ({_IMPORT_ERRORS.get(backend, 'unknown reason')}); reinstall with "
        "a C++ compiler (`pip install --no-build-isolation -e .`) or call avkernels.ops.native.build_jit"
        f"({backend!r})"
    )


def _cpp_unavailable() -> Optional[str]:
    return _not_built("cpp")


# The dtypes the kernels compute in: csrc/cpu checks them again (checks.h), csrc/cuda in binding.cpp.
_CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_MAX_STAGES = 8  # kMaxGateCandidates in csrc/cuda/gate.cuh


def _cpp_inputs(inputs: Inputs) -> Optional[str]:
    if inputs.device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {inputs.device.type} tensors"
    return dtype_reason(inputs.dtype, _CPP_DTYPES, "cpp")


def _cuda_unavailable() -> Optional[str]:
    reason = _not_built("cuda")
    if reason is None and not torch.cuda.is_available():
        reason = "avkernels._C_cuda is built but no CUDA device is visible"
    return reason


def _cuda_inputs(inputs: Inputs) -> Optional[str]:
    if inputs.device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {inputs.device.type} tensors"
    return dtype_reason(inputs.dtype, _CUDA_DTYPES, "cuda")


def _cuda_stage_gate(inputs: Inputs) -> Optional[str]:
    if inputs.sizes["T"] > _CUDA_MAX_STAGES:
        return f"the cuda stage gate takes at most {_CUDA_MAX_STAGES} stages, got {inputs.sizes['T']}"
    return None


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _register_impls(backend: str) -> None:
    """OpImpls that look the module up at call time, so that :func:`build_jit` can supply it later."""

    def ext():
        return _MODULES[backend]

    def tanh_attention_forward(q, k, v, seed, scale, dropout_p, activation, return_mask):
        o, mask = ext().tanh_attention_forward(q, k, v, seed, scale, dropout_p, _ACTIVATIONS[activation], return_mask)
        return o, (mask if return_mask and dropout_p > 0 else None)

    def tanh_attention_backward(do, q, k, v, o, seed, scale, dropout_p, activation):
        return ext().tanh_attention_backward(
            do, q, k, v, o, seed, scale, dropout_p, _ACTIVATIONS[activation], _deterministic()
        )

    def gate_backward(dout, dg, attended, unattended, weight, g, out, tau):
        return ext().gate_backward(dout, dg, attended, unattended, weight, g, out, tau, _deterministic())

    def stage_gate_backward(dout, ds, stages, weight, s, out, tau):
        return ext().stage_gate_backward(dout, ds, stages, weight, s, out, tau, _deterministic())

    register_impl("tanh_attention", backend, OpImpl(tanh_attention_forward, tanh_attention_backward))
    register_impl("gate", backend, OpImpl(lambda *args: ext().gate_forward(*args), gate_backward))
    register_impl(
        "stage_gate",
        backend,
        OpImpl(
            lambda *args: ext().stage_gate_forward(*args),
            stage_gate_backward,
            supports=_cuda_stage_gate if backend == "cuda" else None,
        ),
    )


def build_jit(backend: str = "cpp", verbose: bool = True) -> ModuleType:
    """Compile ``backend``'s extension from ``csrc/`` with ``torch.utils.cpp_extension.load`` and use it.

    The same sources and flags as ``setup.py`` (both read ``avkernels/_build_config.py``); the build is cached by
    torch under ``TORCH_EXTENSIONS_DIR``. Needs a source checkout (``csrc/`` beside the package).

    Args:
        backend: ``"cpp"`` or ``"cuda"``.
        verbose: print the compiler commands.
    Returns:
        The loaded module; from now on the backend is available in this process.
    Raises:
        ValueError: unknown backend.  RuntimeError: no sources here, or the compiler failed.
    """
    if backend not in _MODULE_NAMES:
        raise ValueError(f"backend: expected 'cpp' or 'cuda', got {backend!r}")
    from torch.utils import cpp_extension

    cfg = runpy.run_path(_BUILD_CONFIG)
    prefix = "CPU" if backend == "cpp" else "CUDA"
    sources = sorted(p for pattern in cfg[f"{prefix}_SOURCES"] for p in glob.glob(os.path.join(_REPO_ROOT, pattern)))
    if not sources:
        raise RuntimeError(f"build_jit({backend!r}): no sources under {_REPO_ROOT}/csrc (not a source checkout?)")
    if backend == "cuda" and cpp_extension.CUDA_HOME is None:
        raise RuntimeError("build_jit('cuda'): no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    module = cpp_extension.load(
        name=cfg[f"{prefix}_MODULE"].replace(".", "_"),
        sources=sources,
        extra_include_paths=[os.path.join(_REPO_ROOT, cfg["INCLUDE_DIR"])],
        extra_cflags=list(cfg[f"{prefix}_CXX_FLAGS"]),
        extra_ldflags=list(cfg.get(f"{prefix}_LINK_FLAGS", ())),
        extra_cuda_cflags=list(cfg.get("CUDA_NVCC_FLAGS", ())) if backend == "cuda" else None,
        verbose=verbose,
    )
    _MODULES[backend] = module
    _IMPORT_ERRORS.pop(backend, None)
    return module


for _backend in ("cpp", "cuda"):
    _load(_backend)
register_backend(BackendInfo("cpp", _cpp_unavailable, _cpp_inputs, preference={"cpu": 0}))
# After triton on CUDA: the Triton kernels are the tuned ones there; these are the no-JIT alternative.
register_backend(BackendInfo("cuda", _cuda_unavailable, _cuda_inputs, preference={"cuda": 1}))
_register_impls("cpp")
_register_impls("cuda")
