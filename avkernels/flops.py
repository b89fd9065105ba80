"""Arithmetic and memory-traffic counts of the library's ops and fusion models, for rooflines and benchmarks.

Each count is a :class:`Cost` with four fields:

``flops``
    FLOPs of the matrix products (a multiply-add counts 2), exactly the work of the reference formulation: what
    ``torch.utils.flop_counter.FlopCounterMode`` reports when the reference backend runs the same call. Pointwise
    work (bias adds, ReLU, softmax over 2 or T entries, dropout, the gates' weighted sums) is left out: it is
    bounded by memory traffic, which ``bytes`` counts.
``recompute_flops``
    extra matrix-product FLOPs a fused backward spends recomputing what its forward did not store (the
    ``(Mq, N)`` map of ``tanh_attention``: ``2 * B * Mq * N * D``). The arithmetic floor uses ``flops`` only.
``transcendentals``
    tanh and exp evaluations, including those a fused backward recomputes.
``bytes``
    the minimal traffic to memory: every op reads its inputs once and writes its outputs once, the ``(Mq, N)`` map
    never touches memory, and pointwise ops are fused into a neighbouring op (so they cost nothing extra). The
    optimizer step of a training step is not counted.

Modes: ``"forward"`` (and ``"inference"``, the same work without dropout), ``"backward"`` (the gradients only) and
``"full"``/``"train"`` (forward plus backward). Backward counts assume every input needs its gradient (as inside a
model, where the inputs come from trainable encoders).

A roofline floor for a call follows: ``max(flops / matmul_rate, bytes / bandwidth, transcendentals / tanh_rate)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

MODES = ("forward", "inference", "backward", "full", "train")


@dataclass(frozen=True)
class Cost:
    """FLOPs, recomputed FLOPs, transcendental evaluations and bytes moved by one call (see the module docstring)."""

    flops: int = 0
    recompute_flops: int = 0
    transcendentals: int = 0
    bytes: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    def __mul__(self, times: int) -> "Cost":
        return Cost(*(getattr(self, f.name) * times for f in fields(Cost)))

    __rmul__ = __mul__

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(Cost)}


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def _by_mode(mode: str, forward: Cost, backward: Cost) -> Cost:
    mode = _check_mode(mode)
    if mode in ("forward", "inference"):
        return forward
    if mode == "backward":
        return backward
    return forward + backward


def linear_cost(rows: int, in_features: int, out_features: int, *, bias: bool = True, mode: str = "forward",
                itemsize: int = 4) -> Cost:
    """``y = x @ W^T + b`` over ``rows`` rows; backward computes ``dx``, ``dW`` (and ``db``)."""
    n_bias = out_features if bias else 0
    gemm = 2 * rows * in_features * out_features
    forward = Cost(flops=gemm, bytes=itemsize * (rows * in_features + in_features * out_features + n_bias
                                                 + rows * out_features))
    backward = Cost(flops=2 * gemm, bytes=itemsize * (rows * out_features + 2 * rows * in_features
                                                      + 2 * in_features * out_features + n_bias))
    return _by_mode(mode, forward, backward)


def tanh_attention_cost(batch: int, mq: int, n: int, d: int, e: int, *, shared_v: bool = False,
                        activation: Optional[str] = None, mode: str = "forward", itemsize: int = 4) -> Cost:
    """``o = Drop(tanh(scale * q @ k^T)) @ v`` with ``q (B, Mq, D)``, ``k (B, N, D)``, ``v (B or 1, N, E)``.

    Forward: ``2*B*Mq*N*D + 2*B*Mq*N*E`` FLOPs, ``B*Mq*N`` tanh (plus ``B*Mq*E`` for the ``"tanh_relu"``
    epilogue). Backward: ``dZ = do v^T``, ``dv = P^T do``, ``dq = dS k``, ``dk = dS^T q`` (twice the forward FLOPs)
    plus the recomputation of ``S = q k^T`` and its tanh.
    """
    if activation not in (None, "tanh_relu"):
        raise ValueError(f"activation: expected None or 'tanh_relu', got {activation!r}")
    bv = 1 if shared_v else batch
    sizes_q, sizes_k, sizes_v, sizes_o = batch * mq * d, batch * n * d, bv * n * e, batch * mq * e
    map_elements = batch * mq * n
    forward = Cost(
        flops=2 * map_elements * (d + e),
        transcendentals=map_elements + (sizes_o if activation else 0),
        bytes=itemsize * (sizes_q + sizes_k + sizes_v + sizes_o),
    )
    backward = Cost(
        flops=4 * map_elements * (d + e),
        recompute_flops=2 * map_elements * d,
        transcendentals=map_elements,
        # reads do (and o for the epilogue's derivative), q, k, v; writes dq, dk, dv
        bytes=itemsize * (sizes_o * (2 if activation else 1) + 2 * (sizes_q + sizes_k + sizes_v)),
    )
    return _by_mode(mode, forward, backward)


def gate_cost(batch: int, seq_len: int, dim: int, *, mode: str = "forward", itemsize: int = 4) -> Cost:
    """DCA/GRJCA gate on ``(B, L, d)`` features: logits ``attended @ W^T`` (``W (2, d)``), a 2-way softmax (2 exp)."""
    rows = batch * seq_len
    features = rows * dim
    forward = Cost(flops=4 * features, transcendentals=2 * rows,
                   bytes=itemsize * (3 * features + 2 * dim + 2 + 2 * rows))
    # reads dout, dg, attended, unattended, weight, g (out's sign is known from g and the inputs);
    # writes d_attended, d_unattended, d_weight, d_bias
    backward = Cost(flops=8 * features,
                    bytes=itemsize * (5 * features + 4 * rows + 4 * dim + 2))
    return _by_mode(mode, forward, backward)


def stage_gate_cost(batch: int, seq_len: int, dim: int, stages: int, *, mode: str = "forward",
                    itemsize: int = 4) -> Cost:
    """GRJCA stage gate over ``T`` stages ``(B, L, d)``: logits ``concat @ W^T`` (``W (T, T*d)``), T-way softmax."""
    rows, t = batch * seq_len, stages
    features = rows * dim
    weight = t * t * dim + t
    forward = Cost(flops=2 * rows * t * dim * t, transcendentals=t * rows,
                   bytes=itemsize * (t * features + weight + features + t * rows))
    backward = Cost(flops=4 * rows * t * dim * t,
                    bytes=itemsize * (features + 2 * t * rows + t * features + weight + t * features + weight))
    return _by_mode(mode, forward, backward)


def _dense_block_cost(batch: int, seq_len: int, dims, mode: str, itemsize: int) -> Cost:
    joint = sum(dims)
    rows = batch * seq_len
    cost = linear_cost(rows, joint, joint, mode=mode, itemsize=itemsize)  # Q
    for dm in dims:
        cost = cost + linear_cost(batch * dm, seq_len, seq_len, mode=mode, itemsize=itemsize)  # K_m, time axis
        cost = cost + linear_cost(rows, dm, dm, mode=mode, itemsize=itemsize)  # V_m
        cost = cost + tanh_attention_cost(batch, joint, dm, seq_len, seq_len, activation="tanh_relu", mode=mode,
                                          itemsize=itemsize)
        cost = cost + linear_cost(rows, joint, dm, mode=mode, itemsize=itemsize)  # H_m W_hm
    return cost


def _additive_block_cost(batch: int, seq_len: int, dims, hidden: int, mode: str, itemsize: int) -> Cost:
    joint = sum(dims)
    cost = Cost()
    for dm in dims:
        rows = batch * dm
        cost = cost + linear_cost(rows, seq_len, seq_len, bias=False, mode=mode, itemsize=itemsize)  # K_m
        cost = cost + tanh_attention_cost(batch, dm, joint, seq_len, hidden, shared_v=True, mode=mode,
                                          itemsize=itemsize)  # C_m W_cm
        cost = cost + linear_cost(rows, seq_len, hidden, bias=False, mode=mode, itemsize=itemsize)  # X_m^T W_am
        cost = cost + linear_cost(rows, hidden, seq_len, bias=False, mode=mode, itemsize=itemsize)  # H_m W_hm
    return cost


def fusion_cost(model, batch: int, *, mode: str = "forward", itemsize: int = 4) -> Cost:
    """Cost of one call of a fusion module (:class:`avkernels.JCA` / ``RJCA`` / ``DCA`` / ``GRJCA``, any options).

    Args:
        model: a :class:`avkernels.nn.RecursiveJointCrossAttention` (only its configuration is read).
        batch: ``B``.
        mode: ``"forward"``, ``"inference"``, ``"backward"`` or ``"train"`` (forward + backward).
        itemsize: bytes per element (4 for fp32).
    """
    _check_mode(mode)
    dims, seq_len = model.dims, model.seq_len
    if model.form == "dense":
        block = _dense_block_cost(batch, seq_len, dims, mode, itemsize)
    else:
        hidden = model.blocks[0].correlations[0].out_features
        block = _additive_block_cost(batch, seq_len, dims, hidden, mode, itemsize)
    cost = block * model.iterations
    gates = Cost()
    for dm in dims:
        gates = gates + gate_cost(batch, seq_len, dm, mode=mode, itemsize=itemsize)
    if model.gating == "final":
        cost = cost + gates
    elif model.gating == "recursive":
        cost = cost + gates * model.iterations
        n_stages = model.iterations + int(model.stage_include_input)
        for dm in dims:
            cost = cost + stage_gate_cost(batch, seq_len, dm, n_stages, mode=mode, itemsize=itemsize)
    return cost


def lstm_cost(batch: int, seq_len: int, input_size: int, hidden_size: int, *, num_layers: int = 1,
              bidirectional: bool = False, mode: str = "forward", itemsize: int = 4) -> Cost:
    """An ``nn.LSTM`` over ``(B, L, input_size)``: per step, direction and layer, the gates ``x W_ih^T + h W_hh^T``
    (``2 * 4H * (in + H)`` FLOPs per sample) and ``5H`` transcendentals (three sigmoids, two tanh). Layers after the
    first read ``H`` (or ``2H`` when bidirectional) features. Bytes: each layer's input and output sequences and
    weights, once."""
    directions = 2 if bidirectional else 1
    cost = Cost()
    layer_in = input_size
    for _ in range(num_layers):
        weights = directions * 4 * hidden_size * (layer_in + hidden_size + 2)
        per_step = Cost(flops=2 * 4 * hidden_size * (layer_in + hidden_size), transcendentals=5 * hidden_size)
        sequences = batch * seq_len * (layer_in + directions * hidden_size)
        forward = per_step * (batch * seq_len * directions) + Cost(bytes=itemsize * (sequences + weights))
        backward = Cost(flops=2 * forward.flops, bytes=itemsize * 2 * (sequences + weights))
        cost = cost + _by_mode(mode, forward, backward)
        layer_in = directions * hidden_size
    return cost
