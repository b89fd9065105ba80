"""The ``--precision`` choices shared by the training scripts and ``python -m avkernels predict``."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a ``--precision`` choice on ``device`` (``None``: float32, no autocast).

    ``"auto"`` is fp16 on CUDA and fp32 on CPU, where only CPUs with bfloat16 matrix units make 16-bit faster.
    """
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {('auto', *PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def autocast(precision: str, device: torch.device) -> ContextManager:
    """``torch.autocast`` on ``device`` in the dtype of ``precision``; a no-op context for fp32."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
