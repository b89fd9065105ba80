"""The test suite's one tolerance rule and one comparison helper (SPEC 8), after flash-attention's.

A result computed in ``dtype`` is compared with the same computation in float64 (the reference backend on
float64 copies of the inputs). It passes when its error is at most twice the error of the plain-PyTorch reference run
in the same ``dtype``, plus a floor:

    max|ours - ref64| <= 2 * max|ref_in_dtype - ref64| + FLOOR[dtype] * max(1, max|ref64|)

The reference's own error measures how hard the inputs are for that dtype (long sums, saturated softmaxes, tanh near
its flat ends), so one rule serves every op, shape and dtype. The floor absorbs what the reference's error does not
show: a kernel that accumulates in fp32 where the fp64 reference is exact, the few-row sums whose fp32 rounding is by
luck far below its usual size, and the interpreter's bf16 stores that truncate where torch rounds.
"""

from typing import Sequence

import torch

# Relative to the tensor's scale, max(1, max|ref64|).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def error_and_bound(ours: torch.Tensor, ref_in_dtype: torch.Tensor, ref64: torch.Tensor):
    """(our error, the bound it must stay within), both as max-abs numbers."""
    if ref64.numel() == 0:
        return 0.0, 0.0
    ref64 = ref64.to(torch.float64)
    err = (ours.to(torch.float64) - ref64).abs().max().item()
    ref_err = (ref_in_dtype.to(torch.float64) - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    return err, 2 * ref_err + FLOOR[ours.dtype] * scale


def assert_close(name: str, ours: torch.Tensor, ref_in_dtype: torch.Tensor, ref64: torch.Tensor) -> None:
    """``ours`` has the reference's shape and dtype and meets the rule above (NaN anywhere fails)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref64.shape)}"
    assert ours.dtype == ref_in_dtype.dtype, f"{name}: dtype {ours.dtype}, expected {ref_in_dtype.dtype}"
    err, bound = error_and_bound(ours, ref_in_dtype, ref64)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (2 x reference in {ours.dtype} + floor)"


def _kind(x: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 +inf, -1 -inf, 2 NaN."""
    return torch.where(torch.isnan(x), 2, torch.where(torch.isinf(x), x.sign(), 0).to(torch.int64))


def assert_same_nonfinite(name: str, ours: torch.Tensor, ref_in_dtype: torch.Tensor, ref64: torch.Tensor) -> None:
    """For non-finite inputs: ``ours`` is NaN, +inf or -inf exactly where ``ref64`` is, and its finite values meet the
    rule above (where the reference in ``ours.dtype`` alone is not finite, it counts as exact)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref64.shape)}"
    ref64 = ref64.to(torch.float64)
    differ = (_kind(ours) != _kind(ref64)).nonzero()
    if len(differ):
        at = tuple(differ[0].tolist())
        raise AssertionError(f"{name}: NaN/inf differ from the reference's at {len(differ)} positions, first {at}: "
                             f"{ours[at].item()} where the reference has {ref64[at].item()}")
    finite, same = torch.isfinite(ref64), ref_in_dtype.to(torch.float64)
    exact = torch.where(finite, ref64, 0.0)
    err, bound = error_and_bound(torch.where(finite, ours, 0.0), torch.where(torch.isfinite(same), same, exact), exact)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} on the finite values"


def assert_all_close(names: Sequence[str], ours, ref_in_dtype, ref64) -> None:
    assert len(ours) == len(ref64) == len(names), f"{len(ours)} results, expected {len(ref64)}"
    for name, a, b, c in zip(names, ours, ref_in_dtype, ref64):
        assert_close(name, a, b, c)


def deterministic_call(op, *args, enabled: bool = True):
    """``op(*args)`` under ``torch.use_deterministic_algorithms(enabled)``, the flag the backward kernels read."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        return op(*args)
    finally:
        torch.use_deterministic_algorithms(before)
