"""No file a user was given runs code, and no run destroys its inputs or its previous results.

* A pickle payload (its ``__reduce__`` creates a marker file) planted in a checkpoint, in every form (an extra entry
  of a real checkpoint, the legacy pickle format, a bare pickle), through every load path: ``predict`` and
  ``export`` on the command line, ``--resume`` of both training scripts (the engine), ``from_official``. The marker
  never appears, and the error is one clean line.
* Damaged checkpoints, another model's weights and a backend the machine lacks: ``avkernels <verb>: error: ...``,
  status 2.
* ``predict --overwrite`` never replaces a folder holding the checkpoint, the data or a file it did not write.
* Crash safety: predict is killed (``os._exit``) at each step of writing its folder, then run again: the folder
  holds the previous or the new results, complete, and nothing else is left behind.
"""

import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from avkernels import predict as avpredict
from avkernels.__main__ import main
from avkernels.checkpoint import CheckpointError, plain
from avkernels.models import AVRegressor
from avkernels.prediction_files import foreign_entries, recover, write_iemocap_file, write_recola_files

from test_predict import ROOT, TINY, make_samples, train_av, train_iemocap  # the sample data and the tiny model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Payload:
    """What an attacker would put in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data root, run folder) of a tiny train_av run on the Aff-Wild2 sample files."""
    tmp = tmp_path_factory.mktemp("run")
    root = str(tmp / "data")
    make_samples.write_affwild2(root)
    train_av.run(train_av.build_parser().parse_args(
        TINY + ["--dataset", "affwild2", "--data-root", root, "--out-dir", str(tmp / "run"), "--max-steps", "100",
                "--epochs", "1"]))  # one epoch, so that there are best.pt, last.pt and log.jsonl
    return root, str(tmp / "run")


def _payload_files(folder, checkpoint):
    """Every planted form, as (name, path, marker path)."""
    os.makedirs(folder, exist_ok=True)
    files = []
    state = torch.load(checkpoint, weights_only=True)
    for name in ("extra_entry", "legacy_format", "bare_pickle"):
        marker = os.path.join(folder, f"{name}.marker")
        path = os.path.join(folder, f"{name}.pt")
        if name == "extra_entry":  # a full, valid checkpoint with one more entry
            torch.save({**state, "note": Payload(marker)}, path)
        elif name == "legacy_format":
            torch.save({**state, "note": Payload(marker)}, path, _use_new_zipfile_serialization=False)
        else:
            with open(path, "wb") as f:
                pickle.dump(Payload(marker), f)
        files.append((name, path, marker))
    return files


