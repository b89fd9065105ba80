"""Triton kernels for ``tanh_attention`` (SPEC 1): ``o = Drop_p(map(scale * q @ k^T + bias)) @ v``.

The map is a compile-time parameter of the three kernels (``MAP``, ``"tanh"`` or ``"sigmoid"``): its value and its
derivative are :mod:`avkernels.ops.triton.attention_map`, the only code that differs between maps.

Flash-style: the ``(Mq, N)`` map lives only in registers, one ``(BLOCK_M, BLOCK_N)`` tile at a time, in forward and
backward alike (backward recomputes it). Three kernels:

* ``_tanh_attention_fwd_kernel``: one program per (Mq block, E chunk, batch), looping over N.
* ``_tanh_attention_bwd_dq_kernel``: one program per (Mq block, D chunk, batch), looping over N.
* ``_tanh_attention_bwd_dkdv_kernel``: one program per (N block, D/E chunk, batch), looping over Mq.

Every output element is written by exactly one program and summed in a fixed order, with no atomics, so results are
bitwise reproducible run to run and ``torch.use_deterministic_algorithms(True)`` needs nothing extra. When ``v`` is
shared over the batch (``Bv == 1``), the dk/dv kernel writes one ``dv`` partial per batch element into a
``(B, N, E)`` buffer that the host sums over the batch: a deterministic reduction that keeps ``B`` times more
programs busy than looping over the batch inside one program would (the official N = 512 makes only 4 to 8 N blocks).

Dropout draws ``keep = uniform >= p`` from Triton's Philox generator, one ``tl.randint4x`` call per four keys
(:mod:`avkernels.ops.triton.dropout`, the stream of csrc/common/philox.h that the cpp and cuda backends draw too), so backward
redraws the identical mask without storing it; ``return_mask=True`` also writes the keep-mask (debug only).

Numerics: tiles are cast to the accumulator type right after load (fp32, or fp64 for fp64 inputs: gradcheck runs
through the interpreter; fp64 is refused on CUDA). The dot products on GPU follow torch's matmul precision setting
for fp32 inputs: ``"tf32x3"`` (three TF32 products, rounding like fp32) under ``torch.get_float32_matmulprecision()
== "highest"``, the default, else one TF32 product; fp16/bf16 inputs use TF32, which represents their values exactly
and rounds the tanh map to 10 bits, finer than the reference's own rounding of the map to the input dtype. The
interpreter computes every dot in full fp32/fp64. ``tanh`` and ``sigmoid`` are computed from one ``exp`` each (no
libdevice, which the interpreter lacks), with an absolute error of a few ulps of 1.

Sizes: any ``D``, ``E``, ``Mq``, ``N`` (tails are masked; when ``max(D, E)`` exceeds 64, or 32 with TF32x3, ``D`` and
``E`` are processed in chunks of 32), up to
2**31 - 1 elements per batch element of each tensor and of the map (offsets within a batch element are int32, the
batch offset and the dropout counter int64).
Block sizes are picked by the launcher per size class of ``max(D, E)`` (no autotuning, so the interpreter runs the
same configurations as the GPU); tests/triton_aot.py lists every kernel variant the launchers can produce, and
``tests/test_triton_compile.py`` compiles them for sm_80 and sm_90 and checks that none spills registers (a subset
by default, all with ``AVKERNELS_AOT_FULL=1``).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from avkernels.dispatch import Inputs, OpImpl, register_impl
from avkernels.ops.triton.attention_map import map_slope, map_value, tanh
from avkernels.ops.triton.dropout import keep_mask
from avkernels.ops.triton.tanh_attention_launch import configs, dot_precision, dq_config


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols, ACC: tl.constexpr):
    """The ``(len(rows), len(cols))`` tile ``ptr[rows, cols]``, zero outside ``[0, n_rows) x [0, n_cols)``.

    ``ptr`` already points at the batch element (that offset is int64); offsets within it are int32, which the
    launcher guarantees cannot overflow, because 64-bit offset tiles cost registers the map tiles need. Cast to
    ``ACC`` at once: the interpreter computes garbage on raw bf16, and the math is done in ``ACC`` anyway.
    """
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def _load_grad_out(DO, O, rows, cols, stride_do_row, stride_do_col, stride_o_row, stride_o_col, n_rows, n_cols,
                   tanh_relu, ACC: tl.constexpr):
    """The gradient with respect to the pre-activation output: ``do``, or ``do * (1 - o^2) * (o > 0)`` when the
    ``ReLU(tanh(.))`` epilogue ran (``o`` is the saved output; ``o > 0`` exactly where its pre-activation was). As
    torch's ReLU backward: a select where ``o <= 0`` (a NaN ``do`` there gives 0), and ``o = NaN`` passes ``do`` on."""
    do = _load_tile(DO, rows, cols, stride_do_row, stride_do_col, n_rows, n_cols, ACC)
    # Selects, not an `if tanh_relu:` branch: a tile defined by a runtime branch and then fed to a TF32x3 dot broke
    # triton 3.6's layout pass on sm_80 ("operand does not dominate this use"). Without the epilogue the load of o is
    # masked off entirely (no memory traffic) and o = 0 leaves do unchanged. The flag enters the mask through the row
    # bound, not as `& (tanh_relu != 0)`: triton 3.9's interpreter rejects the mask that and-ing a scalar bool gives.
    o = _load_tile(O, rows, cols, stride_o_row, stride_o_col, n_rows * tanh_relu, n_cols, ACC)
    return tl.where(tanh_relu == 0, do, tl.where(o <= 0, 0.0, do * (1.0 - o * o)))


