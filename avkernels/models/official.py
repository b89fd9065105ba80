"""Load the authors' trained fusion models (the official ``CAM`` of the JCA, RJCA and DCA code) into
:class:`~avkernels.models.AVRegressor`, and write an :class:`AVRegressor` back in their layout.

The three official repositories each define ``CAM`` in ``models/orig_cam.py``: the model trained on precomputed
TSAV features, ``CAM(audio (B, 16, 512), video (B, 16, 25088)) -> (valence, arousal)``, each ``(B, 16)``. Their
training code saves ``{"net": CAM.state_dict(), "best_Val_accV": ..., "best_Val_accA": ..., ...}``.

=========  ==================================  ==========================================================
repo       official code                       ``CAM``
=========  ==================================  ==========================================================
``jca``    praveena2j/Joint-Cross-Attention-   spatial attention, ``DCNLayer(num_seq=1)``, joint BiLSTM,
           for-Audio-Visual-Fusion             two regressors
``rjca``   praveena2j/RecurrentJoint-          as ``jca`` plus per-modality residual BiLSTMs (``num_seq=1``
           AttentionwithLSTMs                  as released)
``dca``    praveena2j/Dynamic-CrossAttention   as ``rjca`` with ``num_seq=2`` and the two gating layers
=========  ==================================  ==========================================================

Every official tensor has a library parameter of the same shape and layout, so the conversion is a renaming;
what it must get right is which official module is which library module (``key1``/``value1``/``linears.0`` belong
to the video, which the official ``DCNLayer`` takes first; ``video_extract`` is ``encoders[0]``), and that the
official ``PositionAttn`` reads the visual map with the scrambled ``view(-1, 49, 512)`` (``scrambled_reshape=True``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from avkernels.checkpoint import describe, load

OFFICIAL_REPOS = ("jca", "rjca", "dca")

# What each repository's CAM hard-codes: DCNLayer(512, 512, num_seq, 0.6), BottomUpExtract(512, 512) with 49
# positions of 512 channels, LSTM(512, 512, 2, 0.1) per modality, LSTM(1024, 512, 2, 0) joint, 16 clips (the
# key maps are nn.Linear(16, 16)), regressors 512 -> 128 -> 1, and gates softmax(Linear(512, 2) / 0.1).
OFFICIAL_ITERATIONS = {"jca": 1, "rjca": 1, "dca": 2}
_ENCODERS = {"jca": False, "rjca": True, "dca": True}
_GATING = {"jca": None, "rjca": None, "dca": "final"}
_DIM, _SEQ_LEN, _CHANNELS, _POSITIONS = 512, 16, 512, 49
_DCA_TAU = 0.1

_LSTM_LAYERS = 2


def check_repo(repo: object) -> str:
    if not isinstance(repo, str) or repo.lower() not in OFFICIAL_REPOS:
        raise ValueError(f"repo: expected one of {OFFICIAL_REPOS}, got {repo!r}")
    return repo.lower()


def _check_iterations(repo: str, iterations: Optional[int]) -> int:
    if iterations is None:
        return OFFICIAL_ITERATIONS[repo]
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations: expected None or a positive int, got {iterations!r}")
    return iterations


def official_config(repo: str, iterations: Optional[int] = None, backend: Optional[str] = None) -> Dict[str, object]:
    """The :class:`AVRegressor` keyword arguments that reproduce ``repo``'s ``CAM``.

    ``iterations`` overrides the number of joint cross-attention blocks (the ``num_seq`` the official ``CAM`` passes
    to ``DCNLayer``: 1 for ``jca`` and ``rjca``, 2 for ``dca``), for checkpoints of a CAM edited to another count.
    """
    repo = check_repo(repo)
    fusion_kwargs: Dict[str, object] = {"iterations": _check_iterations(repo, iterations), "dropout": 0.6}
    if repo == "dca":
        fusion_kwargs["tau"] = _DCA_TAU
    if backend is not None:
        fusion_kwargs["backend"] = backend
    return dict(
        dims=(_DIM, _DIM),
        seq_len=_SEQ_LEN,
        # The fusion class only decides the defaults; gating is what differs (none for JCA and RJCA).
        fusion="dca" if repo == "dca" else "jca",
        fusion_kwargs=fusion_kwargs,
        encoders=_ENCODERS[repo],
        encoder_layers=_LSTM_LAYERS,
        encoder_dropout=0.1,
        joint_dim=_DIM,
        joint_layers=_LSTM_LAYERS,
        head_hidden=128,
        head_dropout=0.6,
        spatial_attention=True,
        spatial_channels=_CHANNELS,
        spatial_positions=_POSITIONS,
        scrambled_reshape=True,
        normalize_inputs=True,
    )


def _lstm_names(official: str, library: str) -> List[Tuple[str, str]]:
    # The official LSTM block registers init_hidden on itself, so state_dict lists it before its children.
    names = [(f"{official}.init_hidden", f"{library}.initial_state")]
    names += [(f"{official}.linear.{p}", f"{library}.projection.{p}") for p in ("weight", "bias")]
    for layer in range(_LSTM_LAYERS):
        for suffix in ("", "_reverse"):
            for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                name = f"{p}_l{layer}{suffix}"
                names.append((f"{official}.rnn.{name}", f"{library}.rnn.{name}"))
    return names


def _linear_names(official: str, library: str, bias: bool = True) -> List[Tuple[str, str]]:
    return [(f"{official}.{p}", f"{library}.{p}") for p in (("weight", "bias") if bias else ("weight",))]


def key_map(repo: str, iterations: Optional[int] = None) -> "OrderedDict[str, str]":
    """Official ``CAM`` state-dict key -> :class:`AVRegressor` state-dict key, in the order of the official
    ``CAM.state_dict()`` (the order its ``__init__`` registers the modules)."""
    repo = check_repo(repo)
    iterations = _check_iterations(repo, iterations)
    pairs: List[Tuple[str, str]] = []
    for t in range(iterations):
        official, library = f"coattn.dcn_layers.{t}", f"fusion.blocks.{t}"
        dense = f"{official}.dense_coattn"
        pairs += _linear_names(f"{dense}.query_linear", f"{library}.query")
        # DCNLayer(data1=video, data2=audio): the "1" modules are the video's, index 0 in the library.
        pairs += _linear_names(f"{dense}.key1_linear", f"{library}.keys.0")
        pairs += _linear_names(f"{dense}.key2_linear", f"{library}.keys.1")
        pairs += _linear_names(f"{dense}.value1_linear", f"{library}.values.0")
        pairs += _linear_names(f"{dense}.value2_linear", f"{library}.values.1")
        pairs += _linear_names(f"{official}.linears.0.0", f"{library}.outputs.0")
        pairs += _linear_names(f"{official}.linears.1.0", f"{library}.outputs.1")
    if _ENCODERS[repo]:
        pairs += _lstm_names("audio_extract", "encoders.1")
        pairs += _lstm_names("video_extract", "encoders.0")
    attention = "video_attn.attn"
    pairs += _linear_names(f"{attention}.affine_audio", "spatial_attention.guide_projection")
    pairs += _linear_names(f"{attention}.affine_video", "spatial_attention.video_projection")
    pairs += _linear_names(f"{attention}.affine_v", "spatial_attention.video_score", bias=False)
    pairs += _linear_names(f"{attention}.affine_g", "spatial_attention.guide_score", bias=False)
    pairs += _linear_names(f"{attention}.affine_h", "spatial_attention.score", bias=False)
    pairs += _linear_names(f"{attention}.affine_feat", "spatial_attention.output")
    heads = [
        _linear_names(f"{official}.{i}", f"{library}.{i}")
        for official, library in (("vregressor", "valence_head"), ("aregressor", "arousal_head"))
        for i in (0, 3)
    ]
    joint = [_lstm_names("Joint", "joint")]
    # The RJCA and DCA CAMs register Joint between the two regressors, the JCA CAM before them.
    for group in joint + heads if repo == "jca" else heads[:2] + joint + heads[2:]:
        pairs += group
    if _GATING[repo] == "final":
        pairs += _linear_names("audio_gating_fc_layer", "fusion.final_gates.1.linear")
        pairs += _linear_names("video_gating_fc_layer", "fusion.final_gates.0.linear")
    return OrderedDict(pairs)


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint (the file itself is read by avkernels.checkpoint.load)


def _state_dict_of(loaded: object, where: str) -> "OrderedDict[str, torch.Tensor]":
    if isinstance(loaded, nn.Module):
        raise TypeError(f"checkpoint: got an nn.Module ({type(loaded).__name__}); pass its state_dict()")
    if not isinstance(loaded, Mapping):
        raise TypeError(
            f"checkpoint: expected a path, a file object, the official {{'net': state_dict, ...}} dict or a state "
            f"dict, got {type(loaded).__name__} from {where}"
        )
    if "net" in loaded:
        state = loaded["net"]
        if not isinstance(state, Mapping):
            raise TypeError(f"checkpoint: {where}['net'] should be the CAM's state dict, got {type(state).__name__}")
    elif loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = loaded
    else:
        keys = sorted(map(str, loaded))[:8]
        raise ValueError(
            f"checkpoint: {where} is neither the official {{'net': state_dict, ...}} dict nor a state dict "
            f"(top-level keys: {keys})"
        )
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint: entries of the state dict that are not named tensors: {bad[:8]}")
    # A CAM wrapped in nn.DataParallel before saving prefixes every key.
    if state and all(k.startswith("module.") for k in state):
        state = OrderedDict((k[len("module."):], v) for k, v in state.items())
    return OrderedDict(state)


def _guess_repo(keys) -> Optional[Tuple[str, int]]:
    """The repository (and num_seq) whose CAM has exactly these keys, if one does."""
    layers = {k.split(".")[2] for k in keys if k.startswith("coattn.dcn_layers.") and k.count(".") > 2}
    count = len(layers) if layers == {str(t) for t in range(len(layers))} and layers else None
    for repo in OFFICIAL_REPOS:
        if count and set(key_map(repo, count)) == set(keys):
            return repo, count
    return None


def _format_keys(keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def from_official(
    cls,
    checkpoint: object,
    repo: str,
    *,
    iterations: Optional[int] = None,
    backend: Optional[str] = None,
    map_location: object = "cpu",
):
    """See :meth:`AVRegressor.from_official`."""
    repo = check_repo(repo)
    iterations = _check_iterations(repo, iterations)
    where = describe(checkpoint)
    state = _state_dict_of(load(checkpoint, map_location), where)
    names = key_map(repo, iterations)

    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names]
    if missing or unexpected:
        lines = [f"checkpoint: {where} does not fit the official {repo.upper()} CAM (num_seq={iterations})"]
        if missing:
            lines.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            lines.append(f"unexpected keys: {_format_keys(unexpected)}")
        guess = _guess_repo(list(state))
        if guess is not None and guess[0] != repo:
            lines.append(f"its keys are those of the official {guess[0].upper()} CAM: use repo={guess[0]!r}")
        elif guess is not None:
            lines.append(f"its keys are those of a CAM with num_seq={guess[1]}: pass iterations={guess[1]}")
        raise ValueError("; ".join(lines))

    # A float64 checkpoint (one made to check equality) stays float64; half-precision ones are widened, since the
    # LSTMs have no half kernels on CPU and widening loses nothing.
    floating = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype = torch.float64 if floating == {torch.float64} else torch.float32
    # Built on the meta device: the tensors are about to be replaced, so nothing is initialised twice.
    with torch.device("meta"):
        model = cls(**official_config(repo, iterations, backend))
    expected = model.state_dict()
    wrong = [
        f"{k}: expected shape {_shape(expected[lib])}, got {_shape(state[k])}"
        for k, lib in names.items()
        if _shape(state[k]) != _shape(expected[lib])
    ]
    if wrong:
        raise ValueError(
            f"checkpoint: {where} does not fit the official {repo.upper()} CAM: " + "; ".join(wrong[:12])
            + (f"; ... ({len(wrong)} in all)" if len(wrong) > 12 else "")
        )
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(OrderedDict((lib, state[k]) for k, lib in names.items()), strict=True)
    return model.eval()


def _layout_problems(model: nn.Module, repo: str) -> Tuple[List[str], int]:
    """Why ``model`` cannot be written as ``repo``'s CAM (empty when it can), and its number of iterations."""
    from avkernels.nn.blocks import DenseJointCrossAttention
    from avkernels.nn.fusion import RecursiveJointCrossAttention

    problems = []
    fusion = model.fusion
    if not isinstance(fusion, RecursiveJointCrossAttention):
        return [f"its fusion is a {type(fusion).__name__}, not the library's joint cross-attention"], 0
    iterations = fusion.iterations
    if len(model.dims) != 2:
        problems.append(f"it has {len(model.dims)} modalities, the CAM two (video, audio)")
    if not all(isinstance(b, DenseJointCrossAttention) for b in fusion.blocks):
        problems.append(f"its fusion has form={fusion.form!r}; the official DenseCoAttn is form='dense'")
    if fusion.share_weights and iterations > 1:
        problems.append("its fusion shares one block across iterations; the official DCNLayer has one per iteration")
    if fusion.gating != _GATING[repo]:
        problems.append(f"its fusion has gating={fusion.gating!r}, the official {repo.upper()} CAM {_GATING[repo]!r}")
    elif repo == "dca":
        taus = {g.tau for g in fusion.final_gates}
        if taus != {_DCA_TAU}:
            problems.append(f"its gates have tau={sorted(taus)}, the official DCA CAM divides by {_DCA_TAU}")
    if (model.encoders is not None) != _ENCODERS[repo]:
        has = "has" if model.encoders is not None else "has no"
        problems.append(f"it {has} per-modality encoders; the official {repo.upper()} CAM "
                        f"{'has' if _ENCODERS[repo] else 'has none'}")
    attention = model.spatial_attention
    if attention is None:
        problems.append("it has no spatial attention; the official CAM has BottomUpExtract")
    elif not attention.scrambled_reshape:
        problems.append(
            "its spatial attention reads the map channel-major (scrambled_reshape=False), the official PositionAttn "
            "with view(-1, 49, 512), which no weights can emulate"
        )
    if not model.normalize_inputs:
        problems.append("it does not L2-normalise its inputs, the official CAM does")
    return problems, iterations


def to_official(model: nn.Module, repo: str) -> "OrderedDict[str, torch.Tensor]":
    """See :meth:`AVRegressor.to_official`."""
    repo = check_repo(repo)
    problems, iterations = _layout_problems(model, repo)
    if not problems:
        with torch.device("meta"):
            reference = type(model)(**official_config(repo, iterations)).state_dict()
        state = model.state_dict()
        names = key_map(repo, iterations)
        libraries = set(names.values())
        problems += [f"unexpected parameter {k}" for k in state if k not in libraries]
        problems += [
            f"{lib} (official {k}): shape {_shape(state[lib])}, the official CAM's {_shape(reference[lib])}"
            for k, lib in names.items()
            if lib in state and _shape(state[lib]) != _shape(reference[lib])
        ]
    if problems:
        raise ValueError(f"to_official: this model cannot be written as the official {repo.upper()} CAM: "
                         + "; ".join(problems))
    return OrderedDict((k, state[lib]) for k, lib in names.items())
