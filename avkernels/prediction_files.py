"""The files ``python -m avkernels predict`` writes, and how it writes their folder without ever losing an input or
a previous result.

* **Formats** (:mod:`avkernels.predict`'s doc): ABAW ``<video>.txt`` files, RECOLA ``valence/`` and ``arousal/``
  folders of ``<subject>.csv``, IEMOCAP's ``predictions.csv``; every value with 6 decimals.
* **What ``--overwrite`` may replace**: only a folder whose every entry is a file in one of those formats, value by
  value (:func:`foreign_entries`). A run folder (checkpoints, logs), a data folder or anything a user added is
  refused, and so is an output folder that holds the checkpoint or the data of the run, or lies inside the data.
* **Crash safety**: the files are written into a temporary sibling ``.<name>.predict-<pid>.tmp``, which then takes
  the output folder's place in one step: on Linux ``renameat2(RENAME_EXCHANGE)`` swaps it with the previous folder
  (there is no moment without an output folder), elsewhere (or where the filesystem lacks the call) two renames, the
  previous folder moved to ``.<name>.predict-<pid>.old`` in between. An error or Ctrl-C removes the temporary folder
  at once. A killed process cannot clean up, so every run first clears what dead runs left in the output folder's
  parent (:func:`recover`): temporary folders are removed, and a previous folder caught between the two renames is
  put back. Whenever a run stops, the output folder holds either the previous results or the new ones, complete.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from typing import Callable, List, Mapping, Optional, Sequence

import numpy as np

from avkernels.data.formats import VA_HEADER

DIMENSIONS = ("valence", "arousal")
IEMOCAP_FILE = "predictions.csv"
_TEMP_KINDS = ("tmp", "old")


class PredictError(ValueError):
    """The checkpoint, the data or the output folder does not allow the run (the message says why)."""


# -- writers ------------------------------------------------------------------------------------------------------


def _number(x: float) -> str:
    return f"{x:.6f}"


def write_va_files(folder: str, names: Sequence[str], per_video: Mapping[str, List[np.ndarray]]) -> List[str]:
    """One ABAW annotation-format file per video."""
    paths = []
    for i, name in enumerate(names):
        path = os.path.join(folder, name + ".txt")
        rows = zip(per_video["valence"][i], per_video["arousal"][i])
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(VA_HEADER + "\n")
            f.writelines(f"{_number(v)},{_number(a)}\n" for v, a in rows)
        paths.append(path)
    return paths


def write_recola_files(folder: str, names: Sequence[str], per_video: Mapping[str, List[np.ndarray]]) -> List[str]:
    """``valence/<subject>.csv`` and ``arousal/<subject>.csv``: one value per 40 ms frame."""
    paths = []
    for d in DIMENSIONS:
        os.makedirs(os.path.join(folder, d))
        for i, name in enumerate(names):
            path = os.path.join(folder, d, name + ".csv")
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(_number(x) + "\n" for x in per_video[d][i])
            paths.append(path)
    return paths


def write_iemocap_file(folder: str, utterances: Sequence[int], probabilities: np.ndarray) -> List[str]:
    path = os.path.join(folder, IEMOCAP_FILE)
    header = ["utterance", "class"] + [f"prob_{c}" for c in range(probabilities.shape[1])]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(",".join(header) + "\n")
        for index, p in zip(utterances, probabilities):
            f.write(",".join([str(int(index)), str(int(np.argmax(p)))] + [_number(x) for x in p]) + "\n")
    return [path]


# -- recognising them ---------------------------------------------------------------------------------------------

# Exactly what the writers above produce: values clipped to [-1, 1] (probabilities in [0, 1]), 6 decimals.
_VALUE = r"(?:-?(?:0\.\d{6}|1\.000000)|nan)"
_PROBABILITY = r"(?:0\.\d{6}|1\.000000|nan)"
_VA_FILE = re.compile(rf"{VA_HEADER}\n(?:{_VALUE},{_VALUE}\n)+")
_COLUMN_FILE = re.compile(rf"(?:{_VALUE}\n)+")
_IEMOCAP_HEADER = re.compile(r"utterance,class((?:,prob_\d+)+)\n")
_LARGEST = 1 << 28  # no prediction file comes near 256 MB; a larger file is not read to find that out


def _text(path: str) -> Optional[str]:
    if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > _LARGEST:
        return None
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _is_iemocap_file(text: str) -> bool:
    header = _IEMOCAP_HEADER.match(text)
    if header is None:
        return False
    classes = header.group(1).count(",")
    row = re.compile(rf"(?:\d+,\d+(?:,{_PROBABILITY}){{{classes}}}\n)+")
    return row.fullmatch(text, header.end()) is not None


def foreign_entries(folder: str) -> List[str]:
    """The entries of ``folder`` (relative paths) that are not files predict writes, in predict's formats."""
    foreign = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in DIMENSIONS and os.path.isdir(path) and not os.path.islink(path):
            foreign += [os.path.join(name, n) for n in sorted(os.listdir(path))
                        if not n.endswith(".csv") or not _COLUMN_FILE.fullmatch(_text(os.path.join(path, n)) or "")]
            continue
        text = _text(path)
        if text is None or not (
            (name.endswith(".txt") and _VA_FILE.fullmatch(text)) or (name == IEMOCAP_FILE and _is_iemocap_file(text))
        ):
            foreign.append(name)
    return foreign


