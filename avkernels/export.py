"""ONNX export of the fusion modules and full models, whatever backend their fused ops were dispatched to.

The fused ops are torch ops whose kernels live in the C++/CUDA/Triton backends: ``torch.ops.avkernels.tanh_attention``,
``.gate``, ``.stage_gate`` (defined in C++, kernels of ``cpp`` and ``cuda``) and each Python-kernel backend's own
ops (``.triton_tanh_attention``, ...; see :mod:`avkernels.ops.declaration`). ONNX Runtime has none of those.
Importing this module (``import avkernels`` does) teaches both of torch's ONNX exporters to write every op of every
backend as standard ONNX operators (MatMul, Tanh, Softmax, ...), with the same arithmetic as
:mod:`avkernels.reference`, one translation per op declaration, registered for each op defined from it (including
ops defined later, after a build on first use):

* ``torch.onnx.export(..., dynamo=True)`` (the default): a decomposition of each op into ATen ops, registered in
  ``torch._decomp.decomposition_table``. Of torch's graph passes only the ONNX exporter decomposes with that table:
  ``torch.export``, AOTInductor and ``torch.compile`` keep the fused op (their tables list ATen ops explicitly).
* ``torch.onnx.export(..., dynamo=False)`` (TorchScript): a symbolic function per op
  (``torch.onnx.register_custom_op_symbolic``).

Export in eval mode: dropout is then off (``dropout_p == 0`` reaches the op) and no dropout node is written
(:func:`export_onnx` sets eval mode; the TorchScript exporter does too and refuses a training-mode export).

``forward(*features)`` models (the fusions, the full models) need ``dynamic_shapes`` rather than ``dynamic_axes``
with the dynamo exporter, whose conversion of ``dynamic_axes`` does not handle a variadic signature;
:func:`export_onnx` builds them.

Typical use (the two lines of the README)::

    from avkernels.export import export_onnx
    export_onnx(model, (video, audio), "model.onnx")      # dynamic batch axis; check with onnxruntime

:func:`export_onnx` needs the optional dependencies (``pip install avkernels[onnx]``: onnx, onnxscript and,
to run or check the file, onnxruntime).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from avkernels import reference
from avkernels.backends import outside_autocast
from avkernels.ops import declaration

ONNX_REQUIREMENTS = ("onnx", "onnxscript")
_TORCHSCRIPT_OPSET = 15  # the symbolics hold for this opset and later ones (CastLike appeared in 15)


class ExportError(RuntimeError):
    """The model cannot be exported as asked (training mode, missing optional dependency, ...)."""


def _eval_only(dropout_p: float, op: str) -> None:
    if dropout_p > 0.0:
        raise ExportError(
            f"{op}: dropout_p={dropout_p} at export; call model.eval() first (the fused dropout masks cannot be "
            "reproduced by ONNX Runtime)"
        )


# -- torch.onnx.export(dynamo=True): decompositions into ATen ops ------------------------------------------------
#
# The table is global, and FakeTensor also reads it: on symbolic sizes (torch.compile's dynamic shapes, torch.export
# with dynamic dims) it prefers a decomposition to the op's registered fake. So each decomposition must give exactly
# the fake's outputs (shapes, dtypes, the mask's presence) for every argument, dropout included, and must compute in
# the inputs' dtype under autocast (as the ops' reference path does), never raise.


def _tanh_attention_decomposition(q, k, v, seed, scale, dropout_p, activation, return_mask):
    with outside_autocast(q.device):
        o, mask = reference.tanh_attention(q, k, v, scale, dropout_p, None if activation == "none" else activation,
                                           return_mask=return_mask)
    if mask is None:  # the op's second output is an empty tensor when no mask is returned
        mask = torch.empty(0, dtype=torch.bool, device=q.device)
    return o, mask


def _gate_decomposition(attended, unattended, weight, bias, tau):
    with outside_autocast(attended.device):
        return reference.gate(attended, unattended, weight, bias, tau)


def _stage_gate_decomposition(stages, weight, bias, tau):
    with outside_autocast(stages[0].device):
        return reference.stage_gate(stages, weight, bias, tau)


_DECOMPOSITION_OF = {
    "tanh_attention": _tanh_attention_decomposition,
    "gate": _gate_decomposition,
    "stage_gate": _stage_gate_decomposition,
}
# Every op defined so far (each backend's) -> its decomposition; the same entries as torch's table.
DECOMPOSITIONS: Dict[torch._ops.OpOverload, Any] = {}


def _register_decomposition(decl: declaration.OpDeclaration, op: torch._ops.OpOverload) -> None:
    from torch._decomp import decomposition_table

    DECOMPOSITIONS[op] = _DECOMPOSITION_OF[decl.name]
    # Idempotent: a module reload must not stack a second registration (torch asserts on duplicates).
    decomposition_table.setdefault(op, DECOMPOSITIONS[op])


# -- torch.onnx.export(dynamo=False): TorchScript symbolics -------------------------------------------------------


def _constant_like(g, value: float, like):
    return g.op("CastLike", g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32)), like)


def _empty_bool(g):
    return g.op("Constant", value_t=torch.zeros(0, dtype=torch.bool))


def _softmax_last(g, x):
    return g.op("Softmax", x, axis_i=-1)


def _column(g, x, index: int):
    """``x[..., index:index + 1]``."""

    def const(values):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    return g.op("Slice", x, const([index]), const([index + 1]), const([-1]))


def _symbolics() -> Dict[str, Any]:
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "f", "f", "s", "b")
    def tanh_attention_symbolic(g, q, k, v, seed, scale, dropout_p, activation, return_mask):
        _eval_only(dropout_p, "tanh_attention")
        scores = g.op("MatMul", q, g.op("Transpose", k, perm_i=[0, 2, 1]))
        c = g.op("Tanh", g.op("Mul", scores, _constant_like(g, scale, q)))
        o = g.op("MatMul", c, v)
        if activation == "tanh_relu":
            o = g.op("Relu", g.op("Tanh", o))
        return o, _empty_bool(g)

    @symbolic_helper.parse_args("v", "v", "v", "v", "f")
    def gate_symbolic(g, attended, unattended, weight, bias, tau):
        logits = g.op("Add", g.op("MatMul", attended, g.op("Transpose", weight, perm_i=[1, 0])), bias)
        gates = _softmax_last(g, g.op("Div", logits, _constant_like(g, tau, attended)))
        mixed = g.op("Add", g.op("Mul", _column(g, gates, 0), unattended), g.op("Mul", _column(g, gates, 1), attended))
        return g.op("Relu", mixed), gates

    @symbolic_helper.parse_args("v", "v", "v", "f")
    def stage_gate_symbolic(g, stages, weight, bias, tau):
        stages = symbolic_helper._unpack_list(stages)
        joined = g.op("Concat", *stages, axis_i=-1)
        logits = g.op("Add", g.op("MatMul", joined, g.op("Transpose", weight, perm_i=[1, 0])), bias)
        s = _softmax_last(g, g.op("Div", logits, _constant_like(g, tau, stages[0])))
        out = g.op("Mul", _column(g, s, 0), stages[0])
        for t in range(1, len(stages)):
            out = g.op("Add", out, g.op("Mul", _column(g, s, t), stages[t]))
        return g.op("Relu", out), s

    return {"tanh_attention": tanh_attention_symbolic, "gate": gate_symbolic, "stage_gate": stage_gate_symbolic}


try:
    _SYMBOLICS = _symbolics()
except Exception:  # noqa: BLE001 - the TorchScript exporter is deprecated; its absence must not break the import
    _SYMBOLICS = {}


def _register(decl: declaration.OpDeclaration, op: torch._ops.OpOverload) -> None:
    _register_decomposition(decl, op)
    if decl.name in _SYMBOLICS:
        from torch.onnx import register_custom_op_symbolic

        register_custom_op_symbolic(op.name(), _SYMBOLICS[decl.name], _TORCHSCRIPT_OPSET)


declaration.on_define(_register)


# -- the helper ---------------------------------------------------------------------------------------------------


def _require(modules: Sequence[str]) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'avkernels[onnx]' "
            f"(or pip install {' '.join(missing)})"
        )


def _batch_axes(model: torch.nn.Module, n_inputs: int, batch) -> Tuple[Any, ...]:
    """``dynamic_shapes`` with axis 0 free in every input, shaped like ``forward``'s signature."""
    import inspect

    per_input = [{0: batch} for _ in range(n_inputs)]
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    # torch.export matches the structure of the signature: ``forward(*features)`` takes one tuple for all of them.
    named = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return tuple(per_input[:named]) + (tuple(per_input[named:]),)
        named += 1
    return tuple(per_input)