@triton.jit
def _dot_nt_chunked(A, a_rows, stride_a_row, stride_a_k, n_a, B, b_rows, stride_b_row, stride_b_k, n_b, K,
                    ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """``A[a_rows, :] @ B[b_rows, :]^T`` as a (BLOCK_A, BLOCK_B) tile, streaming both operands over ``K`` in chunks of
    ``BLOCK_K`` (the wide-head path: a tile of the whole head would not fit in registers)."""
    out = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _load_tile(A, a_rows, ks, stride_a_row, stride_a_k, n_a, K, ACC)
        # B is read already transposed (its strides swapped) rather than transposed in registers.
        b_t = _load_tile(B, ks, b_rows, stride_b_k, stride_b_row, K, n_b, ACC)
        # out_dtype is spelled out on every accumulating dot: triton 3.6 does not take it from the accumulator and
        # asserts that an fp64 one matches its fp32 default.
        out = tl.dot(a, b_t, out, input_precision=PRECISION, out_dtype=ACC)
    return out


@triton.jit
def _dot_grad_out_v_chunked(DO, O, do_rows, stride_do_row, stride_do_e, stride_o_row, stride_o_e, n_do,
                            V, v_rows, stride_v_row, stride_v_e, n_v, E, tanh_relu,
                            ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_DO: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, V_FIRST: tl.constexpr):
    """``dP = do_pre @ v^T`` as a (BLOCK_DO, BLOCK_V) tile, or its transpose ``v @ do_pre^T`` when ``V_FIRST``,
    streaming over ``E`` in chunks of ``BLOCK_E`` like :func:`_dot_nt_chunked`."""
    if V_FIRST:
        out = tl.zeros((BLOCK_V, BLOCK_DO), dtype=ACC)
    else:
        out = tl.zeros((BLOCK_DO, BLOCK_V), dtype=ACC)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        if V_FIRST:
            v = _load_tile(V, v_rows, es, stride_v_row, stride_v_e, n_v, E, ACC)
            do_t = _load_grad_out(DO, O, es, do_rows, stride_do_e, stride_do_row, stride_o_e, stride_o_row, E, n_do,
                                  tanh_relu, ACC)
            out = tl.dot(v, do_t, out, input_precision=PRECISION, out_dtype=ACC)
        else:
            do = _load_grad_out(DO, O, do_rows, es, stride_do_row, stride_do_e, stride_o_row, stride_o_e, n_do, E,
                                tanh_relu, ACC)
            v_t = _load_tile(V, es, v_rows, stride_v_e, stride_v_row, E, n_v, ACC)
            out = tl.dot(do, v_t, out, input_precision=PRECISION, out_dtype=ACC)
    return out


@triton.jit
def _fp32_pair(hi, lo, ACC: tl.constexpr):
    """``hi + lo`` in ``ACC``: scalars reach the kernel as fp32, and the pair restores fp64 precision when needed."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _split_program_id(n_fast, n_mid):
    """Program id -> (fastest index, middle index, batch) for a flattened grid of ``n_fast * n_mid * B`` programs
    (flattened so that no grid axis limit of 65535 applies to the batch)."""
    pid = tl.program_id(0)
    # The batch index is int64: it multiplies batch strides, which can exceed 2**31 / B.
    return pid % n_fast, (pid // n_fast) % n_mid, (pid // (n_fast * n_mid)).to(tl.int64)


@triton.jit(do_not_specialize=["tanh_relu"])
def _tanh_attention_fwd_kernel(
    Q, K, V, O, MASK,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_ve,
    stride_ob, stride_om, stride_oe,
    Mq, N, D, E,
    scale_hi, scale_lo, bias_hi, bias_lo, keep_scale_hi, keep_scale_lo, dropout_p, seed, tanh_relu,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr, RETURN_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HEAD_LOOPS: tl.constexpr, FAST_TANH: tl.constexpr, MAP: tl.constexpr,
):
    """Forward: ``o[b, rows, cols] = act(sum_n Drop(tanh(scale * q k^T))[rows, n] v[n, cols])``.

    Args:
        Q, K, V: ``(B, Mq, D)``, ``(B, N, D)``, ``(B or 1, N, E)`` inputs with arbitrary strides (``stride_vb`` is 0
            when ``v`` is shared over the batch).
        O: ``(B, Mq, E)`` output.
        MASK: ``(B, Mq, N)`` contiguous bool keep-mask, written only when ``RETURN_MASK`` (debug/tests).
        stride_*: element strides of each tensor, by axis.
        Mq, N, D, E: sizes.
        scale_hi, scale_lo: the map scale as an fp32 pair (``hi + lo`` carries fp64 precision for fp64 inputs;
            scalar arguments are fp32 on GPU). bias_hi, bias_lo: the sigmoid map's bias, likewise (unused by tanh).
        keep_scale_hi, keep_scale_lo: ``1 / (1 - dropout_p)`` as an fp32 pair.
        dropout_p, seed: dropout probability and Philox seed (used when ``DROPOUT``).
        tanh_relu: whether to apply the ``ReLU(tanh(.))`` epilogue (an int, 0 or 1: a runtime flag, one branch per
            program).
        ACC: compute dtype (fp32, or fp64 for fp64 inputs).
        PRECISION: ``tl.dot`` input precision ("ieee", "tf32" or "tf32x3").
        DROPOUT, RETURN_MASK: compile-time switches (the Philox code is large; leave it out when unused).
        BLOCK_M, BLOCK_N: map tile. BLOCK_D: covers D, or is the chunk of the D contraction when ``HEAD_LOOPS``.
            BLOCK_E: output columns per program.
        HEAD_LOOPS: D or E exceeds one block: stream the contraction over D in chunks, and split E over programs.
            Otherwise the q tile stays in registers for the whole loop.
        FAST_TANH: the hardware ``tanh.approx.f32`` for the map and the epilogue (see :func:`_fast_tanh`); the same
            in the backward kernels, which must recompute the forward's map.
        MAP: ``"tanh"`` or ``"sigmoid"`` (:mod:`avkernels.ops.triton.attention_map`).

    Grid: ``(cdiv(Mq, BLOCK_M) * cdiv(E, BLOCK_E) * B,)``; Mq blocks vary fastest so that programs running together
    share the same ``k`` and ``v`` in L2.
    """
    pid_m, pid_e, b = _split_program_id(tl.cdiv(Mq, BLOCK_M), tl.cdiv(E, BLOCK_E))
    scale = _fp32_pair(scale_hi, scale_lo, ACC)
    bias = _fp32_pair(bias_hi, bias_lo, ACC)
    keep_scale = _fp32_pair(keep_scale_hi, keep_scale_lo, ACC)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    if not HEAD_LOOPS:
        q = _load_tile(Qb, rows, cols_d, stride_qm, stride_qd, Mq, D, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        # Out-of-range rows/columns load zeros, and their v rows are 0; their map entries are cleared all the same,
        # because an infinite q makes them inf * 0 = NaN (and the sigmoid map is not 0 at 0).
        if HEAD_LOOPS:
            s = _dot_nt_chunked(Qb, rows, stride_qm, stride_qd, Mq, Kb, cols_n, stride_kn, stride_kd, N, D,
                                ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        else:
            k_t = _load_tile(Kb, cols_d, cols_n, stride_kd, stride_kn, D, N, ACC)
            s = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=ACC)
        c = tl.where(cols_n[None, :] < N, map_value(s, scale, bias, MAP, FAST_TANH), 0.0)
        if DROPOUT:
            keep = keep_mask(seed, b * Mq, rows[:, None], cols_n[None, :], N, dropout_p)
            c = c * tl.where(keep, keep_scale, 0.0)  # a product, as torch's dropout: a NaN dropped stays NaN
            if RETURN_MASK:
                if pid_e == 0:
                    in_map = (rows[:, None] < Mq) & (cols_n[None, :] < N)
                    tl.store(MASK + b * Mq * N + (rows[:, None] * N + cols_n[None, :]), keep, mask=in_map)
        v = _load_tile(Vb, cols_n, cols_e, stride_vn, stride_ve, N, E, ACC)
        acc = tl.dot(c, v, acc, input_precision=PRECISION, out_dtype=ACC)
    if tanh_relu:
        acc = tanh(acc, FAST_TANH)
        acc = tl.where(acc < 0, 0.0, acc)  # the ReLU keeps NaN, as torch.relu does (tl.maximum need not)
    out_mask = (rows[:, None] < Mq) & (cols_e[None, :] < E)
    out_offsets = rows[:, None] * stride_om + cols_e[None, :] * stride_oe
    tl.store(O + b * stride_ob + out_offsets, acc.to(O.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["tanh_relu"])
def _tanh_attention_bwd_dq_kernel(
    DO, O, Q, K, V, DQ,
    stride_dob, stride_dom, stride_doe,
    stride_ob, stride_om, stride_oe,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_ve,
    stride_dqb, stride_dqm, stride_dqd,
    Mq, N, D, E,
    scale_hi, scale_lo, bias_hi, bias_lo, keep_scale_hi, keep_scale_lo, dropout_p, seed, tanh_relu,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HEAD_LOOPS: tl.constexpr, FAST_TANH: tl.constexpr, MAP: tl.constexpr,
):
    """Backward for q: ``dq[b, rows, cols] = sum_n dS[rows, n] k[n, cols]`` with
    ``dS = (do_pre @ v^T) * keep / (1 - p) * map'(S) * scale``, the map recomputed tile by tile.

    Args:
        DO: ``(B, Mq, E)`` output gradient, any strides. O: the forward output (read only when ``tanh_relu``).
        Q, K, V: forward inputs (``stride_vb`` 0 when ``v`` is shared). DQ: ``(B, Mq, D)`` output.
        stride_*, Mq, N, D, E, scale_*, bias_*, keep_scale_*, dropout_p, seed, tanh_relu, ACC, PRECISION,
            DROPOUT, MAP: as in ``_tanh_attention_fwd_kernel``.
        BLOCK_M, BLOCK_N: map tile. BLOCK_D: dq columns per program (and the chunk of the S contraction).
            BLOCK_E: covers E, or is the chunk of the ``do @ v^T`` contraction when ``HEAD_LOOPS``.
        HEAD_LOOPS: stream the contractions over D and E in chunks and split D over programs; otherwise the q and
            do tiles stay in registers for the whole loop.

    Grid: ``(cdiv(Mq, BLOCK_M) * cdiv(D, BLOCK_D) * B,)``.
    """
    pid_m, pid_d, b = _split_program_id(tl.cdiv(Mq, BLOCK_M), tl.cdiv(D, BLOCK_D))
    scale = _fp32_pair(scale_hi, scale_lo, ACC)
    bias = _fp32_pair(bias_hi, bias_lo, ACC)
    keep_scale = _fp32_pair(keep_scale_hi, keep_scale_lo, ACC)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_e = tl.arange(0, BLOCK_E)
    DOb = DO + b * stride_dob
    Ob = O + b * stride_ob
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    if not HEAD_LOOPS:
        q = _load_tile(Qb, rows, cols_d, stride_qm, stride_qd, Mq, D, ACC)
        do = _load_grad_out(DOb, Ob, rows, cols_e, stride_dom, stride_doe, stride_om, stride_oe, Mq, E,
                            tanh_relu, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        if HEAD_LOOPS:
            s = _dot_nt_chunked(Qb, rows, stride_qm, stride_qd, Mq, Kb, cols_n, stride_kn, stride_kd, N, D,
                                ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            dp = _dot_grad_out_v_chunked(DOb, Ob, rows, stride_dom, stride_doe, stride_om, stride_oe, Mq,
                                         Vb, cols_n, stride_vn, stride_ve, N, E, tanh_relu,
                                         ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_E, False)
        else:
            k_t = _load_tile(Kb, cols_d, cols_n, stride_kd, stride_kn, D, N, ACC)
            v_t = _load_tile(Vb, cols_e, cols_n, stride_ve, stride_vn, E, N, ACC)
            s = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=ACC)
            dp = tl.dot(do, v_t, input_precision=PRECISION, out_dtype=ACC)
        c = map_value(s, scale, bias, MAP, FAST_TANH)
        ds = dp * map_slope(c, MAP) * scale
        if DROPOUT:
            keep = keep_mask(seed, b * Mq, rows[:, None], cols_n[None, :], N, dropout_p)
            ds = ds * tl.where(keep, keep_scale, 0.0)  # a product: a dropped NaN stays NaN
        ds = tl.where(cols_n[None, :] < N, ds, 0.0)  # past N: NaN when q or do is inf
        if HEAD_LOOPS:
            k = _load_tile(Kb, cols_n, cols_d, stride_kn, stride_kd, N, D, ACC)
        else:
            k = tl.trans(k_t)
        acc = tl.dot(ds, k, acc, input_precision=PRECISION, out_dtype=ACC)
    out_mask = (rows[:, None] < Mq) & (cols_d[None, :] < D)
    out_offsets = rows[:, None] * stride_dqm + cols_d[None, :] * stride_dqd
    tl.store(DQ + b * stride_dqb + out_offsets, acc.to(DQ.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["tanh_relu"])
def _tanh_attention_bwd_dkdv_kernel(
    DO, O, Q, K, V, DK, DV,
    stride_dob, stride_dom, stride_doe,
    stride_ob, stride_om, stride_oe,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_ve,
    stride_dkb, stride_dkn, stride_dkd,
    stride_dvb, stride_dvn, stride_dve,
    Mq, N, D, E,
    scale_hi, scale_lo, bias_hi, bias_lo, keep_scale_hi, keep_scale_lo, dropout_p, seed, tanh_relu,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HEAD_LOOPS: tl.constexpr, FAST_TANH: tl.constexpr, MAP: tl.constexpr,
):
    """Backward for k and v, on the transposed map (rows are N positions):
    ``dk[b, rows, :] = sum_m dS^T[rows, m] q[m, :]`` and ``dv[b, rows, :] = sum_m P^T[rows, m] do_pre[m, :]`` with
    ``P = Drop(map(S))``.

    Args:
        DO, O, Q, K, V: as in ``_tanh_attention_bwd_dq_kernel``.
        DK: ``(B, N, D)`` output. DV: ``(B, N, E)`` output in ``ACC``; per-batch partials when ``v`` is shared, summed
            over the batch by the host.
        stride_*, Mq, N, D, E, scale_*, bias_*, keep_scale_*, dropout_p, seed, tanh_relu, ACC, PRECISION,
            DROPOUT, MAP: as in ``_tanh_attention_fwd_kernel``.
        BLOCK_N: rows (N positions) per program. BLOCK_M: Mq positions per loop step. BLOCK_D, BLOCK_E: dk and dv
            columns per program, also the chunks of the contractions over D and E when ``HEAD_LOOPS``.
        HEAD_LOOPS: stream the contractions in chunks and split D and E over programs; otherwise the k and v tiles
            stay in registers for the whole loop.

    Grid: ``(cdiv(N, BLOCK_N) * max(cdiv(D, BLOCK_D), cdiv(E, BLOCK_E)) * B,)``; program ``(n, c, b)`` writes dk
    chunk ``c`` and dv chunk ``c`` of its rows, whichever exist.
    """
    n_chunks = tl.maximum(tl.cdiv(D, BLOCK_D), tl.cdiv(E, BLOCK_E))
    pid_n, chunk, b = _split_program_id(tl.cdiv(N, BLOCK_N), n_chunks)
    scale = _fp32_pair(scale_hi, scale_lo, ACC)
    bias = _fp32_pair(bias_hi, bias_lo, ACC)
    keep_scale = _fp32_pair(keep_scale_hi, keep_scale_lo, ACC)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
    DOb = DO + b * stride_dob
    Ob = O + b * stride_ob
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    if HEAD_LOOPS:
        has_dk = chunk * BLOCK_D < D
        has_dv = chunk * BLOCK_E < E
    else:  # one chunk holds all of D and E: compile-time true, no branch in the loop
        has_dk = True
        has_dv = True
        k = _load_tile(Kb, rows, cols_d, stride_kn, stride_kd, N, D, ACC)
        v = _load_tile(Vb, rows, cols_e, stride_vn, stride_ve, N, E, ACC)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_E), dtype=ACC)
    for m0 in range(0, Mq, BLOCK_M):
        cols_m = m0 + tl.arange(0, BLOCK_M)
        if HEAD_LOOPS:
            s_t = _dot_nt_chunked(Kb, rows, stride_kn, stride_kd, N, Qb, cols_m, stride_qm, stride_qd, Mq, D,
                                  ACC, PRECISION, BLOCK_N, BLOCK_M, BLOCK_D)
        else:
            q_t = _load_tile(Qb, cols_d, cols_m, stride_qd, stride_qm, D, Mq, ACC)
            do_t = _load_grad_out(DOb, Ob, cols_e, cols_m, stride_doe, stride_dom, stride_oe, stride_om, E, Mq,
                                  tanh_relu, ACC)
            s_t = tl.dot(k, q_t, input_precision=PRECISION, out_dtype=ACC)
        c_t = tl.where(cols_m[None, :] < Mq, map_value(s_t, scale, bias, MAP, FAST_TANH), 0.0)  # past Mq: k inf
        if DROPOUT:
            keep_t = keep_mask(seed, b * Mq, cols_m[None, :], rows[:, None], N, dropout_p)
        if has_dv:
            p_t = c_t
            if DROPOUT:
                p_t = c_t * tl.where(keep_t, keep_scale, 0.0)
            if HEAD_LOOPS:
                do = _load_grad_out(DOb, Ob, cols_m, cols_e, stride_dom, stride_doe, stride_om, stride_oe, Mq, E,
                                    tanh_relu, ACC)
            else:
                do = tl.trans(do_t)
            dv = tl.dot(p_t, do, dv, input_precision=PRECISION, out_dtype=ACC)
        if has_dk:
            if HEAD_LOOPS:
                dp_t = _dot_grad_out_v_chunked(DOb, Ob, cols_m, stride_dom, stride_doe, stride_om, stride_oe, Mq,
                                               Vb, rows, stride_vn, stride_ve, N, E, tanh_relu,
                                               ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_E, True)
                q = _load_tile(Qb, cols_m, cols_d, stride_qm, stride_qd, Mq, D, ACC)
            else:
                dp_t = tl.dot(v, do_t, input_precision=PRECISION, out_dtype=ACC)
                q = tl.trans(q_t)
            ds_t = tl.where(cols_m[None, :] < Mq, dp_t * map_slope(c_t, MAP) * scale, 0.0)
            if DROPOUT:
                ds_t = ds_t * tl.where(keep_t, keep_scale, 0.0)
            dk = tl.dot(ds_t, q, dk, input_precision=PRECISION, out_dtype=ACC)
    dk_mask = (rows[:, None] < N) & (cols_d[None, :] < D)
    dk_offsets = rows[:, None] * stride_dkn + cols_d[None, :] * stride_dkd
    tl.store(DK + b * stride_dkb + dk_offsets, dk.to(DK.dtype.element_ty), mask=dk_mask)
    dv_mask = (rows[:, None] < N) & (cols_e[None, :] < E)
    dv_offsets = rows[:, None] * stride_dvn + cols_e[None, :] * stride_dve
    tl.store(DV + b * stride_dvb + dv_offsets, dv.to(DV.dtype.element_ty), mask=dv_mask)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------

_INT32_LIMIT = 2**31


FAST_TANH_ENV_VAR = "AVKERNELS_TRITON_FAST_TANH"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _fast_tanh(dtype: torch.dtype) -> bool:
    """Whether the kernels use the GPU's ``tanh.approx.f32`` (relative error about 2**-11) instead of the exact
    ``tanh`` built from ``exp``: only when ``AVKERNELS_TRITON_FAST_TANH=1`` (default off), only for fp16/bf16 inputs,
    whose map the tensor cores read at 10 bits of mantissa (fp16) or less anyway and whose outputs round to 11 or
    8 bits, and never under the interpreter, which cannot run inline PTX. Read at each launch."""
    if os.environ.get(FAST_TANH_ENV_VAR, "0") != "1" or dtype not in _HALF_DTYPES:
        return False
    from avkernels.ops.triton import INTERPRET  # the package sets it before importing this module

    return not INTERPRET


def _meta(dtype: torch.dtype, d: int, e: int, map: str):
    """The launch config and the compile-time arguments shared by the three kernels."""
    precision = dot_precision(dtype)
    table = configs(precision)
    widest = max(head for head, loops in table if not loops)
    if max(d, e) > widest:
        head, loops = next(key for key in table if key[1])
    else:
        head, loops = max(16, triton.next_power_of_2(max(d, e))), False
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    meta = dict(ACC=acc, PRECISION=precision, BLOCK_D=head, BLOCK_E=head, HEAD_LOOPS=loops,
                FAST_TANH=_fast_tanh(dtype), MAP=map)
    return table[(head, loops)], meta


def _split(x: float) -> Tuple[float, float]:
    """``x`` as an fp32 pair ``(hi, lo)`` with ``hi + lo == x`` to ~48 bits (Triton passes float scalars as fp32)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _activation_flag(activation) -> int:
    """``tanh_relu`` as an int, not a bool: the interpreter of triton 3.6 cannot take bool arguments (it stores them
    as int32 in an int1 tensor and raises). Not specialised (``do_not_specialize``), so 0 and 1 share one binary, as
    the bool did."""
    return int(activation == "tanh_relu")


def _scalars(q, k, v, scale, map_bias, dropout_p, seed, activation) -> List:
    keep = _split(1.0 / (1.0 - dropout_p)) if dropout_p > 0 else (1.0, 0.0)
    return [q.shape[1], k.shape[1], q.shape[2], v.shape[2], *_split(scale), *_split(map_bias), *keep,
            float(dropout_p), int(seed), _activation_flag(activation)]


def _batch_strides(x: torch.Tensor, name: str) -> Tuple[torch.Tensor, List[int]]:
    """``x`` and its strides, with batch stride 0 for a tensor shared over the batch.

    The kernels index within one batch element in int32 (see ``_load_tile``); a view whose elements of one batch
    element lie 2**31 or more apart (a transposed slice of a huge tensor) is copied, which brings that span down to
    its own size.
    """
    span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:]))
    if span >= _INT32_LIMIT:
        x = x.contiguous()
        if x[0].numel() >= _INT32_LIMIT:
            raise ValueError(f"{name}: one batch element holds {x[0].numel()} elements; the triton backend "
                             f"supports up to 2**31 - 1 per batch element")
    strides = list(x.stride())
    if x.shape[0] == 1:
        strides[0] = 0
    return x, strides


