"""The CCC training loss (SPEC 5): ``sum over dimensions of (1 - CCC)``, i.e. ``(1 - CCC_V) + (1 - CCC_A)``.

Each dimension's CCC is computed over the flattened batch (every valid ``(b, l)`` frame), with population statistics,
by :func:`avkernels.metrics.concordance_correlation`, the same function the metric uses. Frames whose target is
``-5`` are excluded. The official training loss differed in two details: it used the unbiased std and a Pearson
correlation with ``1e-8`` in its denominator, and it did not mask ``-5`` (its training data had none); pass
``eps=1e-8`` for a similar guard against a zero denominator.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from avkernels._validation import check_float_tensor
from avkernels.metrics import INVALID_LABEL, concordance_correlation

Dimensions = Union[torch.Tensor, Sequence[torch.Tensor]]


def _split(x: Dimensions, name: str) -> Sequence[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        check_float_tensor(x, name)
        if x.dim() < 1:
            raise ValueError(f"{name}: expected a tensor whose last axis indexes the dimensions, got a 0-d tensor")
        return x.unbind(-1)
    if not isinstance(x, (list, tuple)) or not x:
        raise TypeError(
            f"{name}: expected a tensor (..., D) or a non-empty sequence of tensors, got {type(x).__name__}"
        )
    for i, t in enumerate(x):
        check_float_tensor(t, f"{name}[{i}]")
    return x


def ccc_loss(
    prediction: Dimensions,
    target: Dimensions,
    mask: Optional[torch.Tensor] = None,
    *,
    invalid_value: Optional[float] = INVALID_LABEL,
    eps: float = 0.0,
) -> torch.Tensor:
    """``sum_k (1 - CCC(prediction[k], target[k]))`` over the dimensions ``k`` (valence, arousal, ...).

    Args:
        prediction: a sequence of tensors, one per dimension (e.g. the ``(valence, arousal)`` of
            :class:`avkernels.models.AVRegressor`, each ``(B, L)``), or one tensor whose last axis indexes them
            (``(B, L, 2)``).
        target: the same layout as ``prediction`` (either form, independently), same per-dimension shapes.
        mask: optional boolean tensor shaped like one dimension, True where the frame counts, shared by every
            dimension; combined per dimension with ``target != invalid_value``.
        invalid_value: label of invalid frames (``-5``); ``None`` keeps every frame.
        eps: added to the CCC denominator (see the module docstring).
    Returns:
        A 0-d tensor, differentiable with respect to ``prediction`` (and ``target``).
    Raises:
        ValueError: the numbers of dimensions or the shapes differ, or a dimension has no valid frame.
    """
    predictions, targets = _split(prediction, "prediction"), _split(target, "target")
    if len(predictions) != len(targets):
        raise ValueError(f"prediction: expected {len(targets)} dimensions like target, got {len(predictions)}")
    loss = 0.0
    for k, (p, t) in enumerate(zip(predictions, targets)):
        try:
            loss = loss + (1.0 - concordance_correlation(p, t, mask, invalid_value=invalid_value, eps=eps))
        except ValueError as error:
            raise ValueError(f"dimension {k}: {error}") from error
    return loss


class CCCLoss(nn.Module):
    """:func:`ccc_loss` as a module: ``CCCLoss()((valence, arousal), (valence_target, arousal_target))``.

    Args:
        invalid_value: label of invalid frames (``-5``); ``None`` keeps every frame.
        eps: added to the CCC denominator (default 0: the exact CCC).
    """

    def __init__(self, *, invalid_value: Optional[float] = INVALID_LABEL, eps: float = 0.0):
        super().__init__()
        self.invalid_value = invalid_value
        self.eps = eps

    def forward(self, prediction: Dimensions, target: Dimensions, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ccc_loss(prediction, target, mask, invalid_value=self.invalid_value, eps=self.eps)

    def extra_repr(self) -> str:
        return f"invalid_value={self.invalid_value}, eps={self.eps}"
