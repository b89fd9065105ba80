"""CCC metric and loss, accuracies and the smoothing post-processing (SPEC 5)."""

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter1d

from avkernels.losses import CCCLoss, ccc_loss
from avkernels.metrics import (
    SMOOTHING_WINDOWS,
    balanced_accuracy,
    ccc,
    concordance_correlation,
    grouped_ccc,
    mean_interval,
    overall_accuracy,
    smooth_predictions,
)


def numpy_ccc(x, y):
    """Independent oracle: the rho * sigma form, with numpy's Pearson and population std."""
    x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    rho = np.corrcoef(x, y)[0, 1]
    sx, sy = np.std(x), np.std(y)
    return 2 * rho * sx * sy / (sx**2 + sy**2 + (np.mean(x) - np.mean(y)) ** 2)


def labels_with_invalid(rng, shape, fraction=0.3):
    y = rng.uniform(-1, 1, size=shape)
    y[rng.random(shape) < fraction] = -5.0
    return y


@pytest.mark.parametrize("shape", [(1, 2), (37,), (3, 16), (2, 5, 7)])
def test_ccc_matches_independent_formula(shape):
    rng = np.random.default_rng(1)
    y = rng.uniform(-1, 1, size=shape)
    x = 0.6 * y + rng.normal(0.1, 0.3, size=shape)
    expected = numpy_ccc(x, y)
    assert ccc(x, y) == pytest.approx(expected, abs=1e-12)
    assert ccc(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, abs=1e-12)
    assert ccc(x.tolist(), y.tolist()) == pytest.approx(expected, abs=1e-12)
    # float32 inputs are computed in float64: only the input rounding differs from the oracle.
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    assert ccc(torch.from_numpy(x32), torch.from_numpy(y32)) == pytest.approx(numpy_ccc(x32, y32), abs=1e-12)
    assert isinstance(ccc(torch.from_numpy(x), torch.from_numpy(y)), float)


def test_ccc_perfect_negated_and_shift():
    rng = np.random.default_rng(2)
    y = rng.uniform(-1, 1, size=200)
    y = y - y.mean()
    assert ccc(y, y) == pytest.approx(1.0, abs=1e-12)
    assert ccc(-y, y) == pytest.approx(-1.0, abs=1e-12)
    # A constant shift keeps Pearson at 1 but lowers the CCC, more for a larger shift.
    shifted = [ccc(y + c, y) for c in (0.0, 0.1, 0.5, 2.0)]
    assert shifted[0] == pytest.approx(1.0, abs=1e-12)
    assert all(a > b for a, b in zip(shifted, shifted[1:]))
    var = y.var()
    assert shifted[2] == pytest.approx(2 * var / (2 * var + 0.25), abs=1e-12)


def test_ccc_excludes_invalid_frames():
    rng = np.random.default_rng(3)
    y = labels_with_invalid(rng, (4, 16))
    x = rng.uniform(-1, 1, size=(4, 16))
    valid = y != -5.0
    assert 0 < valid.sum() < valid.size
    expected = numpy_ccc(x[valid], y[valid])
    assert ccc(x, y) == pytest.approx(expected, abs=1e-12)
    # Predictions on invalid frames do not matter at all.
    x2 = x.copy()
    x2[~valid] = rng.uniform(-100, 100, size=(~valid).sum())
    assert ccc(x2, y) == ccc(x, y)
    # invalid_value=None keeps every frame, -5 labels included.
    assert ccc(x, y, invalid_value=None) == pytest.approx(numpy_ccc(x, y), abs=1e-12)
    # The official bug kept invalid frames as (0, 0) pairs; that is a different (wrong) number.
    x0, y0 = np.where(valid, x, 0.0), np.where(valid, y, 0.0)
    assert abs(ccc(x, y) - numpy_ccc(x0, y0)) > 1e-3


def test_ccc_explicit_mask_combines_with_invalid():
    rng = np.random.default_rng(4)
    y = labels_with_invalid(rng, (50,))
    x = rng.uniform(-1, 1, size=50)
    mask = rng.random(50) < 0.7
    keep = mask & (y != -5.0)
    expected = numpy_ccc(x[keep], y[keep])
    assert ccc(x, y, mask) == pytest.approx(expected, abs=1e-12)
    assert ccc(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)) == pytest.approx(expected, abs=1e-12)
    assert ccc(x, y, mask, invalid_value=None) == pytest.approx(numpy_ccc(x[mask], y[mask]), abs=1e-12)


