"""IEMOCAP in Yoon's preprocessed fold layout (SPEC 6, docs/spec.md).

Expected layout (one folder per fold, ``fold01`` .. ``fold05``)::

    <fold>/{train,dev,test}_audio_mfcc.npy   (N, 1000, 120) float   40 MFCC + delta + delta-delta, 10 ms hop
    <fold>/{train,dev,test}_video.npy        (N, 32, 2048)  float   ResNet-101 features at 3 frames/s
    <fold>/{train,dev,test}_nlp_trans.npy    (N, 128)       int     GloVe token ids, 0 = padding
    <fold>/W_embedding.npy                   (V, 300)       float   GloVe matrix indexed by token id
    <fold>/{train,dev,test}_label.npy        (N,)           int     class 0..6
    <fold>/{train,dev,test}_video_seqN.npy   (N,)           int     valid video frames (only for drop_no_video)

The text input ``(128, 300)`` is ``W_embedding[nlp_trans[i]]``, built per item (the SelfCrossAttn code writes it to
a 5 GB ``text.npy`` first). Arrays are memory-mapped: the training MFCC file of one fold is about 3 GB.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from avkernels.data.formats import DataFormatError, PathLike, check_int_range, load_array

logger = logging.getLogger("avkernels.data")

SPLITS = ("train", "dev", "test")
MODALITIES = ("text", "video", "audio")  # the SelfCrossAttn stacking order
NUM_CLASSES = 7
AUDIO_SHAPE = (1000, 120)
VIDEO_SHAPE = (32, 2048)
TEXT_LEN = 128
EMBEDDING_DIM = 300


class IEMOCAPFold(Dataset):
    """One split of one fold of Yoon's IEMOCAP (7 classes).

    Each item is a dict: ``audio`` ``(1000, 120)``, ``video`` ``(32, 2048)``, ``text`` ``(128, 300)`` float32 (only
    the requested modalities) and ``label`` ``()`` int64, plus the valid steps of the modalities whose padding the
    files mark, as ``()`` int64 (the classifiers' ``lengths=``): ``text_length``, up to the last non-zero token id
    (id 0 is padding), and ``video_length``, ``video_seqN`` (when that file is there; the first frames are the
    valid ones). The MFCC files mark no padding.

    Args:
        fold_dir: the fold folder (layout above).
        split: ``"train"``, ``"dev"`` or ``"test"``.
        modalities: which inputs to load, any of ``("text", "video", "audio")``.
        drop_no_video: leave out utterances with ``video_seqN == 0``, as the SelfCrossAttn code does in every split
            (it needs ``<split>_video_seqN.npy``). The count is in :attr:`n_dropped_no_video` and logged.
    """

    def __init__(
        self,
        fold_dir: PathLike,
        split: str,
        *,
        modalities: Sequence[str] = MODALITIES,
        drop_no_video: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities: expected distinct names among {MODALITIES}, got {tuple(modalities)!r}")
        folder = os.fspath(fold_dir)
        self.split, self.modalities = split, tuple(modalities)

        def path(stem: str) -> str:
            return os.path.join(folder, f"{split}_{stem}.npy")

        self._labels_path = path("label")
        labels = load_array(self._labels_path, f"IEMOCAP {split} labels", trailing_shape=(), kind="int", mmap=False)
        check_int_range(labels, 0, NUM_CLASSES - 1, self._labels_path, "labels")
        n = len(labels)
        self._arrays: Dict[str, np.ndarray] = {}
        if "audio" in modalities:
            self._arrays["audio"] = self._load(path("audio_mfcc"), "audio MFCC", AUDIO_SHAPE, "float", n)
        if "video" in modalities:
            self._arrays["video"] = self._load(path("video"), "video features", VIDEO_SHAPE, "float", n)
        if "text" in modalities:
            tokens = self._load(path("nlp_trans"), "token ids", (TEXT_LEN,), "int", n, mmap=False)
            embedding_path = os.path.join(folder, "W_embedding.npy")
            embedding = load_array(embedding_path, "IEMOCAP word embedding", trailing_shape=(EMBEDDING_DIM,))
            check_int_range(tokens, 0, embedding.shape[0] - 1, path("nlp_trans"), "token ids (rows of W_embedding)")
            self._tokens = tokens.astype(np.int64)
            self._embedding = np.asarray(embedding, dtype=np.float32)

        keep = np.arange(n)
        self.n_dropped_no_video = 0
        seq_path = path("video_seqN")
        self._video_lengths = None
        if drop_no_video or ("video" in modalities and os.path.exists(seq_path)):
            seq = self._load(seq_path, "valid video frame counts", (), "int", n, mmap=False)
            check_int_range(seq, 0, VIDEO_SHAPE[0], seq_path, "valid video frame counts")
            self._video_lengths = seq.astype(np.int64)
        if drop_no_video:
            keep = np.flatnonzero(seq > 0)
            self.n_dropped_no_video = n - len(keep)
            logger.info(
                "IEMOCAP %s %s: dropped %d of %d utterances with no video frames (video_seqN == 0)",
                folder, split, self.n_dropped_no_video, n,
            )
        if len(keep) == 0:
            raise DataFormatError(
                f"{seq_path}: every one of the {n} utterances of the {split} split has video_seqN == 0, so "
                "drop_no_video=True leaves none (pass drop_no_video=False to keep them)")
        self._keep = keep
        self.labels = np.asarray(labels[keep], dtype=np.int64)

    @staticmethod
    def _load(path: str, what: str, trailing, kind: str, n: int, mmap: bool = True) -> np.ndarray:
        array = load_array(path, f"IEMOCAP {what}", trailing_shape=trailing, kind=kind, mmap=mmap)
        if array.shape[0] != n:
            raise DataFormatError(f"{path}: {array.shape[0]} utterances, but the label file has {n}")
        return array

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        j = int(self._keep[i])
        item = {m: torch.from_numpy(np.array(a[j], dtype=np.float32)) for m, a in self._arrays.items()}
        if "text" in self.modalities:
            tokens = self._tokens[j]
            item["text"] = torch.from_numpy(self._embedding[tokens])
            item["text_length"] = torch.tensor(int(np.flatnonzero(tokens)[-1]) + 1 if tokens.any() else 0)
        if "video" in self.modalities and self._video_lengths is not None:
            item["video_length"] = torch.tensor(int(self._video_lengths[j]))
        item["label"] = torch.tensor(int(self.labels[i]))
        return item

    def class_counts(self) -> np.ndarray:
        """Utterances per class (after the video filter)."""
        return np.bincount(self.labels, minlength=NUM_CLASSES)
