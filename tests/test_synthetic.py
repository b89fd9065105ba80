"""The bundled synthetic audio-visual dataset: reproducible, correctly shaped, and its corruptions really are
uninformative or misleading."""

import numpy as np
import pytest
import torch

from avkernels.data import SyntheticAV, SyntheticAVConfig, make_synthetic_videos
from avkernels.data.synthetic import AUDIO_CORRUPTED, MISLEADING, NOISE, VIDEO_CORRUPTED

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
     ({"min_period": 300.0}, "min_period"), ({"video_noise": -1.0}, "video_noise")],
)
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        SyntheticAVConfig(**override)


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        make_synthetic_videos(SyntheticAVConfig(), "test")