def _size_reason(mq: int, n: int) -> Optional[str]:
    if mq * n >= _INT32_LIMIT:
        return f"the triton kernels index the map of one batch element in int32: Mq * N < 2**31, got Mq={mq}, N={n}"
    return None


def supports(inputs: Inputs) -> Optional[str]:
    """Dispatch's question (``OpImpl.supports``); the dtype and device are the backend's (``triton/__init__.py``)."""
    return _size_reason(inputs.sizes["Mq"], inputs.sizes["N"])


def _check_supported(q: torch.Tensor, n: int) -> None:
    # Dispatch never sends such a call; this guards direct callers of the launchers.
    reason = _size_reason(q.shape[1], n)
    if reason is not None:
        raise ValueError(f"tanh_attention: {reason}")


def forward(q, k, v, seed, scale, dropout_p, activation, return_mask, map, map_bias):
    """The ``tanh_attention`` forward contract (see :mod:`avkernels.ops.tanh_attention`)."""
    batch, mq, d = q.shape
    n, e = k.shape[1], v.shape[2]
    _check_supported(q, n)
    (q, q_strides), (k, k_strides), (v, v_strides) = (_batch_strides(q, "q"), _batch_strides(k, "k"),
                                                        _batch_strides(v, "v"))
    o = torch.empty(batch, mq, e, dtype=q.dtype, device=q.device)
    dropout = dropout_p > 0
    write_mask = return_mask and dropout
    mask = torch.empty(batch, mq, n if write_mask else 0, dtype=torch.bool, device=q.device)
    cfg, meta = _meta(q.dtype, d, e, map)
    grid = (triton.cdiv(mq, cfg.block_rows) * triton.cdiv(e, meta["BLOCK_E"]) * batch,)
    _tanh_attention_fwd_kernel[grid](
        q, k, v, o, mask, *q_strides, *k_strides, *v_strides, *o.stride(),
        *_scalars(q, k, v, scale, map_bias, dropout_p, seed, activation),
        DROPOUT=dropout, RETURN_MASK=write_mask, BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_loop,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )
    return o, (mask if write_mask else None)


