"""Evaluation metrics (SPEC 5): the concordance correlation coefficient and the IEMOCAP accuracies.

Also the CCC per group of frames (:func:`grouped_ccc`: e.g. the synthetic dataset's clean and corrupted frames) and
a confidence interval of a mean over independent runs (:func:`mean_interval`: e.g. over seeds).

CCC uses population statistics over all valid frames given (one global value, not a mean over videos). Label value
``-5`` marks an invalid frame (Aff-Wild2) and is excluded automatically; the official evaluation code kept such
frames as ``(0, 0)`` pairs, which this library deliberately does not reproduce.

:func:`concordance_correlation` is the single implementation of the formula: a differentiable torch function that
:func:`ccc` (a metric returning a Python float) and :mod:`avkernels.losses` both call.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

INVALID_LABEL = -5.0
SMOOTHING_WINDOWS = {"valence": 20, "arousal": 50}  # frames, the official post-processing


def valid_frames(
    target: torch.Tensor, mask: Optional[torch.Tensor] = None, invalid_value: Optional[float] = INVALID_LABEL
) -> torch.Tensor:
    """Boolean tensor of the frames that count: ``mask`` (all when ``None``) and ``target != invalid_value``.

    ``invalid_value=None`` turns the automatic exclusion off.
    """
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask
    if invalid_value is not None:
        valid = valid & (target != invalid_value)
    return valid


def _check_pair(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask: expected a boolean tensor or array (True = frame counts), got {what}")
        if mask.shape != target.shape:
            raise ValueError(f"mask: expected the shape of target {tuple(target.shape)}, got {tuple(mask.shape)}")


def concordance_correlation(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    invalid_value: Optional[float] = INVALID_LABEL,
    eps: float = 0.0,
) -> torch.Tensor:
    """Differentiable CCC over all valid frames: ``2 cov / (var_p + var_t + (mean_p - mean_t)^2 + eps)``.

    Population (biased) statistics over the flattened valid frames.

    Args:
        pred, target: floating tensors of the same shape (any shape; every valid element is one frame).
        mask: optional boolean tensor of that shape, True where the frame counts; combined with the automatic
            exclusion of ``target == invalid_value``.
        invalid_value: label marking invalid frames (``-5``); ``None`` to keep every frame.
        eps: added to the denominator. ``0`` gives the exact CCC, which is NaN when both sequences are constant and
            equal; the official training loss used a Pearson form with unbiased std and ``eps = 1e-8``.
    Returns:
        A 0-d tensor in ``pred``'s dtype.
    Raises:
        ValueError: shapes differ, or no valid frame remains.
    """
    _check_pair(pred, target, mask)
    valid = valid_frames(target, mask, invalid_value)
    if not bool(valid.any()):
        raise ValueError(
            f"target: no valid frame to compute the CCC over ({target.numel()} frames, all masked or equal to "
            f"invalid_value={invalid_value})"
        )
    p, t = pred[valid], target[valid]
    p_mean, t_mean = p.mean(), t.mean()
    p_dev, t_dev = p - p_mean, t - t_mean
    covariance = (p_dev * t_dev).mean()
    denominator = p_dev.square().mean() + t_dev.square().mean() + (p_mean - t_mean).square() + eps
    return 2.0 * covariance / denominator


def _as_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{name}: expected a torch.Tensor, numpy array or sequence of numbers, got {type(x).__name__}"
        ) from error


def _as_float64(x: object, name: str) -> torch.Tensor:
    x = _as_tensor(x, name)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: expected real numbers, got {x.dtype}")
    return x.to(torch.float64)


def ccc(
    pred: ArrayLike,
    target: ArrayLike,
    mask: Optional[ArrayLike] = None,
    *,
    invalid_value: Optional[float] = INVALID_LABEL,
) -> float:
    """Concordance correlation coefficient of a partition, as a Python float (computed in float64).

    Global over all given values (concatenate the videos of a partition first, as the challenge does). Accepts
    torch tensors (any device; not differentiated: use :func:`concordance_correlation` or
    :class:`avkernels.losses.CCCLoss` for gradients), numpy arrays and sequences.

    Args:
        pred, target: same shape.
        mask: optional boolean array, True where the frame counts; combined with ``target != invalid_value``.
        invalid_value: label marking invalid frames (``-5`` in Aff-Wild2); ``None`` keeps every frame.
    Returns:
        The CCC in [-1, 1]; NaN when predictions and targets are the same constant.
    Raises:
        ValueError: shapes differ or no valid frame remains.  TypeError: a non-numeric input or non-boolean mask.
    """
    p = _as_float64(pred, "pred")
    t = _as_float64(target, "target").to(p.device)
    m = None if mask is None else _as_tensor(mask, "mask").to(p.device)
    return float(concordance_correlation(p, t, m, invalid_value=invalid_value))


def grouped_ccc(
    pred: ArrayLike,
    target: ArrayLike,
    groups: ArrayLike,
    names: Sequence[str],
    *,
    invalid_value: Optional[float] = INVALID_LABEL,
) -> Dict[str, float]:
    """The CCC of each group of frames on its own: ``{names[k]: CCC over the valid frames whose group is k}``.

    Args:
        pred, target: same shape, as :func:`ccc`.
        groups: integer array of that shape, the group index of every frame (in ``[0, len(names))``).
        names: the groups' names, by index.
        invalid_value: as :func:`ccc`.
    Returns:
        One float per name, NaN for a group without any valid frame (or whose predictions and targets are the same
        constant).
    Raises:
        ValueError: shapes differ or a group index is outside ``[0, len(names))``.  TypeError: as :func:`ccc`.
    """
    p, t = _as_float64(pred, "pred"), _as_float64(target, "target")
    g = _as_tensor(groups, "groups").to(p.device)
    if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise TypeError(f"groups: expected integer group indices, got {g.dtype}")
    if g.shape != t.shape:
        raise ValueError(f"groups: expected the shape of target {tuple(t.shape)}, got {tuple(g.shape)}")
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= len(names)):
        raise ValueError(f"groups: expected indices in [0, {len(names)}) (one per name), got {int(g.min())}.."
                         f"{int(g.max())}")
    t = t.to(p.device)
    out = {}
    for k, name in enumerate(names):
        in_group = g == k
        if bool(valid_frames(t, in_group, invalid_value).any()):
            out[name] = float(concordance_correlation(p, t, in_group, invalid_value=invalid_value))
        else:
            out[name] = float("nan")
    return out


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (scipy.stats.t.ppf(0.975, df), 3 decimals);
# the normal 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.16, 2.145, 2.131,
         2.12, 2.11, 2.101, 2.093, 2.086, 2.08, 2.074, 2.069, 2.064, 2.06, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: Sequence[float]) -> Tuple[float, float]:
    """Mean of independent runs (e.g. seeds) and the half-width of its 95 % Student-t confidence interval.

    NaN values (a run without that measurement) are left out. Returns ``(mean, half_width)``; the half-width is NaN
    with fewer than two values, the mean NaN with none.
    """
    x = [float(v) for v in values if not math.isnan(float(v))]
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(x) / n
    if n == 1:
        return mean, float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    quantile = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, quantile * std / math.sqrt(n)


def _labels(x: ArrayLike, name: str) -> torch.Tensor:
    x = _as_tensor(x, name)
    if x.dim() == 2:  # scores or logits (N, C)
        x = x.argmax(dim=1)
    if x.dim() != 1:
        raise ValueError(f"{name}: expected labels (N,) or scores (N, C), got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer labels (or float scores of shape (N, C)), got {x.dtype}")
    return x.cpu()


def _prediction_and_labels(pred: ArrayLike, target: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    p, t = _labels(pred, "pred"), _labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred: expected {t.shape[0]} predictions like target, got {p.shape[0]}")
    if t.numel() == 0:
        raise ValueError("target: no sample to compute an accuracy over")
    return p, t


def overall_accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of correct predictions (what most SER papers call WA; the ICASSP 2022 paper calls it "UWA").

    Args:
        pred: predicted labels ``(N,)`` or class scores ``(N, C)`` (arg-maxed).
        target: true labels ``(N,)``.
    """
    p, t = _prediction_and_labels(pred, target)
    return float((p == t).double().mean())


