"""Checkpoints that cannot run code: the one loader of every checkpoint file, and the check of what is saved.

A pickle can call any function while it is read, so a checkpoint a user was given could run code before any check
of its content. Every checkpoint the library or its scripts read (``python -m avkernels predict`` and ``export``,
``--resume`` of the training scripts, :meth:`AVRegressor.from_official <avkernels.models.AVRegressor.from_official>`)
goes through :func:`load`, which reads with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists,
tuples and dicts only. Numeric numpy scalars, which the official training code stores next to its weights, are
rebuilt from their bytes (never through numpy's own unpickling). Anything else is refused before it runs, as is a
file that is not a checkpoint at all, with one :class:`CheckpointError` naming the file and what was found.

The scripts save through :func:`plain`, so that what they write always loads this way.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

# What a checkpoint of the library's training scripts may tell its reader when it holds other objects.
CONVERT_HINT = ("a checkpoint written by an older avkernels converts as docs/datasets.md ('Checkpoints') shows, "
                "which only a file you wrote yourself should go through")


class CheckpointError(ValueError):
    """A file that is not a checkpoint, holds objects that weights-only loading refuses, or has not the expected
    content (the message names the file and what was found)."""


class _NumpyDtype:
    """Stands in for ``numpy.dtype`` while unpickling: numeric dtypes only (see :func:`_numpy_scalar`)."""

    def __init__(self, spec: object, align: object = False, copy: object = True):
        dtype = np.dtype(spec) if isinstance(spec, str) else None
        if dtype is None or dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"only numeric numpy scalars are accepted, not dtype {spec!r}")
        self.dtype = dtype

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype: object, data: object = None) -> Union[int, float]:
    """The official training code stores its validation CCCs as numpy scalars next to ``"net"``, which
    ``weights_only=True`` refuses. Numeric scalars are plain bytes, so they are rebuilt here from their bytes alone
    (as Python numbers); object scalars, whose bytes would be a pointer, are refused."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("only numeric numpy scalars are accepted")
    return np.frombuffer(data, dtype=dtype.dtype, count=1)[0].item()


_NUMPY_SCALAR_GLOBALS = [
    (_numpy_scalar, "numpy._core.multiarray.scalar"),  # pickled under numpy >= 2
    (_numpy_scalar, "numpy.core.multiarray.scalar"),  # pickled under numpy 1.x
    (_NumpyDtype, "numpy.dtype"),
    _NumpyDtype,  # so that the unpickler may set its state
]


def describe(source: object) -> str:
    """How messages name ``source``: the quoted path, or "the checkpoint" for a file object."""
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "the checkpoint"


def _head(source: object, size: int = 8) -> Optional[bytes]:
    """The first bytes of a file or seekable file object (left where it was); None when they cannot be read."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(size)
        position = source.tell()
        head = source.read(size)
        source.seek(position)
        return head if isinstance(head, bytes) else None
    except (OSError, AttributeError, ValueError):
        return None


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), "")


def _weights_only_reason(message: str) -> str:
    """The unpickler's own reason, out of torch's advice around it."""
    reason = message.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in message else ""
    return _first_line(reason) or "an object weights-only loading does not build"


def load(source: object, map_location: object = "cpu", *,
         hint: str = "if you trust the file, load it yourself with torch.load(..., weights_only=False) and pass the "
                     "loaded object") -> object:
    """``torch.load(source, weights_only=True)`` with errors that say what is wrong with the file.

    Args:
        source: a path or a seekable binary file object; anything else is returned as it is (already loaded).
        map_location: as ``torch.load``'s.
        hint: what the error tells the user to do when the file holds objects weights-only loading refuses.
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a PyTorch checkpoint (text, random bytes, a truncated or damaged file), or one holding
            Python objects besides tensors, numbers and strings.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    elif not (hasattr(source, "read") and hasattr(source, "seek")):
        return source
    where = describe(source)
    head = _head(source)
    # torch.save writes a zip archive, or (before PyTorch 1.6, or with _use_new_zipfile_serialization=False) a
    # pickle, which starts with the PROTO opcode. Anything else would fail inside the unpickler with a message
    # about opcodes.
    if head is not None and not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        shown = repr(head[:8]) if head else "an empty file"
        raise CheckpointError(f"checkpoint: {where} is not a PyTorch checkpoint (it starts with {shown})")
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" in message:
            refused = re.search(r"GLOBAL [\w.]+", message)  # the class or function the file asks for
            detail = refused.group(0) if refused else _weights_only_reason(message)
            raise CheckpointError(
                f"checkpoint: {where} holds Python objects besides tensors, numbers and strings, which "
                f"weights_only loading refuses ({detail}); nothing in it was run. {hint[:1].upper()}{hint[1:]}."
            ) from None
        raise CheckpointError(f"checkpoint: {where} is not a PyTorch checkpoint ({_first_line(message)})") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged file fails anywhere in the unpickler (IndexError, ...)
        reason = _first_line(str(error)) or type(error).__name__
        raise CheckpointError(f"checkpoint: {where} is not a PyTorch checkpoint ({reason})") from None


_LEAVES = (torch.Tensor, str, bytes, bool, int, float, complex, type(None), torch.dtype, torch.device)


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as :func:`load` reads it back: numeric numpy scalars become Python numbers; tensors, Python numbers,
    strings, ``None``, dtypes, devices and dicts, lists and tuples of them are kept.

    Raises:
        TypeError: anything else (a numpy array, an ``argparse.Namespace``, a dataclass, a function ...), naming
            where in ``obj`` it is, so that a checkpoint that could not be read back is never written.
    """
    if isinstance(obj, _LEAVES):
        return obj
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    if isinstance(obj, (dict, OrderedDict)):
        converted = {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
        for k in converted:
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not a string or number")
        return OrderedDict(converted) if isinstance(obj, OrderedDict) else converted
    if type(obj) in (list, tuple, torch.Size):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot go into a checkpoint, which holds only "
        "tensors and plain Python values (so that it loads with torch.load(weights_only=True)); convert it first "
        "(a tensor, a list, a dict)"
    )


def weights_mismatch(model: torch.nn.Module, weights: Mapping[str, Any]) -> Optional[str]:
    """``None`` when ``weights`` are exactly ``model``'s tensors (names and shapes), else one line saying what
    differs: how many are missing, unexpected or of another shape, with the first of each."""
    expected = model.state_dict()

    def shape(value: object) -> str:
        return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__

    missing = [k for k in expected if k not in weights]
    unexpected = [str(k) for k in weights if k not in expected]
    reshaped = [f"{k} {shape(v)}, the model's {shape(expected[k])}" for k, v in weights.items()
                if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)]
    parts = [f"{len(names)} {what} (first: {names[0]})" for what, names in (
        ("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if names]
    return "; ".join(parts) or None
