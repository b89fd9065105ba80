"""Deterministic weights and inputs for the official-checkpoint golden file (tests/data/official_cam_golden.json).

The golden file keeps, for each official repository, the names and shapes of its ``CAM``'s state dict and the
outputs the official code computed in float64 from the weights and inputs defined here. Weights and inputs are
not stored: at the official sizes they are about 40 MB per model. They are a pure function of the key's position and
shape instead, computed with integer arithmetic only, so that every platform and PyTorch version rebuilds the same
bits (a seeded ``torch.randn`` is not promised to stay the same across versions).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "data", "official_cam_golden.json")
BATCH = 2
AUDIO_STREAM, VIDEO_STREAM = 100_000, 100_001
_MOD = 2**31


def hashed_uniform(shape: Sequence[int], stream: int) -> torch.Tensor:
    """float64 values in ``[-1, 1)``, a fixed function of ``(stream, flat index)``.

    Every product stays below 2**63 (operands below 2**31 and 2**32), so int64 arithmetic is exact.
    """
    n = math.prod(shape)
    x = (torch.arange(n, dtype=torch.int64) * 2654435761 + (stream * 40503 + 1) % _MOD) % _MOD
    for _ in range(3):
        x = (x * 1103515245 + 12345) % _MOD
        x = x ^ (x >> 16)
    return (x.to(torch.float64) / 2**30 - 1.0).reshape(tuple(shape))


def golden_state_dict(keys: Sequence[Tuple[str, Sequence[int]]]) -> "OrderedDict[str, torch.Tensor]":
    """Weights for the official key list ``[(name, shape), ...]``: uniform with a fan-in scale, like PyTorch's
    default init, so that every tanh, softmax and LSTM gate sits in its working range."""
    state = OrderedDict()
    for index, (name, shape) in enumerate(keys):
        fan_in = shape[-1]
        state[name] = hashed_uniform(shape, index) / math.sqrt(fan_in)
    return state


def golden_inputs(batch: int = BATCH) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(audio (B, 16, 512), video (B, 16, 25088))``, float64; the video non-negative like post-ReLU maps."""
    audio = hashed_uniform((batch, 16, 512), AUDIO_STREAM)
    video = (hashed_uniform((batch, 16, 25088), VIDEO_STREAM) + 1.0) / 2.0
    return audio, video


def load_golden(path: str = GOLDEN_PATH) -> Dict[str, object]:
    with open(path) as f:
        return json.load(f)


def keys_of(entry: Dict[str, object]) -> List[Tuple[str, List[int]]]:
    return [(name, list(shape)) for name, shape in entry["keys"]]
