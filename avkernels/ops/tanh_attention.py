"""``tanh_attention``: the core primitive of joint cross-attention (SPEC 1).

``o = Drop_p(tanh(scale * q @ k^T)) @ v`` with an optional ``ReLU(tanh(o))`` epilogue; with ``map="sigmoid"``,
``o = Drop_p(sigmoid(scale * q @ k^T + map_bias)) @ v`` (sigmoid attention).

This module holds the public functional op (input checks, backend choice) and the op's declaration
(:mod:`avkernels.ops.declaration`): its schema, fakes and autograd, from which the op ``avkernels::tanh_attention``
(defined in C++, kernels of ``cpp`` and ``cuda``) and each Python-kernel backend's own op get their registrations.
A Python-kernel backend provides an :class:`~avkernels.dispatch.OpImpl` registered under ``"tanh_attention"`` with

``forward(q, k, v, seed, scale, dropout_p, activation, return_mask, map, map_bias) -> (o, mask)``
    ``q (B, Mq, D)``, ``k (B, N, D)``, ``v (Bv, N, E)`` with ``Bv`` 1 (shared over the batch) or ``B``, all of one
    dtype and device and arbitrary strides; ``seed`` a Python int in ``[0, 2**31)`` (ignored when
    ``dropout_p == 0``); ``activation`` ``"none"`` or ``"tanh_relu"``; ``map`` one of :data:`MAPS`, ``map_bias`` a
    float (0 unless ``map == "sigmoid"``). Returns a contiguous ``o (B, Mq, E)`` and, when ``return_mask`` and
    ``dropout_p > 0``, the boolean keep-mask ``(B, Mq, N)`` it drew, else ``None``.
``backward(do, q, k, v, o, seed, scale, dropout_p, activation, map, map_bias) -> (dq, dk, dv)``
    ``o`` is the forward output (used by the ``"tanh_relu"`` epilogue's derivative; an empty tensor otherwise).
    Must redraw the identical mask from ``seed``. Returns contiguous gradients shaped like ``q``, ``k``, ``v``
    (``dv`` summed over the batch when ``Bv == 1``). Deterministic when
    ``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from avkernels import reference
from avkernels._validation import check_finite, check_float_tensor, check_probability, check_same, check_shape
from avkernels.dispatch import Inputs, cast_for_autocast
from avkernels.ops.declaration import OpDeclaration, declare

ACTIVATIONS = (None, "tanh_relu")
MAPS = ("tanh", "sigmoid")  # map(x) applied to x = scale * q @ k^T + map_bias (SPEC 1)
SEED_BOUND = 2**31  # Philox keys are 32-bit halves; every backend accepts seeds below this


def new_seed(p: float) -> torch.Tensor:
    """A fresh dropout seed drawn from torch's CPU generator (so ``torch.manual_seed`` reproduces it).

    A tensor rather than an int so that ``torch.compile`` traces it without a graph break; empty when no dropout.
    """
    if p == 0.0:
        return torch.empty(0, dtype=torch.int64)
    return torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64)


def _fake(q, k, v, seed, scale, dropout_p, activation, return_mask, map="tanh", map_bias=0.0):
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    mask_shape = (q.shape[0], q.shape[1], k.shape[1]) if return_mask and dropout_p > 0 else (0,)
    return o, q.new_empty(mask_shape, dtype=torch.bool)


def _save(a, output):
    o = output[0] if a.activation != "none" else output[0].new_empty(0)
    return (a.q, a.k, a.v, o, a.seed), (a.scale, a.dropout_p, a.activation, a.map, a.map_bias)


def _seed_int(seed: torch.Tensor) -> int:
    """The Python-kernel contract's seed: the op's seed tensor is empty (no dropout) or holds one int."""
    return int(seed.item()) if seed.numel() else 0


def _kernel_forward(kernel, q, k, v, seed, scale, dropout_p, activation, return_mask, map="tanh", map_bias=0.0):
    o, mask = kernel(q, k, v, _seed_int(seed), scale, dropout_p, activation, return_mask, map, map_bias)
    return o, torch.empty(0, dtype=torch.bool, device=q.device) if mask is None else mask


def _kernel_backward(kernel, do, q, k, v, o, seed, scale, dropout_p, activation, map="tanh", map_bias=0.0):
    return kernel(do, q, k, v, o, _seed_int(seed), scale, dropout_p, activation, map, map_bias)


# The op returns the mask as an empty tensor when none was asked for or drawn; it saves q, k, v, the seed and, with
# the epilogue, o (whose derivative needs it), never the map.
DECLARATION = declare(
    OpDeclaration(
        "tanh_attention",
        schema="(Tensor q, Tensor k, Tensor v, Tensor seed, float scale, float dropout_p, str activation, "
        'bool return_mask, str map="tanh", float map_bias=0.) -> (Tensor, Tensor)',
        backward_schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor seed, float scale, "
        'float dropout_p, str activation, str map="tanh", float map_bias=0.) -> (Tensor, Tensor, Tensor)',
        fake=_fake,
        backward_fake=lambda do, q, k, v, *_: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)),
        save=_save,
        backward_args=lambda saved, values, do, _dmask: (do, *saved, *values),
        input_grads=lambda grads: (*grads, None, None, None, None, None, None, None),
        kernel_forward=_kernel_forward,
        kernel_backward=_kernel_backward,
    )
)


def tanh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    training: bool = False,
    activation: Optional[str] = None,
    return_mask: bool = False,
    map: str = "tanh",
    map_bias: float = 0.0,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Tanh attention: ``o = Drop_p(tanh(scale * q @ k^T)) @ v`` (SPEC 1), or sigmoid attention with ``map``.

    Args:
        q: ``(B, Mq, D)`` queries.
        k: ``(B, N, D)`` keys.
        v: ``(B, N, E)`` values, or ``(N, E)`` / ``(1, N, E)`` / a batch-expanded view to share one value matrix
            across the batch (its gradient is then summed over the batch).
        scale: multiplies ``q @ k^T``; ``None`` means ``1/sqrt(D)`` as in ``scaled_dot_product_attention``.
        dropout_p: inverted-dropout probability on the ``(Mq, N)`` map, applied only when ``training``.
        training: whether dropout is active.
        activation: ``None`` or ``"tanh_relu"`` (returns ``ReLU(tanh(o))``, the dense JCA form).
        return_mask: also return the boolean keep-mask that was drawn (``None`` when no dropout ran).
        map: the function applied to each map element: ``"tanh"`` (``tanh(scale * q @ k^T)``) or ``"sigmoid"``
            (``sigmoid(scale * q @ k^T + map_bias)``, as in sigmoid attention). Every backend runs both, with the
            same dropout, dtypes and strides.
        map_bias: the sigmoid map's scalar bias (e.g. ``-log(N)``); must be 0 for ``"tanh"``.
        backend: ``None`` (the first backend, fastest first, that can run these inputs; or ``$AVKERNELS_BACKEND``),
            or a backend's name: ``"reference"``, ``"triton"``, ``"cpp"``, ``"cuda"`` (see :mod:`avkernels.dispatch`).
    Returns:
        ``o`` of shape ``(B, Mq, E)``, or ``(o, mask)`` when ``return_mask``.

    Precision (SPEC 8): ``q``, ``k``, ``v`` share one dtype (float32, float64, bfloat16 or float16); accumulation is
    float32 (float64 for float64) and ``o`` has the input dtype. Under ``torch.autocast`` the inputs, ``v`` included
    when it is a parameter, are cast to the autocast dtype first.
    """
    check_float_tensor(q, "q")
    check_float_tensor(k, "k")
    check_float_tensor(v, "v")
    check_shape(q, "q", ("B", "Mq", "D"))
    batch, _, head = q.shape
    check_shape(k, "k", (batch, "N", head))
    n = k.shape[1]
    if v.dim() == 2:  # one (N, E) value matrix shared by the batch
        check_shape(v, "v", (n, "E"))
        v = v.unsqueeze(0)
    check_shape(v, "v", ("B or 1", n, "E"))
    if v.shape[0] not in (1, batch):
        raise ValueError(f"v: expected batch size {batch} (like q) or 1 (shared), got {v.shape[0]}")
    if v.shape[0] > 1 and v.stride(0) == 0:
        v = v[:1]  # a batch-expanded weight: let the kernel broadcast it and reduce dv over the batch once
    q, k, v = cast_for_autocast([q, k, v])
    check_same([q, k, v], ["q", "k", "v"], autocast_may_mix=False)
    p = check_probability(dropout_p, "dropout_p")
    if not training:
        p = 0.0
    if scale is None:
        scale = 1.0 / math.sqrt(head) if head > 0 else 1.0
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    scale = check_finite(scale, "scale")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if map not in MAPS:
        raise ValueError(f"map: expected one of {MAPS}, got {map!r}")
    if not isinstance(map_bias, numbers.Real) or isinstance(map_bias, bool) or not math.isfinite(map_bias):
        raise TypeError(f"map_bias: expected a finite float, got {map_bias!r}")
    if map_bias != 0 and map != "sigmoid":
        raise ValueError(f"map_bias: only the sigmoid map takes a bias; got map={map!r} with map_bias={map_bias}")

    inputs = Inputs(
        "tanh_attention",
        q.device,
        q.dtype,
        {"B": batch, "Mq": q.shape[1], "N": n, "D": head, "E": v.shape[2]},
        {"dropout": p > 0, "return_mask": return_mask and p > 0, "shared_v": v.shape[0] == 1 and batch > 1,
         "activation": activation, "map": map},
    )
    o, mask = DECLARATION.run(
        backend, inputs,
        lambda: reference.tanh_attention(q, k, v, float(scale), p, activation, return_mask=return_mask, map=map,
                                         map_bias=float(map_bias)),
        lambda: (q, k, v, new_seed(p), float(scale), p, activation or "none", return_mask, map, float(map_bias)),
        empty=min(q.shape + k.shape + v.shape[1:]) == 0, dropout_p=p)
    if mask is not None and mask.numel() == 0 and mask.dim() == 1:
        mask = None  # the op's "no mask"
    return (o, mask) if return_mask else o
