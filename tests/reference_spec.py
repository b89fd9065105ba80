"""An independent fp64 implementation of SPEC sections 1-3 (docs/spec.md), written from the specification alone.

The library's reference (``avkernels/reference``) and modules are what the tests check; this file is what they are
checked against. It follows the SPEC's equations literally, in the SPEC's orientation (rows are time steps, ``x @ W``
with ``W`` of shape ``(in, out)``), with explicit loops over samples and time steps wherever that makes the
math obvious, and it shares no code with the library. Everything runs in float64; tensors keep autograd so that
tests can differentiate through it.

Parameters are plain dicts of tensors in the SPEC's orientation; the tests map a module's ``nn.Linear`` weights to
them (``W = linear.weight.T``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

F64 = torch.float64


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, written out (max-shifted for stability)."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# SPEC 1: tanh attention
# ----------------------------------------------------------------------------------------------------------------


def _map(x: torch.Tensor, map: str) -> torch.Tensor:
    """SPEC 1's map functions, from their definitions: tanh, and the logistic sigmoid 1 / (1 + e^-x)."""
    return torch.tanh(x) if map == "tanh" else 1.0 / (1.0 + torch.exp(-x))


def _map_derivative(y: torch.Tensor, map: str) -> torch.Tensor:
    """d map(x) / dx at the x with map(x) = y: 1 - tanh^2, and sigmoid (1 - sigmoid)."""
    return 1.0 - y * y if map == "tanh" else y * (1.0 - y)


def tanh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    keep: Optional[torch.Tensor] = None,
    p: float = 0.0,
    activation: Optional[str] = None,
    map: str = "tanh",
    map_bias: float = 0.0,
) -> torch.Tensor:
    """``o[b] = Drop(map(scale * q[b] @ k[b]^T + map_bias)) @ v[b]``, one sample at a time (``map_bias`` 0 for tanh).

    ``v`` is ``(B, N, E)``, ``(1, N, E)`` or ``(N, E)`` (the last two shared by every sample). ``keep`` is a boolean
    ``(B, Mq, N)`` keep-mask; kept entries are scaled by ``1/(1-p)`` (inverted dropout). ``scale=None`` is
    ``1/sqrt(D)``.
    """
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    if v.dim() == 2:
        v = v.unsqueeze(0)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for b in range(q.shape[0]):
        c = _map(scale * (q[b] @ k[b].T) + map_bias, map)  # (Mq, N)
        if keep is not None:
            c = c * keep[b].to(F64) / (1.0 - p)
        o = c @ v[b if v.shape[0] > 1 else 0]  # (Mq, E)
        if activation == "tanh_relu":
            o = torch.clamp(torch.tanh(o), min=0.0)
        outs.append(o)
    if not outs:
        return torch.zeros(0, q.shape[1], v.shape[-1], dtype=F64)
    return torch.stack(outs)


def tanh_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    keep: Optional[torch.Tensor] = None,
    p: float = 0.0,
    map: str = "tanh",
    map_bias: float = 0.0,
):
    """The gradients of SPEC 1, written out (no autograd), for ``activation=None``:

    ``dZ = do v^T``, ``dS = dZ * keep/(1-p) * map'(S) * scale`` (``map' = 1 - tanh^2`` or ``sigmoid (1 -
    sigmoid)``), ``dq = dS k``, ``dk = dS^T q``, ``dv = Drop(map(S))^T do`` (summed over the batch when ``v`` is
    shared).
    """
    q, k, v, do = q.to(F64), k.to(F64), v.to(F64), do.to(F64)
    shared = v.dim() == 2 or v.shape[0] == 1
    v3 = v.unsqueeze(0) if v.dim() == 2 else v
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v3)
    for b in range(q.shape[0]):
        vb = v3[0 if shared else b]
        t = _map(scale * (q[b] @ k[b].T) + map_bias, map)
        drop = keep[b].to(F64) / (1.0 - p) if keep is not None else torch.ones_like(t)
        dz = do[b] @ vb.T
        ds = dz * drop * _map_derivative(t, map) * scale
        dq[b] = ds @ k[b]
        dk[b] = ds.T @ q[b]
        dv[0 if shared else b] += (t * drop).T @ do[b]
    return dq, dk, dv.reshape(v.shape)


