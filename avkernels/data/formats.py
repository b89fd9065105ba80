"""Readers for the on-disk formats of the datasets, with errors that name the file and the line or index.

A dataset of thousands of files is only debuggable when a bad file says where it is bad: every reader here raises
:class:`DataFormatError` (a ``ValueError``) or ``FileNotFoundError`` with the path, and the line (text files) or the
index (arrays) of the first offending entry.
"""

from __future__ import annotations

import codecs
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


def _decode(raw: bytes, path: str) -> str:
    """UTF-8 text (an optional byte-order mark is dropped), else an error naming the line of the first bad byte."""
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        text = raw.decode("utf-8")
        bad = raw.find(b"\x00")  # valid UTF-8, but the mark of UTF-16 or a binary file
        reason = "a NUL byte (UTF-16 text or a binary file?)"
    except UnicodeDecodeError as error:
        text, bad = "", error.start
        reason = f"byte 0x{raw[bad]:02x} is not UTF-8" + (
            " (the file starts with a UTF-16 byte-order mark)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
    if bad < 0:
        return text
    line, column = raw.count(b"\n", 0, bad) + 1, bad - raw.rfind(b"\n", 0, bad)
    raise DataFormatError(f"{path}, line {line}, column {column}: {reason}; the file must be UTF-8 (or ASCII) text: "
                          "save it with that encoding")


def _read_lines(path: str) -> list:
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
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
    check_values: bool = True,
) -> np.ndarray:
    """Load a ``.npy`` array and check its rank, trailing shape and dtype kind, that it has rows, and (floats) that
    every value is finite and within float32's range (:func:`check_finite_rows`).

    Args:
        path: the ``.npy`` file.
        what: what the file holds, for error messages (e.g. ``"IEMOCAP train audio MFCC"``).
        trailing_shape: expected sizes of every axis after the first; ``None`` entries match any size.
        ndim: expected rank when ``trailing_shape`` is not given.
        kind: ``"float"`` (any floating dtype) or ``"int"`` (any integer dtype, or floats holding whole numbers).
        mmap: memory-map the file (feature files can be far larger than memory).
        check_values: check the values of a float array (``False`` when only the shape is wanted and the values are
            checked where the file is loaded for use).
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
    if array.ndim == 0 or array.shape[0] == 0:
        raise DataFormatError(f"{path}: {what} holds no rows (shape {tuple(array.shape)})")
    if kind == "float" and not np.issubdtype(array.dtype, np.floating):
        raise DataFormatError(f"{path}: {what} must hold floating-point values, got dtype {array.dtype}")
    if kind == "float" and check_values:
        check_finite_rows(array, path, what)
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


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CHECK_CHUNK_BYTES = 32 << 20  # bounds the memory of the check of a memory-mapped file


def _good_rows(rows: np.ndarray) -> np.ndarray:
    """``(n, k)`` float rows -> ``(n,)`` bool: every value finite and within float32's range."""
    if rows.dtype == np.float16:  # numpy's float16 isfinite is slow; a non-finite half has all exponent bits set
        return ((np.ascontiguousarray(rows).view(np.uint16) & 0x7C00) != 0x7C00).all(axis=1)
    if rows.dtype == np.float32:
        return np.isfinite(rows).all(axis=1)
    return (np.abs(rows) <= _FLOAT32_MAX).all(axis=1)  # False for NaN too


def check_finite_rows(array: np.ndarray, path: str, what: str) -> None:
    """Every value of a float array finite and within float32's range (items are float32), else an error naming the
    first bad row (index on axis 0), its first bad value, and how many rows are bad.

    The array is read once, in chunks of about 32 MB, so a memory-mapped file is never loaded whole.
    """
    n = array.shape[0]
    step = max(1, _CHECK_CHUNK_BYTES // max(1, array[0].nbytes))
    bad_rows, first = 0, None
    for start in range(0, n, step):
        chunk = np.asarray(array[start:start + step])
        good = _good_rows(chunk.reshape(len(chunk), -1))
        if not good.all():
            bad_rows += int(len(good) - good.sum())
            if first is None:
                first = start + int(np.argmin(good))
    if first is None:
        return
    row = np.asarray(array[first], dtype=np.float64)
    where = _first_index(~(np.abs(row) <= _FLOAT32_MAX))
    value = float(row[where])
    raise DataFormatError(
        f"{path}: {what} holds NaN, inf or values beyond float32's range in {bad_rows} of {n} rows; the first is row "
        f"{first} ({value!r} at index {(first,) + (where if isinstance(where, tuple) else (where,))}). Fix or drop "
        "those rows where the file is written")


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
