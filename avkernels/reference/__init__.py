"""Plain-PyTorch reference implementations: the ``"reference"`` backend and the oracle of every test."""

from avkernels.reference.functional import gate, stage_gate, tanh_attention

__all__ = ["tanh_attention", "gate", "stage_gate"]