# ----------------------------------------------------------------------------------------------------------------
# SPEC 3: gates
# ----------------------------------------------------------------------------------------------------------------


def gate(attended, unattended, W, b, tau):
    """``g = softmax((X~ W + b) / tau)`` per time step, ``out = ReLU(g0 * U + g1 * X~)``; index 0 = unattended.

    ``W`` is ``(d_m, 2)`` (SPEC orientation), ``b`` is ``(2,)``. Returns ``(out, g)``.
    """
    attended, unattended, W, b = (t.to(F64) for t in (attended, unattended, W, b))
    B, L, _ = attended.shape
    rows_out, rows_g = [], []
    for i in range(B):
        for t in range(L):
            gt = _softmax((attended[i, t] @ W + b) / tau)
            rows_g.append(gt)
            rows_out.append(torch.clamp(gt[0] * unattended[i, t] + gt[1] * attended[i, t], min=0.0))
    if not rows_out:
        return torch.zeros_like(attended), torch.zeros(B, L, 2, dtype=F64)
    return torch.stack(rows_out).reshape(attended.shape), torch.stack(rows_g).reshape(B, L, 2)


def stage_gate(stages: Sequence[torch.Tensor], W, b, tau):
    """``s = softmax((concat_t X^(t) W + b) / tau)`` per time step, ``out = ReLU(sum_t s_t X^(t))``.

    ``W`` is ``(T * d_m, T)``, ``b`` is ``(T,)``. Returns ``(out, s)``.
    """
    stages = [x.to(F64) for x in stages]
    W, b = W.to(F64), b.to(F64)
    T = len(stages)
    B, L, d = stages[0].shape
    rows_out, rows_s = [], []
    for i in range(B):
        for t in range(L):
            cat = torch.cat([x[i, t] for x in stages])
            st = _softmax((cat @ W + b) / tau)
            acc = torch.zeros(d, dtype=F64)
            for j in range(T):
                acc = acc + st[j] * stages[j][i, t]
            rows_s.append(st)
            rows_out.append(torch.clamp(acc, min=0.0))
    if not rows_out:
        return torch.zeros(B, L, d, dtype=F64), torch.zeros(B, L, T, dtype=F64)
    return torch.stack(rows_out).reshape(B, L, d), torch.stack(rows_s).reshape(B, L, T)


# ----------------------------------------------------------------------------------------------------------------
# SPEC 2: one joint cross-attention block (no dropout: the tests compare in eval mode)
# ----------------------------------------------------------------------------------------------------------------


def dense_block(X: Sequence[torch.Tensor], P: Dict[str, object]) -> List[torch.Tensor]:
    """SPEC 2.1, per sample. ``P``: ``Wq (d, d)``, ``bq (d,)``, and per modality lists ``Wk (L, L)``, ``bk (L,)``,
    ``Wv (d_m, d_m)``, ``bv (d_m,)``, ``Wh (d, d_m)``, ``bh (d_m,)``."""
    X = [x.to(F64) for x in X]
    d = sum(x.shape[-1] for x in X)
    out = [[] for _ in X]
    for i in range(X[0].shape[0]):
        J = torch.cat([x[i] for x in X], dim=-1)  # (L, d)
        Q = J @ P["Wq"] + P["bq"]  # (L, d)
        for m, x in enumerate(X):
            Xm = x[i]  # (L, d_m)
            K = Xm.T @ P["Wk"][m] + P["bk"][m]  # (d_m, L)
            V = Xm @ P["Wv"][m] + P["bv"][m]  # (L, d_m)
            C = torch.tanh(K @ Q / math.sqrt(d))  # (d_m, d)
            H = torch.clamp(torch.tanh(V @ C), min=0.0)  # (L, d)
            out[m].append(Xm + torch.clamp(H @ P["Wh"][m] + P["bh"][m], min=0.0))
    return [torch.stack(o) if o else x.clone() for o, x in zip(out, X)]


