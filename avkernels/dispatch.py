"""Backend registry and dispatch: which implementation of each fused op runs a given call.

Every functional op (``tanh_attention``, ``gate``, ``stage_gate``) takes ``backend=None`` or the name of a registered
backend (``"reference"``, ``"triton"``, ``"cpp"``, ``"cuda"`` in this build). A backend registers itself when its
module is imported (see ``avkernels/ops/__init__.py``): :func:`register_backend` once, with its preference rank per
device type, then :func:`register_impl` per op. Nothing else lists backend names, so adding one touches only its own
module.

Each call is described by an :class:`Inputs` (device, dtype after autocast, named sizes, options). A backend runs it
only when every check passes: the backend is usable in this process (its build or package is there), it accepts the
device and dtype (:attr:`BackendInfo.input_reason`), it implements the op, and the op's own limits allow the sizes
and options (:attr:`OpImpl.supports`). Each check answers ``None`` or a sentence saying why not, as xformers'
``not_supported_reasons`` does.

Choosing a backend:

* ``backend="name"`` (or ``AVKERNELS_BACKEND=name`` in the environment) forces one. A forced backend that cannot run
  the inputs is an error naming the backend and every reason, never a silent fallback.
* ``backend=None`` takes the first backend, in the preference order of the inputs' device type, that can run the
  inputs; ``"reference"`` (plain PyTorch, every device and dtype) closes every list. Backends passed over are
  recorded with their reasons, which :func:`backend_status` ``(op)`` reports (a record, not a log call: a logging
  call inside the op would break ``torch.compile``'s graph). The Triton interpreter (``TRITON_INTERPRET=1``) runs CPU
  tensors but is far slower than the reference, so it has no rank on CPU: it runs there only when asked for by name.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

BACKEND_ENV_VAR = "AVKERNELS_BACKEND"
OPS = ("tanh_attention", "gate", "stage_gate")


@dataclass(frozen=True)
class Inputs:
    """What dispatch knows about one call of an op, after autocast has picked the compute dtype.

    Attributes:
        op: the op's name, one of :data:`OPS`.
        device: where the tensors live.
        dtype: the dtype the backend will receive (every floating input has it).
        sizes: named sizes, e.g. ``{"B": 8, "Mq": 16, "N": 512, "D": 16, "E": 16}`` for ``tanh_attention``.
        options: the call's options that a backend may not support, e.g. ``{"return_mask": True, "dropout": True}``.
    """

    op: str
    device: torch.device
    dtype: torch.dtype
    sizes: Mapping[str, int] = field(default_factory=dict)
    options: Mapping[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.op} on {self.device.type} in {str(self.dtype).replace('torch.', '')} ({sizes})"


@dataclass(frozen=True)
class BackendInfo:
    """How to tell whether a backend can run a call.

    Attributes:
        name: the name users pass as ``backend=``.
        unavailable_reason: ``None`` when the backend is usable in this process at all (its build or package is
            present and works), else a sentence saying why not.
        input_reason: ``None`` when the backend accepts tensors of ``inputs.device`` and ``inputs.dtype``, else why
            not (op-independent; op-specific limits go in :attr:`OpImpl.supports`).
        preference: device type -> rank; ``backend=None`` tries backends in increasing rank on that device type.
            A device type missing here is never chosen by default (the backend may still be asked for by name).
    """

    name: str
    unavailable_reason: Callable[[], Optional[str]]
    input_reason: Callable[[Inputs], Optional[str]]
    preference: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op.

    Attributes:
        forward, backward: the Python callables whose signatures each op documents (e.g.
            :mod:`avkernels.ops.tanh_attention`); the backend then gets ops of its own, ``avkernels::<backend>_<op>``
            (:mod:`avkernels.ops.declaration`). Both ``None`` when the backend's kernels are registered with torch
            as kernels of the op ``torch.ops.avkernels.<op>`` itself, for the backend's device (the C++ libraries of
            ``cpp`` and ``cuda``: ``TORCH_LIBRARY_IMPL``).
        supports: ``None`` when this implementation handles the sizes and options of ``inputs``, else why not;
            omitted when it handles every call its backend's :attr:`BackendInfo.input_reason` admits.
    """

    forward: Optional[Callable] = None
    backward: Optional[Callable] = None
    supports: Optional[Callable[[Inputs], Optional[str]]] = None

    @property
    def kernels_in_torch(self) -> bool:
        return self.forward is None


