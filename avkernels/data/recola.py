"""RECOLA (AVEC 2016 subset) on precomputed features (SPEC 6, docs/spec.md).

Expected layout::

    <root>/ratings_gold_standard/valence/<subject>.csv   headerless CSV, value in column 0, one row per 40 ms frame
    <root>/ratings_gold_standard/arousal/<subject>.csv
    <root>/features/<modality>/<subject>.npy             float array (n_frames, d_m), one row per 40 ms frame

Subjects are ``train_1..train_9`` and ``dev_1..dev_9`` (the test labels are not public; results are on dev).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from avkernels.data.formats import DataFormatError, PathLike, read_value_column_csv
from avkernels.data.windows import AVWindowDataset, load_videos_features

SPLITS = ("train", "dev")
FPS = 25


def recola_subjects(split: str) -> list:
    """The nine subjects of a split: ``["train_1", ..., "train_9"]`` or ``["dev_1", ..., "dev_9"]``."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return [f"{split}_{i}" for i in range(1, 10)]


class RECOLA(AVWindowDataset):
    """RECOLA valence-arousal samples of ``seq_len`` clips (see :class:`~avkernels.data.windows.AVWindowDataset`).

    Args:
        root: the dataset folder (layout above).
        split: ``"train"`` or ``"dev"``.
        modalities: feature folders under ``<root>/features``, in fusion order.
        subjects: override the split's nine subjects (e.g. a subset for a quick run).
        seq_len, clip_stride, windows: as :class:`~avkernels.data.windows.AVWindowDataset`; the default stride of
            16 frames (0.64 s) matches 16-frame clips, as in the FG 2021 I3D pipeline.
    """

    def __init__(
        self,
        root: PathLike,
        split: str,
        *,
        modalities: Sequence[str] = ("video", "audio"),
        subjects: Optional[Sequence[str]] = None,
        seq_len: int = 16,
        clip_stride: int = 16,
        windows: str = "all",
        mmap: bool = True,
    ):
        root = os.fspath(root)
        names = list(subjects) if subjects is not None else recola_subjects(split)
        labels = {}
        for name in names:
            columns = []
            paths = []
            for dim in ("valence", "arousal"):
                path = os.path.join(root, "ratings_gold_standard", dim, name + ".csv")
                columns.append(read_value_column_csv(path, what=f"RECOLA {dim} gold standard of {name!r}"))
                paths.append(path)
            if len(columns[0]) != len(columns[1]):
                raise DataFormatError(
                    f"{paths[1]}: {len(columns[1])} rows, but {paths[0]} has {len(columns[0])} (one row per frame "
                    "in both)"
                )
            labels[name] = np.stack(columns, axis=1)
        feature_files = {
            m: {n: os.path.join(root, "features", m, n + ".npy") for n in names} for m in modalities
        }
        videos = load_videos_features(names, labels, feature_files, what="RECOLA", mmap=mmap)
        super().__init__(videos, seq_len, clip_stride, windows, f"RECOLA {split}")