def test_ccc_errors():
    with pytest.raises(ValueError, match="pred"):
        ccc(np.zeros(5), np.zeros(6))
    with pytest.raises(ValueError, match="pred"):
        ccc(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no valid frame"):
        ccc(np.zeros(4), np.full(4, -5.0))
    with pytest.raises(ValueError, match="no valid frame"):
        ccc(np.zeros(4), np.ones(4), np.zeros(4, dtype=bool))
    with pytest.raises(TypeError, match="mask"):
        ccc(np.zeros(4), np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="mask"):
        ccc(np.zeros(4), np.ones(4), np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="pred"):
        ccc(["a", "b"], [1.0, 2.0])
    # Two identical constants: 0 / 0, reported as NaN rather than an invented value.
    assert np.isnan(ccc(np.ones(3), np.ones(3)))


def test_concordance_correlation_keeps_dtype_and_graph():
    x = torch.randn(10, dtype=torch.float32, requires_grad=True)
    y = torch.randn(10, dtype=torch.float32)
    r = concordance_correlation(x, y)
    assert r.dtype == torch.float32 and r.dim() == 0 and r.requires_grad
    assert r.item() == pytest.approx(numpy_ccc(x.detach().numpy(), y.numpy()), abs=1e-6)


def test_ccc_loss_value_and_layouts():
    rng = np.random.default_rng(5)
    yv, ya = labels_with_invalid(rng, (3, 8)), labels_with_invalid(rng, (3, 8))
    pv, pa = rng.uniform(-1, 1, (3, 8)), rng.uniform(-1, 1, (3, 8))
    expected = (1 - ccc(pv, yv)) + (1 - ccc(pa, ya))
    t = torch.from_numpy
    loss = CCCLoss()((t(pv), t(pa)), (t(yv), t(ya)))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    stacked = ccc_loss(torch.stack([t(pv), t(pa)], -1), torch.stack([t(yv), t(ya)], -1))
    assert stacked.item() == pytest.approx(expected, abs=1e-12)
    mask = torch.from_numpy(rng.random((3, 8)) < 0.8)
    m = mask.numpy()
    masked = (1 - ccc(pv, yv, m)) + (1 - ccc(pa, ya, m))
    assert ccc_loss((t(pv), t(pa)), (t(yv), t(ya)), mask).item() == pytest.approx(masked, abs=1e-12)


def test_ccc_loss_gradcheck_fp64():
    rng = np.random.default_rng(6)
    targets = tuple(torch.from_numpy(labels_with_invalid(rng, (2, 6), 0.25)) for _ in range(2))
    preds = tuple(torch.rand(2, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 6) < 0.9
    assert torch.autograd.gradcheck(lambda v, a: CCCLoss()((v, a), targets), preds)
    assert torch.autograd.gradcheck(lambda v, a: CCCLoss(eps=1e-3)((v, a), targets, mask), preds)
    # Frames labelled -5 get exactly zero gradient.
    CCCLoss()(preds, targets).backward()
    for p, y in zip(preds, targets):
        assert torch.all(p.grad[y == -5.0] == 0) and torch.any(p.grad[y != -5.0] != 0)


def test_ccc_loss_eps_and_errors():
    ones = torch.ones(4, dtype=torch.float64)
    assert torch.isnan(ccc_loss((ones,), (ones,)))
    assert ccc_loss((ones,), (ones,), eps=1e-8).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="prediction"):
        ccc_loss((ones, ones), (ones,))
    with pytest.raises(ValueError, match="dimension 1"):
        ccc_loss((ones, ones), (ones, torch.full((4,), -5.0, dtype=torch.float64)))
    with pytest.raises(TypeError, match="target"):
        ccc_loss((ones,), (torch.ones(4, dtype=torch.long),))
    with pytest.raises(TypeError, match="prediction"):
        ccc_loss([], (ones,))


def test_accuracies_hand_worked():
    target = [0, 0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 0, 1, 1, 0, 2, 0]
    # 5 of 8 correct; recalls: class 0 3/4, class 1 1/2, class 2 1/2.
    assert overall_accuracy(pred, target) == pytest.approx(5 / 8)
    assert balanced_accuracy(pred, target) == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    # The ICASSP 2022 code's "weighted accuracy": each sample weighted by 1 / (its class count).
    t, p = np.array(target), np.array(pred)
    w = 1.0 / np.bincount(t)[t]
    assert balanced_accuracy(p, t) == pytest.approx(np.sum(w * (p == t)) / np.sum(w))
    # Scores (N, C) are arg-maxed.
    scores = torch.nn.functional.one_hot(torch.tensor(pred), 3).double() + 0.1
    assert overall_accuracy(scores, torch.tensor(target)) == pytest.approx(5 / 8)
    assert balanced_accuracy(scores, torch.tensor(target)) == pytest.approx(7 / 12)


def test_accuracy_errors():
    with pytest.raises(ValueError, match="pred"):
        overall_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(TypeError, match="target"):
        balanced_accuracy([0, 1], [0.0, 1.0])
    with pytest.raises(ValueError, match="no sample"):
        overall_accuracy(np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="pred"):
        overall_accuracy(np.zeros((2, 2, 2)), [0, 1])


@pytest.mark.parametrize("window", [1, 4, 7, SMOOTHING_WINDOWS["valence"]])
def test_smoothing_interior_matches_uniform_filter(window):
    rng = np.random.default_rng(7)
    x = rng.uniform(-1.5, 1.5, size=97)
    clipped = np.clip(x, -1, 1)
    smoothed = smooth_predictions(x, window)
    assert smoothed.shape == x.shape and smoothed.dtype == np.float64
    inner = slice(window, len(x) - window)
    np.testing.assert_allclose(smoothed[inner], uniform_filter1d(clipped, window, mode="constant")[inner], atol=1e-12)
    # At the ends only the existing frames are averaged (no zero padding).
    assert smoothed[0] == pytest.approx(clipped[: (window - 1) // 2 + 1].mean())
    assert smoothed[-1] == pytest.approx(clipped[len(x) - 1 - window // 2:].mean())


def test_smoothing_per_video_clip_and_nan():
    a, b = np.full(10, 0.5), np.full(6, 3.0)
    out = smooth_predictions([a, torch.from_numpy(b)], SMOOTHING_WINDOWS["arousal"])
    np.testing.assert_allclose(out[0], 0.5)  # no window crosses into the other video
    np.testing.assert_allclose(out[1], 1.0)  # clipped to [-1, 1] first
    np.testing.assert_allclose(smooth_predictions(b, 3, clip=None), 3.0)
    x = np.zeros(20)
    x[10] = np.nan
    s = smooth_predictions(x, 3)
    assert np.isnan(s[9:12]).all() and not np.isnan(np.delete(s, [9, 10, 11])).any()
    with pytest.raises(ValueError, match="window"):
        smooth_predictions(x, 0)
    with pytest.raises(ValueError, match="pred"):
        smooth_predictions(np.zeros((2, 3)), 2)


def test_grouped_ccc_on_a_hand_made_case():
    # Group 0: predictions equal to the targets (CCC 1). Group 1: negated (CCC -1), plus an invalid frame whose
    # prediction would spoil it if it counted. Group 2: constant 0 against targets of mean 0 and variance 1/2
    # (CCC 0). Group 3: no frame at all (NaN).
    target = np.array([0.1, 0.5, 0.9, 0.3, -0.3, -5.0, 1.0, -1.0, 0.0, 0.0])
    pred = np.array([0.1, 0.5, 0.9, -0.3, 0.3, 3.0, 0.0, 0.0, 0.0, 0.0])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    out = grouped_ccc(pred, target, groups, ["same", "negated", "constant", "empty"])
    assert list(out) == ["same", "negated", "constant", "empty"]
    assert out["same"] == pytest.approx(1.0) and out["negated"] == pytest.approx(-1.0)
    assert out["constant"] == pytest.approx(0.0) and np.isnan(out["empty"])
    # Each group on its own, not the pooled frames.
    assert ccc(pred, target) != pytest.approx(out["same"])


def test_grouped_ccc_checks_its_groups():
    pred = target = np.zeros(4)
    with pytest.raises(ValueError, match="groups: expected indices in \\[0, 2\\)"):
        grouped_ccc(pred, target, np.array([0, 1, 2, 0]), ["a", "b"])
    with pytest.raises(ValueError, match="groups: expected the shape"):
        grouped_ccc(pred, target, np.array([0, 1]), ["a", "b"])
    with pytest.raises(TypeError, match="groups: expected integer"):
        grouped_ccc(pred, target, np.array([0.0, 1.0, 0.0, 1.0]), ["a", "b"])


@pytest.mark.parametrize("n", [2, 3, 5, 12, 31, 40])
def test_mean_interval_is_the_student_t_interval(n):
    from scipy import stats

    values = np.random.default_rng(n).normal(0.7, 0.05, size=n)
    mean, half = mean_interval(values.tolist())
    quantile = stats.t.ppf(0.975, n - 1) if n <= 31 else 1.96
    assert mean == pytest.approx(values.mean())
    assert half == pytest.approx(quantile * values.std(ddof=1) / np.sqrt(n), rel=2e-4)


def test_mean_interval_leaves_out_missing_runs():
    assert mean_interval([0.5, float("nan"), 0.7]) == pytest.approx((0.6, 12.706 * np.sqrt(0.02) / np.sqrt(2)))
    mean, half = mean_interval([0.4])
    assert mean == 0.4 and np.isnan(half)
    assert all(np.isnan(mean_interval([float("nan")])))
