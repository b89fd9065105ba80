"""What the dataset readers refuse: feature rows with NaN, inf or values beyond float32's range (in every reader's
feature files), text that is not UTF-8, and empty splits. Each error names the file and where in it; the checks
cost little (a vectorised pass over each array, in chunks)."""

import os
import re
import sys

import numpy as np
import pytest

from avkernels.data import AffWild2VA, DataFormatError, IEMOCAPFold, RECOLA
from avkernels.data.formats import load_array, read_name_list, read_va_annotation, read_value_column_csv

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import make_samples  # noqa: E402

BAD_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "beyond float32": 1e39}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("samples")
    make_samples.write_affwild2(str(tmp / "affwild2"))
    make_samples.write_recola(str(tmp / "recola"))
    make_samples.write_iemocap_fold(str(tmp / "fold"))
    return tmp


def _affwild2(root):
    return AffWild2VA(os.path.join(root, "annotations", "Train_Set"),
                      {m: os.path.join(root, "features", m) for m in ("video", "audio")}, seq_len=4, clip_stride=8)


def _plant(path, rows, value, dtype=None):
    """Rewrite the .npy at ``path`` with ``value`` in the given rows (and in float64 when the value needs it)."""
    array = np.load(path)
    dtype = dtype or (np.float64 if abs(value) > 1e38 and np.isfinite(value) else array.dtype)
    array = array.astype(dtype)
    for row in rows:
        array[(row,) + (1,) * (array.ndim - 1)] = value
    np.save(path, array)


def _expect_bad_rows(load, path, first, count, total):
    with pytest.raises(DataFormatError) as info:
        load()
    message = str(info.value)
    assert message.startswith(path + ":"), message
    assert f"in {count} of {total} rows" in message and f"the first is row {first} " in message, message


