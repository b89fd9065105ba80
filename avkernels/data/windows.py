"""Windowing of per-frame audio-visual sequences into ``L``-clip samples (SPEC 6, docs/spec.md).

A video of ``n`` frames carries one feature row per frame and modality: row ``j`` is the feature of the clip that
*ends* at frame ``j`` (the official pipeline computes it from the 32-frame window ending there), and one
(valence, arousal) label per frame, ``-5`` where unannotated.

A sample is ``L`` clips whose end frames are ``clip_stride`` apart: ``e, e + S, ..., e + (L - 1) S``. The
windows of a video tile it so that **every frame is the end frame of exactly one clip in exactly one sample**:
frames are cut into groups of ``L * S`` and group ``g`` holds the ``S`` windows ``g L S + o + S * (0..L-1)``,
``o = 0..S-1`` (the official code's enumeration, with ``S = 32``, ``L = 16``). Clips past the last frame are
padding: zero features, label ``-5``, frame index ``-1``. They are always the last clips of their window, so each item
also carries ``lengths``, its number of real clips, which the models take as ``lengths=`` (SPEC 3.1).

Which windows are kept:

* ``"all"`` (validation, test): every window, so that every frame gets exactly one prediction.
* ``"labelled"`` (training, the official code): only windows whose ``L`` clips are all real frames with both labels
  valid.
* ``"masked"`` (training): every window with at least one valid label; the loss masks the ``-5`` entries.

Nothing is dropped silently: :attr:`AVWindowDataset.stats` counts the unannotated frames, the dropped windows and
the annotated frames they held, and the counts are logged (logger ``avkernels.data``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from avkernels.data.formats import INVALID_LABEL, DataFormatError, load_array, require_file

logger = logging.getLogger("avkernels.data")

WINDOW_MODES = ("all", "labelled", "masked")
LABEL_NAMES = ("valence", "arousal")


def window_frames(n_frames: int, seq_len: int, clip_stride: int = 1) -> np.ndarray:
    """End frames of the clips of every window of an ``n_frames``-frame video.

    Returns:
        ``(n_windows, seq_len)`` int64 array, ``-1`` for clips past the last frame. Every frame index in
        ``0..n_frames-1`` appears exactly once; windows made only of padding are not listed.
    """
    for name, value in (("n_frames", n_frames), ("seq_len", seq_len), ("clip_stride", clip_stride)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    span = seq_len * clip_stride
    n_groups = -(-n_frames // span)
    starts = (np.arange(n_groups)[:, None] * span + np.arange(clip_stride)[None, :]).reshape(-1)
    starts = starts[starts < n_frames]
    ends = starts[:, None] + clip_stride * np.arange(seq_len)[None, :]
    return np.where(ends < n_frames, ends, -1).astype(np.int64)


@dataclass
class AVVideo:
    """One video (or subject) of an audio-visual dataset.

    Attributes:
        name: the video's name (file stem).
        features: modality name -> ``(n_frames, d_m)`` array (possibly memory-mapped), in fusion order.
        labels: ``(n_frames, 2)`` float32 (valence, arousal), ``-5`` where unannotated.
        extras: further per-frame ``(n_frames,)`` integer arrays carried into the samples (e.g. the synthetic
            dataset's corruption codes); padding clips get 0.
    """

    name: str
    features: Dict[str, np.ndarray]
    labels: np.ndarray
    extras: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class WindowStats:
    """What windowing kept and what it left out (``AVWindowDataset.stats``)."""

    n_videos: int = 0
    n_frames: int = 0
    n_invalid_frames: int = 0  # frames with valence or arousal = -5
    n_windows: int = 0  # windows enumerated (before selection)
    n_windows_kept: int = 0
    n_windows_dropped: int = 0
    n_labelled_frames_dropped: int = 0  # annotated frames that are in no kept window

    def summary(self) -> str:
        return (
            f"{self.n_videos} videos, {self.n_frames} frames ({self.n_invalid_frames} unannotated, label -5); "
            f"{self.n_windows_kept} of {self.n_windows} windows kept, {self.n_windows_dropped} dropped with "
            f"{self.n_labelled_frames_dropped} annotated frames"
        )


class AVWindowDataset(Dataset):
    """``L``-clip samples over a list of :class:`AVVideo`.

    Each item is a dict of tensors: one ``(L, d_m)`` float32 tensor per modality (keyed by its name), ``valence``
    and ``arousal`` ``(L,)`` float32 (``-5`` = no label), ``frames`` ``(L,)`` int64 (``-1`` = padding), ``lengths``
    ``()`` int64 (the real clips, which come first: pass the batch's ``lengths`` to the model), ``video`` ``()`` int64
    (index into :attr:`videos`; the key is ``video_index``), ``window`` ``()`` int64 (the item's index), and one
    ``(L,)`` int64 tensor per extra.

    Args:
        videos: the videos, all with the same modalities and feature sizes.
        seq_len: ``L``, clips per sample (16 in the official setting).
        clip_stride: ``S``, frames between the end frames of consecutive clips (32 for Aff-Wild2, see module doc).
        windows: ``"all"``, ``"labelled"`` or ``"masked"`` (module doc).
        name: a label for log messages (e.g. ``"Aff-Wild2 train"``).
    """

    def __init__(
        self,
        videos: Sequence[AVVideo],
        seq_len: int,
        clip_stride: int = 1,
        windows: str = "all",
        name: str = "dataset",
    ):
        if windows not in WINDOW_MODES:
            raise ValueError(f"windows: expected one of {WINDOW_MODES}, got {windows!r}")
        if not videos:
            raise ValueError(f"{name}: no videos")
        self.videos = list(videos)
        self.seq_len, self.clip_stride, self.windows, self.name = seq_len, clip_stride, windows, name
        self.modalities = tuple(self.videos[0].features)
        self.feature_dims = {m: int(self.videos[0].features[m].shape[1]) for m in self.modalities}
        self.extra_names = tuple(self.videos[0].extras)
        for video in self.videos:
            self._check_video(video)

        stats = WindowStats(n_videos=len(self.videos))
        rows: List[np.ndarray] = []
        for v, video in enumerate(self.videos):
            frames = window_frames(video.n_frames, seq_len, clip_stride)
            valid_frame = (video.labels != INVALID_LABEL).all(axis=1)
            valid_label = (video.labels != INVALID_LABEL).any(axis=1)
            real = frames >= 0
            picked = np.where(real, frames, 0)
            if windows == "all":
                keep = np.ones(len(frames), dtype=bool)
            elif windows == "labelled":
                keep = (real & valid_frame[picked]).all(axis=1)
            else:
                keep = (real & valid_label[picked]).any(axis=1)
            dropped = frames[~keep]
            dropped = dropped[dropped >= 0]
            stats.n_frames += video.n_frames
            stats.n_invalid_frames += int((~valid_frame).sum())
            stats.n_windows += len(frames)
            stats.n_windows_kept += int(keep.sum())
            stats.n_labelled_frames_dropped += int(valid_label[dropped].sum())
            rows.append(np.concatenate([np.full((int(keep.sum()), 1), v), frames[keep]], axis=1))
        stats.n_windows_dropped = stats.n_windows - stats.n_windows_kept
        self.stats = stats
        self._index = np.concatenate(rows, axis=0)  # (n_windows, 1 + L): video index, then the clip end frames
        if len(self._index) == 0:
            raise ValueError(f"{name}: no window has a label ({stats.summary()})")
        log = logger.warning if stats.n_labelled_frames_dropped else logger.info
        log("%s: %s", name, stats.summary())

    def _check_video(self, video: AVVideo) -> None:
        if tuple(video.features) != self.modalities:
            raise ValueError(
                f"{self.name}: video {video.name!r} has modalities {tuple(video.features)}, expected {self.modalities}"
            )
        if video.labels.ndim != 2 or video.labels.shape[1] != 2:
            raise ValueError(
                f"{self.name}: video {video.name!r} labels must be (n_frames, 2), got {video.labels.shape}"
            )
        for m, x in video.features.items():
            if x.ndim != 2 or x.shape[1] != self.feature_dims[m] or x.shape[0] != video.n_frames:
                raise ValueError(
                    f"{self.name}: video {video.name!r} {m} features must be "
                    f"({video.n_frames}, {self.feature_dims[m]}) "
                    f"(one row per annotated frame, same size as the first video), got {tuple(x.shape)}"
                )
        if tuple(video.extras) != self.extra_names:
            raise ValueError(f"{self.name}: video {video.name!r} extras {tuple(video.extras)} != {self.extra_names}")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        v = int(self._index[i, 0])
        frames = self._index[i, 1:]
        video = self.videos[v]
        real = frames >= 0
        picked = np.where(real, frames, 0)
        item: Dict[str, torch.Tensor] = {}
        for m in self.modalities:
            x = np.asarray(video.features[m][picked], dtype=np.float32)
            x[~real] = 0.0
            item[m] = torch.from_numpy(x)
        labels = np.where(real[:, None], video.labels[picked], INVALID_LABEL).astype(np.float32)
        item["valence"] = torch.from_numpy(np.ascontiguousarray(labels[:, 0]))
        item["arousal"] = torch.from_numpy(np.ascontiguousarray(labels[:, 1]))
        for e in self.extra_names:
            item[e] = torch.from_numpy(np.where(real, video.extras[e][picked], 0).astype(np.int64))
        item["frames"] = torch.from_numpy(frames.copy())
        item["lengths"] = torch.tensor(int(real.sum()))
        item["video_index"] = torch.tensor(v)
        item["window"] = torch.tensor(i)
        return item

    def frame_values(self, windows: Sequence[int], values: np.ndarray) -> List[np.ndarray]:
        """Put per-clip values back on the frames of each video.

        Args:
            windows: ``(N,)`` item indices of the rows of ``values``.
            values: ``(N, L)`` per-clip values (e.g. predictions) of those items.
        Returns:
            One ``(n_frames,)`` float64 array per video, ``NaN`` for frames no given window covers.
        Raises:
            ValueError: a frame got two values (the same window passed twice).
        """
        windows = np.asarray(windows, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(windows), self.seq_len):
            raise ValueError(f"values: expected shape ({len(windows)}, {self.seq_len}), got {values.shape}")
        out = [np.full(video.n_frames, np.nan) for video in self.videos]
        seen = [np.zeros(video.n_frames, dtype=bool) for video in self.videos]
        for row, i in zip(values, windows):
            v = int(self._index[i, 0])
            frames = self._index[i, 1:]
            real = frames >= 0
            if seen[v][frames[real]].any():
                raise ValueError(f"frame_values: window {int(i)} covers frames of video {v} that already have values")
            seen[v][frames[real]] = True
            out[v][frames[real]] = row[real]
        return out

    def frame_labels(self) -> List[np.ndarray]:
        """Every video's ``(n_frames, 2)`` labels (``-5`` = none)."""
        return [video.labels for video in self.videos]


def load_videos_features(
    names: Sequence[str],
    labels: Mapping[str, np.ndarray],
    feature_files: Mapping[str, Mapping[str, str]],
    *,
    what: str,
    mmap: bool = True,
) -> List[AVVideo]:
    """Build :class:`AVVideo` objects from label arrays and per-modality ``.npy`` feature files.

    Args:
        names: video names, in order.
        labels: name -> ``(n_frames, 2)`` labels (already read and checked).
        feature_files: modality -> (name -> path of a ``(n_frames, d_m)`` ``.npy`` file).
        what: dataset name for messages.
    Raises:
        FileNotFoundError, DataFormatError: a missing or malformed feature file, a row count that differs from the
            labels' frame count, or a feature size that differs from the first video's.
    """
    videos = []
    dims: Dict[str, int] = {}
    first: Dict[str, str] = {}
    for name in names:
        features = {}
        for modality, files in feature_files.items():
            path = require_file(files[name], f"{what} {modality} features of {name!r}")
            x = load_array(path, f"{what} {modality} features", ndim=2, mmap=mmap)
            if x.shape[0] != labels[name].shape[0]:
                raise DataFormatError(
                    f"{path}: {x.shape[0]} feature rows but the labels of {name!r} have {labels[name].shape[0]} "
                    "frames (one feature row per annotated frame is expected)"
                )
            if modality in dims and x.shape[1] != dims[modality]:
                raise DataFormatError(
                    f"{path}: feature size {x.shape[1]} differs from {dims[modality]} in {first[modality]}"
                )
            dims.setdefault(modality, int(x.shape[1]))
            first.setdefault(modality, path)
            features[modality] = x
        videos.append(AVVideo(name, features, labels[name]))
    return videos