def _free_batch(model: torch.nn.Module, inputs, dynamic_batch: bool):
    """The inputs to trace and the ``dynamic_shapes`` that leave their batch axis free (``None`` when not asked)."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not dynamic_batch:
        return inputs, None
    if any(x.shape[0] < 2 for x in inputs):
        # torch.export specialises a size of 0 or 1 to a constant; a traced batch of 2 keeps the axis free.
        inputs = tuple(x[:1].expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else
                       x.new_zeros(2, *x.shape[1:]) for x in inputs)
    return inputs, _batch_axes(model, len(inputs), torch.export.Dim("batch"))


def export_program(
    model: torch.nn.Module, inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *, dynamic_batch: bool = True
) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``model`` in eval mode, with a free batch axis: what AOTInductor compiles.

    Unlike :func:`export_onnx`, the fused ops stay in the program as ``avkernels::<op>`` calls, so that a package
    built from it (``torch._inductor.aoti_compile_and_package``) runs the backend's kernels, from C++ too
    (``examples/aoti/``). Export under ``torch.autocast`` to get a bf16 program. ``inputs`` as for :func:`export_onnx`.
    """
    inputs, dynamic_shapes = _free_batch(model, inputs, dynamic_batch)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)


def _output_names(model: torch.nn.Module) -> Optional[Sequence[str]]:
    from avkernels.models import AVRegressor

    if isinstance(model, AVRegressor):
        return ["valence", "arousal"]
    return None


