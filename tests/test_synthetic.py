"""The bundled synthetic audio-visual dataset: reproducible, correctly shaped, and its corruptions really are
uninformative or misleading."""

import numpy as np
import pytest
import torch

from avkernels.data import SyntheticAV, SyntheticAVConfig, make_synthetic_videos
from avkernels.data.synthetic import (
    AUDIO_CORRUPTED, CONDITIONS, MISLEADING, NOISE, PRESETS, VIDEO_CORRUPTED, condition_codes, parse_overrides,
    preset_config,
)

SMALL = dict(n_train_videos=6, n_val_videos=3, n_frames=96)


def _all_items(ds):
    return [ds[i] for i in range(len(ds))]


def test_same_seed_gives_identical_tensors_and_another_seed_does_not():
    a, b = _all_items(SyntheticAV("train", seed=3, **SMALL)), _all_items(SyntheticAV("train", seed=3, **SMALL))
    assert len(a) == len(b) == 6 * 96 // 16
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
    c = _all_items(SyntheticAV("train", seed=4, **SMALL))
    assert not torch.equal(a[0]["video"], c[0]["video"])


def test_splits_are_independent_streams():
    val = make_synthetic_videos(SyntheticAVConfig(seed=1, **SMALL), "val")
    bigger_train = make_synthetic_videos(SyntheticAVConfig(seed=1, **{**SMALL, "n_train_videos": 9}), "val")
    for v, w in zip(val, bigger_train):
        np.testing.assert_array_equal(v.features["audio"], w.features["audio"])
    train = make_synthetic_videos(SyntheticAVConfig(seed=1, **SMALL), "train")
    assert not np.array_equal(train[0].labels, val[0].labels)


def test_batches_have_the_documented_shapes_and_labels():
    config = SyntheticAVConfig(seed=0, video_dim=10, audio_dim=7, seq_len=8, segment_len=8, **SMALL)
    train, val = SyntheticAV("train", config), SyntheticAV("val", config)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=5)))
    assert batch["video"].shape == (5, 8, 10) and batch["audio"].shape == (5, 8, 7)
    assert batch["valence"].shape == batch["arousal"].shape == batch["corrupted"].shape == (5, 8)
    assert batch["video"].dtype == torch.float32 and batch["corrupted"].dtype == torch.int64
    labels = np.concatenate([v.labels for v in train.videos])
    valid = labels[labels != -5]
    assert valid.min() >= -1 and valid.max() <= 1 and valid.std() > 0.2
    invalid = (labels == -5).all(axis=1).mean()
    assert 0.02 < invalid < 0.1, invalid  # about invalid_share = 5 %
    assert train.windows == "masked" and val.windows == "all"
    assert train.stats.n_invalid_frames > 0


def test_trajectories_are_smooth():
    video = make_synthetic_videos(SyntheticAVConfig(seed=0, **SMALL), "train")[0]
    valence = video.labels[:, 0]
    ok = (valence[1:] != -5) & (valence[:-1] != -5)
    # Periods of 40..200 frames: consecutive frames differ by far less than the spread of the values.
    assert np.abs(np.diff(valence))[ok].max() < 0.1 < valence[valence != -5].std()


def test_corruption_shares_and_records():
    config = SyntheticAVConfig(seed=2, corrupt_share=0.5, misleading_share=0.5, n_train_videos=20, n_val_videos=2,
                               n_frames=160)
    ds = SyntheticAV("train", config)
    info = ds.describe()
    corrupted_share = info["video_corrupted_share"] + info["audio_corrupted_share"]
    assert 0.35 < corrupted_share < 0.65 and 0.3 < info["misleading_share_of_corrupted"] < 0.7
    for video in ds.videos:
        codes = video.extras["corrupted"].reshape(-1, config.segment_len)
        assert (codes == codes[:, :1]).all(), "a corruption covers whole segments"
    item = ds[0]
    segment = int(item["corrupted"][0])
    assert (item["corrupted"] == segment).all()  # segments are aligned with the samples


