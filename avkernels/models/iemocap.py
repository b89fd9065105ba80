"""The IEMOCAP self- and cross-attention classifiers of Rajan, Brutti and Cavallaro (ICASSP 2022), SPEC 4.

Per modality an encoder: optional input dropout, a kernel-1 ``Conv1d`` over the time-as-channel axis (it mixes all
input time steps into fewer output steps, per feature), a 1-layer BiGRU. Then ``nn.MultiheadAttention`` (softmax
attention, no residual or normalisation) per modality (self) or per ordered pair of modalities (cross: the target is
the query, the source the keys and values), a mean over time, and statistical pooling: the unbiased std and the
mean across the stacked vectors, concatenated as ``[std | mean]`` (the code's order), then ``Linear -> Linear``
(no nonlinearity between them, as in the code) to class logits.

Defaults are the code's (smartcameras/SelfCrossAttn): text ``(128, 300)`` GloVe with dropout 0.25, video
``(32, 2048)`` with ``Conv1d(32 -> 25)``, audio ``(1000, 120)`` MFCC with ``Conv1d(1000 -> 500)``, BiGRU 60 per
direction, 6 heads with dropout 0.1, FC 240 -> 60 -> 7. Tri-modal parameter counts: self 1,645,892, cross 1,820,132.
As in the code there is no padding mask by default: padded steps take part in the GRUs, the attention and the
temporal mean. ``forward(..., lengths=...)`` gives the valid steps of each modality (SPEC 4); padded steps are then
zeroed before the time-mixing convolution, skipped by the packed BiGRU, masked as attention keys and left out of
the temporal mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from avkernels._validation import check_probability
from avkernels.models._checks import check_features, check_positive_int
from avkernels.models.av_regressor import run_outside_autocast
from avkernels.nn.lengths import drop_exporter_defaults, lengths_from_mask, padding_mask, zero_padded

POOLINGS = ("statistics", "concat")


@dataclass(frozen=True)
class ModalitySpec:
    """The input layout and front end of one modality.

    Attributes:
        length: input time steps; ``None`` accepts any length (only without ``conv_length``, which fixes it).
        dim: features per time step.
        conv_length: output steps of the kernel-1 ``Conv1d(length -> conv_length)`` over the time axis; ``None``
            for no convolution.
        input_dropout: dropout on the raw inputs, in training only.
    """

    length: Optional[int]
    dim: int
    conv_length: Optional[int] = None
    input_dropout: float = 0.0


IEMOCAP_MODALITIES: Dict[str, ModalitySpec] = {
    "text": ModalitySpec(length=128, dim=300, input_dropout=0.25),
    "video": ModalitySpec(length=32, dim=2048, conv_length=25),
    "audio": ModalitySpec(length=1000, dim=120, conv_length=500),
}


def _check_spec(spec: object, name: str) -> ModalitySpec:
    if not isinstance(spec, ModalitySpec):
        raise TypeError(f"{name}: expected a ModalitySpec, got {type(spec).__name__}")
    check_positive_int(spec.dim, f"{name}.dim")
    for field in ("length", "conv_length"):
        if getattr(spec, field) is not None:
            check_positive_int(getattr(spec, field), f"{name}.{field} (or None)")
    if spec.conv_length is not None and spec.length is None:
        raise ValueError(f"{name}: conv_length needs a fixed length (the convolution's input channels)")
    check_probability(spec.input_dropout, f"{name}.input_dropout")
    return spec


class ModalityEncoder(nn.Module):
    """Input dropout, optional kernel-1 convolution over the time axis, BiGRU: ``(B, T, dim) -> (B, T', 2h)``."""

    def __init__(self, spec: ModalitySpec, hidden: int):
        """See the class docstring for the arguments."""
        super().__init__()
        self.input_dropout = spec.input_dropout
        # (B, T, dim) is read by Conv1d as T channels of length dim: each output step mixes every input step.
        self.conv = nn.Conv1d(spec.length, spec.conv_length, kernel_size=1) if spec.conv_length is not None else None
        self.rnn = nn.GRU(spec.dim, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x (B, T, dim)``, optional ``lengths (B,)`` valid steps -> ``(B, T', 2h)``.

        With ``lengths`` the padded steps are zeroed before the convolution, whose every output step is then a
        combination of valid steps only (all ``T'`` are valid); without a convolution the BiGRU runs on the packed
        valid steps and outputs 0 at padded steps.
        """
        padded = padding_mask(lengths, x.shape[0], x.shape[1], x.device)
        x = zero_padded(F.dropout(x, self.input_dropout, self.training), padded)
        if self.conv is not None:
            x, padded = self.conv(x), None
        return run_outside_autocast(self.rnn, x, lengths=lengths_from_mask(padded))[0]

    def output_padding(self, padded: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The padding mask of :meth:`forward`'s output, from that of its input."""
        return None if self.conv is not None else padded


class _AttentionClassifier(nn.Module):
    """Encoders, attention (by the subclass), temporal mean, pooling and the two-layer classifier."""

    min_modalities = 1

    def __init__(
        self,
        modalities: Sequence[str] = ("text", "video", "audio"),
        *,
        specs: Optional[Mapping[str, ModalitySpec]] = None,
        num_classes: int = 7,
        rnn_hidden: int = 60,
        num_heads: int = 6,
        attention_dropout: float = 0.1,
        fc_hidden: int = 60,
        pooling: str = "statistics",
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        modalities = (modalities,) if isinstance(modalities, str) else tuple(modalities)
        specs = {**IEMOCAP_MODALITIES, **dict(specs or {})}
        unknown = [m for m in modalities if m not in specs]
        if unknown or len(set(modalities)) != len(modalities) or len(modalities) < self.min_modalities:
            raise ValueError(
                f"modalities: expected {self.min_modalities} or more distinct names among {tuple(specs)}, "
                f"got {modalities!r}"
            )
        for name, value in (("num_classes", num_classes), ("rnn_hidden", rnn_hidden), ("num_heads", num_heads),
                            ("fc_hidden", fc_hidden)):
            check_positive_int(value, name)
        embed = 2 * rnn_hidden
        if embed % num_heads:
            raise ValueError(f"num_heads: must divide the attention width 2 * rnn_hidden = {embed}, got {num_heads}")
        check_probability(attention_dropout, "attention_dropout")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")

        self.modalities = modalities
        self.specs = {m: _check_spec(specs[m], f"specs[{m!r}]") for m in modalities}
        self.pooling = pooling
        self.encoders = nn.ModuleDict({m: ModalityEncoder(self.specs[m], rnn_hidden) for m in modalities})
        self.attention = nn.ModuleDict(
            {key: nn.MultiheadAttention(embed, num_heads, dropout=attention_dropout, batch_first=True)
             for key in self.attention_keys()}
        )
        n_vectors = len(self.attention)
        if pooling == "concat":
            pooled = n_vectors * embed
        else:
            # The std of a single vector is undefined (unbiased) or zero: uni-modal pooling keeps the mean only.
            pooled = 2 * embed if n_vectors > 1 else embed
        self.embedding = nn.Linear(pooled, fc_hidden)
        self.classifier = nn.Linear(fc_hidden, num_classes)

    def attention_keys(self) -> List[str]:
        raise NotImplementedError

    def pairs(self) -> List[Tuple[str, str]]:
        """``(target, source)`` per attention module, in the order of :meth:`attention_keys`: the query's modality
        and the modality of the keys and values."""
        raise NotImplementedError

    def attend(
        self, encoded: Dict[str, torch.Tensor], padded: Optional[Dict[str, Optional[torch.Tensor]]] = None
    ) -> List[torch.Tensor]:
        """One ``(B, T, 2h)`` attended sequence per attention module, in the order of :meth:`attention_keys`.

        ``padded``: per modality, the ``(B, T)`` mask of padded steps of its encoded sequence, or ``None``. Padded
        keys are masked; a sample with no valid key attends to nothing and gets 0.
        """
        padded = padded or {}
        attended = []
        for key, (target, source) in zip(self.attention_keys(), self.pairs()):
            mask = padded.get(source)
            empty = None if mask is None else mask.all(dim=1)
            if empty is not None:
                mask = mask & ~empty.unsqueeze(1)  # an all-masked row would give NaN; its output is zeroed below
            out = self.attention[key](encoded[target], encoded[source], encoded[source], key_padding_mask=mask,
                                      need_weights=False)[0]
            attended.append(out if empty is None else out.masked_fill(empty.view(-1, 1, 1), 0))
        return attended

    def _padding(self, features: Sequence[torch.Tensor], lengths: object) -> Dict[str, Optional[torch.Tensor]]:
        """Per modality, the mask of padded input steps (``None`` when none is padded)."""
        if lengths is None:
            return {m: None for m in self.modalities}
        if isinstance(lengths, torch.Tensor):
            per_modality = {m: lengths for m in self.modalities}
        elif isinstance(lengths, Mapping):
            unknown = [m for m in lengths if m not in self.modalities]
            if unknown:
                raise ValueError(f"lengths: keys {unknown} are not among the modalities {self.modalities}")
            per_modality = {m: lengths.get(m) for m in self.modalities}
        elif isinstance(lengths, (list, tuple)) and len(lengths) == len(self.modalities):
            per_modality = dict(zip(self.modalities, lengths))
        else:
            raise TypeError(
                f"lengths: expected None, a (B,) integer tensor (every modality), a dict modality -> tensor or None, "
                f"or a sequence of {len(self.modalities)} tensors or None (one per modality), got {lengths!r}"
            )
        return {
            m: padding_mask(per_modality[m], x.shape[0], x.shape[1], x.device, name=f"lengths[{m!r}]")
            for m, x in zip(self.modalities, features)
        }

    def forward(
        self, *features: torch.Tensor, lengths: object = None, return_embedding: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Classify utterances.

        Args:
            *features: one ``(B, length, dim)`` tensor per modality, in the order of ``modalities``. ``B = 0`` is
                allowed and gives empty logits.
            lengths: optional valid input steps per sample: one ``(B,)`` integer tensor for every modality, or a
                dict ``{modality: tensor or None}`` / a sequence with one tensor or ``None`` per modality (``None``:
                no padding). Steps ``t >= lengths[b]`` of a modality are padding and change no logit or gradient;
                a modality with no valid step contributes zero vectors.
            return_embedding: also return the ``(B, fc_hidden)`` output of the first linear layer.
        Returns:
            ``(B, num_classes)`` logits (and the embedding when ``return_embedding``).
        """
        features = drop_exporter_defaults(features)
        shapes = [(self.specs[m].length or "T", self.specs[m].dim) for m in self.modalities]
        check_features(features, self.modalities, shapes, self, length_argument="specs['{name}'].length")
        padded = self._padding(features, lengths)
        lengths = {m: None if padded[m] is None else (~padded[m]).sum(dim=1) for m in self.modalities}
        encoded = {m: self.encoders[m](x, lengths[m]) for m, x in zip(self.modalities, features)}
        padded = {m: self.encoders[m].output_padding(padded[m]) for m in self.modalities}
        targets = [target for target, _ in self.pairs()]
        vectors = torch.stack(
            [_mean_over_valid(seq, padded[t]) for seq, t in zip(self.attend(encoded, padded), targets)], dim=1
        )  # (B, n, 2h)
        if self.pooling == "concat":
            pooled = vectors.flatten(1)
        elif vectors.shape[1] == 1:
            pooled = vectors[:, 0]
        else:
            # Unbiased std across the stacked vectors, written out because torch.std warns on an empty batch.
            mean = vectors.mean(dim=1)
            std = (vectors - mean.unsqueeze(1)).square().sum(dim=1).div(vectors.shape[1] - 1).sqrt()
            pooled = torch.cat([std, mean], dim=-1)
        embedding = self.embedding(pooled)
        logits = self.classifier(embedding)
        return (logits, embedding) if return_embedding else logits

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, pooling={self.pooling!r}"


def _mean_over_valid(seq: torch.Tensor, padded: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, T, C) -> (B, C)``: the mean over the valid steps (0 for a sample with none)."""
    if padded is None:
        return seq.mean(dim=1)
    count = (~padded).sum(dim=1, keepdim=True).clamp(min=1)
    return zero_padded(seq, padded).sum(dim=1) / count.to(seq.dtype)


class SelfAttentionClassifier(_AttentionClassifier):
    """Self-attention per modality (``TVAModel_Self``): tri-, bi- or uni-modal.

    Args:
        modalities: any non-empty subset of ``("text", "video", "audio")`` (the default, tri-modal) or of the names in
            ``specs``; the inputs of :meth:`forward` come in this order.
        specs: per-modality :class:`ModalitySpec` overriding :data:`IEMOCAP_MODALITIES` (e.g. shorter sequences).
        num_classes: 7 for the paper's IEMOCAP setting.
        rnn_hidden: BiGRU units per direction; the attention width is ``2 * rnn_hidden``.
        num_heads, attention_dropout: of every ``nn.MultiheadAttention``.
        fc_hidden: output size of the first linear layer.
        pooling: ``"statistics"`` (``[std | mean]`` across modalities; the mean alone with one modality) or
            ``"concat"`` (the paper's no-statistical-pooling ablation: the temporal means concatenated).
    """

    def attention_keys(self) -> List[str]:
        return list(self.modalities)

    def pairs(self) -> List[Tuple[str, str]]:
        return [(m, m) for m in self.modalities]


class CrossAttentionClassifier(_AttentionClassifier):
    """Cross-attention per ordered pair of modalities (``TVAModel_Cross``): two or three modalities.

    For every target modality and every other (source) modality, ``MHA(Q = target, K = V = source)``: the output
    keeps the target's length. The pairs are ordered target by target in the order of ``modalities``; this order
    only matters for ``pooling="concat"``. Arguments as :class:`SelfAttentionClassifier`, with at least two
    modalities.
    """

    min_modalities = 2

    def pairs(self) -> List[Tuple[str, str]]:
        """``(target, source)`` pairs, one per attention module."""
        return [(t, s) for t in self.modalities for s in self.modalities if s != t]

    def attention_keys(self) -> List[str]:
        return [f"{source}_to_{target}" for target, source in self.pairs()]