def _error_line(err, verb=None):
    """The one line of a command-line error (``verb=None``: a script's, whose name argparse takes from argv)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    prog = re.escape(verb) if verb else r"[\w.]+"
    assert lines and re.match(prog + ": error: ", lines[-1]), err
    assert "Traceback" not in err, err
    return lines[-1]


def test_checkpoints_of_the_scripts_hold_only_plain_values(run):
    _, folder = run
    for name in ("last.pt", "best.pt"):
        state = torch.load(os.path.join(folder, name), weights_only=True)
        assert isinstance(state["rng"][0]["numpy"][1], torch.Tensor)
    with pytest.raises(TypeError, match=r"checkpoint\['args'\]: a argparse.Namespace cannot go into a checkpoint"):
        import argparse

        plain({"model": {}, "args": argparse.Namespace(lr=1)})
    import numpy as np

    with pytest.raises(TypeError, match=r"\['x'\]\[1\]: a numpy.ndarray"):
        plain({"x": [1, np.zeros(3)]})
    assert plain({"a": np.float32(0.5), "b": (np.int64(3), None)}) == {"a": 0.5, "b": (3, None)}


def test_a_payload_never_runs_on_any_load_path(run, tmp_path, capsys):
    root, folder = run
    for name, path, marker in _payload_files(str(tmp_path / "planted"), os.path.join(folder, "last.pt")):
        # predict and export on the command line
        assert main(["predict", path, "--split", "validation", "--data-root", root, "--out", str(tmp_path / "p"),
                     "--device", "cpu", "--no-progress"]) == 2, name
        line = _error_line(capsys.readouterr().err, "avkernels predict")
        assert path in line and ("weights_only" in line or "not a PyTorch checkpoint" in line), line
        assert main(["export", path, str(tmp_path / "m.onnx")]) == 2, name
        _error_line(capsys.readouterr().err, "avkernels export")
        # the library's readers
        with pytest.raises(CheckpointError, match="nothing in it was run|not a PyTorch checkpoint"):
            avpredict.load_model(path)
        with pytest.raises(ValueError, match="weights_only|not a PyTorch checkpoint"):
            AVRegressor.from_official(path, "dca")
        # --resume of the training script (the engine's loader)
        with pytest.raises(SystemExit) as exit_info:
            train_av.main(TINY + ["--dataset", "affwild2", "--data-root", root, "--out-dir", str(tmp_path / "r"),
                                  "--resume", path])
        assert exit_info.value.code == 2
        line = _error_line(capsys.readouterr().err)
        assert path in line, line
        assert not os.path.exists(marker), f"the payload of {name} ran"
    assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "m.onnx")


def test_the_payload_would_run_under_a_plain_torch_load(tmp_path):
    # The planted file is a real attack: the tests above would see its marker if a reader unpickled it in full.
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "bad.pt")
    torch.save({"note": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_iemocap_resume_refuses_a_payload(tmp_path, capsys):
    fold = str(tmp_path / "fold")
    make_samples.write_iemocap_fold(fold)
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "last.pt")
    torch.save({"model": {}, "note": Payload(marker)}, path)
    with pytest.raises(SystemExit) as exit_info:
        train_iemocap.main(["--fold-dir", fold, "--model", "cross", "--modalities", "video", "audio", "--epochs",
                            "1", "--batch-size", "2", "--no-progress", "--out-dir", str(tmp_path / "run"),
                            "--device", "cpu", "--resume", path])
    assert exit_info.value.code == 2 and not os.path.exists(marker)
    assert "weights_only" in _error_line(capsys.readouterr().err)


def _damaged(folder, checkpoint):
    os.makedirs(folder, exist_ok=True)
    data = open(checkpoint, "rb").read()
    cases = {"truncated.pt": data[: len(data) // 2], "random.pt": os.urandom(4096), "empty.pt": b"",
             "text.pt": b"valence,arousal\n0.1,0.2\n", "zip_head_only.pt": data[:64]}
    for name, content in cases.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    # Another fusion's weights under this configuration.
    state = torch.load(checkpoint, weights_only=True)
    kwargs = dict(state["model_config"]["kwargs"], fusion="jca", fusion_kwargs={"dropout": 0.0})
    state["model"] = AVRegressor(**kwargs).state_dict()
    torch.save(state, os.path.join(folder, "other_fusion.pt"))
    return [os.path.join(folder, name) for name in list(cases) + ["other_fusion.pt"]]


def test_damaged_checkpoints_are_one_clean_error(run, tmp_path, capsys):
    root, folder = run
    for path in _damaged(str(tmp_path / "bad"), os.path.join(folder, "last.pt")):
        assert main(["predict", path, "--split", "validation", "--data-root", root, "--out", str(tmp_path / "p"),
                     "--device", "cpu", "--no-progress"]) == 2, path
        line = _error_line(capsys.readouterr().err, "avkernels predict")
        assert path in line, line
        if path.endswith("other_fusion.pt"):
            assert "do not fit the model" in line and "missing" in line, line
        with pytest.raises(SystemExit) as exit_info:
            train_av.main(TINY + ["--dataset", "affwild2", "--data-root", root, "--out-dir", str(tmp_path / "r"),
                                  "--resume", path])
        assert exit_info.value.code == 2
        assert path in _error_line(capsys.readouterr().err)
    for argv in (["predict", str(tmp_path / "missing.pt")], ["export", str(tmp_path / "missing.pt")]):
        out = ["--split", "validation", "--out", str(tmp_path / "p")] if argv[0] == "predict" else ["x.onnx"]
        assert main(argv + out) == 2
        assert "missing.pt" in _error_line(capsys.readouterr().err, f"avkernels {argv[0]}")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AVKERNELS_BACKEND")}
    env.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_backend_the_machine_lacks_is_a_command_line_error(run, tmp_path, capsys):
    root, folder = run
    argv = ["predict", folder, "--split", "validation", "--data-root", root, "--out", str(tmp_path / "p"),
            "--device", "cpu", "--no-progress"]
    # As a user runs it: no TRITON_INTERPRET, so Triton cannot run on this machine.
    done = subprocess.run([sys.executable, "-m", "avkernels", *argv, "--backend", "triton"], capture_output=True,
                          text=True, env=_clean_env(), timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--backend triton" in _error_line(done.stderr, "avkernels predict")
    for backend, expected in (("cuda", "--backend cuda: not usable"), ("nosuch", "backend: expected None or one of")):
        assert main(argv + ["--backend", backend]) == 2
        assert expected in _error_line(capsys.readouterr().err, "avkernels predict")
    assert not os.path.exists(tmp_path / "p")
    assert main(argv + ["--backend", "reference"]) == 0


def _snapshot(folder):
    files = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def test_overwrite_never_replaces_inputs_or_foreign_files(run, tmp_path, capsys):
    root, folder = run
    checkpoint = os.path.join(folder, "best.pt")
    before = _snapshot(folder)
    # The case: --out is the run folder (best.pt, last.pt, log.jsonl).
    assert main(["predict", checkpoint, "--split", "validation", "--data-root", root, "--out", folder,
                 "--overwrite", "--device", "cpu", "--no-progress"]) == 2
    assert "holds the checkpoint" in _error_line(capsys.readouterr().err, "avkernels predict")
    assert main(["export", folder, checkpoint]) == 2  # the ONNX file would replace the checkpoint it comes from
    assert "is the checkpoint being exported" in _error_line(capsys.readouterr().err, "avkernels export")
    # A checkpoint elsewhere, the run folder as output: its files are not predictions.
    copy = str(tmp_path / "elsewhere.pt")
    shutil.copy(checkpoint, copy)
    with pytest.raises(avpredict.PredictError, match=r"3 entries predict did not write \(best.pt, last.pt, log.jsonl"):
        avpredict.predict(copy, "validation", folder, data_root=root, device="cpu", overwrite=True)
    assert _snapshot(folder) == before
    # The data folder, or a folder inside it.
    data_before = _snapshot(root)
    for out in (root, os.path.join(root, "annotations", "Validation_Set"), os.path.join(root, "predictions")):
        with pytest.raises(avpredict.PredictError, match="data folder"):
            avpredict.predict(copy, "validation", out, data_root=root, device="cpu", overwrite=True)
    assert _snapshot(root) == data_before
    # Earlier predictions plus one file of the user's.
    out = str(tmp_path / "pred")
    avpredict.predict(copy, "validation", out, data_root=root, device="cpu")
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("my notes\n")
    previous = _snapshot(out)
    with pytest.raises(avpredict.PredictError, match=r"1 entry predict did not write \(notes.txt\)"):
        avpredict.predict(copy, "validation", out, data_root=root, device="cpu", overwrite=True, smooth=True)
    assert _snapshot(out) == previous
    os.remove(os.path.join(out, "notes.txt"))
    avpredict.predict(copy, "validation", out, data_root=root, device="cpu", overwrite=True, smooth=True)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere.pt", "pred"]


def test_every_format_predict_writes_is_recognised(tmp_path):
    import numpy as np

    recola = str(tmp_path / "recola")
    os.makedirs(recola)
    write_recola_files(recola, ["dev_1"], {"valence": [np.array([-1.0, 0.25])], "arousal": [np.array([1.0, -0.0])]})
    assert foreign_entries(recola) == []
    with open(os.path.join(recola, "valence", "dev_1.csv"), "a") as f:
        f.write("0.5\n")  # a value of someone else's, not in predict's format
    assert foreign_entries(recola) == [os.path.join("valence", "dev_1.csv")]
    iemocap = str(tmp_path / "iemocap")
    os.makedirs(iemocap)
    write_iemocap_file(iemocap, [0, 4], np.array([[0.25, 0.75], [1.0, 0.0]]))
    assert foreign_entries(iemocap) == []
    os.symlink(os.path.join(iemocap, "predictions.csv"), os.path.join(iemocap, "link.txt"))
    assert foreign_entries(iemocap) == ["link.txt"]


# -- crash safety ------------------------------------------------------------------------------------------------

# Each point makes the predict process die (os._exit, as a kill would: no cleanup runs) at one step of writing its
# output folder; "sigterm" sends it SIGTERM there instead, which it must survive cleanly.
KILL_SCRIPT = textwrap.dedent("""
    import os, shutil, signal, sys
    import avkernels.predict as predict
    import avkernels.prediction_files as files

    point, argv = sys.argv[1], sys.argv[2:]
    real_write, real_exchange, real_rmtree = predict.write_va_files, files._exchange, shutil.rmtree

    def half_written(folder, names, per_video):
        real_write(folder, names[:1], per_video)
        with open(os.path.join(folder, names[1] + ".txt"), "w") as f:
            f.write("valence,arousal\\n0.1")
            f.flush()
            if point == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            os._exit(9)

    def exchange(a, b):
        if point == "before-swap":
            os._exit(9)
        if point == "between-renames":
            raise OSError(22, "no RENAME_EXCHANGE here")
        real_exchange(a, b)
        if point == "after-swap":
            os._exit(9)

    def rmtree(path, *args, **kwargs):
        if point == "removing-old" and ".predict-" in path:
            for base, _, names in os.walk(path):
                if names:
                    os.remove(os.path.join(base, names[0]))
                    break
            os._exit(9)
        real_rmtree(path, *args, **kwargs)

    real_rename = os.rename

    def rename(a, b, *args, **kwargs):
        if point == "between-renames" and str(a).endswith(".tmp"):
            os._exit(9)
        real_rename(a, b, *args, **kwargs)

    predict.write_va_files = half_written if point in ("writing", "sigterm") else real_write
    files._exchange, shutil.rmtree, os.rename = exchange, rmtree, rename
    from avkernels.__main__ import main
    sys.exit(main(argv))