def balanced_accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Mean per-class recall over the classes present in ``target`` (most SER papers' UA/UAR; the ICASSP 2022
    paper and its code call it "WA", weighting each sample by one over its class count).

    Args: as :func:`overall_accuracy`.
    """
    p, t = _prediction_and_labels(pred, target)
    classes = t.unique()
    recalls = torch.stack([(p[t == c] == c).double().mean() for c in classes])
    return float(recalls.mean())


def smooth_predictions(
    pred: Union[ArrayLike, Sequence[ArrayLike]], window: int, *, clip: Optional[float] = 1.0
) -> Union[np.ndarray, List[np.ndarray]]:
    """The official evaluation post-processing: clip, then a per-video moving average.

    Report raw and smoothed CCCs separately (the smoothing is not part of the models).

    Args:
        pred: one video's predictions (1-D), or a list of them (each smoothed on its own: no window crosses a
            video boundary).
        window: frames averaged (:data:`SMOOTHING_WINDOWS`: 20 for valence, 50 for arousal). The window for frame
            ``i`` is ``[i - window // 2, i + (window - 1) // 2]`` (the alignment of
            ``scipy.ndimage.uniform_filter1d``). Near the ends of a video it is cut to the frames that exist and the
            average is over those; the official code padded with zeros, which pulls the ends towards 0.
        clip: clip to ``[-clip, clip]`` before smoothing (``None``: no clipping).
    Returns:
        float64 numpy array(s) of the same length(s).
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window: expected a positive int (frames), got {window!r}")
    if isinstance(pred, (list, tuple)) and len(pred) > 0 and not np.isscalar(pred[0]):
        return [smooth_predictions(video, window, clip=clip) for video in pred]
    x = _as_float64(pred, "pred").cpu().numpy()
    if x.ndim != 1:
        raise ValueError(f"pred: expected one video's predictions (1-D) or a list of them, got shape {x.shape}")
    if clip is not None:
        x = np.clip(x, -clip, clip)
    # A direct convolution rather than a running sum, so that a NaN spoils only the windows that contain it.
    ones, first = np.ones(window), (window - 1) // 2
    sums = np.convolve(x, ones)[first:first + x.shape[0]]
    counts = np.convolve(np.ones_like(x), ones)[first:first + x.shape[0]]
    return sums / counts