@pytest.mark.parametrize("value", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_affwild2_and_recola_features_with_bad_rows(roots, tmp_path, value):
    import shutil

    root = str(tmp_path / "affwild2")
    shutil.copytree(roots / "affwild2", root)
    path = os.path.join(root, "features", "audio", "video_b-30-640x360.npy")
    _plant(path, [7, 30, 44], value)
    _expect_bad_rows(lambda: _affwild2(root), path, 7, 3, 45)

    root = str(tmp_path / "recola")
    shutil.copytree(roots / "recola", root)
    path = os.path.join(root, "features", "video", "dev_4.npy")
    _plant(path, [36], value)
    _expect_bad_rows(lambda: RECOLA(root, "dev", seq_len=4, clip_stride=4), path, 36, 1, 37)


@pytest.mark.parametrize("stem, n", [("audio_mfcc", 3), ("video", 3), ("W_embedding", 11)])
def test_iemocap_arrays_with_bad_rows(roots, tmp_path, stem, n):
    import shutil

    fold = str(tmp_path / "fold")
    shutil.copytree(roots / "fold", fold)
    name = "W_embedding.npy" if stem == "W_embedding" else f"dev_{stem}.npy"
    path = os.path.join(fold, name)
    _plant(path, [2], np.nan)
    _expect_bad_rows(lambda: IEMOCAPFold(fold, "dev"), path, 2, 1, n)


def test_float16_and_float64_files_within_range_load(tmp_path):
    for dtype, big in ((np.float16, 65504.0), (np.float64, 3.0e38)):
        path = str(tmp_path / f"{np.dtype(dtype).name}.npy")
        array = np.zeros((5, 3), dtype=dtype)
        array[4, 2] = big
        np.save(path, array)
        assert load_array(path, "features", ndim=2).shape == (5, 3)
    # float16 infinities are found by their bit pattern: each of the three kinds, in a large chunked file
    array = np.zeros((300_000, 8), dtype=np.float16)
    array[[5, 150_000, 299_999], [0, 3, 7]] = [np.inf, -np.inf, np.nan]
    path = str(tmp_path / "large.npy")
    np.save(path, array)
    with pytest.raises(DataFormatError, match=r"in 3 of 300000 rows; the first is row 5 \(inf at index \(5, 0\)\)"):
        load_array(path, "features", ndim=2)


ENCODINGS = {
    "0xff byte": (b"valence,arousal\n0.1,0.2\n0.3,0.4\xff\n", 3, "byte 0xff is not UTF-8"),
    "latin-1": ("valence,arousal\n0.1,0.2\n0.3,0.4 caf\xe9\n".encode("latin-1"), 3, "byte 0xe9 is not UTF-8"),
    "utf-16": ("valence,arousal\n0.1,0.2\n".encode("utf-16"), 1, "UTF-16 byte-order mark"),
    "utf-16 without mark": ("valence,arousal\n0.1,0.2\n".encode("utf-16-le"), 1, "NUL byte"),
}


@pytest.mark.parametrize("case", list(ENCODINGS))
def test_undecodable_text_names_file_line_and_encoding(tmp_path, case):
    raw, line, reason = ENCODINGS[case]
    path = str(tmp_path / "video.txt")
    with open(path, "wb") as f:
        f.write(raw)
    csv_path = str(tmp_path / "dev_1.csv")
    with open(csv_path, "wb") as f:
        f.write(raw.replace(b"valence,arousal\n", b"") if case in ("0xff byte", "latin-1") else raw)
    for read, where, at in ((read_va_annotation, path, line), (read_name_list, path, line),
                            (read_value_column_csv, csv_path, line - 1 if case in ("0xff byte", "latin-1") else 1)):
        with pytest.raises(DataFormatError) as info:
            read(where)
        message = str(info.value)
        assert re.match(rf"{re.escape(where)}, line {at}, column \d+: ", message), message
        assert reason in message and "UTF-8" in message, message
        assert info.value.__context__ is None or info.value.__suppress_context__


def test_utf8_with_a_byte_order_mark_and_windows_newlines_reads(tmp_path):
    path = str(tmp_path / "video.txt")
    with open(path, "wb") as f:
        f.write("valence,arousal\r\n0.5,-0.25\r\n-5,-5\r\n".encode("utf-8-sig"))
    np.testing.assert_array_equal(read_va_annotation(path), [[0.5, -0.25], [-5, -5]])


def test_an_empty_split_is_an_error_for_every_reader(roots, tmp_path):
    import shutil

    # IEMOCAP: a split with no utterances (every array of it has zero rows) ...
    fold = str(tmp_path / "fold")
    shutil.copytree(roots / "fold", fold)
    for stem in ("audio_mfcc", "video", "nlp_trans", "label", "video_seqN"):
        path = os.path.join(fold, f"dev_{stem}.npy")
        np.save(path, np.load(path)[:0])
    with pytest.raises(DataFormatError, match=re.escape(os.path.join(fold, "dev_label.npy")) + ".*no rows"):
        IEMOCAPFold(fold, "dev")
    # ... or one whose every utterance is left out for having no video.
    np.save(os.path.join(fold, "test_video_seqN.npy"), np.zeros(3, dtype=np.int32))
    with pytest.raises(DataFormatError, match="test_video_seqN.npy: every one of the 3 utterances.*leaves none"):
        IEMOCAPFold(fold, "test")
    assert len(IEMOCAPFold(fold, "test", drop_no_video=False)) == 3

    # Aff-Wild2: an annotation folder without files, an empty name list, a video without frames.
    root = str(tmp_path / "affwild2")
    shutil.copytree(roots / "affwild2", root)
    empty = os.path.join(root, "annotations", "Empty_Set")
    os.makedirs(empty)
    features = {m: os.path.join(root, "features", m) for m in ("video", "audio")}
    with pytest.raises(DataFormatError, match="no .txt annotation files"):
        AffWild2VA(empty, features)
    names = os.path.join(root, "no_videos.txt")
    open(names, "w").close()
    with pytest.raises(DataFormatError, match="the list is empty"):
        AffWild2VA(None, features, videos=names)
    with pytest.raises(ValueError, match="no videos"):
        AffWild2VA(None, features, videos=[])
    np.save(os.path.join(features["video"], "video_a.npy"), np.zeros((0, 6), np.float32))
    with pytest.raises(DataFormatError, match=r"video_a.npy: .*holds no rows"):
        AffWild2VA(None, features, videos=["video_a"])

    # RECOLA: no subjects.
    with pytest.raises(ValueError, match="RECOLA dev: no videos"):
        RECOLA(str(roots / "recola"), "dev", subjects=[])
