"""A synthetic audio-visual valence-arousal dataset with weak complementarity: the library's default dataset.

Every "video" has smooth latent valence and arousal trajectories (sums of random low-frequency sinusoids, clipped to
[-1, 1]) and a smooth two-dimensional nuisance trajectory (context that both modalities see but that carries no
emotion). Each modality is a different noisy nonlinear view of them::

    x_m(t) = tanh( W_m [w_mv * v(t), w_ma * a(t), nuisance(t)] + b_m ) + noise_m * eps(t)

with fixed random ``W_m``, ``b_m``. Video sees valence better than arousal (``w_vv = 1, w_va = 0.4``) and audio the
opposite, so the two are complementary. Then, in a share of the ``segment_len``-frame segments, one modality is
corrupted (the other stays clean):

* ``"noise"``: the modality is uninformative: ``tanh(W_m r(t) + b_m) + noise``, ``r(t)`` white Gaussian, the same
  marginal range as real features but no link to the labels;
* ``"misleading"``: the modality is driven by a different latent trajectory (another emotion), so it looks like
  informative features but points to wrong labels.

With ``corruption_offset > 0`` every corrupted frame of a modality is also shifted by ``corruption_offset`` times a
fixed random sign vector of that modality (a telltale, as an occluded face or a clipped microphone changes the
features' distribution), so that a per-frame gate can see that the frame is corrupted; at 0 (the default) a
corrupted frame has the marginal range of a clean one.

This is the weak-complementarity setting DCA and GRJCA target: on corrupted segments, cross-attending to the
corrupted modality hurts, and a good gate should fall back to the unattended features. Each frame records which
modality was corrupted (``corrupted``: 0 none, 1 video, 2 audio) and how (``corruption_kind``: 0 none, 1 noise,
2 misleading), so that gate values and CCCs can be compared between corrupted and clean segments
(:data:`CONDITIONS`, :meth:`SyntheticAV.frame_conditions`).

:data:`PRESETS` names documented configurations: ``"default"`` (the class defaults) and ``"gating"``, the regime
of ``docs/gating-experiment.md`` where a gate beat plain recursive cross-attention.

A share of frames (in short runs) has label ``-5`` (unannotated), to exercise masking. Everything is drawn from
``numpy.random.SeedSequence(seed)``: the same seed gives identical tensors; the projections, the train split and the
validation split come from separate child streams, so changing the size of one split does not change the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import Dict, List, Optional, Sequence

import numpy as np

from avkernels.data.formats import INVALID_LABEL
from avkernels.data.windows import AVVideo, AVWindowDataset

SPLITS = ("train", "val")
CLEAN, VIDEO_CORRUPTED, AUDIO_CORRUPTED = 0, 1, 2
NO_CORRUPTION, NOISE, MISLEADING = 0, 1, 2
MODALITY_WEIGHTS = {"video": (1.0, 0.4), "audio": (0.4, 1.0)}  # (valence, arousal) emphasis per modality
NUISANCE_DIMS = 2
# The evaluation conditions of a frame, by index (see condition_codes): clean, or which modality is corrupted and how.
CONDITIONS = ("clean", "video noise", "video misleading", "audio noise", "audio misleading")


@dataclass(frozen=True)
class SyntheticAVConfig:
    """Parameters of the synthetic dataset (the defaults are the ``"default"`` preset; ``make demo`` uses ``"gating"``).

    Attributes:
        seed: master seed; same seed, same data.
        n_train_videos, n_val_videos: videos per split.
        n_frames: frames per video.
        video_dim, audio_dim: feature sizes ``d_v``, ``d_a``.
        video_noise, audio_noise: standard deviation of the additive Gaussian noise per modality.
        components: sinusoids per latent trajectory.
        min_period, max_period: range of their periods, in frames (low frequencies: smooth trajectories).
        segment_len: frames per corruption segment (equal to ``seq_len`` aligns segments with samples).
        corrupt_share: probability that a segment has one corrupted modality.
        misleading_share: among corrupted segments, probability of ``"misleading"`` rather than ``"noise"``.
        corruption_offset: shift of every corrupted frame along a fixed random sign vector per modality (module
            doc); 0 leaves corrupted frames undetectable from their marginal range.
        invalid_share: approximate share of frames labelled -5, in runs of 1 to ``max_invalid_run`` frames.
        max_invalid_run: longest run of unannotated frames.
        seq_len: ``L``, clips per sample.
    """

    seed: int = 0
    n_train_videos: int = 48
    n_val_videos: int = 16
    n_frames: int = 256
    video_dim: int = 32
    audio_dim: int = 24
    video_noise: float = 0.3
    audio_noise: float = 0.5
    components: int = 3
    min_period: float = 40.0
    max_period: float = 200.0
    segment_len: int = 16
    corrupt_share: float = 0.3
    misleading_share: float = 0.5
    corruption_offset: float = 0.0
    invalid_share: float = 0.05
    max_invalid_run: int = 8
    seq_len: int = 16

    def __post_init__(self):
        for name in ("n_train_videos", "n_val_videos", "n_frames", "video_dim", "audio_dim", "components",
                     "segment_len", "max_invalid_run", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("corrupt_share", "misleading_share", "invalid_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a share in [0, 1], got {value!r}")
        if self.invalid_share >= 0.5:
            raise ValueError(
                f"invalid_share: expected < 0.5 (most frames must stay annotated), got {self.invalid_share}"
            )
        if not 0.0 < self.min_period <= self.max_period:
            raise ValueError(
                f"min_period, max_period: expected 0 < min <= max, got {self.min_period}, {self.max_period}"
            )
        if self.video_noise < 0 or self.audio_noise < 0:
            raise ValueError("video_noise, audio_noise: expected non-negative standard deviations")
        if self.corruption_offset < 0:
            raise ValueError(f"corruption_offset: expected >= 0, got {self.corruption_offset!r}")


def _trajectories(rng: np.random.Generator, n: int, count: int, cfg: SyntheticAVConfig) -> np.ndarray:
    """``(n, count)`` smooth trajectories in [-1, 1]: an offset plus ``cfg.components`` random sinusoids."""
    t = np.arange(n, dtype=np.float64)[:, None, None]
    periods = rng.uniform(cfg.min_period, cfg.max_period, size=(1, count, cfg.components))
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(1, count, cfg.components))
    amplitudes = rng.uniform(0.2, 0.6, size=(1, count, cfg.components))
    offsets = rng.uniform(-0.3, 0.3, size=(1, count))
    x = offsets + (amplitudes * np.sin(2.0 * np.pi * t / periods + phases)).sum(axis=-1)
    return np.clip(x, -1.0, 1.0)


class _Views:
    """The fixed random projections of the latent drivers to each modality's features."""

    def __init__(self, rng: np.random.Generator, cfg: SyntheticAVConfig):
        n_in = 2 + NUISANCE_DIMS
        self.cfg = cfg
        self.dims = {"video": cfg.video_dim, "audio": cfg.audio_dim}
        self.noise = {"video": cfg.video_noise, "audio": cfg.audio_noise}
        self.weights = {m: rng.normal(0.0, 1.5 / np.sqrt(n_in), size=(n_in, d)) for m, d in self.dims.items()}
        self.biases = {m: rng.normal(0.0, 0.2, size=d) for m, d in self.dims.items()}
        # Drawn after the projections, so that the projections of a seed do not depend on this option.
        self.telltales = {m: rng.choice((-1.0, 1.0), size=d) for m, d in self.dims.items()}

    def project(self, modality: str, va: np.ndarray, nuisance: np.ndarray) -> np.ndarray:
        w_v, w_a = MODALITY_WEIGHTS[modality]
        drivers = np.concatenate([w_v * va[:, :1], w_a * va[:, 1:2], nuisance], axis=1)
        return np.tanh(drivers @ self.weights[modality] + self.biases[modality])

    def render(self, rng, modality: str, va, nuisance, other_va, segments) -> np.ndarray:
        """Features of one modality over a video; ``segments`` maps frame -> corruption kind for this modality."""
        x = self.project(modality, va, nuisance)
        noise_rows = segments == NOISE
        if noise_rows.any():
            white = rng.normal(0.0, 1.0, size=(int(noise_rows.sum()), 2 + NUISANCE_DIMS))
            x[noise_rows] = np.tanh(white @ self.weights[modality] + self.biases[modality])
        misleading_rows = segments == MISLEADING
        if misleading_rows.any():
            x[misleading_rows] = self.project(modality, other_va, nuisance)[misleading_rows]
        x[segments != NO_CORRUPTION] += self.cfg.corruption_offset * self.telltales[modality]
        x += self.noise[modality] * rng.normal(size=x.shape)
        return x.astype(np.float32)


