"""Input checks shared by the public functional ops and modules.

Every message names the argument, what was expected and what came, so that a user never has to read a stack trace
inside a kernel to learn that they passed (B, d, L) instead of (B, L, d).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

Dim = Union[int, str, None]  # an int is checked exactly; a str or None only names the axis in messages


def shape_str(dims: Sequence[Dim]) -> str:
    """``(B, 3, ?)``; a one-axis shape prints as ``(3,)`` like ``tuple(x.shape)`` does, so messages compare alike."""
    inner = ", ".join("?" if d is None else str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def check_float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    return x


def check_shape(x: torch.Tensor, name: str, expected: Sequence[Dim]) -> None:
    """Checks ``x.ndim == len(expected)`` and every int entry of ``expected``; strings only label axes."""
    ok = x.dim() == len(expected) and all(not isinstance(e, int) or e == s for e, s in zip(expected, x.shape))
    if not ok:
        raise ValueError(f"{name}: expected shape {shape_str(expected)}, got {tuple(x.shape)}")


def check_same(
    tensors: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    dtype: Optional[torch.dtype] = None,
    autocast_may_mix: bool = True,
) -> None:
    """All tensors on one device and of one dtype, optionally ``dtype``.

    ``autocast_may_mix``: skip the dtype check while autocast is on for the device (a module's inputs may then come
    in the autocast dtype beside float32 parameters). The functional ops pass ``False``: they check after casting.
    """
    first, first_name = tensors[0], names[0]
    for t, n in zip(tensors[1:], names[1:]):
        if t.device != first.device:
            raise ValueError(f"{n}: expected a tensor on {first.device} like {first_name}, got one on {t.device}")
    want = dtype if dtype is not None else first.dtype
    want_from = "the module's parameters" if dtype is not None else first_name
    if autocast_may_mix and _autocast_enabled(first.device):
        return
    for t, n in zip(tensors, names):
        if t.dtype != want:
            fix = _dtype_fix(want, t.dtype, t.device, module=dtype is not None)
            raise TypeError(f"{n}: expected dtype {want} like {want_from}, got {t.dtype}; {fix}")


def _dtype_fix(want: torch.dtype, got: torch.dtype, device: torch.device, module: bool) -> str:
    """How to reconcile two dtypes, for the message of a dtype mismatch."""
    cast = f"cast it with .to({want})"
    if module:
        cast += f", or convert the module with module.to({got})"
    if got in (torch.float16, torch.bfloat16) and want in (torch.float32, torch.float64):
        effect = f"computes in {got} while the parameters stay {want}" if module else f"casts every input to {got}"
        cast += f", or run the call under torch.autocast({device.type!r}, dtype={got}), which {effect}"
    return cast


def _autocast_enabled(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # device types without autocast (e.g. "meta", used for shape inference)
        return False


def check_probability(p: float, name: str) -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{name}: expected a float in [0, 1), got {p!r}")
    return float(p)


def check_positive(x: float, name: str) -> float:
    if not isinstance(x, numbers.Real) or isinstance(x, bool) or not 0.0 < float(x) < math.inf:
        raise ValueError(f"{name}: expected a finite positive number, got {x!r}")
    return float(x)


def check_finite(x: float, name: str) -> float:
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")
    return float(x)
