"""The authors' trained models in avkernels: AVRegressor.from_official / to_official (avkernels/models/official.py).

The official code is not part of this repository. tests/data/official_cam_golden.json holds what it computed: for
each repository's ``CAM`` (models/orig_cam.py), its state-dict names and shapes in order, and its float64 outputs
on the deterministic weights and inputs of tests/official_golden.py (tests/data/make_official_golden.py says how
the file was made: JCA f1f0a0c, RJCA ea196b3, DCA 7374796, torch 2.13 CPU).

Measured against the official code itself on this library's development machine (random N(0, 1/fan_in) weights
on every tensor, biases included, saved as the official training code saves them with numpy CCC scalars, loaded
with from_official, B = 3, eval mode), the largest absolute output difference was:

    repo    float64     float32
    jca     2.2e-16     1.2e-07
    rjca    1.7e-16     3.0e-08
    dca     1.1e-16     3.0e-08

and ``to_official`` gave back the official state dict exactly (same keys, order and bits). The other way, a freshly
initialised ``AVRegressor(**official_config(repo))`` written with ``to_official`` loaded into the official ``CAM``
with ``load_state_dict(strict=True)`` and agreed with it to 4.1e-08 (jca), 3.7e-08 (rjca), 5.6e-08 (dca) in float32.
The C++ backend (``backend="cpp"``) on official DCA weights: 6.7e-08 (scripts/bench_official_dca.py).
"""

import argparse
import functools
import io
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

import avkernels
from avkernels.models import AVRegressor
from avkernels.models.official import OFFICIAL_REPOS, key_map, official_config
from official_golden import golden_inputs, golden_state_dict, keys_of, load_golden

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GOLDEN = load_golden()
# float64 round-off through the LSTMs and the 1024-wide sums; the measured difference is about 2e-16.
TOL64 = 1e-12
TOL32 = 2e-5


@functools.lru_cache(maxsize=None)
def _golden_state(repo: str) -> "OrderedDict[str, torch.Tensor]":
    return golden_state_dict(keys_of(GOLDEN[repo]))


def golden_state(repo, dtype=torch.float64):
    """A fresh ordered dict (its tensors shared, never modified in place) that a test may edit."""
    return OrderedDict((k, v.to(dtype)) for k, v in _golden_state(repo).items())


@functools.lru_cache(maxsize=None)
def _inputs():
    return golden_inputs()


def golden_outputs(repo):
    return tuple(torch.tensor(GOLDEN[repo][k], dtype=torch.float64) for k in ("valence", "arousal"))


def predict(model, dtype=torch.float64):
    audio, video = _inputs()
    with torch.no_grad():
        return model(video.to(dtype), audio.to(dtype))  # the library order: video first


def max_diff(outputs, expected):
    return max((o.double() - e).abs().max().item() for o, e in zip(outputs, expected))


