"""Layers and fusion models: thin ``nn.Module`` wrappers over the functional ops."""

from avkernels.nn.blocks import AdditiveJointCrossAttention, DenseJointCrossAttention
from avkernels.nn.fusion import DCA, GRJCA, JCA, RJCA, RecursiveJointCrossAttention
from avkernels.nn.gates import Gate, StageGate
from avkernels.nn.linear import Linear

__all__ = [
    "AdditiveJointCrossAttention",
    "DenseJointCrossAttention",
    "RecursiveJointCrossAttention",
    "JCA",
    "RJCA",
    "DCA",
    "GRJCA",
    "Gate",
    "StageGate",
    "Linear",
]
