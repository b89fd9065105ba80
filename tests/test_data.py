"""Dataset loaders on tiny files in the real on-disk formats (written by tests/data/make_samples.py into tmp_path),
including broken files: every error must name the file and the line (text) or index (arrays)."""

import logging
import os
import re
import sys

import numpy as np
import pytest
import torch

from avkernels.data import AffWild2VA, DataFormatError, IEMOCAPFold, RECOLA, window_frames
from avkernels.data.formats import read_va_annotation, read_value_column_csv

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import make_samples  # noqa: E402

FEATURE_DIRS = ("video", "audio")


# ------------------------------------------------------------------------------------------------------------------
# Windowing
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, seq_len, stride", [(1, 1, 1), (7, 3, 1), (70, 4, 8), (45, 4, 8), (512, 16, 32),
                                                (513, 16, 32), (97, 5, 3)])
def test_every_frame_is_the_end_of_exactly_one_clip(n, seq_len, stride):
    frames = window_frames(n, seq_len, stride)
    assert frames.shape[1] == seq_len
    real = frames[frames >= 0]
    assert np.array_equal(np.sort(real), np.arange(n))
    assert (frames[:, 0] >= 0).all(), "a window made only of padding was listed"
    steps = np.diff(frames, axis=1)
    assert ((steps == stride) | (frames[:, 1:] == -1)).all(), "clip ends must be clip_stride frames apart"


def test_official_setting_windows():
    frames = window_frames(1024, 16, 32)
    assert frames.shape == (64, 16)
    assert frames[0].tolist() == list(range(0, 512, 32))
    assert frames[31].tolist() == list(range(31, 512, 32))
    assert frames[32, 0] == 512


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_window_frames_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="seq_len"):
        window_frames(10, bad, 1)


# ------------------------------------------------------------------------------------------------------------------
# Aff-Wild2
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def affwild2(tmp_path):
    root = str(tmp_path / "affwild2")
    written = make_samples.write_affwild2(root)
    return root, written


def _aw2(root, split="Train_Set", **kwargs):
    kwargs.setdefault("seq_len", 4)
    kwargs.setdefault("clip_stride", 8)
    features = {m: os.path.join(root, "features", m) for m in FEATURE_DIRS}
    return AffWild2VA(os.path.join(root, "annotations", split), features, **kwargs)


def test_affwild2_all_windows_cover_every_frame_once_with_its_features_and_label(affwild2):
    root, written = affwild2
    ds = _aw2(root, windows="all")
    assert ds.modalities == FEATURE_DIRS and ds.feature_dims == make_samples.AFFWILD2_DIMS
    seen = {name: np.zeros(n, dtype=int) for name, n in make_samples.AFFWILD2_VIDEOS.items()}
    for i in range(len(ds)):
        item = ds[i]
        name = ds.videos[int(item["video_index"])].name
        frames = item["frames"].numpy()
        real = frames >= 0
        seen[name][frames[real]] += 1
        for m in FEATURE_DIRS:
            assert item[m].shape == (4, make_samples.AFFWILD2_DIMS[m]) and item[m].dtype == torch.float32
            np.testing.assert_array_equal(item[m].numpy()[real], written["features"][m][name][frames[real]])
            assert (item[m].numpy()[~real] == 0).all()
        labels = written["labels"][name]
        np.testing.assert_array_equal(item["valence"].numpy()[real], labels[frames[real], 0])
        np.testing.assert_array_equal(item["arousal"].numpy()[real], labels[frames[real], 1])
        assert (item["valence"].numpy()[~real] == -5).all()
    for name, counts in seen.items():
        assert (counts == 1).all(), name
    assert ds.stats.n_windows_dropped == 0 and ds.stats.n_labelled_frames_dropped == 0
    assert ds.stats.n_invalid_frames == sum(int((y == -5).any(1).sum()) for y in written["labels"].values())


def test_affwild2_training_windows_are_fully_labelled_and_drops_are_counted_and_logged(affwild2, caplog):
    root, written = affwild2
    with caplog.at_level(logging.INFO, logger="avkernels.data"):
        ds = _aw2(root, windows="labelled", name="aw2-train")
    covered = {name: np.zeros(n, dtype=bool) for name, n in make_samples.AFFWILD2_VIDEOS.items()}
    for i in range(len(ds)):
        item = ds[i]
        assert (item["frames"] >= 0).all()
        assert (item["valence"] != -5).all() and (item["arousal"] != -5).all()
        covered[ds.videos[int(item["video_index"])].name][item["frames"].numpy()] = True
    # Independent count of the annotated frames that no kept window holds.
    lost = sum(int(((y != -5).any(1) & ~covered[name]).sum()) for name, y in written["labels"].items())
    assert lost > 0 and ds.stats.n_labelled_frames_dropped == lost
    assert ds.stats.n_windows_dropped == ds.stats.n_windows - len(ds) > 0
    assert any("aw2-train" in r.getMessage() and f"{lost} annotated frames" in r.getMessage() for r in caplog.records)