def save(tmp_path, obj, name="cam_model.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def official_file(state):
    """What the official main.py writes (its CCCs come out of numpy)."""
    return {"net": state, "best_Val_accV": np.float64(0.41), "best_Val_accA": np.float32(0.62), "best_Val_acc_epoch": 7}


# ----------------------------------------------------------------------------------------------------------------
# Outputs and layout against the official code's golden record


@pytest.mark.parametrize("repo", OFFICIAL_REPOS)
def test_key_map_is_the_official_state_dict(repo):
    """Same names, same order, same shapes as the official CAM().state_dict()."""
    expected = keys_of(GOLDEN[repo])
    assert list(key_map(repo)) == [name for name, _ in expected]
    with torch.device("meta"):
        model = AVRegressor(**official_config(repo))
    state = model.state_dict()
    assert sorted(key_map(repo).values()) == sorted(state)
    for (name, shape), library in zip(expected, key_map(repo).values()):
        assert list(state[library].shape) == shape, name


@pytest.mark.parametrize("repo", OFFICIAL_REPOS)
def test_from_official_matches_official_outputs(repo, tmp_path):
    path = save(tmp_path, official_file(golden_state(repo)))
    model = AVRegressor.from_official(path, repo)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float64
    assert max_diff(predict(model), golden_outputs(repo)) < TOL64


@pytest.mark.parametrize("repo", OFFICIAL_REPOS)
def test_from_official_float32(repo):
    model = AVRegressor.from_official({"net": golden_state(repo, torch.float32)}, repo)
    assert next(model.parameters()).dtype == torch.float32
    assert max_diff(predict(model, torch.float32), golden_outputs(repo)) < TOL32


@pytest.mark.skipif("cpp" not in avkernels.backends(), reason="the C++ extension is not built")
def test_from_official_with_the_cpp_backend():
    model = AVRegressor.from_official(golden_state("dca", torch.float32), "dca", backend="cpp")
    assert max_diff(predict(model, torch.float32), golden_outputs("dca")) < TOL32


def test_half_precision_checkpoint_is_widened():
    model = AVRegressor.from_official(golden_state("jca", torch.float16), "jca")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert max_diff(predict(model, torch.float32), golden_outputs("jca")) < 0.05


def test_golden_record_sees_a_swapped_modality():
    """The golden outputs would catch the likeliest mapping mistake, the video's modules given to the audio."""
    state = golden_state("dca")
    prefix = "coattn.dcn_layers.0.dense_coattn."
    for a, b in (("value1_linear", "value2_linear"), ("key1_linear", "key2_linear")):
        for p in ("weight", "bias"):
            first, second = f"{prefix}{a}.{p}", f"{prefix}{b}.{p}"
            state[first], state[second] = state[second], state[first]
    model = AVRegressor.from_official(state, "dca")
    assert max_diff(predict(model), golden_outputs("dca")) > 1e-6


def test_accepted_forms_of_a_checkpoint(tmp_path):
    state = golden_state("jca")
    expected = golden_outputs("jca")
    buffer = io.BytesIO()
    torch.save(official_file(state), buffer)
    buffer.seek(0)
    wrapped = OrderedDict(("module." + k, v) for k, v in state.items())  # saved from nn.DataParallel
    for checkpoint in (
        buffer,
        str(save(tmp_path, state, "bare.pt")),  # a bare state dict, path as str
        official_file(state),  # already loaded
        state,
        {"net": wrapped},
    ):
        model = AVRegressor.from_official(checkpoint, "JCA")
        assert max_diff(predict(model), expected) < TOL64


# ----------------------------------------------------------------------------------------------------------------
# to_official


@pytest.mark.parametrize("repo", OFFICIAL_REPOS)
def test_to_official_round_trip(repo, tmp_path):
    state = golden_state(repo)
    back = AVRegressor.from_official(state, repo).to_official(repo)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)

    # A model trained with avkernels, handed over in the official layout and read back.
    torch.manual_seed(1)
    trained = AVRegressor(**official_config(repo)).double().eval()
    path = save(tmp_path, {"net": trained.to_official(repo)})
    reloaded = AVRegressor.from_official(path, repo)
    assert max_diff(predict(reloaded), predict(trained)) == 0.0


def test_to_official_refuses_other_layouts():
    with torch.device("meta"):
        default = AVRegressor()  # GRJCA, no spatial attention
        correct_reshape = AVRegressor(**{**official_config("rjca"), "scrambled_reshape": False})
        small = AVRegressor(**{**official_config("jca"), "dims": (256, 512)})
        jca = AVRegressor(**official_config("jca"))
        rjca = AVRegressor(**official_config("rjca"))
        shared = AVRegressor(**{**official_config("rjca"), "fusion_kwargs": {"iterations": 2, "share_weights": True}})
    with pytest.raises(ValueError, match=r"gating='recursive'.*no spatial attention"):
        default.to_official("dca")
    with pytest.raises(ValueError, match="scrambled_reshape=False"):
        correct_reshape.to_official("rjca")
    with pytest.raises(ValueError, match=r"coattn.dcn_layers.0.dense_coattn.query_linear.weight\): shape \(768, 768\)"):
        small.to_official("jca")
    with pytest.raises(ValueError, match="has no per-modality encoders"):
        jca.to_official("rjca")
    with pytest.raises(ValueError, match="has per-modality encoders"):
        rjca.to_official("jca")
    with pytest.raises(ValueError, match=r"gating=None, the official DCA CAM 'final'"):
        rjca.to_official("dca")
    with pytest.raises(ValueError, match="shares one block"):
        shared.to_official("rjca")
    with pytest.raises(ValueError, match="repo: expected one of"):
        jca.to_official("grjca")


# ----------------------------------------------------------------------------------------------------------------
# Refusals


