"""The audio-visual valence/arousal regressor of the JCA/RJCA/DCA code (the TSAV pipeline head), SPEC 4.

On precomputed per-clip features ``(B, L, d_m)``, video first::

    X_m   = L2norm(X_m)                                   every modality
    X_a   = BiLSTM_a(X_a)                                 optional per-modality encoders (audio before the video
    X_v   = SpatialAttention(X_v, guide=X_a)                attention, which it guides; video after it)
    X_v   = BiLSTM_v(X_v)
    X_1.. = fusion(X_v, X_a, ...)                          JCA, RJCA, DCA or GRJCA
    h     = BiLSTM_joint([X_v | X_a | ...])                (B, L, joint_dim), L2-normalised
    valence, arousal = head_v(h), head_a(h)               (B, L) each

Each BiLSTM is the official ``LSTM(embed, dim, num_layers, dropout, residual_embeddings=True)`` block
(:class:`ResidualBiLSTM`). The audio-guided spatial attention (:class:`AudioGuidedSpatialAttention`) is the official
``PositionAttn``, with the correct channel-major reshape of the visual map by default.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from avkernels._validation import check_probability
from avkernels.models._checks import check_features, check_positive_int
from avkernels.nn.fusion import DCA, GRJCA, JCA, RJCA, RecursiveJointCrossAttention
from avkernels.nn.lengths import drop_exporter_defaults, lengths_from_mask, padding_mask, zero_padded
from avkernels.nn.linear import Linear

FUSIONS = {"jca": JCA, "rjca": RJCA, "dca": DCA, "grjca": GRJCA}

Prediction = Tuple[torch.Tensor, torch.Tensor]


def _check_even(value: object, name: str) -> int:
    check_positive_int(value, name)
    if value % 2:
        raise ValueError(f"{name}: expected an even size (half per direction of a bidirectional LSTM), got {value}")
    return value


class ResidualBiLSTM(nn.Module):
    """The official BiLSTM block (``models/layer.py: LSTM(..., residual_embeddings=True)``).

    ``Y = normalize(Linear([X | BiLSTM(X)]))`` with a learnable initial state, dropout between the LSTM layers and on
    ``[X | BiLSTM(X)]``, and an L2-normalised output.

    Args:
        input_size: feature size of ``X``.
        hidden_size: output size; the LSTM has ``hidden_size / 2`` units per direction (so it must be even).
        num_layers: stacked LSTM layers.
        dropout: probability between the LSTM layers and on the concatenation before the projection.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, dropout: float = 0.1):
        """See the class docstring for the arguments."""
        super().__init__()
        check_positive_int(input_size, "input_size")
        _check_even(hidden_size, "hidden_size")
        check_positive_int(num_layers, "num_layers")
        check_probability(dropout, "dropout")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        per_direction = hidden_size // 2
        # nn.LSTM warns when asked for inter-layer dropout with a single layer, where it does nothing anyway.
        self.rnn = nn.LSTM(
            input_size, per_direction, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=True, batch_first=True,
        )
        # Rows [0, 2 * num_layers) are h0 and the rest c0, one row per (layer, direction), shared by every sample.
        self.initial_state = nn.Parameter(torch.empty(2 * 2 * num_layers, per_direction))
        self.dropout = nn.Dropout(dropout)
        self.projection = Linear(input_size + hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.initial_state)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, L, input_size) -> (B, L, hidden_size)``, unit L2 norm along the last axis.

        With ``lengths`` (``(B,)`` valid steps) the LSTM runs on the packed valid steps only, and the output at padded
        steps is 0.
        """
        padded = padding_mask(lengths, x.shape[0], x.shape[1], x.device)
        x = zero_padded(x, padded)
        states = self.initial_state.unsqueeze(1).expand(-1, x.shape[0], -1).contiguous()
        h0, c0 = states.chunk(2, dim=0)
        recurrent, _ = run_outside_autocast(self.rnn, x, (h0, c0), lengths=lengths_from_mask(padded))
        return zero_padded(F.normalize(self.projection(self.dropout(torch.cat([x, recurrent], dim=-1))), dim=-1), padded)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"


def run_outside_autocast(
    rnn: nn.RNNBase, x: torch.Tensor, state=None, lengths: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, object]:
    """``rnn(x, *state)`` in the recurrent layer's own dtype, also under ``torch.autocast``; batch-first ``x``.

    ``lengths``: CPU int64 valid steps per sample, or ``None`` for none padded. The layer then runs on the packed
    valid steps (a bidirectional layer's backward direction starts at each sample's last valid step) and its output
    is 0 at padded steps. A sample of length 0 runs one step on the (zeroed) padding, which the caller discards.

    CPU autocast runs LSTMs and GRUs in bfloat16 through oneDNN, which has no bfloat16 recurrent primitive on CPUs
    without AVX-512 BF16 ("could not create a primitive descriptor for the LSTM forward propagation primitive"), and
    a recurrence carries its rounding error through every step. The layer is small next to the fusion (L steps of
    a few hundred units), so it runs in float32 everywhere and its output joins the autocast region as float32.
    """
    dtype = rnn.weight_ih_l0.dtype
    if isinstance(state, torch.Tensor):
        state = state.to(dtype)
    elif state is not None:  # an LSTM's (h0, c0)
        state = tuple(s.to(dtype) for s in state)
    with torch.autocast(x.device.type, enabled=False):
        if lengths is None:
            return rnn(x.to(dtype), state)
        packed = nn.utils.rnn.pack_padded_sequence(
            x.to(dtype), lengths.clamp(min=1), batch_first=True, enforce_sorted=False
        )
        out, state = rnn(packed, state)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, state


class AudioGuidedSpatialAttention(nn.Module):
    """Audio-guided attention over the positions of a visual feature map (the official ``PositionAttn``, from AVEL).

    Per clip, with the map ``V`` as ``(positions, channels)`` and the guide ``a`` (the audio features)::

        v = ReLU(V W_v + b_v)                       (positions, hidden)
        g = ReLU(a W_g + b_g)                       (hidden,)
        z = tanh(v U_v + (g U_g)[:, None]) u        (positions,)   U_v: hidden -> positions, U_g: hidden -> positions,
        alpha = softmax(z)                                         u: positions -> 1, all without bias
        out = (alpha V) W_o + b_o                   (out_dim,)

    As in the official layer, ``g U_g`` gives one score per position, broadcast over the attention width, and that
    width equals the number of positions.

    Args:
        channels: channels of the visual map (512 for the R(2+1)D-18 of TSAV).
        positions: spatial positions of the map (7 x 7 = 49).
        guide_dim: feature size of the guide.
        hidden: width of the video and guide projections (512 in the official code).
        out_dim: size of the attended output (512).
        scrambled_reshape: read the flattened map as ``(positions, channels)`` row-major, as the official code does
            with ``view(-1, 49, 512)``. The map is the flattening of a channel-major ``(channels, 7, 7)`` tensor, so
            that reading mixes channels and positions; the default reads it correctly, ``view(channels, positions)``
            then transposed.
    """

    def __init__(
        self,
        channels: int = 512,
        positions: int = 49,
        guide_dim: int = 512,
        hidden: int = 512,
        out_dim: int = 512,
        *,
        scrambled_reshape: bool = False,
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        for name, value in (
            ("channels", channels), ("positions", positions), ("guide_dim", guide_dim), ("hidden", hidden),
            ("out_dim", out_dim),
        ):
            check_positive_int(value, name)
        self.channels, self.positions, self.scrambled_reshape = channels, positions, scrambled_reshape
        self.video_projection = Linear(channels, hidden)
        self.guide_projection = Linear(guide_dim, hidden)
        self.video_score = Linear(hidden, positions, bias=False)
        self.guide_score = Linear(hidden, positions, bias=False)
        self.score = Linear(positions, 1, bias=False)
        self.output = Linear(channels, out_dim)

    def positions_first(self, video: torch.Tensor) -> torch.Tensor:
        """``(..., channels * positions)`` flattened map -> ``(..., positions, channels)``."""
        lead = video.shape[:-1]
        if self.scrambled_reshape:
            return video.reshape(*lead, self.positions, self.channels)
        return video.reshape(*lead, self.channels, self.positions).transpose(-1, -2)

    def forward(self, video: torch.Tensor, guide: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``video (B, L, channels * positions)``, ``guide (B, L, guide_dim)`` -> ``(out (B, L, out_dim),
        alpha (B, L, positions))``."""
        feature_map = self.positions_first(video)  # (B, L, P, C)
        v = torch.relu(self.video_projection(feature_map))
        g = torch.relu(self.guide_projection(guide))
        scores = self.score(torch.tanh(self.video_score(v) + self.guide_score(g).unsqueeze(-1))).squeeze(-1)
        alpha = torch.softmax(scores, dim=-1)
        attended = torch.matmul(alpha.unsqueeze(-2), feature_map).squeeze(-2)  # (B, L, C)
        return self.output(attended), alpha

    def extra_repr(self) -> str:
        return f"channels={self.channels}, positions={self.positions}, scrambled_reshape={self.scrambled_reshape}"


