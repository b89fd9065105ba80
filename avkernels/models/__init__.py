"""Full models (SPEC 4): the audio-visual valence/arousal regressor and the IEMOCAP attention classifiers."""

from avkernels.models.av_regressor import AudioGuidedSpatialAttention, AVRegressor, ResidualBiLSTM
from avkernels.models.iemocap import (
    IEMOCAP_MODALITIES,
    CrossAttentionClassifier,
    ModalityEncoder,
    ModalitySpec,
    SelfAttentionClassifier,
)

__all__ = [
    "AVRegressor",
    "ResidualBiLSTM",
    "AudioGuidedSpatialAttention",
    "SelfAttentionClassifier",
    "CrossAttentionClassifier",
    "ModalitySpec",
    "ModalityEncoder",
    "IEMOCAP_MODALITIES",
]
