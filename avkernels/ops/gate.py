"""``gate``: the per-time-step two-way gate of DCA and GRJCA (SPEC 3).

``g = softmax((attended @ W^T + b) / tau)``, ``out = ReLU(g[..., 0] * unattended + g[..., 1] * attended)``.

Public functional op plus the ``avkernels::gate`` custom op shared by the fused backends. A backend registers an
:class:`~avkernels.backends.OpImpl` under ``"gate"`` with

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
from avkernels.backends import Inputs, cast_for_autocast, get_impl, outside_autocast, resolve


@torch.library.custom_op("avkernels::gate", mutates_args=())
def _gate_op(
    attended: torch.Tensor, unattended: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: float, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    return get_impl("gate", backend).forward(attended, unattended, weight, bias, tau)


@_gate_op.register_fake
def _(attended, unattended, weight, bias, tau, backend):
    return attended.new_empty(attended.shape), attended.new_empty(*attended.shape[:-1], 2)


@torch.library.custom_op("avkernels::gate_backward", mutates_args=())
def _gate_backward_op(
    dout: torch.Tensor,
    dg: torch.Tensor,
    attended: torch.Tensor,
    unattended: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    out: torch.Tensor,
    tau: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_impl("gate", backend).backward(dout, dg, attended, unattended, weight, g, out, tau)


@_gate_backward_op.register_fake
def _(dout, dg, attended, unattended, weight, g, out, tau, backend):
    return (
        attended.new_empty(attended.shape),
        unattended.new_empty(unattended.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(2),
    )


def _setup_context(ctx, inputs, output):
    attended, unattended, weight, _, tau, backend = inputs
    out, g = output
    ctx.save_for_backward(attended, unattended, weight, g, out)
    ctx.args = (tau, backend)


def _backward(ctx, dout, dg):
    attended, unattended, weight, g, out = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dg is None:
        dg = torch.zeros_like(g)
    grads = torch.ops.avkernels.gate_backward(dout, dg, attended, unattended, weight, g, out, *ctx.args)
    return (*grads, None, None)


_gate_op.register_autograd(_backward, setup_context=_setup_context)


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
    name = resolve(backend, Inputs("gate", attended.device, attended.dtype, {"B": batch, "L": length, "d": d}))
    if name == "reference" or attended.numel() == 0:
        with outside_autocast(attended.device):
            return reference.gate(attended, unattended, weight, bias, tau)
    return torch.ops.avkernels.gate(attended, unattended, weight, bias, tau, name)