_BACKENDS: Dict[str, BackendInfo] = {}
_IMPLS: Dict[Tuple[str, str], OpImpl] = {}
# Called as listener(op, backend, impl) by register_impl: avkernels.ops.declaration defines a Python-kernel backend's
# own ops there (this module stays below the ops in the layering and does not import them).
_IMPL_LISTENERS: List[Callable[[str, str, OpImpl], None]] = []
# op -> {backend: reason} for the backends passed over by the last default choice of that op.
_PASSED_OVER: Dict[str, Dict[str, str]] = {}


def dtype_reason(dtype: torch.dtype, accepted, backend: str) -> Optional[str]:
    """The sentence every backend uses to refuse a dtype (``accepted`` an iterable of dtypes)."""
    if dtype in accepted:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in accepted)
    return f"the {backend} backend computes in {names}, got {str(dtype).replace('torch.', '')} inputs"


def register_backend(info: BackendInfo) -> None:
    if not isinstance(info.name, str) or not info.name.isidentifier():
        raise ValueError(f"backend name must be an identifier, got {info.name!r}")
    _BACKENDS[info.name] = info


def register_impl(op: str, backend: str, impl: OpImpl) -> None:
    """Register the implementation that runs ``op`` on ``backend``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"register_backend({backend!r}) must come before register_impl")
    if (impl.forward is None) != (impl.backward is None):
        raise ValueError(f"register_impl({op!r}, {backend!r}): forward and backward are both callables or both None")
    for listener in _IMPL_LISTENERS:
        listener(op, backend, impl)
    _IMPLS[(op, backend)] = impl


def on_register_impl(listener: Callable[[str, str, OpImpl], None]) -> None:
    """Calls ``listener(op, backend, impl)`` at each later :func:`register_impl`, before the registration."""
    _IMPL_LISTENERS.append(listener)


def get_impl(op: str, backend: str) -> OpImpl:
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        raise RuntimeError(f"backend {backend!r} has no implementation of {op!r}") from None


def registered() -> Tuple[str, ...]:
    """Every registered backend name, usable here or not, in registration order."""
    return tuple(_BACKENDS)


def _missing_impl(op: str, backend: str) -> Optional[str]:
    if backend != "reference" and (op, backend) not in _IMPLS:  # the reference runs every op without an OpImpl
        return f"it has no implementation of {op}"
    return None


def why_not(backend: str, inputs: Inputs) -> List[str]:
    """Every reason ``backend`` cannot run ``inputs``; empty when it can."""
    info = _BACKENDS.get(backend)
    if info is None:
        return [f"no backend named {backend!r} is registered in this build of avkernels"]
    reason = info.unavailable_reason()
    if reason is not None:
        return [reason]  # nothing else can be asked of a backend that is not there
    reasons = [r for r in (_missing_impl(inputs.op, backend), info.input_reason(inputs)) if r is not None]
    impl = _IMPLS.get((inputs.op, backend))
    if impl is not None and impl.supports is not None and not reasons:
        reason = impl.supports(inputs)
        if reason is not None:
            reasons.append(reason)
    return reasons


def preference(device_type: str) -> List[str]:
    """The backends ``backend=None`` tries on ``device_type``, first choice first, ``"reference"`` last."""
    ranked = [info for info in _BACKENDS.values() if device_type in info.preference and info.name != "reference"]
    return [info.name for info in sorted(ranked, key=lambda info: info.preference[device_type])] + ["reference"]


def backends() -> List[str]:
    """The backends usable in this process (built and working here), in registration order."""
    return [name for name, info in _BACKENDS.items() if info.unavailable_reason() is None]


def backend_status(op: Optional[str] = None) -> Dict[str, str]:
    """Every registered backend with ``"available"`` or the reason it is not (for bug reports and the README).

    Args:
        op: also report whether each backend implements this op, and why the last ``backend=None`` call of the op
            passed a backend over (e.g. ``"available; passed over for the last tanh_attention call (... in
            float16 ...): the cpp backend computes in float32, float64, got float16 inputs"``).
    """
    if op is not None and op not in OPS:
        raise ValueError(f"op: expected None or one of {OPS}, got {op!r}")
    status = {}
    for name, info in _BACKENDS.items():
        reason = info.unavailable_reason()
        if reason is None and op is not None:
            reason = _missing_impl(op, name)
        status[name] = reason or "available"
        if reason is None and op is not None and name in _PASSED_OVER.get(op, {}):
            status[name] += f"; passed over for the last {op} call: {_PASSED_OVER[op][name]}"
    return status


def resolve(backend: Optional[str], inputs: Inputs) -> str:
    """The backend that runs ``inputs``.

    Args:
        backend: the caller's choice; ``None`` defers to ``$AVKERNELS_BACKEND`` and then to the device's preference
            order.
        inputs: the call.
    Raises:
        ValueError: ``backend`` is not a registered name.
        RuntimeError: the requested backend cannot run the inputs, with every reason.
    """
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or None
        source = f"${BACKEND_ENV_VAR}"
    if backend is not None:
        if backend not in _BACKENDS:
            raise ValueError(f"{source} must be one of {registered()} or None, got {backend!r}")
        reasons = why_not(backend, inputs)
        if reasons:
            raise RuntimeError(
                f"{inputs.op}: backend {backend!r} (from {source}) cannot run {inputs.describe()}: " + "; ".join(reasons)
            )
        return backend
    passed_over = {}
    for name in preference(inputs.device.type):
        reasons = why_not(name, inputs)
        if not reasons:
            _PASSED_OVER[inputs.op] = {n: f"({inputs.describe()}) {r}" for n, r in passed_over.items()}
            return name
        passed_over[name] = "; ".join(reasons)
    raise AssertionError("the reference backend runs every input")  # pragma: no cover


def active_autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts to on ``device``, or ``None`` when autocast is off there."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
    except RuntimeError:  # device types without autocast (e.g. "meta", used for shape inference)
        return None
    return torch.get_autocast_dtype(device.type)


def cast_for_autocast(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The op inputs as the op receives them under ``torch.autocast`` (SPEC 8).

    When autocast is on for the tensors' device, every floating input (parameters passed as ``v`` or as gate weights
    included) is cast to the autocast dtype, so that a backend sees one dtype; float64 is left alone, as torch's
    autocast leaves it. The casts are ordinary autograd ops, so gradients reach the parameters in their own dtype.
    Outside autocast the tensors are returned as they are.
    """
    dtype = active_autocast_dtype(tensors[0].device)
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