def regression_head(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """``Linear(in_dim, hidden) -> ReLU -> Dropout -> Linear(hidden, 1)``, applied per time step."""
    return nn.Sequential(Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), Linear(hidden, 1))


class AVRegressor(nn.Module):
    """Valence/arousal regressor: encoders, joint cross-attention fusion, joint BiLSTM and two heads (SPEC 4).

    Args:
        dims: feature size ``d_m`` of each modality entering the fusion, video first, then audio, then any other
            modality (two or more). It is also each modality's input size, except for the video when
            ``spatial_attention`` is on (then the input is the flattened ``spatial_channels x spatial_positions``
            map and the attention outputs ``dims[0]`` features).
        seq_len: ``L``, the clips per sequence (the fusion learns an ``L x L`` map, so inputs must have this length).
        fusion: ``"jca"``, ``"rjca"``, ``"dca"``, ``"grjca"`` (case-insensitive; default GRJCA, the latest of the
            family), or a built fusion module that maps ``(B, L, d_m)`` tensors to tensors of the same shapes and
            accepts ``return_gates=True`` (returning the outputs and a dict), as the library's fusions do.
        fusion_kwargs: keyword arguments of the fusion class when ``fusion`` is a name (``iterations``, ``dropout``,
            ``tau``, ``backend``, ...).
        encoders: per-modality :class:`ResidualBiLSTM` (``d_m -> d_m``) before the fusion.
        encoder_layers, encoder_dropout: their depth and dropout (official: 2 and 0.1).
        joint_dim, joint_layers: the joint BiLSTM on the fused concatenation (official: 512 and 2; dropout 0).
        head_hidden, head_dropout: the two heads ``Linear(joint_dim, head_hidden) -> ReLU -> Dropout -> Linear(., 1)``
            (official: 128 and 0.6).
        spatial_attention: audio-guided attention over the visual map (:class:`AudioGuidedSpatialAttention`),
            guided by the (encoded) audio, ``features[1]``.
        spatial_channels, spatial_positions, scrambled_reshape: the map's layout, see
            :class:`AudioGuidedSpatialAttention`.
        normalize_inputs: L2-normalise each modality's input features along the last axis (official: yes).

    Every ``nn.Linear`` built here gets Xavier-uniform weights and zero biases, the LSTMs keep PyTorch's
    initialisation (the official ``init_weights``); a fusion built from a name initialises itself the same way and a
    fusion passed as a module is left as it is.
    """

    def __init__(
        self,
        dims: Sequence[int] = (512, 512),
        seq_len: int = 16,
        *,
        fusion: Union[str, nn.Module] = "grjca",
        fusion_kwargs: Optional[Mapping[str, object]] = None,
        encoders: bool = True,
        encoder_layers: int = 2,
        encoder_dropout: float = 0.1,
        joint_dim: int = 512,
        joint_layers: int = 2,
        head_hidden: int = 128,
        head_dropout: float = 0.6,
        spatial_attention: bool = False,
        spatial_channels: int = 512,
        spatial_positions: int = 49,
        scrambled_reshape: bool = False,
        normalize_inputs: bool = True,
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else dims
        if not isinstance(dims, tuple) or len(dims) < 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
        ):
            raise ValueError(f"dims: expected a sequence of >= 2 positive ints (video, audio, ...), got {dims!r}")
        check_positive_int(seq_len, "seq_len")
        self.dims, self.seq_len, self.normalize_inputs = dims, seq_len, normalize_inputs

        self.fusion = self._build_fusion(fusion, fusion_kwargs)
        if encoders:
            for m, d in enumerate(dims):
                _check_even(d, f"dims[{m}]")
            self.encoders = nn.ModuleList(ResidualBiLSTM(d, d, encoder_layers, encoder_dropout) for d in dims)
        else:
            self.encoders = None
        if spatial_attention:
            self.spatial_attention = AudioGuidedSpatialAttention(
                spatial_channels, spatial_positions, guide_dim=dims[1], hidden=dims[0], out_dim=dims[0],
                scrambled_reshape=scrambled_reshape,
            )
            self.input_dims = (spatial_channels * spatial_positions,) + dims[1:]
        else:
            self.spatial_attention = None
            self.input_dims = dims
        self.joint = ResidualBiLSTM(sum(dims), _check_even(joint_dim, "joint_dim"), joint_layers, dropout=0.0)
        check_probability(head_dropout, "head_dropout")
        check_positive_int(head_hidden, "head_hidden")
        self.valence_head = regression_head(joint_dim, head_hidden, head_dropout)
        self.arousal_head = regression_head(joint_dim, head_hidden, head_dropout)
        self.reset_parameters()

    def _build_fusion(self, fusion: Union[str, nn.Module], fusion_kwargs: Optional[Mapping[str, object]]) -> nn.Module:
        if isinstance(fusion, str):
            key = fusion.lower()
            if key not in FUSIONS:
                raise ValueError(f"fusion: expected one of {tuple(FUSIONS)} or an nn.Module, got {fusion!r}")
            return FUSIONS[key](self.dims, self.seq_len, **dict(fusion_kwargs or {}))
        if not isinstance(fusion, nn.Module):
            raise TypeError(f"fusion: expected a name in {tuple(FUSIONS)} or an nn.Module, got {type(fusion).__name__}")
        if fusion_kwargs:
            raise ValueError("fusion_kwargs: only used when fusion is a name; this fusion is already built")
        built_for = (fusion.dims, fusion.seq_len) if isinstance(fusion, RecursiveJointCrossAttention) else None
        if built_for is not None and built_for != (self.dims, self.seq_len):
            raise ValueError(
                f"fusion: built for dims={fusion.dims}, seq_len={fusion.seq_len}, but this regressor has "
                f"dims={self.dims}, seq_len={self.seq_len}"
            )
        return fusion

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases in every linear layer outside the fusion (the official init)."""
        in_fusion = {id(m) for m in self.fusion.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in in_fusion:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self, *features: torch.Tensor, lengths: Optional[torch.Tensor] = None, return_gates: bool = False
    ) -> Union[Prediction, Tuple[Prediction, Dict[str, object]]]:
        """Predict valence and arousal per clip.

        Args:
            *features: one ``(B, L, input_dims[m])`` tensor per modality: video, audio, then any other modality.
                ``B = 0`` is allowed and gives empty predictions.
            lengths: optional ``(B,)`` integer tensor on the features' device: the valid clips of each sample, in
                ``[0, L]`` (the windows' ``"lengths"``); clips ``t >= lengths[b]`` are padding. Padding changes no
                valid clip's prediction or gradient (the BiLSTMs run on packed sequences, the fusion as SPEC 3.1);
                predictions and gate values at padded clips are 0.
            return_gates: also return the fusion's gate dict (see :meth:`RecursiveJointCrossAttention.forward`),
                plus ``"spatial"``: the ``(B, L, positions)`` attention weights when spatial attention is on.
        Returns:
            ``(valence, arousal)``, each ``(B, L)`` (and the gate dict when ``return_gates``).
        """
        features = drop_exporter_defaults(features)
        names = [("video", "audio")[m] if m < 2 else f"features[{m}]" for m in range(len(self.dims))]
        check_features(features, names, [(self.seq_len, d) for d in self.input_dims], self)
        padded = padding_mask(lengths, features[0].shape[0], self.seq_len, features[0].device)
        lengths = None if padded is None else lengths  # all full: every layer runs exactly as without lengths
        xs = [zero_padded(x, padded) for x in features]
        xs = [F.normalize(x, dim=-1) if self.normalize_inputs else x for x in xs]
        # The video is encoded last: its spatial attention is guided by the encoded audio.
        if self.encoders is not None:
            xs[1:] = [encoder(x, lengths) for encoder, x in zip(self.encoders[1:], xs[1:])]
        spatial = None
        if self.spatial_attention is not None:
            xs[0], spatial = self.spatial_attention(xs[0], xs[1])
            spatial = zero_padded(spatial, padded)
        if self.encoders is not None:
            xs[0] = self.encoders[0](xs[0], lengths)

        # A fusion passed as a module need not know lengths= until padded batches come.
        fusion_lengths = {} if lengths is None else {"lengths": lengths}
        fused, gates = self.fusion(*xs, **fusion_lengths, return_gates=True)
        joint = self.joint(torch.cat(fused, dim=-1), lengths)
        valence = zero_padded(self.valence_head(joint).squeeze(-1), padded)
        arousal = zero_padded(self.arousal_head(joint).squeeze(-1), padded)
        if not return_gates:
            return valence, arousal
        gates = dict(gates)
        if spatial is not None:
            gates["spatial"] = spatial
        return (valence, arousal), gates

    @classmethod
    def from_official(
        cls,
        checkpoint: object,
        repo: str,
        *,
        iterations: Optional[int] = None,
        backend: Optional[str] = None,
        map_location: object = "cpu",
    ) -> "AVRegressor":
        """A trained official ``CAM`` (``models/orig_cam.py`` of the JCA, RJCA or DCA repository) as an AVRegressor.

        The result is configured like that repository's ``CAM`` (see :mod:`avkernels.models.official`: 512-d audio,
        25088-d visual maps read with the official scrambled ``view(-1, 49, 512)``, 16 clips), holds every tensor of
        the checkpoint, and is returned in eval mode, where it gives the official model's outputs on the same inputs
        (to round-off). It is float64 for a float64 checkpoint and float32 otherwise, on the CPU: call ``.train()``
        to fine-tune it, ``.to(device)`` to move it.

        The argument order follows the library, video first: the official ``vouts, aouts = cam(audio, video)`` is
        ``valence, arousal = model(video, audio)``, with the same ``(B, 16, 512)`` audio and ``(B, 16, 25088)``
        visual features.

        Args:
            checkpoint: a path or file object of what the official training code saves,
                ``{"net": state_dict, "best_Val_accV": ..., ...}``, or a bare state dict; or that object already
                loaded. Files are read with ``torch.load(weights_only=True)`` (the numpy scalars the official code
                stores next to ``"net"`` are accepted, other Python objects are not).
            repo: ``"jca"``, ``"rjca"`` or ``"dca"``: the repository whose ``CAM`` saved it.
            iterations: joint cross-attention blocks, when the checkpoint comes from a ``CAM`` edited to another
                ``DCNLayer`` ``num_seq`` than the released one (1 for jca and rjca, 2 for dca).
            backend: backend of the fusion's fused ops (``None``: the fastest for the inputs' device).
            map_location: as ``torch.load``'s, for files (CPU by default, so a checkpoint saved on a GPU loads
                anywhere).
        Raises:
            ValueError: a checkpoint with missing or unexpected keys (all named, with the repository whose ``CAM``
                they fit when one does) or tensors of the wrong shape (named with the expected shape), or a file
                that is not a PyTorch checkpoint. FileNotFoundError, TypeError: no such file; not a checkpoint object.
        """
        from avkernels.models.official import from_official

        return from_official(cls, checkpoint, repo, iterations=iterations, backend=backend, map_location=map_location)

    def to_official(self, repo: str) -> "Dict[str, torch.Tensor]":
        """This model's tensors as the official ``CAM`` of ``repo`` names them (an ordered state dict, in the
        official ``CAM.state_dict()`` order), the inverse of :meth:`from_official`.

        ``torch.save({"net": model.to_official("dca")}, path)`` writes a file the official code loads with
        ``CAM().load_state_dict(torch.load(path)["net"])``. Like ``state_dict()``, the tensors share storage with
        the model.

        Raises:
            ValueError: the model is not laid out like that ``CAM``, with every reason (sizes, encoders, gating,
                the channel-major spatial reshape, which the official ``PositionAttn`` cannot reproduce, ...).
        """
        from avkernels.models.official import to_official

        return to_official(self, repo)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, seq_len={self.seq_len}, input_dims={self.input_dims}"