# -- the output folder --------------------------------------------------------------------------------------------


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_folder(out_dir: str, overwrite: bool, *, checkpoint: Optional[str] = None,
                        data_root: Optional[str] = None) -> None:
    """Refuse, before any work, an output folder the run could not write or would destroy an input by replacing.

    Args:
        out_dir: the output folder.
        overwrite: replace a non-empty folder of earlier predictions.
        checkpoint: the checkpoint file the run reads, which the output folder must not hold.
        data_root: the data folder the run reads, which the output folder must neither hold nor (with ``overwrite``)
            lie inside.
    """
    out_dir = os.path.abspath(out_dir)
    if checkpoint is not None and _within(checkpoint, out_dir):
        raise PredictError(f"{out_dir}: the output folder holds the checkpoint {checkpoint}; choose another --out")
    if data_root is not None and (_within(data_root, out_dir) or (overwrite and _within(out_dir, data_root))):
        raise PredictError(
            f"{out_dir}: the output folder {'holds' if _within(data_root, out_dir) else 'lies inside'} the data "
            f"folder {data_root}, which --overwrite could destroy; choose an --out outside it")
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise PredictError(f"{out_dir}: exists and is not a folder; predictions are written to a folder")
    if not os.listdir(out_dir):
        return
    if not overwrite:
        raise PredictError(f"{out_dir}: the output folder exists and is not empty; pass --overwrite to replace it")
    foreign = foreign_entries(out_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PredictError(
            f"{out_dir}: --overwrite replaces only a folder of earlier predictions, and this one holds "
            f"{len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} predict did not write ({shown}); "
            "move them away or choose another --out")


def _temp_name(out_dir: str, pid: int, kind: str) -> str:
    parent, base = os.path.split(out_dir)
    return os.path.join(parent, f".{base}.predict-{pid}.{kind}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had this process's id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (another user's), or this platform cannot tell: leave its files alone
    return True


_TEMP = re.compile(rf"\.(.+)\.predict-(\d+)\.({'|'.join(_TEMP_KINDS)})")


def recover(out_dir: str) -> None:
    """Clear what killed runs left beside ``out_dir`` (for it, or for another output folder in the same parent): a
    previous folder caught between the two renames of the portable path is put back in place, temporary folders
    are removed. Those of runs still alive are left alone."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        return
    found = [_TEMP.fullmatch(name) for name in sorted(os.listdir(parent))]
    stale = [m for m in found if m and not _alive(int(m.group(2)))]
    for m in sorted(stale, key=lambda m: m.group(3) != "old"):  # put back before removing
        path, target = os.path.join(parent, m.group(0)), os.path.join(parent, m.group(1))
        if m.group(3) == "old" and not os.path.lexists(target):
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> None:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``, Linux 3.15+ on most filesystems).

    Raises ``OSError`` with ``ENOSYS``, ``EINVAL`` or ``EOPNOTSUPP`` where that is not possible."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _put_in_place(tmp: str, out_dir: str) -> None:
    """Make the complete folder ``tmp`` the output folder; the previous one, if any, is removed."""
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)  # atomic; fails if another process filled out_dir meanwhile
        return
    try:
        _exchange(tmp, out_dir)
    except OSError as error:
        if error.errno not in _NO_EXCHANGE:
            raise
        old = _temp_name(out_dir, os.getpid(), "old")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old)
        return
    shutil.rmtree(tmp)  # the previous results, swapped out


def write_folder_atomically(out_dir: str, overwrite: bool, write: Callable[[str], List[str]], *,
                            checkpoint: Optional[str] = None, data_root: Optional[str] = None) -> List[str]:
    """Run ``write(folder)`` on a temporary sibling of ``out_dir``, then put it in place (module doc).

    Returns the written paths as they are under ``out_dir``. The checks of :func:`check_output_folder` run before
    and again after writing (another process may have written there meanwhile).
    """
    out_dir = os.path.abspath(out_dir)
    recover(out_dir)
    check_output_folder(out_dir, overwrite, checkpoint=checkpoint, data_root=data_root)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = _temp_name(out_dir, os.getpid(), "tmp")
    os.mkdir(tmp)  # with the mode of a folder made by os.makedirs, since it becomes the output folder
    try:
        paths = write(tmp)
        check_output_folder(out_dir, overwrite, checkpoint=checkpoint, data_root=data_root)
        _put_in_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out_dir, os.path.relpath(p, tmp)) for p in paths]