def test_missing_unexpected_and_misshapen_keys():
    state = golden_state("rjca")
    del state["audio_extract.rnn.weight_hh_l1"]
    state["video_attn.attn.affine_x.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        AVRegressor.from_official(state, "rjca")
    message = str(info.value)
    assert "missing keys: audio_extract.rnn.weight_hh_l1" in message
    assert "unexpected keys: video_attn.attn.affine_x.weight" in message

    state = golden_state("rjca")
    state["coattn.dcn_layers.0.dense_coattn.key1_linear.weight"] = torch.zeros(8, 8, dtype=torch.float64)
    state["Joint.init_hidden"] = torch.zeros(4, 256, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        AVRegressor.from_official(state, "rjca")
    message = str(info.value)
    assert "coattn.dcn_layers.0.dense_coattn.key1_linear.weight: expected shape (16, 16), got (8, 8)" in message
    assert "Joint.init_hidden: expected shape (8, 256), got (4, 256)" in message


@pytest.mark.parametrize("saved, asked", [("dca", "rjca"), ("rjca", "jca"), ("jca", "dca"), ("dca", "jca")])
def test_checkpoint_of_another_repository(saved, asked):
    with pytest.raises(ValueError, match=f"those of the official {saved.upper()} CAM: use repo='{saved}'"):
        AVRegressor.from_official(golden_state(saved), asked)


def test_edited_iteration_count():
    """An RJCA CAM edited to num_seq=2 (the DCA repository's count): refused by default, loaded when asked."""
    state = OrderedDict((k, v) for k, v in golden_state("dca").items() if "gating" not in k)
    with pytest.raises(ValueError, match=r"unexpected keys: coattn.dcn_layers.1\..*pass iterations=2"):
        AVRegressor.from_official(state, "rjca")
    model = AVRegressor.from_official(state, "rjca", iterations=2)
    assert model.fusion.iterations == 2 and model.fusion.gating is None
    assert list(model.to_official("rjca")) == list(state)


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("valence,arousal\n0.1,0.2\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "not a tensor archive")
    pickled = tmp_path / "list.pkl"
    pickled.write_bytes(pickle.dumps([1, 2, 3], protocol=2)[:-3])  # a pickle, cut short
    truncated = tmp_path / "truncated.pt"
    torch.save({"net": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    for path in (text, empty, archive, pickled, truncated):
        with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as info:
            AVRegressor.from_official(path, "dca")
        error = info.value
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), (
            "the error from inside torch.load should not be chained"
        )
    with pytest.raises(FileNotFoundError, match="no such file"):
        AVRegressor.from_official(tmp_path / "missing.pt", "dca")


def test_weights_only_refuses_python_objects(tmp_path):
    path = save(tmp_path, {"net": golden_state("jca"), "args": argparse.Namespace(lr=1e-4)})
    with pytest.raises(ValueError, match=r"weights_only.*argparse.Namespace\).*weights_only=False"):
        AVRegressor.from_official(path, "jca")
    # Numpy arrays are refused too (only the scalars the official code stores are let through).
    path = save(tmp_path, {"net": golden_state("jca"), "x": np.array([None], dtype=object)[0:1]})
    with pytest.raises(ValueError, match="weights_only"):
        AVRegressor.from_official(path, "jca")


def test_numpy_scalars_are_rebuilt_from_bytes_only():
    from avkernels.checkpoint import _numpy_scalar, _NumpyDtype

    assert _numpy_scalar(_NumpyDtype("f8"), np.float64(0.25).tobytes()) == 0.25
    with pytest.raises(pickle.UnpicklingError):
        _NumpyDtype("O8")
    with pytest.raises(pickle.UnpicklingError):
        _numpy_scalar(_NumpyDtype("f8"), b"\x00")


def test_objects_that_are_not_checkpoints():
    with pytest.raises(ValueError, match="repo: expected one of"):
        AVRegressor.from_official({}, "cam")
    with pytest.raises(TypeError, match="pass its state_dict"):
        AVRegressor.from_official(AVRegressor(dims=(4, 4), seq_len=3), "jca")
    with pytest.raises(TypeError, match="got list"):
        AVRegressor.from_official([1, 2], "jca")
    with pytest.raises(ValueError, match=r"neither the official .*top-level keys: \['epoch', 'model'\]"):
        AVRegressor.from_official({"model": {}, "epoch": 3}, "jca")
    with pytest.raises(TypeError, match=r"\['net'\] should be the CAM's state dict"):
        AVRegressor.from_official({"net": 3}, "jca")
    with pytest.raises(ValueError, match="not named tensors"):
        AVRegressor.from_official({"net": {"coattn.x": 1.0}}, "jca")
    with pytest.raises(ValueError, match="iterations: expected None or a positive int"):
        AVRegressor.from_official(golden_state("jca"), "jca", iterations=0)
