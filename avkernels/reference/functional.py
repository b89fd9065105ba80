"""Plain-PyTorch definitions of the library's ops (SPEC sections 1 and 3).

These are the ground truth every fused backend is tested against, and the ``"reference"`` backend itself. They
take already-validated arguments (the public wrappers in :mod:`avkernels.ops` check inputs) and are written the way
the official code computes them, so that timing them is timing what users would otherwise run.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def tanh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    activation: Optional[str] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    return_mask: bool = False,
    map: str = "tanh",
    map_bias: float = 0.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``o = Drop_p(tanh(scale * q @ k^T)) @ v``, optionally followed by ``ReLU(tanh(o))``; with ``map="sigmoid"``
    the map is ``sigmoid(scale * q @ k^T + map_bias)``.

    Args:
        q: ``(B, Mq, D)``.  k: ``(B, N, D)``.  v: ``(B, N, E)`` or ``(1, N, E)`` (shared over the batch).
        scale: multiplies ``q @ k^T`` before the tanh.
        dropout_p: inverted-dropout probability on the ``(B, Mq, N)`` map; ``0`` disables dropout. The caller
            passes 0 outside training.
        activation: ``None`` or ``"tanh_relu"``.
        dropout_mask: a boolean ``(B, Mq, N)`` keep-mask to apply instead of drawing one (to replay the mask a
            fused kernel drew).
        return_mask: also return the keep-mask used (``None`` when no dropout ran).
        map: ``"tanh"`` or ``"sigmoid"``.
        map_bias: added to ``scale * q @ k^T`` before the sigmoid (0 for tanh).
    Returns:
        ``(o, mask)`` with ``o`` of shape ``(B, Mq, E)``.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    c = torch.sigmoid(s + map_bias) if map == "sigmoid" else torch.tanh(s)
    mask = None
    if dropout_p > 0.0:
        if dropout_mask is None and not return_mask:
            c = F.dropout(c, dropout_p, training=True)
        else:
            mask = dropout_mask if dropout_mask is not None else torch.rand_like(c) >= dropout_p
            c = c * mask.to(c.dtype) * (1.0 / (1.0 - dropout_p))
    o = torch.matmul(c, v)
    if activation == "tanh_relu":
        o = torch.relu(torch.tanh(o))
    return o, mask


def gate(
    attended: torch.Tensor, unattended: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two-way gate of DCA/GRJCA (SPEC 3).

    ``g = softmax((attended @ weight^T + bias) / tau)`` per time step, ``out = ReLU(g0 * unattended + g1 * attended)``.
    Index 0 weighs the unattended features, index 1 the attended ones.

    Args:
        attended, unattended: ``(B, L, d_m)``.  weight: ``(2, d_m)``.  bias: ``(2,)``.  tau: temperature.
    Returns:
        ``(out, g)``: ``(B, L, d_m)`` and ``(B, L, 2)``.
    """
    g = torch.softmax(F.linear(attended, weight, bias) / tau, dim=-1)
    out = torch.relu(g[..., 0:1] * unattended + g[..., 1:2] * attended)
    return out, g


def stage_gate(
    stages: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, tau: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stage gate of GRJCA (SPEC 3): a softmax over ``T`` candidate stages per time step.

    ``s = softmax((concat_t stages[t] @ weight^T + bias) / tau)``, ``out = ReLU(sum_t s[..., t] * stages[t])``.

    Args:
        stages: ``T`` tensors of shape ``(B, L, d_m)``.  weight: ``(T, T * d_m)``.  bias: ``(T,)``.
    Returns:
        ``(out, s)``: ``(B, L, d_m)`` and ``(B, L, T)``.
    """
    s = torch.softmax(F.linear(torch.cat(list(stages), dim=-1), weight, bias) / tau, dim=-1)
    out = s[..., 0:1] * stages[0]
    for t in range(1, len(stages)):
        out = out + s[..., t : t + 1] * stages[t]
    return torch.relu(out), s