""")


@pytest.mark.parametrize("point", ["writing", "sigterm", "before-swap", "after-swap", "removing-old",
                                   "between-renames"])
def test_a_killed_predict_leaves_complete_results_and_no_debris(run, tmp_path, point):
    root, folder = run
    out = str(tmp_path / "pred")
    common = dict(data_root=root, device="cpu")
    avpredict.predict(folder, "validation", out, **common)
    previous = _snapshot(out)
    avpredict.predict(folder, "validation", str(tmp_path / "expected"), smooth=True, **common)
    new = _snapshot(str(tmp_path / "expected"))
    shutil.rmtree(tmp_path / "expected")
    assert new != previous

    script = str(tmp_path.parent / f"kill_{point}.py")
    with open(script, "w") as f:
        f.write(KILL_SCRIPT)
    argv = ["predict", folder, "--split", "validation", "--data-root", root, "--out", out, "--overwrite", "--smooth",
            "--device", "cpu", "--no-progress"]
    done = subprocess.run([sys.executable, script, point, *argv], capture_output=True, text=True,
                          env=_clean_env(), timeout=300)
    if point == "sigterm":  # a catchable signal: cleaned up at once, the previous results untouched
        assert done.returncode == 128 + 15, done.stderr
        assert sorted(os.listdir(tmp_path)) == ["pred"] and _snapshot(out) == previous
    else:
        assert done.returncode == 9, done.stderr
        if point == "between-renames":  # only the portable path has a moment without the output folder ...
            assert not os.path.exists(out)
            recover(out)  # ... which the next run (or this) undoes
        assert _snapshot(out) == (new if point in ("after-swap", "removing-old") else previous)
    # The next run clears what the killed one left and writes its results; so does a run into another folder there.
    if point == "before-swap":
        avpredict.predict(folder, "validation", str(tmp_path / "other"), **common)
        assert sorted(os.listdir(tmp_path)) == ["other", "pred"] and _snapshot(out) == previous
        shutil.rmtree(tmp_path / "other")
    avpredict.predict(folder, "validation", out, overwrite=True, smooth=True, **common)
    assert sorted(os.listdir(tmp_path)) == ["pred"]
    assert _snapshot(out) == new


def test_an_older_checkpoint_converts_with_an_explicit_flag_and_resumes(run, tmp_path, capsys):
    import numpy as np

    import convert_checkpoint

    root, folder = run
    state = torch.load(os.path.join(folder, "last.pt"), weights_only=True)
    state["rng"][0]["numpy"] = np.random.get_state()  # as older training scripts saved it
    old = str(tmp_path / "old.pt")
    torch.save(state, old)
    with pytest.raises(CheckpointError, match=r"numpy.*multiarray.*docs/datasets.md"):
        avpredict.load_checkpoint(old)
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main([old, old])  # the unsafe read is never implicit
    assert exit_info.value.code == 2 and "--trust-this-file" in capsys.readouterr().err
    assert convert_checkpoint.main([old, old, "--trust-this-file"]) == 0
    assert "warning: unpickling" in capsys.readouterr().err
    converted = torch.load(old, weights_only=True)
    assert torch.equal(converted["rng"][0]["numpy"][1], torch.from_numpy(state["rng"][0]["numpy"][1].astype(np.int64)))
    out = str(tmp_path / "resumed")
    shutil.copytree(folder, out)
    shutil.copy(old, os.path.join(out, "last.pt"))
    train_av.main(TINY + ["--dataset", "affwild2", "--data-root", root, "--out-dir", out, "--resume", "auto",
                          "--epochs", "2", "--max-steps", "100"])
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_training_with_a_backend_the_machine_lacks_is_a_command_line_error(run, tmp_path, capsys):
    root, _ = run
    with pytest.raises(SystemExit) as exit_info:
        train_av.main(TINY + ["--dataset", "affwild2", "--data-root", root, "--out-dir", str(tmp_path / "r"),
                              "--backend", "cuda"])
    assert exit_info.value.code == 2
    assert "--backend cuda: not usable on this machine" in _error_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "r" / "last.pt")
