"""``python -m avkernels predict`` on sample files in the real formats (tests/data/make_samples.py): checkpoints of
the training scripts in, predictions out that read back through the library's own readers with every frame of every
video (or every utterance) exactly once; smoothing, precision, the output folder rules and the command line."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from avkernels import predict as avpredict
from avkernels.data import read_va_annotation, read_value_column_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests", "data"))

import make_samples  # noqa: E402
import train_av  # noqa: E402
import train_iemocap  # noqa: E402

TINY = ["--seq-len", "4", "--clip-stride", "8", "--batch-size", "4", "--encoder-layers", "1", "--joint-dim", "8",
        "--joint-layers", "1", "--head-hidden", "4", "--no-progress", "--device", "cpu", "--max-steps", "1",
        "--fusion", "grjca"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained(tmp_path_factory, dataset, write_samples, *options):
    """(data root, checkpoint) of a tiny train_av run on the dataset's sample files."""
    tmp = tmp_path_factory.mktemp(dataset)
    root = str(tmp / "data")
    write_samples(root)
    args = train_av.build_parser().parse_args(
        TINY + ["--dataset", dataset, "--data-root", root, *options, "--out-dir", str(tmp / "run")])
    train_av.run(args)
    return root, str(tmp / "run" / "last.pt")


@pytest.fixture(scope="module")
def affwild2(tmp_path_factory):
    return _trained(tmp_path_factory, "affwild2", make_samples.write_affwild2)


@pytest.fixture(scope="module")
def recola(tmp_path_factory):
    return _trained(tmp_path_factory, "recola", make_samples.write_recola, "--fusion", "dca", "--form", "additive")


def _affwild2_files(out):
    return {name[:-4]: read_va_annotation(os.path.join(out, name)) for name in sorted(os.listdir(out))}


@pytest.mark.parametrize("split", ["validation", "test"])
def test_affwild2_one_file_per_video_every_frame_once(affwild2, tmp_path, split):
    root, checkpoint = affwild2
    out = str(tmp_path / "pred")
    result = avpredict.predict(checkpoint, split, out, data_root=root, device="cpu")
    files = _affwild2_files(out)
    assert sorted(files) == sorted(make_samples.AFFWILD2_VIDEOS)  # nothing else in the folder
    for name, n_frames in make_samples.AFFWILD2_VIDEOS.items():
        assert files[name].shape == (n_frames, 2)
        assert np.all(np.abs(files[name]) <= 1.0)
    with open(os.path.join(out, "video_a.txt")) as f:
        assert f.readline() == "valence,arousal\n"
    assert result["frames"] == make_samples.AFFWILD2_VIDEOS

    # The files hold the model's own per-frame predictions (to the 6 decimals written).
    model, data_config = avpredict.load_model(checkpoint)
    dataset = avpredict.build_dataset(data_config, split, root)
    raw = avpredict.predict_frames(model, dataset, device=torch.device("cpu"), batch_size=3)
    for i, video in enumerate(dataset.videos):
        expected = np.stack([np.clip(raw[d][i], -1, 1) for d in ("valence", "arousal")], axis=1)
        np.testing.assert_allclose(files[video.name], expected, atol=1e-6)


def test_affwild2_smoothing_and_precision(affwild2, tmp_path):
    root, checkpoint = affwild2
    model, data_config = avpredict.load_model(checkpoint)
    dataset = avpredict.build_dataset(data_config, "validation", root)
    raw = avpredict.predict_frames(model, dataset, device=torch.device("cpu"))
    smoothed = avpredict.predict(checkpoint, "validation", str(tmp_path / "smooth"), data_root=root, smooth=True,
                                 device="cpu")
    files = _affwild2_files(smoothed["out_dir"])
    from avkernels.metrics import SMOOTHING_WINDOWS, smooth_predictions

    for i, video in enumerate(dataset.videos):
        for k, d in enumerate(("valence", "arousal")):
            np.testing.assert_allclose(files[video.name][:, k], smooth_predictions(raw[d][i], SMOOTHING_WINDOWS[d]),
                                       atol=1e-6)
    fp32 = _affwild2_files(avpredict.predict(checkpoint, "validation", str(tmp_path / "fp32"), data_root=root,
                                             device="cpu")["out_dir"])
    for precision in ("bf16", "fp16"):
        out = avpredict.predict(checkpoint, "validation", str(tmp_path / precision), data_root=root, device="cpu",
                                precision=precision)["out_dir"]
        for name, values in _affwild2_files(out).items():
            assert values.shape == fp32[name].shape
            np.testing.assert_allclose(values, fp32[name], atol=0.05)


def test_recola_one_value_per_frame_per_subject(recola, tmp_path):
    root, checkpoint = recola
    out = str(tmp_path / "pred")
    avpredict.predict(checkpoint, "dev", out, data_root=root, device="cpu")
    assert sorted(os.listdir(out)) == ["arousal", "valence"]
    for d in ("valence", "arousal"):
        names = sorted(os.listdir(os.path.join(out, d)))
        assert names == sorted(f"dev_{i}.csv" for i in range(1, 10))
        for name in names:
            values = read_value_column_csv(os.path.join(out, d, name))
            assert values.shape == (make_samples.RECOLA_FRAMES,)


