"""Readers for the on-disk formats of the datasets, with errors that name the file and the line or index.

A dataset of thousands of files is only debuggable when a bad file says where it is bad: every reader here raises
:class:`DataFormatError` (a ``ValueError``) or ``FileNotFoundError`` with the path, and the line (text files) or the
index (arrays) of the first offending entry.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

INVALID_LABEL = -5.0
"""Aff-Wild2's marker of an unannotated frame; the datasets use it for every frame without a label."""

VA_HEADER = "valence,arousal"


class DataFormatError(ValueError):
    """A data file exists but its content is not in the expected format (the message names the file and where)."""


def require_file(path: PathLike, what: str) -> str:
    """``path`` as a string, or ``FileNotFoundError`` saying which file of which dataset part is missing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def _read_lines(path: str) -> list:
    with open(path, "r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # One trailing newline (or several) ends the file; an empty line anywhere else would shift every later frame.
    while lines and lines[-1].strip() == "":
        lines.pop()
    return lines


def _check_not_blank(line: str, path: str, line_no: int) -> None:
    if not line.strip():
        raise DataFormatError(f"{path}, line {line_no}: empty line (every frame needs its own line; only trailing "
                              "empty lines are allowed)")


def _parse_float(token: str, path: str, line_no: int, line: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataFormatError(f"{path}, line {line_no}: expected a number, got {token.strip()!r} in {line!r}") from None
    if not np.isfinite(value):
        raise DataFormatError(f"{path}, line {line_no}: expected a finite number, got {token.strip()!r}")
    return value


def _check_label(value: float, path: str, line_no: int, name: str) -> None:
    if value != INVALID_LABEL and not -1.0 <= value <= 1.0:
        raise DataFormatError(
            f"{path}, line {line_no}: {name} {value!r} is outside [-1, 1] and is not the invalid marker -5"
        )


def read_va_annotation(path: PathLike) -> np.ndarray:
    """Read an ABAW valence-arousal annotation file.

    Format: line 1 is the header ``valence,arousal``; then one ``v,a`` line per video frame, values in [-1, 1] or
    -5 for an unannotated frame.

    Returns:
        ``(n_frames, 2)`` float32 array, columns (valence, arousal).
    Raises:
        FileNotFoundError: the file is missing.
        DataFormatError: wrong header, a line without exactly two numbers, a value out of range, no frames.
    """
    path = require_file(path, "Aff-Wild2 annotation file")
    lines = _read_lines(path)
    if not lines or lines[0].strip().replace(" ", "").lower() != VA_HEADER:
        got = lines[0] if lines else "an empty file"
        raise DataFormatError(f"{path}, line 1: expected the header {VA_HEADER!r}, got {got!r}")
    values = np.empty((len(lines) - 1, 2), dtype=np.float32)
    for i, line in enumerate(lines[1:]):
        line_no = i + 2
        _check_not_blank(line, path, line_no)
        tokens = line.split(",")
        if len(tokens) != 2:
            raise DataFormatError(
                f"{path}, line {line_no}: expected two comma-separated values 'valence,arousal', got {line!r}"
            )
        for j, (token, name) in enumerate(zip(tokens, ("valence", "arousal"))):
            values[i, j] = _parse_float(token, path, line_no, line)
            _check_label(float(values[i, j]), path, line_no, name)
    if len(values) == 0:
        raise DataFormatError(f"{path}: the header is followed by no frame lines")
    return values


def read_value_column_csv(path: PathLike, *, column: int = 0, what: str = "gold-standard file") -> np.ndarray:
    """Read a headerless CSV file holding one frame per row and the value in ``column`` (the RECOLA gold standard).

    Returns:
        ``(n_rows,)`` float32 array.
    Raises:
        FileNotFoundError: the file is missing.
        DataFormatError: a row with too few columns, a non-numeric or non-finite value, a value outside [-1, 1]
            (other than -5), or no rows.
    """
    path = require_file(path, what)
    lines = _read_lines(path)
    if not lines:
        raise DataFormatError(f"{path}: the file holds no rows")
    values = np.empty(len(lines), dtype=np.float32)
    for i, line in enumerate(lines):
        _check_not_blank(line, path, i + 1)
        tokens = line.split(",")
        if len(tokens) <= column:
            raise DataFormatError(f"{path}, line {i + 1}: expected a value in column {column}, got {line!r}")
        values[i] = _parse_float(tokens[column], path, i + 1, line)
        _check_label(float(values[i]), path, i + 1, "value")
    return values


def read_name_list(path: PathLike, what: str = "split list") -> list:
    """One name per line (a split list such as ABAW's test-set release file); blank lines are not allowed inside."""
    path = require_file(path, what)
    names = [line.strip() for line in _read_lines(path)]
    for i, name in enumerate(names):
        if not name or "," in name or os.sep in name:
            raise DataFormatError(f"{path}, line {i + 1}: expected one name per line, got {name!r}")
    if not names:
        raise DataFormatError(f"{path}: the list is empty")
    return names


def load_array(
    path: PathLike,
    what: str,
    *,
    trailing_shape: Optional[Sequence[Optional[int]]] = None,
    ndim: Optional[int] = None,
    kind: str = "float",
    mmap: bool = True,
) -> np.ndarray:
    """Load a ``.npy`` array and check its rank, trailing shape and dtype kind.

    Args:
        path: the ``.npy`` file.
        what: what the file holds, for error messages (e.g. ``"IEMOCAP train audio MFCC"``).
        trailing_shape: expected sizes of every axis after the first; ``None`` entries match any size.
        ndim: expected rank when ``trailing_shape`` is not given.
        kind: ``"float"`` (any floating dtype) or ``"int"`` (any integer dtype, or floats holding whole numbers).
        mmap: memory-map the file (feature files can be far larger than memory).
    """
    path = require_file(path, what)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: cannot be read as a .npy array ({exc})") from None
    if trailing_shape is not None:
        expected = ("N",) + tuple("?" if s is None else s for s in trailing_shape)
        ok = array.ndim == len(expected) and all(
            s is None or s == got for s, got in zip(trailing_shape, array.shape[1:])
        )
        if not ok:
            shape = "(" + ", ".join(str(s) for s in expected) + ")"
            raise DataFormatError(f"{path}: {what} must have shape {shape}, got {tuple(array.shape)}")
    elif ndim is not None and array.ndim != ndim:
        raise DataFormatError(f"{path}: {what} must be a {ndim}-d array, got shape {tuple(array.shape)}")
    if kind == "float" and not np.issubdtype(array.dtype, np.floating):
        raise DataFormatError(f"{path}: {what} must hold floating-point values, got dtype {array.dtype}")
    if kind == "int":
        if np.issubdtype(array.dtype, np.floating):
            whole = np.isfinite(array) & (np.floor(array) == array)
            if not whole.all():
                index = _first_index(~whole)
                got = array[index].item()
                raise DataFormatError(f"{path}: {what} must hold integers, got {got!r} at index {index}")
        elif not np.issubdtype(array.dtype, np.integer):
            raise DataFormatError(f"{path}: {what} must hold integers, got dtype {array.dtype}")
    return array


def check_int_range(array: np.ndarray, low: int, high: int, path: str, what: str) -> None:
    """All entries in ``[low, high]``, else an error naming the first offending index and value."""
    bad = (array < low) | (array > high)
    if bad.any():
        index = _first_index(bad)
        raise DataFormatError(
            f"{path}: {what} must lie in {low}..{high}, got {array[index].item()!r} at index {index}"
        )


def _first_index(mask: np.ndarray) -> Tuple[int, ...]:
    flat = int(np.flatnonzero(np.asarray(mask))[0])
    index = np.unravel_index(flat, mask.shape)
    return tuple(int(i) for i in index) if len(index) > 1 else int(index[0])