# Documented configurations: field overrides of SyntheticAVConfig. "gating" is the regime of
# docs/gating-experiment.md where a gate beat plain recursive cross-attention: every corruption misleading (another
# emotion, not noise), half the segments corrupted, a faint telltale that makes a corrupted frame detectable but not
# trivially so, and segments of 4 frames, shorter than the 16-frame windows, so that a window mixes clean and
# corrupted time steps.
PRESETS: Dict[str, Dict[str, object]] = {
    "default": {},
    "gating": {"misleading_share": 1.0, "corrupt_share": 0.5, "corruption_offset": 0.3, "segment_len": 4},
}


def preset_config(preset: str = "default", **overrides) -> SyntheticAVConfig:
    """The configuration of a named preset (:data:`PRESETS`), with keyword ``overrides`` of its fields on top."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    return SyntheticAVConfig(**{**PRESETS[preset], **overrides})


def parse_overrides(items: Sequence[str]) -> Dict[str, object]:
    """``["corrupt_share=0.5", ...]`` (command-line ``FIELD=VALUE`` pairs) -> typed field overrides."""
    fields = {f.name: f.type for f in dataclass_fields(SyntheticAVConfig)}
    overrides: Dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"synthetic override {item!r}: expected FIELD=VALUE with FIELD one of {tuple(fields)}")
        kind = int if fields[name] in (int, "int") else float
        try:
            overrides[name] = kind(value)
        except ValueError as error:
            article = "an int" if kind is int else "a float"
            raise ValueError(f"synthetic override {item!r}: {name} takes {article}") from error
    return overrides


def condition_codes(corrupted: np.ndarray, corruption_kind: np.ndarray) -> np.ndarray:
    """Per frame, the index into :data:`CONDITIONS` of its ``corrupted`` and ``corruption_kind`` codes."""
    corrupted, kind = np.asarray(corrupted), np.asarray(corruption_kind)
    return np.where(corrupted == CLEAN, 0, 2 * (corrupted - 1) + kind).astype(np.int64)


def make_synthetic_videos(config: SyntheticAVConfig, split: str) -> List[AVVideo]:
    """The videos of one split (``"train"`` or ``"val"``), features ordered (video, audio)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    views_seq, train_seq, val_seq = np.random.SeedSequence(config.seed).spawn(3)
    views = _Views(np.random.default_rng(views_seq), config)
    rng = np.random.default_rng(train_seq if split == "train" else val_seq)
    n_videos = config.n_train_videos if split == "train" else config.n_val_videos
    n = config.n_frames
    videos = []
    for i in range(n_videos):
        va = _trajectories(rng, n, 2, config)
        other_va = _trajectories(rng, n, 2, config)
        nuisance = _trajectories(rng, n, NUISANCE_DIMS, config)

        n_segments = -(-n // config.segment_len)
        corrupt = rng.random(n_segments) < config.corrupt_share
        modality = np.where(rng.random(n_segments) < 0.5, VIDEO_CORRUPTED, AUDIO_CORRUPTED)
        kind = np.where(rng.random(n_segments) < config.misleading_share, MISLEADING, NOISE)
        per_frame = np.repeat(np.arange(n_segments), config.segment_len)[:n]
        corrupted = np.where(corrupt, modality, CLEAN)[per_frame]
        corruption_kind = np.where(corrupt, kind, NO_CORRUPTION)[per_frame]

        features = {}
        for code, name in ((VIDEO_CORRUPTED, "video"), (AUDIO_CORRUPTED, "audio")):
            segments = np.where(corrupted == code, corruption_kind, NO_CORRUPTION)
            features[name] = views.render(rng, name, va, nuisance, other_va, segments)

        labels = va.astype(np.float32)
        labels[_invalid_frames(rng, n, config)] = INVALID_LABEL
        extras = {"corrupted": corrupted.astype(np.int64), "corruption_kind": corruption_kind.astype(np.int64)}
        videos.append(AVVideo(f"synthetic_{split}_{i:03d}", features, labels, extras))
    return videos


def _invalid_frames(rng: np.random.Generator, n: int, cfg: SyntheticAVConfig) -> np.ndarray:
    """A boolean mask of about ``invalid_share * n`` frames, in runs of 1..max_invalid_run."""
    mask = np.zeros(n, dtype=bool)
    mean_run = (1 + cfg.max_invalid_run) / 2.0
    for _ in range(int(round(cfg.invalid_share * n / mean_run))):
        start = int(rng.integers(0, n))
        mask[start:start + int(rng.integers(1, cfg.max_invalid_run + 1))] = True
    return mask


class SyntheticAV(AVWindowDataset):
    """The synthetic dataset windowed into ``(L, d_m)`` samples (see :class:`~avkernels.data.windows.AVWindowDataset`).

    Items carry ``video`` ``(L, d_v)``, ``audio`` ``(L, d_a)``, ``valence``/``arousal`` ``(L,)`` (-5 on unannotated
    frames), ``corrupted`` and ``corruption_kind`` ``(L,)`` (module doc), ``frames``, ``lengths``, ``video_index``,
    ``window``.

    Args:
        split: ``"train"`` or ``"val"``.
        config: the generator's parameters (default :class:`SyntheticAVConfig`); keyword ``overrides`` replace fields.
        windows: default ``"masked"`` for train (windows with -5 frames kept, the loss masks them) and ``"all"``
            for val.
    """

    def __init__(self, split: str = "train", config: Optional[SyntheticAVConfig] = None, *,
                 windows: Optional[str] = None, **overrides):
        config = replace(config or SyntheticAVConfig(), **overrides)
        self.config = config
        if windows is None:
            windows = "masked" if split == "train" else "all"
        super().__init__(make_synthetic_videos(config, split), config.seq_len, 1, windows, f"synthetic {split}")

    def frame_conditions(self) -> List[np.ndarray]:
        """Every video's ``(n_frames,)`` condition codes, indices into :data:`CONDITIONS` (frame order of
        :meth:`frame_labels`)."""
        return [condition_codes(v.extras["corrupted"], v.extras["corruption_kind"]) for v in self.videos]

    def describe(self) -> dict:
        """The configuration plus the corruption and label statistics of this split, for logs."""
        corrupted = np.concatenate([v.extras["corrupted"] for v in self.videos])
        kind = np.concatenate([v.extras["corruption_kind"] for v in self.videos])
        return {
            **asdict(self.config),
            "frames": int(corrupted.size),
            "video_corrupted_share": float((corrupted == VIDEO_CORRUPTED).mean()),
            "audio_corrupted_share": float((corrupted == AUDIO_CORRUPTED).mean()),
            "misleading_share_of_corrupted": float((kind == MISLEADING).sum() / max(1, (kind != 0).sum())),
            "invalid_frames": self.stats.n_invalid_frames,
        }