def additive_block(X: Sequence[torch.Tensor], P: Dict[str, object]) -> List[torch.Tensor]:
    """SPEC 2.2, per sample. ``P`` per modality lists: ``Wj (L, L)``, ``Wc (d, k)``, ``Wa (L, k)``, ``Wh (k, L)``."""
    X = [x.to(F64) for x in X]
    d = sum(x.shape[-1] for x in X)
    out = [[] for _ in X]
    for i in range(X[0].shape[0]):
        J = torch.cat([x[i] for x in X], dim=-1)  # (L, d)
        for m, x in enumerate(X):
            Xm = x[i]
            K = Xm.T @ P["Wj"][m]  # (d_m, L)
            C = torch.tanh(K @ J / math.sqrt(d))  # (d_m, d)
            H = torch.clamp(C @ P["Wc"][m] + Xm.T @ P["Wa"][m], min=0.0)  # (d_m, k)
            out[m].append(Xm + (H @ P["Wh"][m]).T)  # (L, d_m)
    return [torch.stack(o) if o else x.clone() for o, x in zip(out, X)]


# ----------------------------------------------------------------------------------------------------------------
# SPEC 3: the four fusion models
# ----------------------------------------------------------------------------------------------------------------


def fusion(
    X0: Sequence[torch.Tensor],
    blocks: Sequence[Dict[str, object]],
    form: str,
    *,
    model: str,
    iteration_gates: Optional[Sequence[Sequence[tuple]]] = None,
    final_gates: Optional[Sequence[tuple]] = None,
    stage_gates: Optional[Sequence[tuple]] = None,
    tau: float = 0.1,
    tau_s: float = 0.1,
    gate_unattended: str = "previous",
    stage_include_input: bool = False,
):
    """JCA / RJCA / DCA / GRJCA (SPEC 3). ``blocks[t]`` are the parameters of iteration ``t`` (the same dict repeated
    when weights are shared); gates are ``(W, b)`` pairs per modality (per iteration for ``iteration_gates``).

    Returns ``(outputs, gates)`` with ``gates`` a dict: ``{}`` for JCA/RJCA, ``{"final": [g_m]}`` for DCA,
    ``{"iterations": [[g_m] per t], "stage": [s_m]}`` for GRJCA (candidate 0 is ``X^(0)`` when it is included).
    """
    block = dense_block if form == "dense" else additive_block
    X0 = [x.to(F64) for x in X0]
    M = len(X0)
    X = list(X0)
    history = [X0] if stage_include_input else []
    it_g = []
    for t, P in enumerate(blocks):
        Xt = block(X, P)  # X~^(t), every modality from the same X^(t-1)
        if model == "GRJCA":
            U = X if gate_unattended == "previous" else X0
            pairs = [gate(Xt[m], U[m], *iteration_gates[t][m], tau) for m in range(M)]
            Xt = [o for o, _ in pairs]
            it_g.append([g for _, g in pairs])
            history.append(Xt)
        X = Xt
    if model == "DCA":
        pairs = [gate(X[m], X0[m], *final_gates[m], tau) for m in range(M)]
        return [o for o, _ in pairs], {"final": [g for _, g in pairs]}
    if model == "GRJCA":
        pairs = [stage_gate([h[m] for h in history], *stage_gates[m], tau_s) for m in range(M)]
        return [o for o, _ in pairs], {"iterations": it_g, "stage": [s for _, s in pairs]}
    return X, {}
