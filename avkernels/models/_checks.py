"""Argument checks shared by the full models."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn

from avkernels._validation import check_float_tensor, check_same
from avkernels.nn.lengths import check_time_shape


def check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_features(
    features: Sequence[torch.Tensor],
    names: Sequence[str],
    shapes: Sequence[Tuple[Union[int, str], int]],
    model: nn.Module,
    length_argument: str = "seq_len",
) -> None:
    """One floating ``(B, length, dim)`` tensor per name, with one ``B``, on the device and of the dtype of
    ``model``'s parameters. ``shapes`` holds ``(length, dim)`` per modality; a string length only labels the axis.
    ``length_argument`` names the model's argument that fixed the lengths, for the error's advice (``{name}``
    becomes the modality's name)."""
    if len(features) != len(names):
        raise ValueError(f"features: expected {len(names)} tensors ({', '.join(names)}), got {len(features)}")
    for name, x in zip(names, features):
        check_float_tensor(x, name)
    batch = features[0].shape[0] if features[0].dim() == 3 else "B"
    for name, x, (length, dim) in zip(names, features, shapes):
        check_time_shape(x, name, (batch, length, dim), length_argument.format(name=name))
    check_same(list(features), list(names))
    param = next(model.parameters())
    if features[0].device != param.device:
        raise ValueError(f"{names[0]}: expected a tensor on {param.device} like the model, got {features[0].device}")
    check_same(list(features), list(names), dtype=param.dtype)