def test_affwild2_masked_windows_keep_partially_labelled_windows(affwild2):
    root, _ = affwild2
    labelled, masked = _aw2(root, windows="labelled"), _aw2(root, windows="masked")
    assert len(masked) > len(labelled)
    assert any((masked[i]["valence"] == -5).any() for i in range(len(masked)))
    assert all((masked[i]["valence"] != -5).any() for i in range(len(masked)))


def test_affwild2_test_set_from_a_name_list_has_only_invalid_labels(affwild2):
    root, _ = affwild2
    features = {m: os.path.join(root, "features", m) for m in FEATURE_DIRS}
    ds = AffWild2VA(None, features, videos=os.path.join(root, "test_set.txt"), seq_len=4, clip_stride=8)
    assert [v.n_frames for v in ds.videos] == list(make_samples.AFFWILD2_VIDEOS.values())
    assert all((v.labels == -5).all() for v in ds.videos)


def test_affwild2_frame_values_round_trip(affwild2):
    root, _ = affwild2
    ds = _aw2(root, windows="all")
    windows = np.arange(len(ds))[::-1]  # any order
    values = np.stack([ds[i]["frames"].numpy().astype(float) for i in windows])
    per_video = ds.frame_values(windows, values)
    for video, v in zip(ds.videos, per_video):
        np.testing.assert_array_equal(v, np.arange(video.n_frames))
    with pytest.raises(ValueError, match="already have values"):
        ds.frame_values([0, 0], np.zeros((2, 4)))


def test_affwild2_exclude_rejects_unknown_names(affwild2):
    root, _ = affwild2
    assert len(_aw2(root, exclude=["video_a"]).videos) == 1
    with pytest.raises(ValueError, match="typo"):
        _aw2(root, exclude=["typo"])


def _rewrite_line(path, line_no, text):
    with open(path) as f:
        lines = f.read().split("\n")
    lines[line_no - 1] = text
    with open(path, "w") as f:
        f.write("\n".join(lines))


@pytest.mark.parametrize(
    "line_no, text, message",
    [
        (1, "arousal,valence", r"line 1: expected the header 'valence,arousal'"),
        (5, "0.1;0.2", r"line 5: expected two comma-separated values"),
        (7, "0.1,abc", r"line 7: expected a number, got 'abc'"),
        (9, "0.1,0.2,0.3", r"line 9: expected two comma-separated values"),
        (12, "1.5,0.2", r"line 12: valence 1.5 is outside \[-1, 1\]"),
        (20, "0.1,nan", r"line 20: expected a finite number"),
        (30, "", r"line 30: empty line"),
    ],
)
def test_affwild2_malformed_annotation_names_file_and_line(affwild2, line_no, text, message):
    root, _ = affwild2
    path = os.path.join(root, "annotations", "Train_Set", "video_a.txt")
    _rewrite_line(path, line_no, text)
    with pytest.raises(DataFormatError, match=re.escape(path) + ", " + message):
        _aw2(root)


def test_affwild2_missing_annotation_and_feature_files_are_named(affwild2):
    root, _ = affwild2
    with pytest.raises(FileNotFoundError, match=r"Train_Set.*nope\.txt: Aff-Wild2 annotation file not found"):
        _aw2(root, videos=["video_a", "nope"])
    missing = os.path.join(root, "features", "audio", "video_a.npy")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + ": Aff-Wild2 audio features of 'video_a'"):
        _aw2(root)


def test_affwild2_feature_rows_must_match_annotation_lines(affwild2):
    root, written = affwild2
    path = os.path.join(root, "features", "video", "video_a.npy")
    np.save(path, written["features"]["video"]["video_a"][:-1])
    message = r": 69 feature rows but the labels of 'video_a' have 70"
    with pytest.raises(DataFormatError, match=re.escape(path) + message):
        _aw2(root)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((70,), np.float32), r"must be a 2-d array, got shape \(70,\)"),
        (np.zeros((70, 6), np.int64), r"must hold floating-point values, got dtype int64"),
    ],
)
def test_affwild2_feature_array_shape_and_dtype(affwild2, array, message):
    root, _ = affwild2
    path = os.path.join(root, "features", "video", "video_a.npy")
    np.save(path, array)
    with pytest.raises(DataFormatError, match=re.escape(path) + ": Aff-Wild2 video features " + message):
        _aw2(root)


