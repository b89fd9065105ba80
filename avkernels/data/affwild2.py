"""Aff-Wild2, ABAW valence-arousal track, on precomputed features (SPEC 6, docs/spec.md).

Expected layout (docs/datasets.md tells how the official pipelines produce the feature files)::

    <annotation_dir>/<video>.txt        ABAW annotation: header "valence,arousal", one "v,a" line per frame, -5 = none
    <feature_dir[m]>/<video>.npy        float array (n_frames, d_m) per modality m: row j = the clip ending at frame j

ABAW's annotation folders are ``Train_Set`` and ``Validation_Set``; the test set has no annotations and is given by
a name list (``Valence_Arousal_Estimation_Challenge_test_set_release.txt``), its frame counts by the feature files.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from avkernels.data.formats import (
    INVALID_LABEL,
    DataFormatError,
    PathLike,
    load_array,
    read_name_list,
    read_va_annotation,
    require_file,
)
from avkernels.data.windows import AVWindowDataset, load_videos_features


class AffWild2VA(AVWindowDataset):
    """Aff-Wild2 valence-arousal samples of ``seq_len`` clips (see :class:`~avkernels.data.windows.AVWindowDataset`).

    Args:
        annotation_dir: folder of ``<video>.txt`` annotation files, or ``None`` for the unlabelled test set (then
            ``videos`` is required and every label is -5).
        feature_dirs: modality name -> folder of ``<video>.npy`` feature files, in fusion order (video first, as
            the official code concatenates).
        videos: the videos to use: a list of names, or the path of a file with one name per line; ``None`` takes
            every ``.txt`` file of ``annotation_dir`` (sorted).
        seq_len: ``L``, clips per sample (16 officially).
        clip_stride: frames between consecutive clip ends (32 officially: 16 clips of 32 frames = 512 frames).
        windows: ``"labelled"`` (official training), ``"masked"`` (training with -5 masked) or ``"all"``
            (validation and test: every frame predicted once).
        exclude: video names to leave out (the JCA/RJCA code skips 10 training videos; DCA skips none). Names that
            are not in the split are an error, so a typo cannot pass unnoticed.
        mmap: memory-map the feature files (the official 25088-d video features do not fit in memory).
    """

    def __init__(
        self,
        annotation_dir: Optional[PathLike],
        feature_dirs: Mapping[str, PathLike],
        *,
        videos: Union[None, PathLike, Sequence[str]] = None,
        seq_len: int = 16,
        clip_stride: int = 32,
        windows: str = "all",
        exclude: Sequence[str] = (),
        mmap: bool = True,
        name: str = "Aff-Wild2",
    ):
        if not feature_dirs:
            raise ValueError("feature_dirs: expected at least one modality -> folder entry")
        names = self._video_names(annotation_dir, videos)
        unknown = sorted(set(exclude) - set(names))
        if unknown:
            raise ValueError(f"exclude: {unknown} are not videos of this split")
        names = [n for n in names if n not in set(exclude)]
        feature_files = {
            m: {n: os.path.join(os.fspath(folder), n + ".npy") for n in names} for m, folder in feature_dirs.items()
        }
        if annotation_dir is None:
            first = next(iter(feature_files))
            labels = {}
            for n in names:
                path = require_file(feature_files[first][n], f"Aff-Wild2 {first} features of {n!r}")
                rows = load_array(path, f"Aff-Wild2 {first} features", ndim=2, check_values=False).shape[0]
                labels[n] = np.full((rows, 2), INVALID_LABEL, dtype=np.float32)
        else:
            labels = {n: read_va_annotation(os.path.join(os.fspath(annotation_dir), n + ".txt")) for n in names}
        video_list = load_videos_features(names, labels, feature_files, what="Aff-Wild2", mmap=mmap)
        super().__init__(video_list, seq_len, clip_stride, windows, name)

    @staticmethod
    def _video_names(annotation_dir, videos) -> list:
        if videos is None:
            if annotation_dir is None:
                raise ValueError("videos: required when annotation_dir is None (the test set is given by a name list)")
            folder = os.fspath(annotation_dir)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: Aff-Wild2 annotation folder not found")
            names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt"))
            if not names:
                raise DataFormatError(f"{folder}: no .txt annotation files")
            return names
        if isinstance(videos, (str, os.PathLike)):
            return read_name_list(videos, "Aff-Wild2 video list")
        names = list(videos)
        if len(set(names)) != len(names):
            raise ValueError("videos: a video name appears twice")
        return names
