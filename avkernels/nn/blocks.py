"""One iteration of joint cross-attention (SPEC 2), in its two forms.

Both correlate each modality's features with the joint features: the map is ``(d_m x d)`` per sample and the
contraction runs over time, so both are built for one sequence length ``L``. All modalities are updated from the same
inputs (a simultaneous update, as in the official code).

With ``lengths=`` every product over time sees zeros at the padded steps (SPEC 3.1): the block's inputs there, the
time steps of the contraction's two operands. Its outputs at padded steps are left as computed (from valid steps
only); the fusion zeroes them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from avkernels.dispatch import cast_for_autocast
from avkernels.nn.lengths import padding_mask, zero_padded
from avkernels.nn.linear import Linear
from avkernels.ops.tanh_attention import tanh_attention


def _time_padding(features: Sequence[torch.Tensor], lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    x = features[0]
    return padding_mask(lengths, x.shape[0], x.shape[1], x.device)


class DenseJointCrossAttention(nn.Module):
    """``form="dense"``: the official JCA/RJCA/DCA block (``DenseCoAttn`` + ``NormalSubLayer``), SPEC 2.1.

    ``C_m = Drop(tanh(K_m Q / sqrt(d)))``, ``H_m = ReLU(tanh(V_m C_m))``, ``X_m' = X_m + Drop(ReLU(H_m W_hm + b))``.
    ``V_m C_m`` is one fused ``tanh_attention(q=Q^T, k=K_m, v=V_m^T)`` with the ``"tanh_relu"`` epilogue, so a fused
    backend never writes the ``(d_m x d)`` map.

    Args:
        dims: feature size of each modality, in concatenation order (the official code puts video first).
        seq_len: ``L``, the length the time-axis key maps are built for.
        dropout: probability of the dropout on the map and in the residual MLP (0.6 in the official code).
        backend: backend of the fused ops (see :func:`avkernels.tanh_attention`).
    """

    def __init__(self, dims: Sequence[int], seq_len: int, dropout: float = 0.6, backend: Optional[str] = None):
        """See the class docstring for the arguments."""
        super().__init__()
        joint = sum(dims)
        self.dropout_p = dropout
        self.backend = backend
        self.scale = 1.0 / math.sqrt(joint)
        self.query = Linear(joint, joint)
        self.keys = nn.ModuleList(Linear(seq_len, seq_len) for _ in dims)
        self.values = nn.ModuleList(Linear(d, d) for d in dims)
        self.outputs = nn.ModuleList(Linear(joint, d) for d in dims)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, features: Sequence[torch.Tensor], lengths: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, ...]:
        """``features``: one ``(B, L, d_m)`` tensor per modality; ``lengths``: optional ``(B,)`` valid steps."""
        padded = _time_padding(features, lengths)
        features = [zero_padded(x, padded) for x in features]
        # Under autocast each input is cast once here, not once by every layer that reads it (the query's concat,
        # the key, the value); the residual adds the input as given, so it keeps its precision (SPEC 8).
        cast = cast_for_autocast(list(features))
        query = self.query(torch.cat(cast, dim=-1)).transpose(1, 2)  # Q^T: (B, d, L)
        query = zero_padded(query, padded, time_axis=2)
        updated = []
        for x, x_cast, key, value, output in zip(features, cast, self.keys, self.values, self.outputs):
            # Contiguous inputs let F.linear fold the bias into one addmm; a transposed view takes matmul's copy
            # anyway, then a separate bias add (slow in bf16 on the key's 16-wide rows).
            k = key(x_cast.transpose(1, 2).contiguous())  # K_m: (B, d_m, L), a learned map on the time axis
            k = zero_padded(k, padded, time_axis=2)
            v = value(x_cast).transpose(1, 2)  # V_m^T: (B, d_m, L)
            h = tanh_attention(
                query, k, v, scale=self.scale, dropout_p=self.dropout_p, training=self.training,
                activation="tanh_relu", backend=self.backend,
            ).transpose(1, 2).contiguous()  # H_m: (B, L, d)
            updated.append(x + self.dropout(torch.relu(output(h))))
        return tuple(updated)


class AdditiveJointCrossAttention(nn.Module):
    """``form="additive"``: the JCA equations of the CVPRW 2022 paper with hidden size ``k``, SPEC 2.2.

    ``K_m = X_m^T W_jm``, ``C_m = Drop(tanh(K_m J / sqrt(d)))``, ``H_m = ReLU(C_m W_cm + X_m^T W_am)``,
    ``X_m' = X_m + (H_m W_hm)^T``; no biases. ``C_m W_cm`` is one fused ``tanh_attention`` whose value matrix
    ``W_cm`` is shared by the whole batch.

    Args:
        dims, seq_len, dropout, backend: as :class:`DenseJointCrossAttention`.
        hidden: ``k``, the attention hidden size (32 in the CVPRW code).
    """

    def __init__(
        self, dims: Sequence[int], seq_len: int, dropout: float = 0.6, hidden: int = 32, backend: Optional[str] = None
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        joint = sum(dims)
        self.dropout_p = dropout
        self.backend = backend
        self.scale = 1.0 / math.sqrt(joint)
        self.keys = nn.ModuleList(Linear(seq_len, seq_len, bias=False) for _ in dims)
        self.correlations = nn.ModuleList(Linear(joint, hidden, bias=False) for _ in dims)
        self.inputs = nn.ModuleList(Linear(seq_len, hidden, bias=False) for _ in dims)
        self.outputs = nn.ModuleList(Linear(hidden, seq_len, bias=False) for _ in dims)

    def forward(
        self, features: Sequence[torch.Tensor], lengths: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, ...]:
        """``features``: one ``(B, L, d_m)`` tensor per modality; ``lengths``: optional ``(B,)`` valid steps."""
        padded = _time_padding(features, lengths)
        features = [zero_padded(x, padded) for x in features]
        joint_t = torch.cat(features, dim=-1).transpose(1, 2)  # J^T: (B, d, L), zero at padded steps
        updated = []
        for x, key, corr, inp, output in zip(features, self.keys, self.correlations, self.inputs, self.outputs):
            x_t = x.transpose(1, 2)  # (B, d_m, L)
            c_w = tanh_attention(  # C_m W_cm: (B, d_m, k)
                zero_padded(key(x_t), padded, time_axis=2), joint_t, corr.weight.t(), scale=self.scale,
                dropout_p=self.dropout_p,
                training=self.training, backend=self.backend,
            )
            h = torch.relu(c_w + inp(x_t))
            updated.append(x + output(h).transpose(1, 2))
        return tuple(updated)
