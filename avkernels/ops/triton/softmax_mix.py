"""Triton kernels of the *softmax mix*, the one computation behind both gates (SPEC 3), and their launchers.

Both gates are one computation, a *softmax mix* of ``T`` candidate feature sets per row (time step)::

    z   = sum_{t >= FIRST} X_t @ W[:, (t - FIRST) * d : (t - FIRST + 1) * d]^T + b        (T logits per row)
    s   = softmax(z / tau)
    out = ReLU(sum_t s_t * X_t)

``stage_gate`` is the mix with ``FIRST = 0`` (every stage feeds the logits, ``W`` is ``(T, T * d)``); ``gate`` is the
mix of ``(unattended, attended)`` with ``FIRST = 1`` (only the attended features feed the logits, ``W`` is
``(2, d)``). One pair of kernels therefore serves both ops: :mod:`avkernels.ops.triton.gate` and
:mod:`avkernels.ops.triton.stage_gate` only adapt their contracts to :func:`softmax_mix_forward` and
:func:`softmax_mix_backward` and register themselves. This module registers nothing.

Design:

* One pass over the inputs. Rows of ``B * L`` are processed in blocks of ``BLOCK_R``; the stages are passed as a
  tuple of pointers with their own strides (no stacking copy), and when ``d <= MAX_BLOCK_D`` a program holds the whole
  feature row of every stage in registers (a tuple of tiles), so each input element is read from memory once. Wider
  rows are tiled: the logits (forward) or the row sums (backward) need the whole row first, so those rows are read
  twice.
* Arbitrary strides for every ``(B, L, d)`` input, int64 offsets, fp32/fp16/bf16 inputs computed in fp32 (upcast
  right after the load, which the interpreter needs for bf16) and fp64 inputs computed in fp64 (``ACC`` constexpr),
  so that ``gradcheck`` passes.
* Deterministic weight/bias gradients without atomics and without a separate deterministic mode: each backward
  program owns one row of a partials buffer (registers while ``d`` fits one tile, its private global row otherwise)
  and the host sums the partials along a fixed axis with ``torch.sum``. Same inputs, same grid, same bits.
* The backward reads the saved softmax weights ``s`` and renormalises each row: saved in bf16/fp16 they no longer
  sum to 1, which would bias every logit gradient (and so the bias gradient, a sum over all rows).
* ``tau`` reaches the kernels as fp64, so that fp64 runs divide by the exact temperature.
* ``exp`` via ``tl.exp`` (no libdevice, which the interpreter cannot run); no autotuning: block sizes follow from the
  shape (:func:`launch_config`).
"""

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from avkernels.dispatch import Inputs

MAX_BLOCK_D = 1024  # widest feature tile held in registers; wider rows are tiled
REGISTER_BUDGET = 8192  # fp32 values a program keeps live when sizing BLOCK_R (64 per thread at 4 warps)
MAX_BLOCK_R = 64


