"""Per-sample sequence lengths (``lengths=``) and the padding masks the modules build from them (SPEC 3.1).

``lengths[b]`` is the number of valid time steps of sample ``b``; steps ``t >= lengths[b]`` are padding. The modules
turn it into a ``(B, L)`` boolean mask, ``True`` at padded steps, and treat those steps as absent in everything that
mixes time steps (``masked_fill``, not a product, so that NaN or inf in the padding cannot leak either).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from avkernels._validation import Dim, check_shape, shape_str


def check_time_shape(x: torch.Tensor, name: str, expected: Sequence[Dim], argument: str = "seq_len") -> None:
    """``check_shape(x, name, expected)`` for ``(B, L, ...)`` features whose ``L`` was fixed by the module's
    ``argument``: a wrong ``L`` is an error that says how to fix it."""
    seq_len = expected[1]
    if isinstance(seq_len, int) and x.dim() == len(expected) and x.shape[1] != seq_len:
        raise ValueError(
            f"{name}: expected shape {shape_str(expected)}, got {tuple(x.shape)}: the module was built with "
            f"{argument}={seq_len}. Pad shorter sequences to {seq_len} steps and pass lengths= (the valid steps of "
            f"each sample), or build the module with {argument}={x.shape[1]}"
        )
    check_shape(x, name, expected)


def check_lengths(
    lengths: object, batch: int, seq_len: int, device: torch.device, name: str = "lengths"
) -> Optional[int]:
    """``lengths``: a ``(batch,)`` integer tensor on ``device`` with values in ``[0, seq_len]``.

    Returns the smallest length, or ``None`` when it was not read (an empty batch, or while ``torch.compile`` traces).
    """
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name}: expected None or a ({batch},) integer torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(
            f"{name}: expected an integer tensor (e.g. torch.int64) of valid steps per sample, got {lengths.dtype}"
        )
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one length per sample), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like the features, got one on {lengths.device}")
    if batch and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(lengths))
        if low < 0 or high > seq_len:
            raise ValueError(f"{name}: expected values in [0, seq_len={seq_len}], got values in [{low}, {high}]")
        return low
    return None


def padding_mask(
    lengths: Optional[torch.Tensor], batch: int, seq_len: int, device: torch.device, name: str = "lengths"
) -> Optional[torch.Tensor]:
    """The ``(batch, seq_len)`` mask of padded steps, after :func:`check_lengths`; ``None`` without padding.

    ``None`` also when every length is ``seq_len`` (seen in the range check), so that such a call runs exactly the
    code of a call without ``lengths`` and gives bit-identical results. While ``torch.compile`` traces, the mask is
    always built (reading the values would break the graph); masking nothing is exact as well.
    """
    if lengths is None:
        return None
    shortest = check_lengths(lengths, batch, seq_len, device, name)
    if batch == 0 or shortest == seq_len:
        return None
    return torch.arange(seq_len, device=device) >= lengths.unsqueeze(1)


def zero_padded(x: torch.Tensor, padded: Optional[torch.Tensor], time_axis: int = 1) -> torch.Tensor:
    """``x`` with its padded steps set to 0; ``padded`` is ``(B, L)`` and ``x`` has ``L`` on ``time_axis``."""
    if padded is None:
        return x
    shape = [1] * x.dim()
    shape[0], shape[time_axis] = padded.shape
    return x.masked_fill(padded.view(shape), 0)


def lengths_from_mask(padded: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The CPU int64 lengths of a prefix-valid padding mask (for ``pack_padded_sequence``), or ``None``."""
    if padded is None:
        return None
    return (~padded).sum(dim=1).cpu()


def drop_exporter_defaults(features: tuple) -> tuple:
    """``features`` less the keyword defaults that torch.onnx's TorchScript exporter appends while it traces.

    That exporter (``dynamo=False``, ``_decide_input_format``) counts ``*features`` as one parameter and passes the
    default of every keyword-only parameter past the number of inputs as one more positional input: with two
    modalities, ``forward(*features, lengths=None, return_gates=False)`` receives ``(video, audio, tensor(False))``
    (the tracer turns the bool into a 0-d tensor). Outside tracing nothing is dropped, so a stray positional argument
    stays an error.
    """
    if torch.jit.is_tracing():
        while features and not (isinstance(features[-1], torch.Tensor) and features[-1].is_floating_point()
                                and features[-1].dim() > 0):
            features = features[:-1]
    return features