def backward(do, q, k, v, o, seed, scale, dropout_p, activation, map, map_bias):
    """The ``tanh_attention`` backward contract (see :mod:`avkernels.ops.tanh_attention`)."""
    batch, mq, d = q.shape
    n, e = k.shape[1], v.shape[2]
    _check_supported(q, n)
    v_batch = v.shape[0]
    (q, q_strides), (k, k_strides), (v, v_strides) = (_batch_strides(q, "q"), _batch_strides(k, "k"),
                                                        _batch_strides(v, "v"))
    do, do_strides = _batch_strides(do, "grad_output")
    if activation != "tanh_relu":
        o = do  # never read; any tensor of the input dtype keeps the kernel signature fixed
    o, o_strides = _batch_strides(o, "o")
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    # dv in the compute dtype, one partial per batch element when v is shared (summed below, deterministically).
    dv_buf = torch.empty(batch, n, e, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                         device=q.device)
    cfg, meta = _meta(q.dtype, d, e, map)
    tensor_strides = [*do_strides, *o_strides, *q_strides, *k_strides, *v_strides]
    scalars = _scalars(q, k, v, scale, map_bias, dropout_p, seed, activation)
    dropout = dropout_p > 0
    dq_cfg = dq_config(cfg, dropout)
    grid_dq = (triton.cdiv(mq, dq_cfg.block_rows) * triton.cdiv(d, meta["BLOCK_D"]) * batch,)
    _tanh_attention_bwd_dq_kernel[grid_dq](
        do, o, q, k, v, dq, *tensor_strides, *dq.stride(), *scalars,
        DROPOUT=dropout, BLOCK_M=dq_cfg.block_rows, BLOCK_N=dq_cfg.block_loop,
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages, **meta,
    )
    n_chunks = max(triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(e, meta["BLOCK_E"]))
    grid_dkdv = (triton.cdiv(n, cfg.block_rows) * n_chunks * batch,)
    _tanh_attention_bwd_dkdv_kernel[grid_dkdv](
        do, o, q, k, v, dk, dv_buf, *tensor_strides, *dk.stride(), *dv_buf.stride(), *scalars,
        DROPOUT=dropout, BLOCK_M=cfg.block_loop, BLOCK_N=cfg.block_rows,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )
    dv = dv_buf.sum(0, keepdim=True) if v_batch == 1 and batch > 1 else dv_buf
    return dq, dk, dv.to(v.dtype)


register_impl("tanh_attention", "triton", OpImpl(forward, backward, supports=supports))