@triton.jit
def _split_rows(rows, L):
    """``(b, l)`` of each row ``r = b * L + l``, as int64 for the offsets. The division runs in int32: a 64-bit
    integer division is a subroutine call on NVIDIA GPUs (stack frame, register pressure); rows fit int32 (checked
    by the launchers)."""
    return (rows // L).to(tl.int64), (rows % L).to(tl.int64)


@triton.jit
def _row_offsets(b, l_, SB, SL, T: tl.constexpr):
    """Per-stage element offset of rows ``(b, l)`` of ``(B, L, d)`` views (a tuple of T int64 vectors)."""
    offsets = ()
    for t in tl.static_range(T):
        offsets = offsets + (b * SB[t] + l_ * SL[t],)
    return offsets


@triton.jit
def _feature_tile(k0, cols, d, row_ok):
    """Columns ``k0 + cols`` of a block of rows: the columns, their mask, and the (row, column) mask."""
    cols_k = k0 + cols
    col_ok = cols_k < d
    return cols_k, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _load_tiles(XS, row_offs, SD, cols, mask, T: tl.constexpr, ACC: tl.constexpr):
    """The ``(BLOCK_R, BLOCK_D)`` tile of every stage, upcast to ``ACC`` at once (bf16 math is wrong in the
    interpreter and imprecise on GPU)."""
    tiles = ()
    for t in tl.static_range(T):
        ptrs = XS[t] + row_offs[t][:, None] + cols[None, :] * SD[t]
        tiles = tiles + (tl.load(ptrs, mask=mask, other=0.0).to(ACC),)
    return tiles


@triton.jit
def _column(x, t_idx, t: tl.constexpr):
    """Column ``t`` of a ``(BLOCK_R, BLOCK_T)`` tile: a select, not a product, so NaN in other columns stays put."""
    return tl.sum(tl.where(t_idx[None, :] == t, x, 0.0), axis=1)


@triton.jit
def _put_column(x, t_idx, t: tl.constexpr, value):
    return tl.where(t_idx[None, :] == t, x + value[:, None], x)


@triton.jit
def _weight_row(W, w_s0, w_s1, j: tl.constexpr, t: tl.constexpr, d, cols, col_ok, FIRST: tl.constexpr,
                ACC: tl.constexpr):
    """The slice of logit ``j``'s weights that multiplies stage ``t``: ``W[j, (t - FIRST) * d + cols]``."""
    return tl.load(W + j * w_s0 + ((t - FIRST) * d + cols) * w_s1, mask=col_ok, other=0.0).to(ACC)


@triton.jit
def _add_logits(z, tiles, W, w_s0, w_s1, d, cols, col_ok, t_idx, T: tl.constexpr, FIRST: tl.constexpr,
                ACC: tl.constexpr):
    for t in tl.static_range(FIRST, T):
        for j in tl.static_range(T):
            w = _weight_row(W, w_s0, w_s1, j, t, d, cols, col_ok, FIRST, ACC)
            z = _put_column(z, t_idx, j, tl.sum(tiles[t] * w[None, :], axis=1))
    return z


@triton.jit
def _mix(tiles, s, t_idx, T: tl.constexpr):
    """``ReLU(sum_t s_t * X_t)``; the ReLU keeps NaN (``x < 0`` is false for NaN), like ``torch.relu``."""
    acc = _column(s, t_idx, 0)[:, None] * tiles[0]
    for t in tl.static_range(1, T):
        acc += _column(s, t_idx, t)[:, None] * tiles[t]
    return tl.where(acc < 0.0, 0.0, acc)


@triton.jit
def _stage_dots(dpre, tiles, t_idx, T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                ACC: tl.constexpr):
    """``sum_k dpre * X_t`` per row and stage: the gradient reaching ``s_t`` through the mix."""
    dots = tl.zeros([BLOCK_R, BLOCK_T], ACC)
    for t in tl.static_range(T):
        dots = _put_column(dots, t_idx, t, tl.sum(dpre * tiles[t], axis=1))
    return dots


@triton.jit
def _relu_grad(DOut, do_rows, do_sd, Out, out_rows, cols, mask, ACC: tl.constexpr):
    dout = tl.load(DOut + do_rows[:, None] + cols[None, :] * do_sd, mask=mask, other=0.0).to(ACC)
    out = tl.load(Out + out_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    return tl.where(out <= 0.0, 0.0, dout)  # as torch's ReLU backward: an output NaN passes dout on


@triton.jit
def _zeros_tuple(N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    zeros = ()
    for _ in tl.static_range(N):
        zeros = zeros + (tl.zeros([BLOCK_D], ACC),)
    return zeros


@triton.jit
def _partials_ptrs(dw_row, n_wcols, d, cols, j: tl.constexpr, t: tl.constexpr, FIRST: tl.constexpr):
    """Where ``dW[j, (t - FIRST) * d + cols]`` lives in a program's row of the partials buffer."""
    return dw_row + j * n_wcols + (t - FIRST) * d + cols


@triton.jit
def _load_partials(dw_row, n_wcols, d, cols, col_ok, T: tl.constexpr, FIRST: tl.constexpr):
    dw = ()
    for j in tl.static_range(T):
        for t in tl.static_range(FIRST, T):
            dw = dw + (tl.load(_partials_ptrs(dw_row, n_wcols, d, cols, j, t, FIRST), mask=col_ok, other=0.0),)
    return dw


@triton.jit
def _store_partials(dw_row, dw, n_wcols, d, cols, col_ok, T: tl.constexpr, FIRST: tl.constexpr):
    for j in tl.static_range(T):
        for t in tl.static_range(FIRST, T):
            ptrs = _partials_ptrs(dw_row, n_wcols, d, cols, j, t, FIRST)
            tl.store(ptrs, dw[j * (T - FIRST) + t - FIRST], mask=col_ok)


@triton.jit
def _tile_backward(tiles, dpre, s, dz, t_idx, dw, DXS, out_rows, mask, W, w_s0, w_s1, d, cols, col_ok,
                   T: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr):
    """One feature tile of the gradients: stores ``dX_t = dpre * s_t + sum_j dz_j W[j, t]`` stage by stage (so only
    one ``dX`` tile is live at a time) and returns ``dw`` with ``sum_rows dz_j X_t`` added at
    ``j * (T - FIRST) + t - FIRST``."""
    for t in tl.static_range(T):
        dx = dpre * _column(s, t_idx, t)[:, None]
        if t >= FIRST:
            for j in tl.static_range(T):
                dz_j = _column(dz, t_idx, j)
                dx += dz_j[:, None] * _weight_row(W, w_s0, w_s1, j, t, d, cols, col_ok, FIRST, ACC)[None, :]
        tl.store(DXS[t] + out_rows[:, None] + cols[None, :], dx.to(DXS[t].dtype.element_ty), mask=mask)
    new_dw = ()
    for j in tl.static_range(T):
        dz_j = _column(dz, t_idx, j)
        for t in tl.static_range(FIRST, T):
            new_dw = new_dw + (dw[j * (T - FIRST) + t - FIRST] + tl.sum(dz_j[:, None] * tiles[t], axis=0),)
    return new_dw


@triton.jit
def _softmax_mix_fwd_kernel(
    XS, X_SB, X_SL, X_SD,
    W, w_s0, w_s1,
    Bias, bias_s,
    Out, S,
    n_rows, L, d,
    tau: tl.float64,
    T: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """Forward softmax mix: ``s = softmax(z / tau)``, ``out = ReLU(sum_t s_t X_t)`` for a block of rows.

    Args:
        XS: tuple of ``T`` pointers to the stages, each viewed as ``(B, L, d)``.
        X_SB, X_SL, X_SD: tuples of the stages' batch, time and feature strides (elements).
        W: ``(T, (T - FIRST) * d)`` logit weights with strides ``w_s0, w_s1``; Bias: ``(T,)`` with stride ``bias_s``.
        Out: contiguous ``(B * L, d)`` output, in the stages' dtype.
        S: contiguous ``(B * L, T)`` softmax weights, in the stages' dtype.
        n_rows: ``B * L``.  L: time steps per sample (splits a row index into ``(b, l)``).  d: features.
        tau: softmax temperature, fp64 so that fp64 runs see the exact value.
        T: number of stages.  FIRST: first stage feeding the logits (0 for stage_gate, 1 for gate).
        ACC: compute dtype (fp32, or fp64 for fp64 inputs).
        BLOCK_R: rows per program.  BLOCK_D: feature tile (a power of two).  BLOCK_T: ``T`` rounded up to a power of 2.
        ONE_TILE: ``d <= BLOCK_D``: the whole row stays in registers between the logits and the mix.
    Grid:
        ``(cdiv(n_rows, BLOCK_R),)``: one program per block of ``BLOCK_R`` rows.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b, l_ = _split_rows(rows, L)
    row_offs = _row_offsets(b, l_, X_SB, X_SL, T)
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    t_idx = tl.arange(0, BLOCK_T)
    t_ok = t_idx < T

    z = tl.zeros([BLOCK_R, BLOCK_T], ACC)
    if ONE_TILE:
        _, col_ok, mask = _feature_tile(0, cols, d, row_ok)
        tiles = _load_tiles(XS, row_offs, X_SD, cols, mask, T, ACC)
        z = _add_logits(z, tiles, W, w_s0, w_s1, d, cols, col_ok, t_idx, T, FIRST, ACC)
    else:
        for k0 in range(0, d, BLOCK_D):
            cols_k, col_ok, mask = _feature_tile(k0, cols, d, row_ok)
            tiles = _load_tiles(XS, row_offs, X_SD, cols_k, mask, T, ACC)
            z = _add_logits(z, tiles, W, w_s0, w_s1, d, cols_k, col_ok, t_idx, T, FIRST, ACC)

    bias = tl.load(Bias + t_idx * bias_s, mask=t_ok, other=0.0).to(ACC)
    z = (z + bias[None, :]) / tl.full((), tau, ACC)
    z = tl.where(t_ok[None, :], z, -float("inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    s = e / tl.sum(e, axis=1)[:, None]
    tl.store(S + rows[:, None] * T + t_idx[None, :], s.to(S.dtype.element_ty), mask=row_ok[:, None] & t_ok[None, :])

    out_rows = rows * d
    if ONE_TILE:
        tl.store(Out + out_rows[:, None] + cols[None, :], _mix(tiles, s, t_idx, T).to(Out.dtype.element_ty), mask=mask)
    else:
        for k0 in range(0, d, BLOCK_D):
            cols_k, _, mask = _feature_tile(k0, cols, d, row_ok)
            tiles = _load_tiles(XS, row_offs, X_SD, cols_k, mask, T, ACC)
            out = _mix(tiles, s, t_idx, T)
            tl.store(Out + out_rows[:, None] + cols_k[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_mix_bwd_kernel(
    DOut, do_sb, do_sl, do_sd,
    DS, ds_sb, ds_sl, ds_st,
    XS, X_SB, X_SL, X_SD,
    W, w_s0, w_s1,
    S, Out,
    DXS, DW_partial, DB_partial,
    n_rows, L, d, n_blocks,
    tau: tl.float64,
    T: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """Backward softmax mix: stage gradients, and per-program partial sums of the weight and bias gradients.

    ``dpre = dout * (out > 0)``, ``dX_t = dpre * s_t + sum_j dz_j W[j, t]``, where
    ``dz = s * (g - sum_t s_t g_t) / tau`` with ``g_t = sum_k dpre * X_t + ds_t``; ``dW[j, t] = sum_rows dz_j X_t``,
    ``db = sum_rows dz``.

    Args:
        DOut: ``(B, L, d)`` output gradient with strides ``do_sb, do_sl, do_sd`` (may be 0: expanded zeros).
        DS: ``(B, L, T)`` gradient of the softmax weights with strides ``ds_sb, ds_sl, ds_st``.
        XS, X_SB, X_SL, X_SD, W, w_s0, w_s1: as in the forward kernel.
        S, Out: the forward's contiguous ``(B * L, T)`` and ``(B * L, d)`` results.
        DXS: tuple of ``T`` pointers to the contiguous ``(B * L, d)`` stage gradients.
        DW_partial: zeroed contiguous ``(grid, T, (T - FIRST) * d)`` in ``ACC``: row ``p`` belongs to program ``p``.
        DB_partial: contiguous ``(grid, T)`` in ``ACC``.
        n_rows, L, d, tau, T, FIRST, ACC, BLOCK_R, BLOCK_D, BLOCK_T, ONE_TILE: as in the forward kernel.
        n_blocks: ``cdiv(n_rows, BLOCK_R)``.
    Grid:
        ``(min(n_blocks, programs),)``: program ``p`` handles row blocks ``p, p + grid, ...`` (a grid-stride loop, so
        the partials buffer stays small whatever ``B * L``), accumulating its weight-gradient partials in registers
        when ``ONE_TILE``, else in its own row of ``DW_partial``.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    t_idx = tl.arange(0, BLOCK_T)
    t_ok = t_idx < T
    inv_tau = 1.0 / tl.full((), tau, ACC)
    n_wcols = (T - FIRST) * d
    dw_row = DW_partial + pid.to(tl.int64) * T * n_wcols
    dw = _zeros_tuple(T * (T - FIRST), BLOCK_D, ACC)
    db = tl.zeros([BLOCK_T], ACC)

    for block in range(pid, n_blocks, n_programs):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        b, l_ = _split_rows(rows, L)
        row_offs = _row_offsets(b, l_, X_SB, X_SL, T)
        do_rows = b * do_sb + l_ * do_sl
        rows = rows.to(tl.int64)
        out_rows = rows * d
        rt_mask = row_ok[:, None] & t_ok[None, :]
        # Padded rows and stages load s = 0, hence dz = 0: they add nothing to the partial sums.
        s = tl.load(S + rows[:, None] * T + t_idx[None, :], mask=rt_mask, other=0.0).to(ACC)
        # s was saved in the inputs' dtype: in bf16/fp16 its rows no longer sum to 1, and the softmax backward below
        # then leaks |m| * (1 - sum s) / tau into every logit gradient (the bias gradient, a sum over all rows, was
        # 10x the reference's error in bf16). Renormalising restores sum s = 1 (a rounding-level change in fp32).
        s_sum = tl.sum(s, axis=1)
        s = s / tl.where(s_sum == 0.0, 1.0, s_sum)[:, None]  # padded rows sum to 0: leave them 0
        ds_ptrs = DS + (b * ds_sb + l_ * ds_sl)[:, None] + t_idx[None, :] * ds_st
        ds = tl.load(ds_ptrs, mask=rt_mask, other=0.0).to(ACC)

        if ONE_TILE:
            _, col_ok, mask = _feature_tile(0, cols, d, row_ok)
            tiles = _load_tiles(XS, row_offs, X_SD, cols, mask, T, ACC)
            dpre = _relu_grad(DOut, do_rows, do_sd, Out, out_rows, cols, mask, ACC)
            g = _stage_dots(dpre, tiles, t_idx, T, BLOCK_R, BLOCK_T, ACC) + ds
        else:
            g = ds
            for k0 in range(0, d, BLOCK_D):
                cols_k, _, mask = _feature_tile(k0, cols, d, row_ok)
                tiles = _load_tiles(XS, row_offs, X_SD, cols_k, mask, T, ACC)
                dpre = _relu_grad(DOut, do_rows, do_sd, Out, out_rows, cols_k, mask, ACC)
                g += _stage_dots(dpre, tiles, t_idx, T, BLOCK_R, BLOCK_T, ACC)
        dz = s * (g - tl.sum(s * g, axis=1)[:, None]) * inv_tau
        db += tl.sum(dz, axis=0)

        if ONE_TILE:
            dw = _tile_backward(tiles, dpre, s, dz, t_idx, dw, DXS, out_rows, mask, W, w_s0, w_s1, d, cols, col_ok, T,
                                FIRST, ACC)
        else:
            for k0 in range(0, d, BLOCK_D):
                cols_k, col_ok, mask = _feature_tile(k0, cols, d, row_ok)
                tiles = _load_tiles(XS, row_offs, X_SD, cols_k, mask, T, ACC)
                dpre = _relu_grad(DOut, do_rows, do_sd, Out, out_rows, cols_k, mask, ACC)
                # This program's private row of the partials: no other program touches it, so no atomics.
                dw_tile = _load_partials(dw_row, n_wcols, d, cols_k, col_ok, T, FIRST)
                dw_tile = _tile_backward(tiles, dpre, s, dz, t_idx, dw_tile, DXS, out_rows, mask, W, w_s0, w_s1, d,
                                         cols_k, col_ok, T, FIRST, ACC)
                _store_partials(dw_row, dw_tile, n_wcols, d, cols_k, col_ok, T, FIRST)

    if ONE_TILE:
        _store_partials(dw_row, dw, n_wcols, d, cols, cols < d, T, FIRST)
    tl.store(DB_partial + pid * T + t_idx, db, mask=t_ok)


@dataclass(frozen=True)
class LaunchConfig:
    block_r: int
    block_d: int
    block_t: int
    one_tile: bool
    num_warps: int


def launch_config(n_stages: int, first: int, d: int, n_rows: int, backward: bool, fp64: bool = False) -> LaunchConfig:
    """Block sizes for ``n_stages`` stages of ``d`` features: the widest feature tile up to :data:`MAX_BLOCK_D`, and
    as many rows as keep the live tiles (stages, ``out`` and ``dout`` in backward, plus the register-held weight
    gradient partials) within :data:`REGISTER_BUDGET`. Warps: 4 for the forward, 8 for the backward (gradients,
    weight rows and addresses on top of the tiles) and for fp64 (two registers a value). Compiled for sm_80/sm_90,
    every variant of tests/triton_aot.py has no local-memory spill; 7 of 160 keep 8-32 bytes on the
    stack (16 warps made it worse: ptxas then caps registers at 128)."""
    block_d = min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK_D)
    live_tiles = n_stages + (2 if backward else 1)
    held = n_stages * (n_stages - first) if backward else 0
    while block_d > 16 and (live_tiles + held) * block_d > REGISTER_BUDGET:
        block_d //= 2  # too many stages to hold a whole row: tile the features instead
    one_tile = d <= block_d
    rows_fit = max(1, (REGISTER_BUDGET - held * block_d) // (live_tiles * block_d))
    block_r = min(MAX_BLOCK_R, 1 << (rows_fit.bit_length() - 1), triton.next_power_of_2(max(n_rows, 1)))
    num_warps = 8 if backward or fp64 else 4
    return LaunchConfig(block_r, block_d, triton.next_power_of_2(n_stages), one_tile, num_warps)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stage_strides(stages: Sequence[torch.Tensor]):
    return tuple(tuple(x.stride(i) for x in stages) for i in range(3))


def _backward_programs(device: torch.device, n_blocks: int) -> int:
    """Programs of the backward grid-stride loop: enough to fill the GPU twice over, few under the interpreter (which
    runs programs one after another) so that tests exercise the loop."""
    if device.type == "cuda":
        return min(n_blocks, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_blocks, 4)


def _rows_reason(n_rows: int) -> Optional[str]:
    if n_rows >= 2**31 - MAX_BLOCK_R:
        return f"the triton gate kernels index rows in int32: B * L < 2**31, got {n_rows} rows"
    return None


def supports(inputs: Inputs) -> Optional[str]:
    """Dispatch's question (``OpImpl.supports``) for ``gate`` and ``stage_gate``."""
    return _rows_reason(inputs.sizes["B"] * inputs.sizes["L"])


def _check_rows(n_rows: int) -> None:
    # Dispatch never sends such a call; this guards direct callers of the launchers.
    reason = _rows_reason(n_rows)
    if reason is not None:
        raise ValueError(f"gate/stage_gate: {reason}")


def _launch_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the inputs' device (they may live on another GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def softmax_mix_forward(
    stages: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, tau: float, first: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. ``stages``: ``T`` tensors ``(B, L, d)`` of any strides. Returns contiguous
    ``out (B, L, d)`` and ``s (B, L, T)``."""
    x0 = stages[0]
    batch, length, d = x0.shape
    n_stages, n_rows = len(stages), batch * length
    _check_rows(n_rows)
    out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    s = torch.empty(batch, length, n_stages, dtype=x0.dtype, device=x0.device)
    cfg = launch_config(n_stages, first, d, n_rows, backward=False, fp64=x0.dtype == torch.float64)
    sb, sl, sd = _stage_strides(stages)
    with _launch_device(x0.device):
        _softmax_mix_fwd_kernel[(triton.cdiv(n_rows, cfg.block_r),)](
            tuple(stages), sb, sl, sd,
            weight, weight.stride(0), weight.stride(1),
            bias, bias.stride(0),
            out, s,
            n_rows, length, d, float(tau),
            T=n_stages, FIRST=first, ACC=_acc_dtype(x0.dtype),
            BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, BLOCK_T=cfg.block_t, ONE_TILE=cfg.one_tile,
            num_warps=cfg.num_warps,
        )
    return out, s


def softmax_mix_backward(
    dout: torch.Tensor,
    ds: torch.Tensor,
    stages: Sequence[torch.Tensor],
    weight: torch.Tensor,
    s: torch.Tensor,
    out: torch.Tensor,
    tau: float,
    first: int,
    stacked: bool,
) -> Tuple[object, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns ``(d_stages, d_weight, d_bias)``: ``d_stages`` is one contiguous
    ``(T, B, L, d)`` tensor when ``stacked``, else a list of ``T`` separate contiguous ``(B, L, d)`` tensors (a custom
    op's outputs may not alias one another)."""
    x0 = stages[0]
    batch, length, d = x0.shape
    n_stages, n_rows = len(stages), batch * length
    _check_rows(n_rows)
    acc_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    cfg = launch_config(n_stages, first, d, n_rows, backward=True, fp64=x0.dtype == torch.float64)
    n_blocks = triton.cdiv(n_rows, cfg.block_r)
    n_programs = _backward_programs(x0.device, n_blocks)
    if stacked:
        d_stages = torch.empty(n_stages, batch, length, d, dtype=x0.dtype, device=x0.device)
        grads = tuple(d_stages.unbind(0))
    else:
        d_stages = [torch.empty(x0.shape, dtype=x0.dtype, device=x0.device) for _ in range(n_stages)]
        grads = tuple(d_stages)
    # Zeroed: the multi-tile path accumulates into it (read-modify-write of the program's own row).
    dw_partial = torch.zeros(n_programs, n_stages, (n_stages - first) * d, dtype=acc_dtype, device=x0.device)
    db_partial = torch.empty(n_programs, n_stages, dtype=acc_dtype, device=x0.device)
    sb, sl, sd = _stage_strides(stages)
    with _launch_device(x0.device):
        _softmax_mix_bwd_kernel[(n_programs,)](
            dout, *dout.stride(),
            ds, *ds.stride(),
            tuple(stages), sb, sl, sd,
            weight, weight.stride(0), weight.stride(1),
            s.contiguous(), out.contiguous(),
            grads, dw_partial, db_partial,
            n_rows, length, d, n_blocks, float(tau),
            T=n_stages, FIRST=first, ACC=_acc_dtype(x0.dtype),
            BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, BLOCK_T=cfg.block_t, ONE_TILE=cfg.one_tile,
            num_warps=cfg.num_warps,
        )
    # A fixed-order reduction over the programs' partials: deterministic, unlike atomics.
    d_weight = dw_partial.sum(0).to(weight.dtype)
    d_bias = db_partial.sum(0).to(weight.dtype)
    return d_stages, d_weight, d_bias
