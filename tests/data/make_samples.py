"""Write tiny sample datasets in the real on-disk formats (docs/datasets.md), for the loader tests.

The tests call these functions into a temporary folder (nothing large is committed); run this file to look at the
files: ``python tests/data/make_samples.py /tmp/samples``.

Every writer returns what it wrote (labels, features) so that the tests compare the loaders' output against it.
"""

from __future__ import annotations

import os
import sys
from typing import Dict

import numpy as np

AFFWILD2_VIDEOS = {"video_a": 70, "video_b-30-640x360": 45}  # frames per video
AFFWILD2_DIMS = {"video": 6, "audio": 4}
RECOLA_FRAMES = 37
RECOLA_DIMS = {"video": 6, "audio": 4}
IEMOCAP_N = {"train": 4, "dev": 3, "test": 3}
IEMOCAP_VOCAB = 11


def _va_labels(rng: np.random.Generator, n: int, invalid_runs=((10, 14),)) -> np.ndarray:
    labels = np.round(rng.uniform(-1, 1, size=(n, 2)), 4).astype(np.float32)
    for start, stop in invalid_runs:
        labels[start:min(stop, n)] = -5.0
    return labels


def write_va_annotation(path: str, labels: np.ndarray) -> None:
    with open(path, "w") as f:
        f.write("valence,arousal\n")
        for v, a in labels:
            f.write(f"{v:g},{a:g}\n")


def write_affwild2(root: str, seed: int = 0) -> Dict[str, object]:
    """``root/annotations/{Train_Set,Validation_Set}/<video>.txt``, ``root/features/<m>/<video>.npy``,
    ``root/test_set.txt``. Both annotation folders hold the same two videos."""
    rng = np.random.default_rng(seed)
    labels, features = {}, {m: {} for m in AFFWILD2_DIMS}
    for split in ("Train_Set", "Validation_Set"):
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
    for name, n in AFFWILD2_VIDEOS.items():
        labels[name] = _va_labels(rng, n, invalid_runs=((10, 14), (n - 3, n)))
        for split in ("Train_Set", "Validation_Set"):
            write_va_annotation(os.path.join(root, "annotations", split, name + ".txt"), labels[name])
        for m, d in AFFWILD2_DIMS.items():
            os.makedirs(os.path.join(root, "features", m), exist_ok=True)
            x = rng.normal(size=(n, d)).astype(np.float32)
            np.save(os.path.join(root, "features", m, name + ".npy"), x)
            features[m][name] = x
    with open(os.path.join(root, "test_set.txt"), "w") as f:
        f.write("\n".join(AFFWILD2_VIDEOS) + "\n")
    return {"labels": labels, "features": features}


def write_recola(root: str, seed: int = 0) -> Dict[str, object]:
    """``root/ratings_gold_standard/{valence,arousal}/<subject>.csv`` and ``root/features/<m>/<subject>.npy`` for
    train_1..9 and dev_1..9 (``RECOLA_FRAMES`` frames each)."""
    rng = np.random.default_rng(seed)
    labels, features = {}, {m: {} for m in RECOLA_DIMS}
    for dim in ("valence", "arousal"):
        os.makedirs(os.path.join(root, "ratings_gold_standard", dim), exist_ok=True)
    for m in RECOLA_DIMS:
        os.makedirs(os.path.join(root, "features", m), exist_ok=True)
    for split in ("train", "dev"):
        for i in range(1, 10):
            name = f"{split}_{i}"
            y = np.round(rng.uniform(-0.5, 0.5, size=(RECOLA_FRAMES, 2)), 5).astype(np.float32)
            labels[name] = y
            for k, dim in enumerate(("valence", "arousal")):
                with open(os.path.join(root, "ratings_gold_standard", dim, name + ".csv"), "w") as f:
                    # A second column (e.g. a frame time) must be ignored: the value is column 0.
                    f.writelines(f"{value:g},{t * 0.04:.2f}\n" for t, value in enumerate(y[:, k]))
            for m, d in RECOLA_DIMS.items():
                x = rng.normal(size=(RECOLA_FRAMES, d)).astype(np.float32)
                np.save(os.path.join(root, "features", m, name + ".npy"), x)
                features[m][name] = x
    return {"labels": labels, "features": features}


def write_iemocap_fold(fold: str, seed: int = 0) -> Dict[str, object]:
    """One fold folder with the true trailing shapes and ``IEMOCAP_N`` utterances per split; utterance 1 of every
    split has ``video_seqN == 0``."""
    rng = np.random.default_rng(seed)
    os.makedirs(fold, exist_ok=True)
    embedding = rng.normal(size=(IEMOCAP_VOCAB, 300)).astype(np.float32)
    embedding[0] = 0.0
    np.save(os.path.join(fold, "W_embedding.npy"), embedding)
    written = {"W_embedding": embedding}
    for split, n in IEMOCAP_N.items():
        arrays = {
            "audio_mfcc": rng.normal(size=(n, 1000, 120)).astype(np.float32),
            "video": rng.normal(size=(n, 32, 2048)).astype(np.float32),
            "nlp_trans": rng.integers(0, IEMOCAP_VOCAB, size=(n, 128)).astype(np.int32),
            "label": (np.arange(n) % 7).astype(np.int64),
            "video_seqN": np.array([5] + [0] + [32] * (n - 2), dtype=np.int32),
        }
        for stem, array in arrays.items():
            np.save(os.path.join(fold, f"{split}_{stem}.npy"), array)
        written[split] = arrays
    return written


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "samples"
    write_affwild2(os.path.join(out, "affwild2"))
    write_recola(os.path.join(out, "recola"))
    write_iemocap_fold(os.path.join(out, "iemocap", "fold01"))
    print(f"wrote sample datasets under {out}")
