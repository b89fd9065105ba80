"""One declaration per op, and the ``torch.library`` registrations made from it for every backend.

An op is declared once, beside its public function (``ops/<op>.py``), as an :class:`OpDeclaration`: its schema and
its backward op's, their fake (meta) implementations, what autograd saves and how the backward op's outputs map to
the inputs' gradients. From that one declaration this module registers:

* for the ops defined in C++ (``TORCH_LIBRARY(avkernels, ...)`` in ``csrc/cpu/library.cpp``, whose CPU and CUDA
  kernels the ``cpp`` and ``cuda`` libraries register): the fakes and the autograd formula, on
  ``avkernels::<op>`` and ``avkernels::<op>_backward``, when :mod:`avkernels.ops.native` has loaded the library
  (:func:`define_library_ops`; at import, after a build if one was needed). The C++ schemas must be the declared ones: a
  library built from other sources is refused, with both schemas in the reason;
* for a backend whose kernels are Python callables (an :class:`~avkernels.dispatch.OpImpl` with ``forward`` and
  ``backward``: ``triton``, a test's stand-in): the backend's own pair of custom ops, ``avkernels::<backend>_<op>``
  and its ``_backward``, with the same schema, fakes and autograd, created when the implementation is registered
  (before any call, so that ``torch.compile`` never traces a registration). Two backends whose kernels both run on
  CUDA tensors cannot share one op's CUDA key, hence one op per Python-kernel backend.

A public function ends with ``DECLARATION.run(backend, inputs, reference, op_args)``: dispatch
(:func:`avkernels.dispatch.resolve`) picks a backend, and the op that runs that backend's kernels
(``DECLARATION.op(backend)``) or the reference runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from avkernels.dispatch import (OPS, Inputs, OpImpl, get_impl, on_register_impl, outside_autocast, resolve,
                                runs_reference)

NAMESPACE = "avkernels"


def _passthrough(kernel, *args):
    return kernel(*args)


@dataclass(frozen=True)
class OpDeclaration:
    """Everything ``torch.library`` needs to know about one op, whichever backend runs it.

    Attributes:
        name: the op's name, one of :data:`avkernels.dispatch.OPS`.
        schema: the forward's arguments and returns, e.g. ``"(Tensor x, float tau) -> (Tensor, Tensor)"``: the same
            text as the op's ``m.def`` in ``csrc/cpu/library.cpp`` (checked when the library loads).
        backward_schema: the same for the backward op ``<name>_backward``.
        fake: the forward's outputs as empty tensors of the right shapes and dtypes, from the op's arguments.
        backward_fake: the same for the backward op.
        save: ``(args, outputs) -> (tensors, values)``: what backward needs, tensors to save and other values;
            ``args`` holds the forward's arguments as attributes named as in ``schema`` (``args.tau``).
        backward_args: ``(saved_tensors, values, *output_grads) -> args`` of the backward op (a ``None`` gradient
            arrives when an output was not used).
        input_grads: the backward op's outputs -> one gradient (or ``None``) per forward argument.
        kernel_forward, kernel_backward: ``(kernel, *op_args)``: calls a Python backend's ``OpImpl.forward`` /
            ``.backward`` (whose contracts are in the op's module) with the op's arguments, converting what differs
            (e.g. the seed tensor to an int); by default the arguments go through as they are.
    """

    name: str
    schema: str
    backward_schema: str
    fake: Callable
    backward_fake: Callable
    save: Callable
    backward_args: Callable
    input_grads: Callable
    kernel_forward: Callable = _passthrough
    kernel_backward: Callable = _passthrough
    # backend -> (forward, backward) OpOverloads of that Python-kernel backend's own ops.
    _python_ops: Dict[str, Tuple[torch._ops.OpOverload, torch._ops.OpOverload]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def op(self, backend: str) -> torch._ops.OpOverload:
        """The op that runs ``backend``'s kernels of this op (``backend`` registered an implementation of it)."""
        if get_impl(self.name, backend).kernels_in_torch:
            return getattr(torch.ops.avkernels, self.name).default
        return self._python_ops[backend][0]

    def run(self, backend: Optional[str], inputs: Inputs, reference: Callable[[], Any],
            op_args: Callable[[], Tuple], *, empty: bool = False, dropout_p: float = 0.0) -> Any:
        """The dispatch tail of the public function: resolves ``backend`` for ``inputs``, then returns
        ``reference()`` (the reference backend, an ONNX export trace, or ``empty`` inputs: a size of 0), run outside
        autocast so that torch does not switch dtypes halfway through it, or the chosen backend's op called with
        ``op_args()`` (called only then: it may draw a dropout seed)."""
        name = resolve(backend, inputs)
        if runs_reference(name, dropout_p, self.name) or empty:
            with outside_autocast(inputs.device):
                return reference()
        return self.op(name)(*op_args())

    def backward_op(self, backend: str) -> torch._ops.OpOverload:
        """The backward op (``<name>_backward``) that goes with :meth:`op`."""
        if get_impl(self.name, backend).kernels_in_torch:
            return getattr(torch.ops.avkernels, f"{self.name}_backward").default
        return self._python_ops[backend][1]

    @functools.cached_property
    def arg_names(self) -> Tuple[str, ...]:
        """The forward's argument names, from its schema."""
        return tuple(a.name for a in torch._C.parse_schema(f"{NAMESPACE}::{self.name}{self.schema}").arguments)

    def saved(self, inputs: Tuple, output: Tuple) -> Tuple[Tuple, Tuple]:
        """``save`` applied to the forward's arguments ``inputs`` (all of them, in schema order) and outputs."""
        assert len(self.arg_names) == len(inputs), f"{self.name}: {len(inputs)} arguments for {self.arg_names}"
        return self.save(SimpleNamespace(**dict(zip(self.arg_names, inputs))), output)

    def _autograd(self, backward_op):
        """``setup_context`` and ``backward`` for ``torch.library.register_autograd``, calling ``backward_op``."""

        def setup_context(ctx, inputs, output):
            tensors, ctx.values = self.saved(inputs, output)
            ctx.save_for_backward(*tensors)

        def backward(ctx, *grads):
            return self.input_grads(backward_op(*self.backward_args(ctx.saved_tensors, ctx.values, *grads)))

        return setup_context, backward

    def _register(self, forward_name: str, backward_name: str) -> None:
        """Fakes and autograd on the pair of ops ``forward_name``, ``backward_name`` (qualified names)."""
        torch.library.register_fake(forward_name, self.fake)
        torch.library.register_fake(backward_name, self.backward_fake)
        backward_op = _overload(backward_name)
        setup_context, backward = self._autograd(backward_op)
        torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


_DECLARATIONS: Dict[str, OpDeclaration] = {}
_LIBRARY_OPS_DEFINED = False


def _overload(qualname: str) -> torch._ops.OpOverload:
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def declare(declaration: OpDeclaration) -> OpDeclaration:
    """Registers ``declaration``; Python-kernel backends' implementations registered from now on get their ops."""
    if declaration.name not in OPS:
        raise ValueError(f"op must be one of {OPS} (avkernels.dispatch.OPS), got {declaration.name!r}")
    _DECLARATIONS[declaration.name] = declaration
    return declaration


def declarations() -> Tuple[OpDeclaration, ...]:
    return tuple(_DECLARATIONS.values())


def _define_python_ops(op: str, backend: str, impl: OpImpl) -> None:
    """The ``avkernels::<backend>_<op>`` pair of ``backend`` (a registration listener of avkernels.dispatch)."""
    if impl.kernels_in_torch:
        return
    declaration = _DECLARATIONS.get(op)
    if declaration is None:
        raise RuntimeError(f"register_impl({op!r}, {backend!r}) came before the op's declaration: import avkernels.ops "
                           "first (it declares every op)")
    if backend in declaration._python_ops:
        return  # registered again (a test's stand-in): the ops stay, their bodies look the kernels up per call
    names = f"{NAMESPACE}::{backend}_{op}", f"{NAMESPACE}::{backend}_{op}_backward"

    # The bodies look the implementation up at each call: registering another one for the backend replaces it.
    def forward(*args):
        return declaration.kernel_forward(get_impl(op, backend).forward, *args)

    def backward(*args):
        return declaration.kernel_backward(get_impl(op, backend).backward, *args)

    for qualname, body, schema in ((names[0], forward, declaration.schema),
                                   (names[1], backward, declaration.backward_schema)):
        torch.library.custom_op(qualname, body, mutates_args=(), schema=schema)
    declaration._register(*names)
    declaration._python_ops[backend] = (_overload(names[0]), _overload(names[1]))


def library_schema_mismatch() -> Optional[str]:
    """``None`` when the ops defined by the loaded C++ library have the declared schemas, else every difference."""
    problems = []
    for declaration in _DECLARATIONS.values():
        for name, schema in ((declaration.name, declaration.schema),
                             (f"{declaration.name}_backward", declaration.backward_schema)):
            expected = str(torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}"))
            try:
                actual = str(getattr(torch.ops.avkernels, name).default._schema)
            except (AttributeError, RuntimeError):
                actual = "missing"
            if actual != expected:
                problems.append(f"{name} is {actual}, expected {expected}")
    return "; ".join(problems) or None


def define_library_ops() -> None:
    """Fakes and autograd for the ops the C++ library defined; once per process (the library loads once)."""
    global _LIBRARY_OPS_DEFINED
    if _LIBRARY_OPS_DEFINED:
        return
    for declaration in _DECLARATIONS.values():
        declaration._register(f"{NAMESPACE}::{declaration.name}", f"{NAMESPACE}::{declaration.name}_backward")
    _LIBRARY_OPS_DEFINED = True


on_register_impl(_define_python_ops)


__all__ = ["OpDeclaration", "declare", "declarations", "define_library_ops", "library_schema_mismatch"]
