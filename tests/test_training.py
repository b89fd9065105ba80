"""The example training scripts: the loss falls, a resumed run is bitwise the uninterrupted one, torchrun with two
CPU processes (gloo) works, the IEMOCAP protocol runs on real-format files, checkpoints are atomic, plots are
written. Tiny configurations, one CPU thread per process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import avkernels
from avkernels.data.synthetic import preset_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)
sys.path.insert(0, os.path.join(ROOT, "tests", "data"))

import engine  # noqa: E402
import make_samples  # noqa: E402
import plot_training  # noqa: E402
import train_av  # noqa: E402
import train_iemocap  # noqa: E402
import train_synthetic  # noqa: E402

# 4 videos x 64 frames in 8-clip windows: 32 training samples, 8 steps per epoch at batch 4.
TINY = [
    "--dataset", "synthetic", "--synthetic-train-videos", "4", "--synthetic-val-videos", "2",
    "--synthetic-frames", "64", "--seq-len", "8", "--batch-size", "4", "--encoder-layers", "1",
    "--joint-dim", "16", "--joint-layers", "1", "--head-hidden", "8", "--fusion-dropout", "0.3",
    "--head-dropout", "0.2", "--no-progress", "--log-every", "1", "--device", "cpu", "--warmup-steps", "2",
]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _args(*extra):
    return train_av.build_parser().parse_args(TINY + list(extra))


def _records(out_dir, event):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


def test_training_loss_falls_and_the_log_can_be_plotted(tmp_path):
    out = str(tmp_path / "run")
    result = train_av.run(_args("--fusion", "dca", "--epochs", "4", "--lr", "3e-3", "--out-dir", out))
    losses = [r["loss"] for r in _records(out, "train")]
    assert len(losses) == 32
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first - 0.2, f"loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    val = _records(out, "val")
    assert [r["epoch"] for r in val] == [0, 1, 2, 3]
    assert all(-1 <= r["ccc_valence"] <= 1 and -1 <= r["ccc_arousal_smoothed"] <= 1 for r in val)
    assert result["best"]["ccc_mean"] == max(r["ccc_mean"] for r in val)
    assert os.path.exists(os.path.join(out, "best.pt")) and os.path.exists(os.path.join(out, "last.pt"))
    png = plot_training.plot_log(os.path.join(out, "log.jsonl"), str(tmp_path / "curves.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_gives_bitwise_the_uninterrupted_run(tmp_path):
    # GRJCA with dropout: the resumed step depends on the restored RNG, data order, optimizer and scheduler states.
    # Step 9 is the second batch of epoch 2, so the interrupted run also crossed an epoch end (evaluation).
    common = ("--fusion", "grjca", "--epochs", "3", "--lr", "3e-3")
    straight = train_av.run(_args(*common, "--max-steps", "10", "--out-dir", str(tmp_path / "a")))["trainer"]
    interrupted = str(tmp_path / "b")
    first = train_av.run(_args(*common, "--max-steps", "9", "--out-dir", interrupted))["trainer"]
    assert first.step == 9
    torch.manual_seed(1234)  # whatever happens in between must not matter
    resumed = train_av.run(_args(*common, "--max-steps", "10", "--out-dir", interrupted, "--resume", "auto"))["trainer"]
    assert resumed.step == straight.step == 10
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The step-9 parameters differ from step 10: the comparison is not between two untrained models.
    assert not all(torch.equal(first.model.state_dict()[k], a[k]) for k in a)
    moments = [s["exp_avg"] for s in straight.optimizer.state_dict()["state"].values()]
    resumed_moments = [s["exp_avg"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(moments, resumed_moments))
    assert straight.scheduler.state_dict() == resumed.scheduler.state_dict()
    # The log of the resumed run reads as one run: steps 1..10 once each.
    assert [r["step"] for r in _records(interrupted, "train")] == list(range(1, 11))


def test_atomic_save_never_leaves_a_partial_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    engine.atomic_save({"step": 1}, path)
    with pytest.raises(Exception):
        engine.atomic_save({"step": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # the failed write's temporary file is gone too


class _ConstantTask(engine.Task):
    """A task whose validation score never improves, to exercise early stopping."""

    monitor = "score"

    def loss(self, model, batch):
        return model(batch["x"]).square().mean()

    def evaluate(self, model, loader, ctx, autocast):
        return {"score": 0.5, "loss": 1.0}


class _Points(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i))}


def test_early_stopping_and_plateau_scheduler(tmp_path):
    model = torch.nn.Linear(3, 1)
    config = engine.TrainConfig(out_dir=str(tmp_path), epochs=50, batch_size=4, patience=3, progress=False)
    trainer = engine.Trainer(
        _ConstantTask(), model, lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=1),
        _Points(), _Points(), config, engine.Context(), scheduler_per="epoch", scheduler_metric="loss",
    )
    history = trainer.fit()
    # Epoch 1 sets the best; epochs 2, 3, 4 do not improve it: stop after 4.
    assert len(history) == 4 and trainer.stopped_early
    assert trainer.optimizer.param_groups[0]["lr"] < 1e-3


def test_resume_refuses_another_world_size_or_batch_size(tmp_path):
    out = str(tmp_path / "run")
    train_av.run(_args("--fusion", "jca", "--max-steps", "2", "--out-dir", out))
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    state["world_size"] = 2
    engine.atomic_save(state, os.path.join(out, "other.pt"))
    with pytest.raises(ValueError, match="saved by 2 processes, resumed by 1"):
        train_av.run(_args("--fusion", "jca", "--out-dir", out, "--resume", os.path.join(out, "other.pt")))
    with pytest.raises(ValueError, match="another batch_size or seed"):
        train_av.run(_args("--fusion", "jca", "--out-dir", out, "--resume", "auto", "--batch-size", "8"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        os.path.join(EXAMPLES, "train_av.py"), *TINY, "--fusion", "dca", "--epochs", "2", "--max-steps", "6",
        "--threads", "1", "--out-dir", out,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = _records(out, "config")
    assert len(config) == 1 and config[0]["world_size"] == 2  # only rank 0 writes the log
    # 32 samples over 2 processes at batch 4: 4 steps per epoch; step 6 stops inside epoch 2.
    assert [r["step"] for r in _records(out, "val")] == [4]
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["rng"]) == 2
    # Each rank draws its own dropout masks: the two RNG streams differ.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert proc.stdout.count("best epoch") == 1


def test_gate_statistics_group_frames_by_corruption():
    args = _args("--fusion", "dca")
    train_set, val_set = train_av.build_datasets(args)
    model = train_av.build_model(args, [val_set.feature_dims[m] for m in val_set.modalities])
    rows = train_synthetic.gate_statistics(model, val_set)
    assert [(r["gate"], r["modality"]) for r in rows] == [("final gate", "video"), ("final gate", "audio")]
    for r in rows:
        for group in ("clean", "self", "other"):
            assert 0.0 <= r[group] <= 1.0


def test_iemocap_protocol_on_real_format_files(tmp_path):
    fold = str(tmp_path / "fold01")
    make_samples.write_iemocap_fold(fold)
    out = str(tmp_path / "run")
    args = train_iemocap.build_parser().parse_args([
        "--fold-dir", fold, "--model", "cross", "--modalities", "video", "text", "--epochs", "2",
        "--batch-size", "2", "--no-progress", "--out-dir", out, "--device", "cpu", "--log-every", "1",
    ])
    result = train_iemocap.run(args)
    assert len(result["history"]) == 2
    for key in ("loss", "overall_accuracy", "balanced_accuracy"):
        assert key in result["test"]
    assert 0.0 <= result["test"]["overall_accuracy"] <= 1.0
    test_records = _records(out, "test")
    assert len(test_records) == 1 and test_records[0]["balanced_accuracy"] == result["test"]["balanced_accuracy"]
    config = _records(out, "config")[0]
    assert config["dropped_no_video"] == {"train": 1, "dev": 1, "test": 1}


REAL_TINY = ["--seq-len", "4", "--clip-stride", "8", "--batch-size", "4", "--encoder-layers", "1", "--joint-dim", "8",
             "--joint-layers", "1", "--head-hidden", "4", "--no-progress", "--device", "cpu", "--epochs", "1",
             "--fusion", "rjca"]


def test_affwild2_with_spatial_attention_and_recola_through_the_training_script(tmp_path):
    aw2 = str(tmp_path / "affwild2")
    make_samples.write_affwild2(aw2)
    for name, n in make_samples.AFFWILD2_VIDEOS.items():  # TSAV-like video maps: C x 49 with C = 2
        np.save(os.path.join(aw2, "features", "video", name + ".npy"), np.random.rand(n, 98).astype(np.float32))
    args = train_av.build_parser().parse_args(
        REAL_TINY + ["--dataset", "affwild2", "--data-root", aw2, "--spatial-attention",
                     "--out-dir", str(tmp_path / "a")])
    result = train_av.run(args)
    assert result["trainer"].model.spatial_attention is not None
    assert -1 <= result["best"]["ccc_valence"] <= 1
    # Every validation frame was predicted once (frame_values raises otherwise), -5 frames left out of the CCC.
    assert result["val_set"].stats.n_windows_dropped == 0

    recola = str(tmp_path / "recola")
    make_samples.write_recola(recola)
    args = train_av.build_parser().parse_args(
        REAL_TINY + ["--dataset", "recola", "--data-root", recola, "--out-dir", str(tmp_path / "r")])
    assert -1 <= train_av.run(args)["best"]["ccc_arousal_smoothed"] <= 1


def test_a_batch_without_any_label_of_one_dimension_still_trains():
    args = _args("--fusion", "jca")
    train_set, _ = train_av.build_datasets(args)
    model = train_av.build_model(args, [train_set.feature_dims[m] for m in train_set.modalities])
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=4)))
    batch["valence"][:] = -5.0
    task = train_av.VARegressionTask(train_set.modalities)
    model.eval()  # no dropout: the loss can be compared with the arousal term alone
    loss = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.valence_head.parameters())  # in the graph, with zero gradient
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.valence_head.parameters())
    arousal_term = task.criterion((model(batch["video"], batch["audio"])[1],), (batch["arousal"],))
    assert loss.item() == pytest.approx(arousal_term.item(), rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_scripts_take_a_precision_on_cpu(tmp_path, precision, monkeypatch):
    # The forward pass runs under CPU autocast in that dtype (the fused ops return it), the parameters stay float32,
    # fp16 goes through the gradient scaler, and both scripts train, evaluate and checkpoint.
    seen = set()
    real_tanh_attention = avkernels.nn.blocks.tanh_attention

    def recording(q, k, v, **kwargs):
        seen.add((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None, q.dtype))
        assert real_tanh_attention(q, k, v, **kwargs).dtype == torch.get_autocast_dtype("cpu")
        return real_tanh_attention(q, k, v, **kwargs)

    monkeypatch.setattr(avkernels.nn.blocks, "tanh_attention", recording)
    out = str(tmp_path / "av")
    result = train_av.run(_args("--fusion", "grjca", "--max-steps", "3", "--precision", precision, "--out-dir", out))
    trainer = result["trainer"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert {autocast for autocast, _ in seen} == {dtype}  # every fused call ran under autocast in that dtype
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _records(out, "train"))
    assert _records(out, "config")[0]["config"]["precision"] == precision

    fold = str(tmp_path / "fold01")
    make_samples.write_iemocap_fold(fold)
    args = train_iemocap.build_parser().parse_args([
        "--fold-dir", fold, "--model", "self", "--modalities", "video", "text", "--epochs", "1", "--batch-size", "2",
        "--no-progress", "--out-dir", str(tmp_path / "iemocap"), "--device", "cpu", "--precision", precision,
    ])
    assert 0.0 <= train_iemocap.run(args)["test"]["overall_accuracy"] <= 1.0


def test_precision_choices():
    assert engine.autocast_dtype("auto", torch.device("cpu")) is None
    assert engine.autocast_dtype("auto", torch.device("cuda")) == torch.float16
    assert engine.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="precision: expected one of .* got 'fp8'"):
        engine.autocast_dtype("fp8", torch.device("cpu"))
    with pytest.raises(SystemExit):
        _args("--precision", "half")


def test_synthetic_runs_report_the_ccc_by_condition_of_the_frames(tmp_path):
    out = str(tmp_path / "run")
    args = _args("--fusion", "rjca", "--epochs", "1", "--out-dir", out, "--synthetic-set", "misleading_share=1",
                 "corrupt_share=0.6", "segment_len=4")
    result = train_av.run(args)
    assert result["val_set"].config.segment_len == 4 and result["val_set"].config.misleading_share == 1.0
    (val,) = _records(out, "val")
    # Only misleading corruptions in this regime: the noise conditions have no frame and no entry.
    assert sorted(k for k in val if k.startswith("ccc_mean/")) == [
        "ccc_mean/audio misleading", "ccc_mean/clean", "ccc_mean/video misleading"]
    assert all(-1 <= val[k] <= 1 for k in val if k.startswith("ccc_mean/"))
    with pytest.raises(SystemExit, match="--synthetic-set: synthetic override 'segment=4'"):
        train_av.run(_args("--synthetic-set", "segment=4"))


def test_the_demo_reports_over_seeds_and_draws_the_gates(tmp_path, monkeypatch, capsys):
    # The demo's own sizes, one epoch: a short demo run.
    out, results = str(tmp_path / "demo"), str(tmp_path / "results.json")
    train_synthetic.main(["--epochs", "1", "--seeds", "2", "--models", "rjca", "dca", "grjca", "--out-dir", out,
                          "--results", results])
    printed = capsys.readouterr().out
    assert "mean ± 95 % CI over 2 seed(s): [0, 1]" in printed and "Gated minus RJCA, paired by seed" in printed
    with open(results) as f:
        numbers = json.load(f)
    assert numbers["seeds"] == [0, 1] and set(numbers["differences"]) == {"dca", "grjca"}
    by_condition = numbers["by_condition"]
    # The demo's gating preset corrupts with misleading features only: no noise condition.
    assert list(by_condition["dca"]) == ["clean", "video misleading", "audio misleading"]
    for c in by_condition["dca"]:
        assert len(by_condition["dca"][c]) == 2
        assert numbers["differences"]["dca"][c] == pytest.approx(
            [a - b for a, b in zip(by_condition["dca"][c], by_condition["rjca"][c])])
    # Seed k of every model trained on the synthetic data of seed k.
    for k in (0, 1):
        state = torch.load(os.path.join(out, f"seed{k}", "dca", "best.pt"), map_location="cpu", weights_only=True)
        assert state["data_config"]["synthetic"]["seed"] == k
    with open(os.path.join(out, "gates.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gate_traces_cover_every_frame_of_the_video(tmp_path):
    args = _args("--fusion", "grjca")
    _, val_set = train_av.build_datasets(args)
    model = train_av.build_model(args, [val_set.feature_dims[m] for m in val_set.modalities])
    video = train_synthetic.plot_video(val_set)
    traces = train_synthetic.gate_traces(model, val_set, video)
    assert list(traces) == ["iteration 1 gate", "iteration 2 gate", "stage gate, first stage"]
    for per_modality in traces.values():
        assert list(per_modality) == ["video", "audio"]
        for weights in per_modality.values():
            assert weights.shape == (val_set.videos[video].n_frames,)
            assert not np.isnan(weights).any() and (0 <= weights).all() and (weights <= 1).all()
    extras = val_set.videos[video].extras
    png = plot_training.plot_gates(traces, extras["corrupted"], extras["corruption_kind"], str(tmp_path / "g.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_synthetic_preset_and_its_overrides_reach_the_datasets():
    _, val_set = train_av.build_datasets(_args("--synthetic-preset", "gating"))
    assert val_set.config == preset_config("gating", seed=0, n_train_videos=4, n_val_videos=2, n_frames=64, seq_len=8)
    _, val_set = train_av.build_datasets(_args("--synthetic-preset", "gating", "--synthetic-set", "segment_len=2"))
    assert val_set.config.segment_len == 2 and val_set.config.corruption_offset == 0.3
    # The default regime keeps its segments aligned with the windows, whatever the window length.
    _, val_set = train_av.build_datasets(_args())
    assert val_set.config.segment_len == val_set.config.seq_len == 8