def test_affwild2_feature_size_must_agree_across_videos(affwild2):
    root, _ = affwild2
    path = os.path.join(root, "features", "audio", "video_b-30-640x360.npy")
    np.save(path, np.zeros((45, 5), np.float32))
    with pytest.raises(DataFormatError, match=re.escape(path) + r": feature size 5 differs from 4"):
        _aw2(root)


def test_affwild2_corrupt_npy_is_named(affwild2):
    root, _ = affwild2
    path = os.path.join(root, "features", "video", "video_a.npy")
    with open(path, "wb") as f:
        f.write(b"not a numpy file")
    with pytest.raises(DataFormatError, match=re.escape(path) + ": cannot be read as a .npy array"):
        _aw2(root)


def test_va_annotation_trailing_newlines_are_fine_but_no_frames_is_not(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("valence,arousal\n0.5,-0.25\n-5,-5\n\n\n")
    np.testing.assert_array_equal(read_va_annotation(path), [[0.5, -0.25], [-5, -5]])
    path.write_text("valence,arousal\n")
    with pytest.raises(DataFormatError, match="no frame lines"):
        read_va_annotation(path)
    path.write_text("")
    with pytest.raises(DataFormatError, match="line 1: expected the header"):
        read_va_annotation(path)


# ------------------------------------------------------------------------------------------------------------------
# RECOLA
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def recola(tmp_path):
    root = str(tmp_path / "recola")
    return root, make_samples.write_recola(root)


@pytest.mark.parametrize("split", ["train", "dev"])
def test_recola_reads_gold_standard_and_features(recola, split):
    root, written = recola
    ds = RECOLA(root, split, seq_len=4, clip_stride=3, windows="all")
    assert [v.name for v in ds.videos] == [f"{split}_{i}" for i in range(1, 10)]
    for v in ds.videos:
        np.testing.assert_array_equal(v.labels, written["labels"][v.name])
        np.testing.assert_array_equal(v.features["audio"], written["features"]["audio"][v.name])
    total = sum(int((ds[i]["frames"] >= 0).sum()) for i in range(len(ds)))
    assert total == 9 * make_samples.RECOLA_FRAMES
    assert ds.stats.n_invalid_frames == 0


def test_recola_rejects_a_bad_split():
    with pytest.raises(ValueError, match="split"):
        RECOLA("/nonexistent", "test")


def test_recola_valence_arousal_length_mismatch_names_both_files(recola):
    root, _ = recola
    arousal = os.path.join(root, "ratings_gold_standard", "arousal", "train_4.csv")
    with open(arousal) as f:
        lines = f.readlines()
    with open(arousal, "w") as f:
        f.writelines(lines[:-2])
    valence = os.path.join(root, "ratings_gold_standard", "valence", "train_4.csv")
    with pytest.raises(DataFormatError, match=re.escape(arousal) + r": 35 rows, but " + re.escape(valence) + " has 37"):
        RECOLA(root, "train")


def test_recola_malformed_row_names_file_and_line(recola):
    root, _ = recola
    path = os.path.join(root, "ratings_gold_standard", "valence", "dev_2.csv")
    _rewrite_line(path, 11, "0.1x,0.40")
    with pytest.raises(DataFormatError, match=re.escape(path) + r", line 11: expected a number, got '0.1x'"):
        RECOLA(root, "dev")
    _rewrite_line(path, 11, "")
    with pytest.raises(DataFormatError, match=re.escape(path) + r", line 11: empty line"):
        RECOLA(root, "dev")
    _rewrite_line(path, 11, "  ")
    with pytest.raises(DataFormatError, match=re.escape(path) + r", line 11: empty line"):
        RECOLA(root, "dev")


def test_recola_missing_and_empty_files(recola, tmp_path):
    root, _ = recola
    path = os.path.join(root, "ratings_gold_standard", "arousal", "dev_9.csv")
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=re.escape(path) + ": RECOLA arousal gold standard of 'dev_9'"):
        RECOLA(root, "dev")
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match="holds no rows"):
        read_value_column_csv(empty)


def test_recola_feature_rows_must_match(recola):
    root, written = recola
    path = os.path.join(root, "features", "video", "train_1.npy")
    np.save(path, np.zeros((40, 6), np.float32))
    message = r": 40 feature rows but the labels of 'train_1' have 37"
    with pytest.raises(DataFormatError, match=re.escape(path) + message):
        RECOLA(root, "train")


# ------------------------------------------------------------------------------------------------------------------
# IEMOCAP
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iemocap_template(tmp_path_factory):
    fold = str(tmp_path_factory.mktemp("iemocap") / "fold01")
    return fold, make_samples.write_iemocap_fold(fold)


