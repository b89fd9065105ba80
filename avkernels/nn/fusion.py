"""The joint cross-attention fusion family: JCA -> RJCA -> DCA -> GRJCA (SPEC 3).

One class, :class:`RecursiveJointCrossAttention`, implements the recursion and both gating schemes; the four
public models are it with the papers' settings. ``forward(*features)`` takes one ``(B, L, d_m)`` tensor per modality
(any number >= 2, in the order of ``dims``) and returns one tensor per modality of the same shape.
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from avkernels._validation import check_float_tensor, check_positive, check_probability, check_same
from avkernels.dispatch import registered
from avkernels.nn.blocks import AdditiveJointCrossAttention, DenseJointCrossAttention
from avkernels.nn.gates import Gate, StageGate
from avkernels.nn.lengths import check_time_shape, drop_exporter_defaults, padding_mask, zero_padded

FORMS = ("dense", "additive")
GATINGS = (None, "final", "recursive")
GATE_UNATTENDED = ("previous", "original")

Outputs = Tuple[torch.Tensor, ...]


def _check_backend_name(backend: Optional[str]) -> None:
    # Availability depends on the inputs' device and is checked per call; a misspelt name is caught at once.
    if backend is not None and backend not in registered():
        raise ValueError(f"backend: expected None or one of {registered()}, got {backend!r}")


class RecursiveJointCrossAttention(nn.Module):
    """Recursive joint cross-attention with optional gating (the engine behind JCA, RJCA, DCA and GRJCA).

    Args:
        dims: feature size ``d_m`` of each modality, in concatenation order (the official code: video first).
        seq_len: ``L``; the blocks learn an ``L x L`` map on the time axis, so inputs must have this length.
        form: ``"dense"`` (official code, SPEC 2.1) or ``"additive"`` (CVPRW 2022 equations, SPEC 2.2).
        iterations: ``T``, the number of joint cross-attention blocks applied in sequence.
        dropout: dropout probability on the correlation maps (and, for ``"dense"``, in the residual MLP).
        hidden: hidden size ``k`` of the ``"additive"`` form (ignored by ``"dense"``).
        share_weights: one block (and one set of iteration gates) reused by every iteration.
        gating: ``None`` (JCA, RJCA), ``"final"`` (DCA: one gate per modality after the last iteration, against the
            inputs) or ``"recursive"`` (GRJCA: a gate in every iteration, then a stage gate across iterations).
        tau: temperature of the per-iteration / final gates.
        stage_tau: temperature of the GRJCA stage gate.
        gate_unattended: GRJCA's unattended features at iteration ``t``: ``"previous"`` (``X^(t-1)``) or
            ``"original"`` (``X^(0)``, the DCA reading).
        stage_include_input: GRJCA's stage gate also chooses among the inputs ``X^(0)`` (``T + 1`` candidates).
        backend: backend of the fused ops; ``None`` picks the fastest for the inputs' device.
    """

    def __init__(
        self,
        dims: Sequence[int],
        seq_len: int,
        *,
        form: str = "dense",
        iterations: int = 1,
        dropout: float = 0.6,
        hidden: int = 32,
        share_weights: bool = False,
        gating: Optional[str] = None,
        tau: float = 0.1,
        stage_tau: float = 0.1,
        gate_unattended: str = "previous",
        stage_include_input: bool = False,
        backend: Optional[str] = None,
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else dims
        if not isinstance(dims, tuple) or len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ValueError(f"dims: expected a sequence of >= 2 positive ints (one per modality), got {dims!r}")
        for name, value in (("seq_len", seq_len), ("iterations", iterations), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        if gating not in GATINGS:
            raise ValueError(f"gating: expected one of {GATINGS}, got {gating!r}")
        if gate_unattended not in GATE_UNATTENDED:
            raise ValueError(f"gate_unattended: expected one of {GATE_UNATTENDED}, got {gate_unattended!r}")
        check_probability(dropout, "dropout")
        check_positive(tau, "tau")
        check_positive(stage_tau, "stage_tau")
        _check_backend_name(backend)
        self.dims, self.seq_len, self.form, self.iterations = dims, seq_len, form, iterations
        self.gating, self.gate_unattended, self.stage_include_input = gating, gate_unattended, stage_include_input
        self.share_weights = share_weights

        def block():
            if form == "dense":
                return DenseJointCrossAttention(dims, seq_len, dropout, backend)
            return AdditiveJointCrossAttention(dims, seq_len, dropout, hidden, backend)

        def gates():
            return nn.ModuleList(Gate(d, tau, backend) for d in dims)

        n_weights = 1 if share_weights else iterations
        self.blocks = nn.ModuleList(block() for _ in range(n_weights))
        if gating == "final":
            self.final_gates = gates()
        elif gating == "recursive":
            self.iteration_gates = nn.ModuleList(gates() for _ in range(n_weights))
            n_stages = iterations + int(stage_include_input)
            self.stage_gates = nn.ModuleList(StageGate(d, n_stages, stage_tau, backend) for d in dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Xavier-uniform weights and zero biases in every linear layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_backend(self, backend: Optional[str]) -> "RecursiveJointCrossAttention":
        """Route every fused op of this module through ``backend`` (``None``: the fastest for the inputs)."""
        _check_backend_name(backend)
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        return self

    def _check_features(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.dims):
            raise ValueError(
                f"features: expected {len(self.dims)} tensors (one per modality, dims={self.dims}), got {len(features)}"
            )
        names = [f"features[{m}]" for m in range(len(features))]
        for name, x in zip(names, features):
            check_float_tensor(x, name)
        batch = features[0].shape[0] if features[0].dim() == 3 else "B"
        for name, x, d in zip(names, features, self.dims):
            check_time_shape(x, name, (batch, self.seq_len, d))
        param = next(self.parameters())
        check_same(list(features), names)
        if features[0].device != param.device:
            raise ValueError(f"features[0]: expected a tensor on {param.device} like the module, got {features[0].device}")
        check_same(list(features), names, dtype=param.dtype)

    def forward(
        self, *features: torch.Tensor, lengths: Optional[torch.Tensor] = None, return_gates: bool = False
    ) -> Union[Outputs, Tuple[Outputs, Dict[str, object]]]:
        """Fuse the modalities.

        Args:
            *features: one ``(B, L, d_m)`` tensor per modality, in the order of ``dims``.
            lengths: optional ``(B,)`` integer tensor on the features' device: the valid time steps of each sample,
                in ``[0, L]``; steps ``t >= lengths[b]`` are padding. Padding contributes nothing to the valid
                steps' outputs, gates or gradients, and the outputs and gates at padded steps are 0 (SPEC 3.1).
            return_gates: also return a dict of gate values: ``{"final": (g_m, ...)}`` for DCA (each ``(B, L, 2)``),
                ``{"iterations": ((g_m, ...) per iteration), "stage": (s_m, ...)}`` for GRJCA (``s_m`` is
                ``(B, L, T)``, or ``(B, L, T + 1)`` with the inputs as candidate 0); empty for JCA and RJCA.
        Returns:
            A tuple of ``(B, L, d_m)`` tensors, one per modality (and the gate dict when ``return_gates``).
        """
        features = drop_exporter_defaults(features)
        self._check_features(features)
        padded = padding_mask(lengths, features[0].shape[0], self.seq_len, features[0].device)
        lengths = None if padded is None else lengths  # all full: the blocks run exactly as without lengths
        inputs = tuple(zero_padded(x, padded) for x in features)
        current = inputs
        gate_values: Dict[str, object] = {}
        stages = [inputs] if self.stage_include_input else []
        iteration_gates = []
        for t in range(self.iterations):
            w = 0 if self.share_weights else t
            attended = self.blocks[w](current, lengths)
            if self.gating == "recursive":
                unattended = current if self.gate_unattended == "previous" else inputs
                gated = [g(a, u) for g, a, u in zip(self.iteration_gates[w], attended, unattended)]
                attended = tuple(out for out, _ in gated)
                iteration_gates.append(tuple(zero_padded(g, padded) for _, g in gated))
                stages.append(attended)
            current = attended
        if self.gating == "final":
            gated = [g(a, u) for g, a, u in zip(self.final_gates, current, inputs)]
            current = tuple(out for out, _ in gated)
            gate_values["final"] = tuple(zero_padded(g, padded) for _, g in gated)
        elif self.gating == "recursive":
            fused = [sg([stage[m] for stage in stages]) for m, sg in enumerate(self.stage_gates)]
            current = tuple(out for out, _ in fused)
            gate_values["iterations"] = tuple(iteration_gates)
            gate_values["stage"] = tuple(zero_padded(s, padded) for _, s in fused)
        current = tuple(zero_padded(x, padded) for x in current)
        return (current, gate_values) if return_gates else current

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, seq_len={self.seq_len}, form={self.form!r}, iterations={self.iterations}, "
            f"gating={self.gating!r}, share_weights={self.share_weights}"
        )


def _preset(name: str, summary: str, iterations: int, gating: Optional[str]) -> type:
    """A fusion class with the papers' settings and the full, explicit signature of the engine (for ``help()``)."""

    def __init__(self, dims: Sequence[int], seq_len: int, **options):
        options.setdefault("iterations", iterations)
        if options.setdefault("gating", gating) != gating:
            chosen = options["gating"]
            raise ValueError(
                f"gating: {name} is the fusion with gating={gating!r}, got {chosen!r}; "
                f"use {GATING_CLASSES[chosen] if chosen in GATING_CLASSES else 'one of ' + str(GATINGS)} or "
                "RecursiveJointCrossAttention(..., gating=...) for another gating"
            )
        RecursiveJointCrossAttention.__init__(self, dims, seq_len, **options)

    # help() and inspect.signature show the engine's arguments with this preset's defaults, not **options.
    engine = inspect.signature(RecursiveJointCrossAttention.__init__)
    presets = {"iterations": iterations, "gating": gating}
    __init__.__signature__ = engine.replace(parameters=[
        p.replace(default=presets[p.name]) if p.name in presets else p for p in engine.parameters.values()
    ])
    __init__.__doc__ = f"Build {name}; the arguments are those of :class:`RecursiveJointCrossAttention` (below)."
    doc = f"{summary}\n\n    Arguments and defaults as :class:`RecursiveJointCrossAttention`, with ``iterations={iterations}`` " \
          f"and ``gating={gating!r}``.\n\n    " + RecursiveJointCrossAttention.__doc__.split("\n", 1)[1].lstrip()
    return type(name, (RecursiveJointCrossAttention,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


JCA = _preset("JCA", "Joint cross-attention (CVPRW 2022 / T-BIOM 2023): one block, no gate.", 1, None)
RJCA = _preset("RJCA", "Recursive joint cross-attention (ICASSP 2023): ``iterations`` blocks (default 2), no gate.", 2,
               None)
DCA = _preset(
    "DCA", "Dynamic cross-attention (ICME 2024): RJCA, then a gate per modality between the result and the inputs.",
    2, "final",
)
GRJCA = _preset(
    "GRJCA", "Gated recursive joint cross-attention (CVPRW 2025): a gate in every iteration, then a stage gate.", 2,
    "recursive",
)
GATING_CLASSES = {None: "RJCA", "final": "DCA", "recursive": "GRJCA"}
