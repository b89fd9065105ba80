"""Backend registry: which implementation of each fused op runs where.

Every functional op (``tanh_attention``, ``gate``, ``stage_gate``) takes ``backend=None | "reference" | "triton" |
"cpp" | "cuda"``. A backend registers itself here when its module is imported (see ``avkernels/ops/__init__.py``);
adding one is a matter of calling :func:`register_backend` once and :func:`register_impl` per op.

Choosing a backend:

* ``backend="name"`` (or ``AVKERNELS_BACKEND=name`` in the environment) forces one. A forced backend that cannot run
  the inputs is an error naming the backend and the reason, never a silent fallback.
* ``backend=None`` picks the first usable entry of :data:`DEFAULT_PREFERENCE` for the inputs' device type. The
  Triton interpreter (``TRITON_INTERPRET=1``) runs on CPU tensors but is far slower than the reference, so it is
  never chosen by default on CPU; ask for it by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKEND_ENV_VAR = "AVKERNELS_BACKEND"
KNOWN_BACKENDS = ("reference", "triton", "cpp", "cuda")

# Fastest first, per device type; "reference" always closes the list.
DEFAULT_PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}


@dataclass(frozen=True)
class BackendInfo:
    """How to tell whether a backend can run here.

    Attributes:
        name: one of :data:`KNOWN_BACKENDS`.
        unavailable_reason: returns ``None`` when the backend is usable in this process at all (its build or
            package is present), else a sentence saying why not.
        device_reason: returns ``None`` when the backend can run tensors on the given device, else why not.
    """

    name: str
    unavailable_reason: Callable[[], Optional[str]]
    device_reason: Callable[[torch.device], Optional[str]]


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op: its forward and backward callables.

    The signatures per op are documented in the op's module (e.g. :mod:`avkernels.ops.tanh_attention`).
    """

    forward: Callable
    backward: Callable


_BACKENDS: Dict[str, BackendInfo] = {}
_IMPLS: Dict[Tuple[str, str], OpImpl] = {}


def register_backend(info: BackendInfo) -> None:
    if info.name not in KNOWN_BACKENDS:
        raise ValueError(f"backend name must be one of {KNOWN_BACKENDS}, got {info.name!r}")
    _BACKENDS[info.name] = info


def register_impl(op: str, backend: str, impl: OpImpl) -> None:
    """Register the ``forward``/``backward`` pair that runs ``op`` on ``backend``."""
    if backend not in _BACKENDS:
        raise ValueError(f"register_backend({backend!r}) must come before register_impl")
    _IMPLS[(op, backend)] = impl


def get_impl(op: str, backend: str) -> OpImpl:
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        raise RuntimeError(f"backend {backend!r} has no implementation of {op!r}") from None


def _why_not(name: str, op: str, device: Optional[torch.device]) -> Optional[str]:
    info = _BACKENDS.get(name)
    if info is None:
        return "it is not installed in this build of avkernels"
    reason = info.unavailable_reason()
    if reason is None and name != "reference" and (op, name) not in _IMPLS:
        reason = f"it has no implementation of {op}"
    if reason is None and device is not None:
        reason = info.device_reason(device)
    return reason


def backends() -> List[str]:
    """The backends usable in this process, in :data:`KNOWN_BACKENDS` order ("reference" is always there)."""
    return [name for name in KNOWN_BACKENDS if name in _BACKENDS and _BACKENDS[name].unavailable_reason() is None]


def backend_status() -> Dict[str, str]:
    """Every known backend with "available" or the reason it is not (for bug reports and the README)."""
    return {name: (_why_not(name, "tanh_attention", None) or "available") for name in KNOWN_BACKENDS}


def resolve(op: str, backend: Optional[str], device: torch.device) -> str:
    """The backend that runs ``op`` on tensors living on ``device``.

    Args:
        op: the op's name, e.g. ``"tanh_attention"``.
        backend: the caller's choice; ``None`` defers to ``$AVKERNELS_BACKEND`` and then to the default order.
        device: where the inputs live.
    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: the requested backend cannot run here, with the reason.
    """
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or None
        source = f"${BACKEND_ENV_VAR}"
    if backend is not None:
        if backend not in KNOWN_BACKENDS:
            raise ValueError(f"{source} must be one of {KNOWN_BACKENDS} or None, got {backend!r}")
        reason = _why_not(backend, op, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {backend!r} (from {source}) cannot run on {device}: {reason}")
        return backend
    for name in DEFAULT_PREFERENCE.get(device.type, ("reference",)):
        if _why_not(name, op, device) is None:
            return name
    return "reference"