@pytest.fixture
def iemocap(iemocap_template, tmp_path):
    import shutil

    template, written = iemocap_template
    fold = str(tmp_path / "fold01")
    shutil.copytree(template, fold)
    return fold, written


def test_iemocap_items_have_the_true_shapes_and_text_from_the_embedding(iemocap):
    fold, written = iemocap
    ds = IEMOCAPFold(fold, "train", drop_no_video=False)
    assert len(ds) == 4 and ds.n_dropped_no_video == 0
    item = ds[2]
    assert item["audio"].shape == (1000, 120) and item["video"].shape == (32, 2048)
    assert item["text"].shape == (128, 300) and item["label"].dtype == torch.int64
    arrays = written["train"]
    np.testing.assert_array_equal(item["audio"].numpy(), arrays["audio_mfcc"][2])
    np.testing.assert_array_equal(item["video"].numpy(), arrays["video"][2])
    np.testing.assert_array_equal(item["text"].numpy(), written["W_embedding"][arrays["nlp_trans"][2]])
    assert int(item["label"]) == arrays["label"][2]


def test_iemocap_drops_utterances_without_video_and_reports_them(iemocap, caplog):
    fold, written = iemocap
    with caplog.at_level(logging.INFO, logger="avkernels.data"):
        ds = IEMOCAPFold(fold, "dev", modalities=("audio",))
    assert ds.n_dropped_no_video == 1 and len(ds) == 2
    assert set(ds[0]) == {"audio", "label"}
    np.testing.assert_array_equal(ds.labels, written["dev"]["label"][[0, 2]])
    np.testing.assert_array_equal(ds[1]["audio"].numpy(), written["dev"]["audio_mfcc"][2])
    assert any("dropped 1 of 3 utterances" in r.getMessage() for r in caplog.records)


def test_iemocap_wrong_shape_names_the_file(iemocap):
    fold, _ = iemocap
    path = os.path.join(fold, "test_audio_mfcc.npy")
    np.save(path, np.zeros((3, 999, 120), np.float32))
    with pytest.raises(DataFormatError, match=re.escape(path) + r": IEMOCAP audio MFCC must have shape "
                                              r"\(N, 1000, 120\), got \(3, 999, 120\)"):
        IEMOCAPFold(fold, "test")


def test_iemocap_label_out_of_range_names_file_and_index(iemocap):
    fold, _ = iemocap
    path = os.path.join(fold, "train_label.npy")
    np.save(path, np.array([0, 3, 7, 1]))
    with pytest.raises(DataFormatError, match=re.escape(path) + r": labels must lie in 0..6, got 7 at index 2"):
        IEMOCAPFold(fold, "train")
    np.save(path, np.array([0.0, 1.5, 2.0, 1.0]))
    message = r": IEMOCAP train labels must hold integers, got 1.5 at index 1"
    with pytest.raises(DataFormatError, match=re.escape(path) + message):
        IEMOCAPFold(fold, "train")


def test_iemocap_utterance_counts_must_agree(iemocap):
    fold, _ = iemocap
    path = os.path.join(fold, "train_video.npy")
    np.save(path, np.zeros((5, 32, 2048), np.float32))
    with pytest.raises(DataFormatError, match=re.escape(path) + r": 5 utterances, but the label file has 4"):
        IEMOCAPFold(fold, "train")


def test_iemocap_token_ids_must_index_the_embedding(iemocap):
    fold, _ = iemocap
    path = os.path.join(fold, "dev_nlp_trans.npy")
    tokens = np.zeros((3, 128), np.int64)
    tokens[1, 17] = make_samples.IEMOCAP_VOCAB
    np.save(path, tokens)
    with pytest.raises(DataFormatError, match=re.escape(path) + r": token ids .* got 11 at index \(1, 17\)"):
        IEMOCAPFold(fold, "dev")


def test_iemocap_missing_files_are_named(iemocap):
    fold, _ = iemocap
    path = os.path.join(fold, "train_video_seqN.npy")
    os.remove(path)
    assert len(IEMOCAPFold(fold, "train", drop_no_video=False)) == 4
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        IEMOCAPFold(fold, "train")
    embedding = os.path.join(fold, "W_embedding.npy")
    os.remove(embedding)
    with pytest.raises(FileNotFoundError, match=re.escape(embedding)):
        IEMOCAPFold(fold, "dev", modalities=("text",))


def test_iemocap_rejects_bad_arguments(iemocap):
    fold, _ = iemocap
    with pytest.raises(ValueError, match="split"):
        IEMOCAPFold(fold, "val")
    with pytest.raises(ValueError, match="modalities"):
        IEMOCAPFold(fold, "train", modalities=("audio", "speech"))