def test_iemocap_one_row_per_utterance(tmp_path):
    fold = str(tmp_path / "fold01")
    make_samples.write_iemocap_fold(fold)
    args = train_iemocap.build_parser().parse_args([
        "--fold-dir", fold, "--model", "cross", "--modalities", "video", "audio", "--epochs", "1",
        "--batch-size", "2", "--no-progress", "--out-dir", str(tmp_path / "run"), "--device", "cpu",
    ])
    train_iemocap.run(args)
    checkpoint = str(tmp_path / "run" / "best.pt")
    for drop, expected_rows in ((False, [0, 1, 2]), (True, [0, 2])):
        out = str(tmp_path / f"pred_{drop}")
        avpredict.predict(checkpoint, "test", out, data_root=fold, device="cpu", drop_no_video=drop)
        assert os.listdir(out) == [avpredict.IEMOCAP_FILE]
        with open(os.path.join(out, avpredict.IEMOCAP_FILE)) as f:
            rows = list(csv.DictReader(f))
        assert [int(r["utterance"]) for r in rows] == expected_rows
        for r in rows:
            p = np.array([float(r[f"prob_{c}"]) for c in range(7)])
            assert abs(p.sum() - 1.0) < 1e-5 and int(r["class"]) == int(np.argmax(p))


def test_output_folder_is_never_half_written(affwild2, tmp_path, monkeypatch):
    root, checkpoint = affwild2
    out = str(tmp_path / "pred")
    os.makedirs(out)  # an empty folder is fine to fill
    avpredict.predict(checkpoint, "validation", out, data_root=root, device="cpu")
    before = {name: open(os.path.join(out, name)).read() for name in os.listdir(out)}
    with pytest.raises(avpredict.PredictError, match="--overwrite"):
        avpredict.predict(checkpoint, "validation", out, data_root=root, device="cpu")

    # A run that dies while writing leaves the old folder as it was and no temporary folder behind.
    real = avpredict.write_va_files

    def dies_half_way(folder, names, per_video):
        real(folder, names[:1], per_video)
        raise KeyboardInterrupt

    monkeypatch.setattr(avpredict, "write_va_files", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        avpredict.predict(checkpoint, "validation", out, data_root=root, device="cpu", overwrite=True, smooth=True)
    assert {name: open(os.path.join(out, name)).read() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["pred"]
    with pytest.raises(KeyboardInterrupt):
        avpredict.predict(checkpoint, "validation", str(tmp_path / "new"), data_root=root, device="cpu")
    assert sorted(os.listdir(tmp_path)) == ["pred"]

    monkeypatch.setattr(avpredict, "write_va_files", real)
    avpredict.predict(checkpoint, "validation", out, data_root=root, device="cpu", overwrite=True, smooth=True)
    after = {name: open(os.path.join(out, name)).read() for name in os.listdir(out)}
    assert after.keys() == before.keys() and after != before
    assert sorted(os.listdir(tmp_path)) == ["pred"]


def test_checkpoint_without_configuration_is_explained(affwild2, tmp_path):
    _, checkpoint = affwild2
    state = torch.load(checkpoint, weights_only=True)
    del state["model_config"]
    old = str(tmp_path / "old.pt")
    torch.save(state, old)
    with pytest.raises(avpredict.PredictError, match="no model_config"):
        avpredict.predict(old, "validation", str(tmp_path / "out"), data_root="unused")
    assert not os.path.exists(tmp_path / "out")


def test_wrong_split_and_missing_data_root(affwild2, tmp_path):
    _, checkpoint = affwild2
    with pytest.raises(avpredict.PredictError, match="splits"):
        avpredict.predict(checkpoint, "dev", str(tmp_path / "out"), data_root=str(tmp_path))
    with pytest.raises(avpredict.PredictError, match="--data-root"):
        avpredict.predict(checkpoint, "test", str(tmp_path / "out"))


def test_command_line(affwild2, tmp_path):
    root, checkpoint = affwild2
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "avkernels", "--help"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and "predict" in run.stdout and "backends" in run.stdout

    from avkernels.__main__ import main

    out = str(tmp_path / "pred")
    run_folder = os.path.dirname(checkpoint)  # a run folder stands for its best.pt
    argv = ["predict", run_folder, "--split", "test", "--data-root", root, "--out", out, "--device", "cpu",
            "--smooth", "--precision", "bf16"]
    assert main(argv) == 0
    assert sorted(_affwild2_files(out)) == sorted(make_samples.AFFWILD2_VIDEOS)
    assert main(argv) == 2  # refuses to overwrite
    assert main(argv + ["--overwrite", "--no-progress"]) == 0


def test_spatial_attention_checkpoint_and_a_training_backend_that_is_not_used(tmp_path):
    # TSAV-like C x 49 video maps; the backend named at training is the machine's business, not the model's.
    root = str(tmp_path / "data")
    make_samples.write_affwild2(root)
    for name, n in make_samples.AFFWILD2_VIDEOS.items():
        np.save(os.path.join(root, "features", "video", name + ".npy"), np.random.rand(n, 98).astype(np.float32))
    args = train_av.build_parser().parse_args(
        TINY + ["--dataset", "affwild2", "--data-root", root, "--spatial-attention", "--backend", "reference",
                "--out-dir", str(tmp_path / "run")])
    train_av.run(args)
    state = torch.load(str(tmp_path / "run" / "last.pt"), weights_only=True)
    assert state["model_config"]["kwargs"]["fusion_kwargs"]["backend"] == "reference"
    assert state["data_config"] == {"dataset": "affwild2", "modalities": ["video", "audio"], "seq_len": 4,
                                    "clip_stride": 8}
    model, _ = avpredict.load_model(str(tmp_path / "run"))
    assert model.spatial_attention is not None and model.fusion.blocks[0].backend is None
    out = str(tmp_path / "pred")
    avpredict.predict(str(tmp_path / "run"), "train", out, data_root=root, device="cpu")
    for name, n_frames in make_samples.AFFWILD2_VIDEOS.items():
        assert read_va_annotation(os.path.join(out, name + ".txt")).shape == (n_frames, 2)
