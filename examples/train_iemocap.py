"""Train the IEMOCAP self- or cross-attention classifier (Rajan et al., ICASSP 2022) on one of Yoon's folds.

    python examples/train_iemocap.py --fold-dir /data/IEMOCAP/seven_category_120/folds/fold01 --model self
    python examples/train_iemocap.py --fold-dir ... --model cross --modalities video text --seed 3
    torchrun --nproc_per_node 2 examples/train_iemocap.py --fold-dir ... --model self

The paper's protocol (the defaults): cross-entropy, Adam lr 1e-3, batch 32, ReduceLROnPlateau(factor 0.1,
patience 10) on the validation loss, early stopping when the validation overall accuracy has not improved for 10
epochs, then the best checkpoint is evaluated on the test split. The paper ran 5 folds x seeds 1..10 and reports
mean (std) over the 50 runs; ``--epochs`` caps a run (the code's cap was 20,000, i.e. early stopping only).
The code trained in float64; this script trains in float32, or under autocast with ``--precision bf16|fp16``
(default: fp16 on CUDA, fp32 on CPU).

Metric names: "balanced accuracy" (mean per-class recall) is what the paper calls WA, "overall accuracy" what it
calls UWA (SPEC 5, docs/spec.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other examples, when imported as a module

import prelude  # noqa: E402  (first: the installed avkernels, else the checkout's)

from engine import (  # noqa: E402
    Context, Task, TrainConfig, Trainer, add_precision_argument, load_checkpoint, run_or_exit, seed_everything,
    setup_context, teardown_context,
)

from avkernels.data import IEMOCAPFold  # noqa: E402
from avkernels.metrics import balanced_accuracy, overall_accuracy  # noqa: E402
from avkernels.models import CrossAttentionClassifier, SelfAttentionClassifier  # noqa: E402

MODELS = {"self": SelfAttentionClassifier, "cross": CrossAttentionClassifier}


class ClassificationTask(Task):
    """Cross-entropy on the class logits; validation loss, overall and balanced accuracy."""

    monitor = "overall_accuracy"

    def __init__(self, modalities):
        self.modalities = tuple(modalities)

    def logits(self, model, batch):
        # The valid steps the fold's files mark (text and video; the MFCCs mark none).
        lengths = {m: batch[f"{m}_length"] for m in self.modalities if f"{m}_length" in batch}
        return model(*(batch[m] for m in self.modalities), lengths=lengths)

    def loss(self, model, batch):
        return F.cross_entropy(self.logits(model, batch).float(), batch["label"])

    def evaluate(self, model, loader, ctx: Context, autocast) -> Dict[str, float]:
        logits, labels = [], []
        for batch in loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            with autocast():
                logits.append(self.logits(model, batch).float().cpu())
            labels.append(batch["label"].cpu())
        logits, labels = torch.cat(logits), torch.cat(labels)
        return {
            "loss": float(F.cross_entropy(logits, labels)),
            "overall_accuracy": overall_accuracy(logits, labels),
            "balanced_accuracy": balanced_accuracy(logits, labels),
        }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fold-dir", required=True, help="a fold folder of Yoon's IEMOCAP (layout: docs/datasets.md)")
    p.add_argument("--model", choices=tuple(MODELS), default="self")
    p.add_argument("--modalities", nargs="+", choices=("text", "video", "audio"), default=["text", "video", "audio"])
    p.add_argument("--keep-no-video", action="store_true",
                   help="keep utterances with video_seqN == 0 (the paper's code drops them from every split)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--plateau-patience", type=int, default=10, help="ReduceLROnPlateau patience (epochs)")
    p.add_argument("--patience", type=int, default=10, help="early stopping on val overall accuracy (epochs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_precision_argument(p)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join("runs", "iemocap"))
    p.add_argument("--resume", default=None, help="checkpoint path or 'auto'")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot", action="store_true")
    return p


def run(args, ctx: Optional[Context] = None) -> Dict[str, Any]:
    """Train, then evaluate the best checkpoint on the test split; returns history, best and test metrics."""
    own_ctx = ctx is None
    if args.plot:
        prelude.require("matplotlib", "--plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = ctx or setup_context(args.device)
    try:
        seed_everything(args.seed)
        common = dict(modalities=args.modalities, drop_no_video=not args.keep_no_video)
        train_set, val_set, test_set = (IEMOCAPFold(args.fold_dir, s, **common) for s in ("train", "dev", "test"))
        model = MODELS[args.model](args.modalities)
        task = ClassificationTask(args.modalities)
        config = TrainConfig(
            out_dir=args.out_dir, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
            max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, patience=args.patience,
            precision=args.precision, progress=not args.no_progress, log_every=args.log_every, num_workers=args.num_workers,
        )
        trainer = Trainer(
            task, model,
            lambda params: torch.optim.Adam(params, lr=args.lr),
            lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                                   patience=args.plateau_patience),
            train_set, val_set, config, ctx, scheduler_per="epoch", scheduler_metric="loss", resume=args.resume,
            run_info={"args": vars(args), "dropped_no_video": {
                s.split: s.n_dropped_no_video for s in (train_set, val_set, test_set)}},
            extra_state={
                "model_config": {"class": MODELS[args.model].__name__, "kwargs": {"modalities": list(args.modalities)}},
                "data_config": {"dataset": "iemocap", "modalities": list(args.modalities),
                                "drop_no_video": not args.keep_no_video},
            },
        )
        history = trainer.fit()
        result: Dict[str, Any] = {"history": history, "trainer": trainer, "stopped_early": trainer.stopped_early}
        if ctx.is_main:
            best_path = os.path.join(args.out_dir, "best.pt")
            model.load_state_dict(load_checkpoint(best_path)["model"])
            loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch_size, shuffle=False)
            model.eval()
            with torch.no_grad():
                test = task.evaluate(model, loader, ctx, trainer.autocast)
            result["best"] = max(history, key=lambda r: r["overall_accuracy"])
            result["test"] = test
            trainer.log.write({"event": "test", "step": trainer.step, "checkpoint": best_path, **test})
            if args.plot:
                from plot_training import plot_log

                plot_log(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "curves.png"))
        return result
    finally:
        if own_ctx:
            teardown_context(ctx)


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    result = run_or_exit(parser, run, parser.parse_args(argv))
    if "test" in result:
        print(json.dumps({"best_val": result["best"], "test": result["test"],
                          "stopped_early": result["stopped_early"]}, indent=1))


if __name__ == "__main__":
    main()
