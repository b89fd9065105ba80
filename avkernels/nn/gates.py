"""Gate layers of DCA and GRJCA: thin modules over :func:`avkernels.gate` and :func:`avkernels.stage_gate`."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from avkernels.ops.gate import gate
from avkernels.ops.stage_gate import stage_gate


class Gate(nn.Module):
    """Chooses, per time step, between attended and unattended features: ``nn.Linear(dim, 2)`` + softmax / tau.

    Index 0 of the returned gate weighs the unattended features, index 1 the attended ones.

    Args:
        dim: feature size ``d_m`` of the attended and unattended features.
        tau: softmax temperature.
        backend: backend of the fused op (see :func:`avkernels.gate`); ``None`` picks the fastest.
    """

    def __init__(self, dim: int, tau: float = 0.1, backend: Optional[str] = None):
        """See the class docstring for the arguments."""
        super().__init__()
        self.linear = nn.Linear(dim, 2)
        self.tau = tau
        self.backend = backend

    def forward(self, attended: torch.Tensor, unattended: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return gate(attended, unattended, self.linear.weight, self.linear.bias, tau=self.tau, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class StageGate(nn.Module):
    """Softmax over ``n_stages`` candidate feature sets per time step: ``nn.Linear(n_stages * dim, n_stages)``.

    Args:
        dim: feature size ``d_m`` of every candidate.
        n_stages: number of candidates ``T``.
        tau: softmax temperature.
        backend: backend of the fused op (see :func:`avkernels.stage_gate`); ``None`` picks the fastest.
    """

    def __init__(self, dim: int, n_stages: int, tau: float = 0.1, backend: Optional[str] = None):
        """See the class docstring for the arguments."""
        super().__init__()
        self.linear = nn.Linear(n_stages * dim, n_stages)
        self.tau = tau
        self.backend = backend

    def forward(self, stages: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return stage_gate(stages, self.linear.weight, self.linear.bias, tau=self.tau, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
