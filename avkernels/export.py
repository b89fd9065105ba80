"""ONNX export of the fusion modules and full models, whatever backend their fused ops were dispatched to.

The fused ops are torch ops whose kernels live in the C++/CUDA/Triton backends: ``torch.ops.avkernels.tanh_attention``,
``.gate``, ``.stage_gate`` (defined in C++, kernels of ``cpp`` and ``cuda``) and each Python-kernel backend's own
ops (``.triton_tanh_attention``, ...; see :mod:`avkernels.ops.declaration`). ONNX Runtime has none of those. So while
one of torch's ONNX exporters traces a model (``torch.onnx.is_in_onnx_export()``), the ops run the reference's plain
ATen ops instead (:func:`avkernels.dispatch.runs_reference`): the same arithmetic, written by either exporter as
standard ONNX operators (MatMul, Tanh, Softmax, ...). Plain ``torch.onnx.export`` therefore works with any backend,
and nothing global is registered: torch's decomposition table, which ``torch.compile`` reads too, stays untouched,
and ``torch.export`` / AOTInductor keep the fused ops (:func:`export_program`).

Export in eval mode: dropout is then off and no dropout node is written (:func:`export_onnx` sets eval mode; the
TorchScript exporter refuses a training-mode export; an export that reaches an op with dropout raises
:class:`ExportError`).

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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from avkernels.dispatch import ExportError

ONNX_REQUIREMENTS = ("onnx", "onnxscript")
AV_MODALITIES = ("video", "audio")  # the order of the features a regressor or fusion takes (then any others)


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


def _graph_names(model: torch.nn.Module, n_inputs: int,
                 input_names: Optional[Sequence[str]]) -> Tuple[List[str], Optional[List[str]]]:
    """The names of the ONNX graph's inputs and outputs: modalities in, and valence and arousal (a regressor), one
    fused sequence per modality (a fusion) or the logits (a classifier) out; ``input_i`` and the exporter's own
    output names for any other module."""
    from avkernels.models import AVRegressor
    from avkernels.nn.fusion import RecursiveJointCrossAttention

    if isinstance(model, (AVRegressor, RecursiveJointCrossAttention)):
        default = [AV_MODALITIES[i] if i < len(AV_MODALITIES) else f"modality_{i}" for i in range(n_inputs)]
    elif hasattr(model, "specs") and hasattr(model, "modalities"):  # an IEMOCAP classifier, as in example_inputs
        default = list(model.modalities)
    else:
        default = [f"input_{i}" for i in range(n_inputs)]
    inputs = list(input_names) if input_names is not None else default
    if isinstance(model, AVRegressor):
        return inputs, ["valence", "arousal"]
    if isinstance(model, RecursiveJointCrossAttention):
        return inputs, [f"{name}_fused" for name in inputs]
    if hasattr(model, "specs") and hasattr(model, "modalities"):
        return inputs, ["logits"]
    return inputs, None


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
        input_names, output_names: names in the ONNX graph. Default inputs: the modalities (``video, audio``, then
            ``modality_2, ...`` for a regressor or fusion; the classifier's ``modalities``), else ``input_0, ...``.
            Default outputs: ``valence, arousal`` for an :class:`~avkernels.models.AVRegressor`, ``<modality>_fused``
            per modality for a fusion module, ``logits`` for a classifier.
        opset_version: ONNX opset (default: the exporter's).
        **kwargs: passed to ``torch.onnx.export`` (``dynamo=True`` is used).
    Returns:
        The ``torch.onnx.ONNXProgram``.
    """
    _require(ONNX_REQUIREMENTS)
    inputs, dynamic_shapes = _free_batch(model, inputs, dynamic_batch)
    input_names, default_outputs = _graph_names(model, len(inputs), input_names)
    output_names = default_outputs if output_names is None else output_names
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

    from avkernels.predict import load_model, resolve_checkpoint

    try:
        if os.path.exists(args.output) and os.path.samefile(args.output, resolve_checkpoint(args.checkpoint)):
            raise ExportError(f"{args.output}: is the checkpoint being exported; choose another output file")
        model, _ = load_model(args.checkpoint)
        export_onnx(model, example_inputs(model, batch=2), args.output, opset_version=args.opset)
        if not args.no_check:
            inputs = example_inputs(model, batch=3, seed=1)
            with torch.no_grad():
                expected = model(*inputs)
            expected = (expected,) if isinstance(expected, torch.Tensor) else expected
            error = max(float(np.abs(got - e.numpy()).max()) for got, e in zip(run_onnx(args.output, inputs), expected))
            print(f"onnxruntime vs PyTorch at batch 3: max abs difference {error:.2e}")
    except (ExportError, ValueError, OSError) as exc:  # PredictError, CheckpointError, a missing file ...
        print(f"avkernels export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0