def export_onnx(
    model: torch.nn.Module,
    inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    path: Union[str, "os.PathLike[str]"],
    *,
    dynamic_batch: bool = True,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    opset_version: Optional[int] = None,
    **kwargs: Any,
):
    """Export ``model`` in eval mode to an ONNX file of standard operators, with a dynamic batch axis.

    Args:
        model: a fusion module (:class:`~avkernels.JCA` ... :class:`~avkernels.GRJCA`), a full model from
            :mod:`avkernels.models`, or any module built on the library's ops. It is put in eval mode (and back in
            training mode afterwards if it was).
        inputs: example inputs, one tensor per positional argument (batch first).
        path: the ``.onnx`` file to write (the weights are stored inside it).
        dynamic_batch: axis 0 of every input (and so of every output) is a free dimension in the file.
        input_names, output_names: names in the ONNX graph (default ``input_0, ...``; ``valence, arousal`` for an
            :class:`~avkernels.models.AVRegressor`).
        opset_version: ONNX opset (default: the exporter's).
        **kwargs: passed to ``torch.onnx.export`` (``dynamo=True`` is used).
    Returns:
        The ``torch.onnx.ONNXProgram``.
    """
    _require(ONNX_REQUIREMENTS)
    inputs, dynamic_shapes = _free_batch(model, inputs, dynamic_batch)
    if input_names is None:
        input_names = [f"input_{i}" for i in range(len(inputs))]
    if output_names is None:
        output_names = _output_names(model)
    was_training = model.training
    model.eval()
    try:
        options: Dict[str, Any] = dict(
            input_names=list(input_names), output_names=None if output_names is None else list(output_names),
            dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False,
        )
        if opset_version is not None:
            options["opset_version"] = opset_version
        options.update(kwargs)
        with torch.no_grad():
            return torch.onnx.export(model, inputs, os.fspath(path), **options)
    finally:
        model.train(was_training)


def run_onnx(path: Union[str, "os.PathLike[str]"], inputs: Sequence[torch.Tensor]) -> Tuple[Any, ...]:
    """Run an exported file in ONNX Runtime (CPU) on ``inputs``; returns its outputs as numpy arrays."""
    _require(("onnxruntime",))
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return tuple(session.run(None, feeds))


# -- the command --------------------------------------------------------------------------------------------------


def example_inputs(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Random inputs of the shapes ``model`` takes (an AVRegressor, an IEMOCAP classifier or a fusion module)."""
    from avkernels.models import AVRegressor
    from avkernels.nn.fusion import RecursiveJointCrossAttention

    g = torch.Generator().manual_seed(seed)
    if isinstance(model, AVRegressor):
        shapes = [(model.seq_len, d) for d in model.input_dims]
    elif isinstance(model, RecursiveJointCrossAttention):
        shapes = [(model.seq_len, d) for d in model.dims]
    elif hasattr(model, "specs") and hasattr(model, "modalities"):
        shapes = [(model.specs[m].length or 8, model.specs[m].dim) for m in model.modalities]
    else:
        raise ExportError(f"example_inputs: no known input shapes for {type(model).__name__}; pass inputs yourself")
    return tuple(torch.randn(batch, *shape, generator=g) for shape in shapes)


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="last.pt or best.pt written by examples/train_av.py or train_iemocap.py")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip running the file in onnxruntime against PyTorch on a batch of another size")


def run_from_args(args) -> int:
    import sys

    import numpy as np

    from avkernels.predict import PredictError, load_model

    try:
        model, _ = load_model(args.checkpoint)
        export_onnx(model, example_inputs(model, batch=2), args.output, opset_version=args.opset)
        if not args.no_check:
            inputs = example_inputs(model, batch=3, seed=1)
            with torch.no_grad():
                expected = model(*inputs)
            expected = (expected,) if isinstance(expected, torch.Tensor) else expected
            error = max(float(np.abs(got - e.numpy()).max()) for got, e in zip(run_onnx(args.output, inputs), expected))
            print(f"onnxruntime vs PyTorch at batch 3: max abs difference {error:.2e}")
    except (ExportError, PredictError, FileNotFoundError) as exc:
        print(f"avkernels export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0
