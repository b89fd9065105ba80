"""``gate``: the per-time-step two-way gate of DCA and GRJCA (SPEC 3).

``g = softmax((attended @ W^T + b) / tau)``, ``out = ReLU(g[..., 0] * unattended + g[..., 1] * attended)``.

Public functional op plus the op's declaration (:mod:`avkernels.ops.declaration`). A Python-kernel backend
registers an :class:`~avkernels.dispatch.OpImpl` under ``"gate"`` with

``forward(attended, unattended, weight, bias, tau) -> (out, g)``
    ``attended``/``unattended`` ``(B, L, d)`` of arbitrary strides, ``weight (2, d)``, ``bias (2,)``; returns
    contiguous ``out (B, L, d)`` and ``g (B, L, 2)``.
``backward(dout, dg, attended, unattended, weight, g, out, tau) -> (d_attended, d_unattended, d_weight, d_bias)``
    ``dout``/``dg`` may be non-contiguous (``dg`` is zeros when the gate values were not used); returns contiguous
    gradients shaped like the inputs. The weight and bias gradients reduce over ``B * L``: deterministic when
    ``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from avkernels import reference
from avkernels._validation import check_float_tensor, check_positive, check_same, check_shape
from avkernels.dispatch import Inputs, cast_for_autocast
from avkernels.ops.declaration import OpDeclaration, declare


def _backward_args(saved, values, dout, dg):
    attended, unattended, weight, g, out = saved
    dout = torch.zeros_like(out) if dout is None else dout  # an output that was not used has no gradient
    dg = torch.zeros_like(g) if dg is None else dg
    return (dout, dg, attended, unattended, weight, g, out, *values)


DECLARATION = declare(
    OpDeclaration(
        "gate",
        schema="(Tensor attended, Tensor unattended, Tensor weight, Tensor bias, float tau) -> (Tensor, Tensor)",
        backward_schema="(Tensor dout, Tensor dg, Tensor attended, Tensor unattended, Tensor weight, Tensor g, "
        "Tensor out, float tau) -> (Tensor, Tensor, Tensor, Tensor)",
        fake=lambda attended, *_: (attended.new_empty(attended.shape), attended.new_empty(*attended.shape[:-1], 2)),
        backward_fake=lambda dout, dg, attended, unattended, weight, *_: (
            attended.new_empty(attended.shape), unattended.new_empty(unattended.shape),
            weight.new_empty(weight.shape), weight.new_empty(2),
        ),
        save=lambda a, output: ((a.attended, a.unattended, a.weight, output[1], output[0]), (a.tau,)),
        backward_args=_backward_args,
        input_grads=lambda grads: (*grads, None),
    )
)


def check_gate_inputs(attended, unattended, weight, bias) -> None:
    for name, x in (("attended", attended), ("unattended", unattended), ("weight", weight), ("bias", bias)):
        check_float_tensor(x, name)
    check_shape(attended, "attended", ("B", "L", "d"))
    check_shape(unattended, "unattended", tuple(attended.shape))
    check_shape(weight, "weight", (2, attended.shape[-1]))
    check_shape(bias, "bias", (2,))


def gate(
    attended: torch.Tensor,
    unattended: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    tau: float = 0.1,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-way gate between attended and unattended features (DCA, GRJCA; SPEC 3).

    Args:
        attended: ``(B, L, d)`` cross-attended features; the gate logits are computed from these only.
        unattended: ``(B, L, d)`` the features before cross-attention.
        weight: ``(2, d)`` and bias: ``(2,)``, stored as ``nn.Linear(d, 2)`` stores them.
        tau: softmax temperature (0.1 in the official DCA code).
        backend: see :func:`avkernels.tanh_attention`.
    Returns:
        ``(out, g)``: ``out = ReLU(g[..., :1] * unattended + g[..., 1:] * attended)`` of shape ``(B, L, d)`` and the
        gate ``g`` of shape ``(B, L, 2)`` (index 0 = unattended, 1 = attended), both in the inputs' dtype (under
        ``torch.autocast``, the autocast dtype: the inputs and the weights are cast to it first; SPEC 8).
    """
    check_gate_inputs(attended, unattended, weight, bias)
    tau = check_positive(tau, "tau")
    attended, unattended, weight, bias = cast_for_autocast([attended, unattended, weight, bias])
    check_same([attended, unattended, weight, bias], ["attended", "unattended", "weight", "bias"], autocast_may_mix=False)
    batch, length, d = attended.shape
    return DECLARATION.run(backend, Inputs("gate", attended.device, attended.dtype, {"B": batch, "L": length, "d": d}),
                           lambda: reference.gate(attended, unattended, weight, bias, tau),
                           lambda: (attended, unattended, weight, bias, tau), empty=attended.numel() == 0)
