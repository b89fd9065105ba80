"""Train an audio-visual valence/arousal regressor (JCA, RJCA, DCA or GRJCA fusion) with the CCC loss.

    python examples/train_av.py --dataset synthetic --fusion dca --epochs 10 --out-dir runs/dca
    python examples/train_av.py --dataset affwild2 --data-root /data/affwild2 --fusion grjca --out-dir runs/aw2
    torchrun --nproc_per_node 2 examples/train_av.py --dataset recola --data-root /data/recola --out-dir runs/recola
    python examples/train_av.py ... --resume auto          # continue exactly where last.pt left off
    python examples/plot_training.py runs/dca/log.jsonl    # training curves as a PNG

Datasets and their layouts: docs/datasets.md. Evaluation (SPEC 5): every validation frame gets exactly one
prediction (the windows tile the videos); the CCC is global over the partition's valid frames (label != -5), raw,
and smoothed (clip to [-1, 1], per-video moving average of 20 frames for valence and 50 for arousal).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other examples, when imported as a module

import prelude  # noqa: E402  (first: the installed avkernels, else the checkout's)

from engine import (  # noqa: E402
    Context, Task, TrainConfig, Trainer, add_precision_argument, run_or_exit, seed_everything, setup_context,
    teardown_context,
)

from avkernels.data import INVALID_LABEL, AffWild2VA, RECOLA, SyntheticAV, SyntheticAVConfig  # noqa: E402
from avkernels.losses import CCCLoss  # noqa: E402
from avkernels.data.synthetic import CONDITIONS, PRESETS, parse_overrides, preset_config  # noqa: E402
from avkernels.metrics import SMOOTHING_WINDOWS, ccc, grouped_ccc, smooth_predictions  # noqa: E402
from avkernels.dispatch import registered  # noqa: E402
from avkernels.models import AVRegressor  # noqa: E402
from avkernels.predict import check_backend  # noqa: E402

DATASETS = ("synthetic", "affwild2", "recola")
FUSIONS = ("jca", "rjca", "dca", "grjca")
DIMENSIONS = ("valence", "arousal")
DEFAULT_CLIP_STRIDE = {"synthetic": 1, "affwild2": 32, "recola": 16}


class VARegressionTask(Task):
    """CCC loss on ``(valence, arousal)`` with -5 frames masked; evaluation by global CCC over the valid frames."""

    monitor = "ccc_mean"

    def __init__(self, modalities: Sequence[str], use_lengths: bool = True):
        self.modalities = tuple(modalities)
        self.use_lengths = use_lengths
        self.criterion = CCCLoss()

    def predict(self, model, batch, **kwargs):
        # The windows' lengths keep the padding clips past a video's end out of every real clip's prediction.
        lengths = batch["lengths"] if self.use_lengths else None
        return model(*(batch[m] for m in self.modalities), lengths=lengths, **kwargs)

    def loss(self, model, batch):
        total = 0.0
        for prediction, dim in zip(self.predict(model, batch), DIMENSIONS):
            target = batch[dim]
            if bool((target != INVALID_LABEL).any()):
                # The CCC's moments are taken in float32 even under autocast.
                total = total + self.criterion((prediction.float(),), (target,))
            else:
                # No label of this dimension in the batch: no loss term, but the head stays in the graph (DDP
                # expects a gradient for every parameter).
                total = total + 0.0 * prediction.float().sum()
        return total

    def evaluate(self, model, loader, ctx: Context, autocast) -> Dict[str, float]:
        windows, predictions = [], {d: [] for d in DIMENSIONS}
        for batch in loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            with autocast():
                valence, arousal = self.predict(model, batch)
            windows.append(batch["window"].cpu())
            predictions["valence"].append(valence.float().cpu())
            predictions["arousal"].append(arousal.float().cpu())
        return va_metrics(loader.dataset, torch.cat(windows).numpy(),
                          {d: torch.cat(p).numpy() for d, p in predictions.items()})


def va_metrics(dataset, windows: np.ndarray, predictions: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Raw and smoothed global CCC per dimension over the valid frames of ``dataset`` (SPEC 5)."""
    labels = dataset.frame_labels()
    metrics = {}
    for k, dim in enumerate(DIMENSIONS):
        per_video = dataset.frame_values(windows, predictions[dim])
        targets = [y[:, k] for y in labels]
        target = np.concatenate(targets)
        valid = target != INVALID_LABEL
        raw = np.concatenate(per_video)
        if np.isnan(raw).any():
            raise ValueError(f"{dataset.name}: some frames got no prediction; evaluate on windows='all'")
        smoothed = np.concatenate(smooth_predictions(per_video, SMOOTHING_WINDOWS[dim]))
        metrics[f"ccc_{dim}"] = ccc(raw[valid], target[valid])
        metrics[f"ccc_{dim}_smoothed"] = ccc(smoothed[valid], target[valid])
    metrics["ccc_mean"] = (metrics["ccc_valence"] + metrics["ccc_arousal"]) / 2
    metrics["ccc_mean_smoothed"] = (metrics["ccc_valence_smoothed"] + metrics["ccc_arousal_smoothed"]) / 2
    if hasattr(dataset, "frame_conditions"):
        metrics.update(condition_metrics(dataset, windows, predictions))
    return metrics