def outside_autocast(device: torch.device) -> ContextManager:
    """Runs the reference in the dtype its inputs were cast to: under autocast, torch would otherwise run its
    matmuls in the autocast dtype but its softmax in float32, and return a dtype that depends on the op."""
    if active_autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class ExportError(RuntimeError):
    """The model cannot be exported as asked (training mode, missing optional dependency, ...)."""


def runs_reference(backend: str, dropout_p: float = 0.0, op: str = "") -> bool:
    """Whether a call takes the reference's plain ATen ops rather than ``backend``'s fused op.

    The reference backend does, and so does every call while one of torch's ONNX exporters traces a model
    (``torch.onnx.is_in_onnx_export()``, both exporters): no exporter or ONNX runtime knows the fused ops, and the
    reference's ops, the same arithmetic, are standard ONNX operators. Nothing global (a decomposition table entry,
    which torch.compile's Inductor would also read) has to teach the exporters. Dropout cannot be exported: its
    fused masks have no ONNX form, so an export of ``op`` with ``dropout_p > 0`` is refused.
    """
    if not torch.onnx.is_in_onnx_export():
        return backend == "reference"
    if dropout_p > 0.0:
        raise ExportError(f"{op}: dropout_p={dropout_p} at ONNX export; call model.eval() first (the fused dropout "
                          "masks cannot be reproduced by ONNX Runtime)")
    return True