def _linear_fit_ccc(x_fit, y_fit, x_eval, y_eval):
    a = np.c_[x_fit, np.ones(len(x_fit))]
    w = np.linalg.lstsq(a, y_fit, rcond=None)[0]
    p = np.c_[x_eval, np.ones(len(x_eval))] @ w
    pm, ym = p.mean(), y_eval.mean()
    return 2 * ((p - pm) * (y_eval - ym)).mean() / (p.var() + y_eval.var() + (pm - ym) ** 2)


@pytest.mark.parametrize("modality, code", [("video", VIDEO_CORRUPTED), ("audio", AUDIO_CORRUPTED)])
def test_corrupted_segments_do_not_predict_the_labels(modality, code):
    config = SyntheticAVConfig(seed=5, corrupt_share=0.4, n_train_videos=24, n_val_videos=2, n_frames=192)
    videos = make_synthetic_videos(config, "train")
    x = np.concatenate([v.features[modality] for v in videos])
    y = np.concatenate([v.labels for v in videos])
    corrupted = np.concatenate([v.extras["corrupted"] for v in videos])
    kind = np.concatenate([v.extras["corruption_kind"] for v in videos])
    labelled = (y != -5).all(axis=1)
    clean = labelled & (corrupted == 0)
    half = np.flatnonzero(clean)
    fit, held_out = half[::2], half[1::2]
    dim = 0 if modality == "video" else 1  # the dimension this modality sees best
    clean_ccc = _linear_fit_ccc(x[fit], y[fit, dim], x[held_out], y[held_out, dim])
    assert clean_ccc > 0.6, clean_ccc
    for k in (NOISE, MISLEADING):
        rows = labelled & (corrupted == code) & (kind == k)
        bad_ccc = _linear_fit_ccc(x[fit], y[fit, dim], x[rows], y[rows, dim])
        assert bad_ccc < 0.3, (k, bad_ccc)


@pytest.mark.parametrize(
    "override, message",
    [({"n_frames": 0}, "n_frames"), ({"corrupt_share": 1.5}, "corrupt_share"),
     ({"invalid_share": 0.6}, "invalid_share"),
     ({"min_period": 300.0}, "min_period"), ({"video_noise": -1.0}, "video_noise"),
     ({"corruption_offset": -0.5}, "corruption_offset")],
)
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        SyntheticAVConfig(**override)


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        make_synthetic_videos(SyntheticAVConfig(), "test")


def test_condition_codes_name_the_corrupted_modality_and_the_kind():
    corrupted = np.array([0, VIDEO_CORRUPTED, VIDEO_CORRUPTED, AUDIO_CORRUPTED, AUDIO_CORRUPTED])
    kind = np.array([0, NOISE, MISLEADING, NOISE, MISLEADING])
    assert [CONDITIONS[c] for c in condition_codes(corrupted, kind)] == [
        "clean", "video noise", "video misleading", "audio noise", "audio misleading"]


def test_frame_conditions_match_what_was_corrupted():
    ds = SyntheticAV("val", seed=3, corrupt_share=0.6, **SMALL)
    for video, conditions in zip(ds.videos, ds.frame_conditions()):
        assert conditions.shape == (video.n_frames,)
        for code, name in enumerate(CONDITIONS):
            rows = conditions == code
            expected_modality = {"clean": 0, "video": VIDEO_CORRUPTED, "audio": AUDIO_CORRUPTED}[name.split()[0]]
            assert (video.extras["corrupted"][rows] == expected_modality).all()
            if name != "clean":
                expected_kind = NOISE if name.endswith("noise") else MISLEADING
                assert (video.extras["corruption_kind"][rows] == expected_kind).all()
    assert set(np.concatenate(ds.frame_conditions()).tolist()) == set(range(len(CONDITIONS)))


