"""Datasets: Aff-Wild2 and RECOLA (valence-arousal, windowed into ``L``-clip samples), IEMOCAP (Yoon's folds),
and the bundled synthetic audio-visual dataset (the default everywhere).

On-disk layouts and how the official pipelines produce the feature files: ``docs/datasets.md``.
"""

from avkernels.data.affwild2 import AffWild2VA
from avkernels.data.formats import INVALID_LABEL, DataFormatError, read_va_annotation, read_value_column_csv
from avkernels.data.iemocap import IEMOCAPFold
from avkernels.data.recola import RECOLA, recola_subjects
from avkernels.data.synthetic import SyntheticAV, SyntheticAVConfig, make_synthetic_videos
from avkernels.data.windows import AVVideo, AVWindowDataset, WindowStats, window_frames

__all__ = [
    "AffWild2VA",
    "RECOLA",
    "recola_subjects",
    "IEMOCAPFold",
    "SyntheticAV",
    "SyntheticAVConfig",
    "make_synthetic_videos",
    "AVVideo",
    "AVWindowDataset",
    "WindowStats",
    "window_frames",
    "INVALID_LABEL",
    "DataFormatError",
    "read_va_annotation",
    "read_value_column_csv",
]