def condition_metrics(dataset, windows: np.ndarray, predictions: Dict[str, np.ndarray]) -> Dict[str, float]:
    """``{"ccc_mean/<condition>": mean of the valence and arousal CCCs over the frames of that condition}`` (raw
    predictions), for a dataset that records a condition per frame (the synthetic one: clean, or which modality is
    corrupted and how); conditions without any frame in ``dataset`` are left out."""
    groups = np.concatenate(dataset.frame_conditions())
    labels = np.concatenate(dataset.frame_labels())
    per_dim = [grouped_ccc(np.concatenate(dataset.frame_values(windows, predictions[dim])), labels[:, k], groups,
                           CONDITIONS) for k, dim in enumerate(DIMENSIONS)]
    present = set(np.unique(groups).tolist())
    return {f"ccc_mean/{name}": (per_dim[0][name] + per_dim[1][name]) / 2
            for k, name in enumerate(CONDITIONS) if k in present}


class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total`` steps."""

    def __init__(self, warmup: int, total: int, floor: float = 0.05):
        self.warmup, self.total, self.floor = max(0, warmup), max(1, total), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="synthetic")
    g.add_argument("--data-root", help="dataset folder (affwild2, recola); layouts in docs/datasets.md")
    g.add_argument("--modalities", nargs="+", default=["video", "audio"],
                   help="feature folders, in fusion order (video first, as the official code)")
    g.add_argument("--seq-len", type=int, default=16, help="L, clips per sample")
    g.add_argument("--clip-stride", type=int,
                   help="frames between clip ends (default: 32 affwild2, 16 recola, 1 synthetic)")
    g.add_argument("--train-windows", choices=("labelled", "masked"), default="masked",
                   help="training windows: only fully annotated ones (official) or all with -5 masked in the loss")
    g.add_argument("--exclude", nargs="*", default=[], help="Aff-Wild2 training videos to leave out")
    g.add_argument("--synthetic-train-videos", type=int, default=SyntheticAVConfig.n_train_videos)
    g.add_argument("--synthetic-val-videos", type=int, default=SyntheticAVConfig.n_val_videos)
    g.add_argument("--synthetic-frames", type=int, default=SyntheticAVConfig.n_frames)
    g.add_argument("--synthetic-seed", type=int, default=SyntheticAVConfig.seed)
    g.add_argument("--synthetic-preset", choices=tuple(PRESETS), default="default",
                   help="named synthetic regime (avkernels.data.synthetic.PRESETS; 'gating': "
                        "docs/gating-experiment.md)")
    g.add_argument("--synthetic-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override fields of the synthetic preset, e.g. corrupt_share=0.5 segment_len=4 "
                        "(SyntheticAVConfig; segment_len defaults to --seq-len unless the preset sets it)")
    g = p.add_argument_group("model")
    g.add_argument("--fusion", choices=FUSIONS, default="dca")
    g.add_argument("--form", choices=("dense", "additive"), default="dense")
    g.add_argument("--iterations", type=int, help="T (default: 1 for jca, 2 otherwise)")
    g.add_argument("--fusion-dropout", type=float, default=0.6, help="dropout on the maps and residual MLPs")
    g.add_argument("--tau", type=float, default=0.1, help="gate temperature (dca, grjca)")
    g.add_argument("--no-encoders", action="store_true", help="no per-modality BiLSTM before the fusion")
    g.add_argument("--encoder-layers", type=int, default=2)
    g.add_argument("--joint-dim", type=int, default=512)
    g.add_argument("--joint-layers", type=int, default=2)
    g.add_argument("--head-hidden", type=int, default=128)
    g.add_argument("--head-dropout", type=float, default=0.6)
    g.add_argument("--spatial-attention", action="store_true",
                   help="video features are flattened C x 49 maps (TSAV: 25088 = 512 x 7 x 7): audio-guided "
                        "spatial attention reduces them to C features")
    g.add_argument("--scrambled-reshape", action="store_true",
                   help="with --spatial-attention, the official code's view(N, 49, 512) instead of the correct one")
    g.add_argument("--backend", choices=registered(),
                   help="backend of the fused ops (default: the fastest for the device)")
    g.add_argument("--no-lengths", action="store_true",
                   help="feed the padding clips of a video's last windows to the model as if they were real (the "
                        "behaviour before lengths=; for comparison only)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--weight-decay", type=float, default=1e-5)
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--patience", type=int, default=None, help="early stopping on val mean CCC (epochs)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (checkpointed)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_precision_argument(g)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--num-workers", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=None, help="run folder: log.jsonl, last.pt, best.pt (default: runs/<fusion>)")
    g.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (out-dir/last.pt if any)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--plot", action="store_true", help="write out-dir/curves.png at the end")
    return p


def build_datasets(args):
    stride = args.clip_stride or DEFAULT_CLIP_STRIDE[args.dataset]
    if args.dataset == "synthetic":
        try:
            overrides = parse_overrides(args.synthetic_set)
        except ValueError as error:
            raise SystemExit(f"--synthetic-set: {error}") from None
        if "segment_len" not in PRESETS[args.synthetic_preset]:
            overrides.setdefault("segment_len", args.seq_len)  # corruption segments aligned with the windows
        sizes = dict(seed=args.synthetic_seed, n_train_videos=args.synthetic_train_videos,
                     n_val_videos=args.synthetic_val_videos, n_frames=args.synthetic_frames, seq_len=args.seq_len)
        config = preset_config(args.synthetic_preset, **{**overrides, **sizes})
        return (SyntheticAV("train", config, windows=args.train_windows), SyntheticAV("val", config))
    if args.data_root is None:
        raise SystemExit(f"--data-root is required for --dataset {args.dataset}")
    if args.dataset == "affwild2":
        features = {m: os.path.join(args.data_root, "features", m) for m in args.modalities}
        annotations = os.path.join(args.data_root, "annotations")
        common = dict(seq_len=args.seq_len, clip_stride=stride)
        return (
            AffWild2VA(os.path.join(annotations, "Train_Set"), features, windows=args.train_windows,
                       exclude=args.exclude, name="Aff-Wild2 train", **common),
            AffWild2VA(os.path.join(annotations, "Validation_Set"), features, windows="all",
                       name="Aff-Wild2 validation", **common),
        )
    common = dict(modalities=args.modalities, seq_len=args.seq_len, clip_stride=stride)
    return (RECOLA(args.data_root, "train", windows=args.train_windows, **common),
            RECOLA(args.data_root, "dev", windows="all", **common))


def model_config(args, dims: Sequence[int]) -> Dict[str, Any]:
    """``{"class", "kwargs"}`` of the regressor for features of sizes ``dims`` (video first), as checkpoints hold it."""
    spatial = {}
    if args.spatial_attention:
        positions = 49
        if dims[0] % positions:
            raise SystemExit(f"--spatial-attention: video features of size {dims[0]} are not C x {positions} maps")
        channels = dims[0] // positions
        spatial = dict(spatial_attention=True, spatial_channels=channels, spatial_positions=positions,
                       scrambled_reshape=args.scrambled_reshape)
        dims = (channels, *dims[1:])
    fusion_kwargs: Dict[str, Any] = {"form": args.form, "dropout": args.fusion_dropout}
    if args.iterations is not None:
        fusion_kwargs["iterations"] = args.iterations
    if args.fusion in ("dca", "grjca"):
        fusion_kwargs["tau"] = args.tau
    if args.backend:
        fusion_kwargs["backend"] = args.backend
    kwargs = dict(
        dims=tuple(int(d) for d in dims), seq_len=args.seq_len, fusion=args.fusion, fusion_kwargs=fusion_kwargs,
        encoders=not args.no_encoders, encoder_layers=args.encoder_layers, joint_dim=args.joint_dim,
        joint_layers=args.joint_layers, head_hidden=args.head_hidden, head_dropout=args.head_dropout, **spatial,
    )
    return {"class": "AVRegressor", "kwargs": kwargs}


def build_model(args, dims: Sequence[int]) -> AVRegressor:
    """The regressor for features of sizes ``dims`` (video first)."""
    return AVRegressor(**model_config(args, dims)["kwargs"])


def data_config(args, train_set) -> Dict[str, Any]:
    """What ``python -m avkernels predict`` needs to window a split as training did."""
    config: Dict[str, Any] = {
        "dataset": args.dataset, "modalities": list(train_set.modalities), "seq_len": args.seq_len,
        "clip_stride": args.clip_stride or DEFAULT_CLIP_STRIDE[args.dataset],
    }
    if args.dataset == "synthetic":
        config["synthetic"] = asdict(train_set.config)
    return config


def run(args, ctx: Optional[Context] = None) -> Dict[str, Any]:
    """Train as ``args`` says; returns ``{"history", "best", "trainer", "val_set"}`` (the trainer holds the model)."""
    own_ctx = ctx is None
    if args.plot:
        prelude.require("matplotlib", "--plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = ctx or setup_context(args.device)
    try:
        seed_everything(args.seed)
        train_set, val_set = build_datasets(args)
        dims = [train_set.feature_dims[m] for m in train_set.modalities]
        model = build_model(args, dims)
        check_backend(model.to(ctx.device), args.backend, ctx.device, args.precision)  # one it lacks: a CLI error
        out_dir = args.out_dir or os.path.join("runs", args.fusion)
        config = TrainConfig(
            out_dir=out_dir, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
            max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, patience=args.patience,
            precision=args.precision, grad_clip=args.grad_clip, progress=not args.no_progress, log_every=args.log_every,
            num_workers=args.num_workers,
        )
        total_steps = args.epochs * (len(train_set) // (args.batch_size * ctx.world_size))
        trainer = Trainer(
            VARegressionTask(train_set.modalities, use_lengths=not args.no_lengths), model,
            lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay),
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(args.warmup_steps, total_steps)),
            train_set, val_set, config, ctx, resume=args.resume,
            run_info={"args": vars(args), "train_windows": vars(train_set.stats), "val_windows": vars(val_set.stats),
                      "parameters": sum(p.numel() for p in model.parameters())},
            extra_state={"model_config": model_config(args, dims), "data_config": data_config(args, train_set)},
        )
        started = time.time()
        history = trainer.fit()
        if ctx.is_main and args.plot and config.out_dir:
            from plot_training import plot_log

            plot_log(os.path.join(config.out_dir, "log.jsonl"), os.path.join(config.out_dir, "curves.png"))
        best = max(history, key=lambda r: r["ccc_mean"]) if history else None
        return {"history": history, "best": best, "trainer": trainer, "val_set": val_set,
                "seconds": time.time() - started}
    finally:
        if own_ctx:
            teardown_context(ctx)


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    result = run_or_exit(parser, run, parser.parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0 and result["best"] is not None:
        best = result["best"]
        print(f"best epoch {best['epoch'] + 1}: CCC valence {best['ccc_valence']:.4f} "
              f"arousal {best['ccc_arousal']:.4f} "
              f"(smoothed {best['ccc_valence_smoothed']:.4f} / {best['ccc_arousal_smoothed']:.4f})")


if __name__ == "__main__":
    main()