def test_corruption_offset_shifts_exactly_the_corrupted_frames_of_the_corrupted_modality():
    plain = make_synthetic_videos(SyntheticAVConfig(seed=4, corrupt_share=0.5, **SMALL), "train")
    marked = make_synthetic_videos(SyntheticAVConfig(seed=4, corrupt_share=0.5, corruption_offset=0.8, **SMALL),
                                   "train")
    for a, b in zip(plain, marked):
        np.testing.assert_array_equal(a.labels, b.labels)
        for modality, code in (("video", VIDEO_CORRUPTED), ("audio", AUDIO_CORRUPTED)):
            shift = b.features[modality] - a.features[modality]
            corrupted = a.extras["corrupted"] == code
            assert (shift[~corrupted] == 0).all(), "clean frames (and the other modality's) are unchanged"
            if corrupted.any():
                # One fixed sign vector per modality, the same on every corrupted frame.
                np.testing.assert_allclose(np.abs(shift[corrupted]), 0.8, atol=1e-5)
                first = np.broadcast_to(shift[corrupted][0], shift[corrupted].shape)
                np.testing.assert_allclose(shift[corrupted], first, atol=1e-5)


def test_the_gating_preset_is_the_regime_it_claims():
    config = preset_config("gating", seed=1, n_train_videos=12, n_val_videos=2)
    assert config.segment_len < config.seq_len
    ds = SyntheticAV("train", config)
    corrupted = np.concatenate([v.extras["corrupted"] for v in ds.videos])
    kind = np.concatenate([v.extras["corruption_kind"] for v in ds.videos])
    assert (kind[corrupted != 0] == MISLEADING).all(), "every corruption is misleading, none is noise"
    assert 0.4 < (corrupted != 0).mean() < 0.6
    # Windows mix clean and corrupted time steps.
    mixed = [len(set(ds[i]["corrupted"].tolist())) > 1 for i in range(len(ds))]
    assert np.mean(mixed) > 0.5
    # The faint telltale makes a corrupted frame detectable on its own, most of the time: one direction (the sign of
    # the mean shift) and a threshold separate most corrupted frames of each modality from its clean ones.
    for modality, code in (("video", VIDEO_CORRUPTED), ("audio", AUDIO_CORRUPTED)):
        x = np.concatenate([v.features[modality] for v in ds.videos])
        bad = corrupted == code
        direction = np.sign(x[bad].mean(axis=0) - x[~bad].mean(axis=0))
        score = x @ direction
        threshold = (score[bad].mean() + score[~bad].mean()) / 2
        accuracy = ((score > threshold) == bad).mean()
        assert accuracy > 0.85, (modality, accuracy)
        # Without the telltale the same frames are not separable this way.
        plain = preset_config("gating", seed=1, n_train_videos=12, n_val_videos=2, corruption_offset=0.0)
        y = np.concatenate([v.features[modality] for v in make_synthetic_videos(plain, "train")])
        score = y @ np.sign(y[bad].mean(axis=0) - y[~bad].mean(axis=0))
        threshold = (score[bad].mean() + score[~bad].mean()) / 2
        assert ((score > threshold) == bad).mean() < 0.7


def test_presets_and_overrides():
    assert preset_config("default") == SyntheticAVConfig()
    assert preset_config("default", corrupt_share=0.7).corrupt_share == 0.7
    assert set(PRESETS) == {"default", "gating"}
    with pytest.raises(ValueError, match="preset: expected one of"):
        preset_config("nope")
    assert parse_overrides(["corrupt_share=0.5", "segment_len=4"]) == {"corrupt_share": 0.5, "segment_len": 4}
    assert isinstance(parse_overrides(["segment_len=4"])["segment_len"], int)
    with pytest.raises(ValueError, match="FIELD=VALUE with FIELD one of"):
        parse_overrides(["corrupt_shares=0.5"])
    with pytest.raises(ValueError, match="segment_len takes an int"):
        parse_overrides(["segment_len=0.5"])
