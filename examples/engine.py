"""The training loop shared by the example scripts: single process or ``torchrun`` (DDP), resumable exactly.

What it does, once for every script:

* **Distributed**: under ``torchrun`` (``WORLD_SIZE > 1``) it joins a process group (``nccl`` on GPU, ``gloo`` on
  CPU), wraps the model in ``DistributedDataParallel`` and shards the training data with a ``DistributedSampler``.
  Only rank 0 evaluates, logs, draws the progress bar and writes checkpoints; the metrics it computes are broadcast
  so that every rank takes the same scheduler and early-stopping decisions.
* **Mixed precision** on CPU and CUDA: ``precision`` is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``torch.autocast`` in
  that dtype around the forward pass and the loss; a ``GradScaler`` for fp16, whose gradients underflow otherwise).
  ``"auto"`` means fp16 on CUDA and fp32 on CPU, where only CPUs with bfloat16 matrix units (AMX, AVX-512 BF16) make
  16-bit faster.
* **Checkpoints** (``last.pt`` every ``checkpoint_every`` steps and at each epoch end, ``best.pt`` on a new best
  validation score) are written to a temporary file and moved into place with ``os.replace``, so a crash never
  leaves a truncated checkpoint. They hold the model, optimizer, scheduler and scaler states, the epoch and the
  step within it, the early-stopping state and the RNG states of every rank (torch, CUDA, numpy, python), plus the
  script's ``extra_state`` (the model and data configuration that ``python -m avkernels predict`` rebuilds from),
  all as tensors and plain Python values, so that they load with ``weights_only=True`` as every reader of them does
  (:mod:`avkernels.checkpoint`): resuming from a file that would run code refuses it before it runs.
* **Exact resume**: the data order is a function of ``(seed, epoch)`` (the sampler's own generator; the loader has
  its own generator too, so iterating never draws from the global RNG), and a resumed epoch skips the batches
  already done. Resuming from step ``n`` and taking one step gives bitwise the parameters of an uninterrupted run.
* **Logs**: ``log.jsonl`` in the run folder, one JSON object per line (``{"event": "train", "step", "epoch",
  "loss", "lr"}`` and ``{"event": "val", "epoch", "step", <metrics>}``); ``plot_training.py`` draws them. On resume
  the records past the checkpoint are dropped, since the resumed run writes them again.

A task supplies what differs between the datasets (:class:`Task`): the loss of a batch and the evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from avkernels.checkpoint import CONVERT_HINT, CheckpointError, plain, weights_mismatch
from avkernels.checkpoint import load as load_checkpoint
from avkernels.data.formats import DataFormatError
from avkernels.prediction_files import PredictError
from avkernels.precision import PRECISIONS, autocast_dtype  # noqa: F401  (shared with `python -m avkernels predict`)

logger = logging.getLogger("avkernels.examples")

# What a checkpoint must hold to be resumed from (besides the script's extra_state).
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "batch_in_epoch", "step", "best", "bad_evals",
               "history", "rng", "world_size", "config")


# ----------------------------------------------------------------------------------------------------------------
# Distributed context
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_context(device: str = "auto") -> Context:
    """Join the process group when launched by ``torchrun`` and pick the device.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but no CUDA GPU is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Context(rank, world_size, local_rank, dev)


def teardown_context(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        # Every rank reaches teardown before any closes its connections: gloo aborts a rank ("terminate called
        # without an active exception") whose peer tears the group down while it is still finishing.
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plain_numpy_state(state: Sequence[Any]) -> List[Any]:
    """``np.random.get_state()`` in tensors and plain values (its key array as a tensor), as checkpoints hold it."""
    name, key, position, has_gauss, gauss = state
    return [name, torch.from_numpy(np.asarray(key).astype(np.int64)), int(position), int(has_gauss), float(gauss)]


def rng_state() -> Dict[str, Any]:
    """Every generator's state, in tensors and plain values."""
    state = {"torch": torch.get_rng_state(), "numpy": plain_numpy_state(np.random.get_state(legacy=True)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_or_exit(parser, run: Callable[[Any], Any], args: Any) -> Any:
    """``run(args)``, where a bad input (a refused or damaged checkpoint, a malformed or missing data file, a backend
    the machine lacks) ends the script as a command-line error, ``<prog>: error: ...`` with exit status 2, rather
    than a traceback."""
    try:
        return run(args)
    except (CheckpointError, DataFormatError, FileNotFoundError, PredictError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


# ----------------------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order fixed by ``seed`` and the epoch) that can start an epoch at a given batch."""

    def __init__(self, dataset: Dataset, ctx: Context, batch_size: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` without ever leaving a partial file there (write a temp file, then rename).

    ``obj`` may hold only tensors and plain Python values (:func:`avkernels.checkpoint.plain`), so that the file loads
    with ``weights_only=True``."""
    obj = plain(obj)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class JsonlLog:
    """Append-only JSON-lines log (rank 0 only)."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def reset(self) -> None:
        """Start an empty log (a new run in a folder that held an older one)."""
        if self.path is not None:
            open(self.path, "w", encoding="utf-8").close()

    def truncate_after(self, step: int) -> None:
        """Drop step records past ``step`` (left by a run that stopped after its last checkpoint)."""
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path, "r", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if r.get("step", -1) <= step or r.get("event") == "config"]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------


class Task:
    """What a dataset brings to the loop.

    Attributes:
        monitor: the validation metric that selects ``best.pt`` and drives early stopping (higher is better).
    """

    monitor: str = "score"

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: Context, autocast: Callable) -> Dict[str, float]:
        """Metrics over the whole validation set (run on rank 0 with the unwrapped model in eval mode)."""
        raise NotImplementedError


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Options of :class:`Trainer` (the scripts expose them as command-line flags).

    Attributes:
        out_dir: run folder (``log.jsonl``, ``last.pt``, ``best.pt``); ``None`` keeps nothing on disk.
        epochs: epochs to train (a resumed run continues up to this many).
        batch_size: per process.
        seed: seeds the model initialisation, the data order and dropout.
        max_steps: stop after this many optimizer steps in all (a checkpoint is written there); ``None``: no limit.
        checkpoint_every: also write ``last.pt`` every this many steps (0: only at epoch ends).
        patience: early stopping after this many evaluations without a strict improvement of ``task.monitor``
            (``None``: never).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (autocast dtype) or ``"auto"`` (fp16 on CUDA, fp32 on CPU).
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        progress: draw a tqdm progress bar (rank 0).
        log_every: write a train record every this many steps.
        num_workers: DataLoader workers.
        eval_batch_size: validation batch size (default: ``batch_size``).
    """

    out_dir: Optional[str] = None
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    max_steps: Optional[int] = None
    checkpoint_every: int = 0
    patience: Optional[int] = None
    precision: str = "auto"
    grad_clip: Optional[float] = None
    progress: bool = True
    log_every: int = 10
    num_workers: int = 0
    eval_batch_size: Optional[int] = None




def add_precision_argument(parser) -> None:
    parser.add_argument(
        "--precision", choices=("auto", *PRECISIONS), default="auto",
        help="autocast dtype of the forward pass (auto: fp16 on CUDA, fp32 on CPU); fp16 adds a gradient scaler",
    )


class Trainer:
    """Trains ``model`` on ``train_set`` for a :class:`Task`, evaluating on ``val_set`` after every epoch.

    Args:
        task: the loss and the evaluation.
        model: the model (on CPU; the trainer moves it and wraps it for DDP).
        make_optimizer: ``params -> optimizer`` (called on the moved model's parameters).
        make_scheduler: ``optimizer -> scheduler`` or ``None``; stepped per step (``scheduler_per="step"``) or once
            per epoch on the validation metrics (``scheduler_per="epoch"``, e.g. ReduceLROnPlateau on the val loss:
            ``scheduler_metric`` names the metric).
        train_set, val_set: datasets whose items are dicts of tensors.
        config: :class:`TrainConfig`.
        ctx: from :func:`setup_context`.
        resume: path of a checkpoint to resume from (``"auto"``: ``out_dir/last.pt`` when it exists).
        extra_state: further entries of every checkpoint. The scripts store ``model_config`` and ``data_config``
            there, so that ``python -m avkernels predict`` rebuilds the model and its data without any flag.
    """

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        make_optimizer: Callable,
        make_scheduler: Optional[Callable],
        train_set: Dataset,
        val_set: Dataset,
        config: TrainConfig,
        ctx: Context,
        *,
        scheduler_per: str = "step",
        scheduler_metric: Optional[str] = None,
        resume: Optional[str] = None,
        run_info: Optional[Dict[str, Any]] = None,
        extra_state: Optional[Dict[str, Any]] = None,
    ):
        if scheduler_per not in ("step", "epoch"):
            raise ValueError(f"scheduler_per: expected 'step' or 'epoch', got {scheduler_per!r}")
        self.task, self.cfg, self.ctx = task, config, ctx
        self.extra_state = dict(extra_state or {})
        self.model = model.to(ctx.device)
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
            if ctx.distributed else self.model
        )
        self.optimizer = make_optimizer(self.model.parameters())
        self.scheduler = make_scheduler(self.optimizer) if make_scheduler is not None else None
        self.scheduler_per, self.scheduler_metric = scheduler_per, scheduler_metric
        self.autocast_dtype = autocast_dtype(config.precision, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.autocast_dtype == torch.float16)

        self.sampler = ResumableSampler(train_set, ctx, config.batch_size, config.seed)
        self.train_loader = DataLoader(
            train_set, batch_size=config.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=config.num_workers, generator=torch.Generator().manual_seed(config.seed),
            pin_memory=ctx.device.type == "cuda",
        )
        if self.sampler.batches_per_epoch() == 0:
            raise ValueError(
                f"batch_size: {config.batch_size} x {ctx.world_size} processes is more than the {len(train_set)} "
                "training samples; no full batch per epoch"
            )
        self.val_loader = DataLoader(val_set, batch_size=config.eval_batch_size or config.batch_size, shuffle=False,
                                     num_workers=config.num_workers)

        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best: Optional[float] = None
        self.bad_evals = 0
        self.history: List[Dict[str, Any]] = []
        self.stopped_early = False

        main = ctx.is_main and config.out_dir is not None
        if main:
            os.makedirs(config.out_dir, exist_ok=True)
        self.log = JsonlLog(os.path.join(config.out_dir, "log.jsonl") if main else None)
        if resume == "auto":
            candidate = os.path.join(config.out_dir, "last.pt") if config.out_dir else None
            resume = candidate if candidate and os.path.exists(candidate) else None
        if resume is not None:
            self._load(resume)
            self.log.truncate_after(self.step)
            if ctx.is_main:
                logger.info("resumed from %s at epoch %d, batch %d (step %d)", resume, self.epoch,
                            self.batch_in_epoch, self.step)
        else:
            self.log.reset()
            self.log.write({"event": "config", "config": asdict(config), "world_size": ctx.world_size,
                            "device": str(ctx.device), **(run_info or {})})

    # -- autocast ------------------------------------------------------------------------------------------------

    def autocast(self):
        return torch.autocast(
            device_type=self.ctx.device.type, dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _state(self) -> Dict[str, Any]:
        states = [rng_state()]
        if self.ctx.distributed:
            states = [None] * self.ctx.world_size
            dist.all_gather_object(states, rng_state())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "rng": states,
            "world_size": self.ctx.world_size,
            "config": asdict(self.cfg),
            **self.extra_state,
        }

    def save(self, name: str) -> None:
        """Write ``out_dir/name`` atomically (every rank must call it: the RNG states are gathered)."""
        state = self._state()
        if self.ctx.is_main and self.cfg.out_dir is not None:
            atomic_save(state, os.path.join(self.cfg.out_dir, name))

    def _load(self, path: str) -> None:
        state = load_checkpoint(path, hint=CONVERT_HINT)  # weights_only: a file that would run code is refused
        missing = [k for k in RESUME_KEYS if k not in state] if isinstance(state, dict) else list(RESUME_KEYS)
        if missing:
            raise CheckpointError(f"{path}: not a checkpoint of the training scripts (no {', '.join(missing)})")
        if state["world_size"] != self.ctx.world_size:
            raise CheckpointError(
                f"{path}: saved by {state['world_size']} processes, resumed by {self.ctx.world_size}; the data order "
                "and RNG streams would differ (resume with the same number of processes)"
            )
        if state["config"]["batch_size"] != self.cfg.batch_size or state["config"]["seed"] != self.cfg.seed:
            raise CheckpointError(
                f"{path}: saved with another batch_size or seed; resuming would change the data order")
        mismatch = weights_mismatch(self.model, state["model"])
        if mismatch:
            raise CheckpointError(f"{path}: its weights do not fit this run's model: {mismatch}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best, self.bad_evals, self.history = state["best"], state["bad_evals"], state["history"]
        set_rng_state(state["rng"][self.ctx.rank])

    # -- training ------------------------------------------------------------------------------------------------

    def _train_step(self, batch: Dict[str, torch.Tensor]) -> float:
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.task.loss(self.ddp, to_device(batch, self.ctx.device))
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None and self.scheduler_per == "step":
            self.scheduler.step()
        return float(loss.detach())

    def evaluate(self) -> Dict[str, float]:
        """Validation metrics, computed on rank 0 and broadcast to every rank."""
        metrics = None
        if self.ctx.is_main:
            self.model.eval()
            with torch.no_grad():
                metrics = self.task.evaluate(self.model, self.val_loader, self.ctx, self.autocast)
        return broadcast_object(self.ctx, metrics)

    def _end_epoch(self) -> bool:
        """Evaluate, log, step the epoch scheduler, checkpoint; returns True when early stopping triggers."""
        metrics = self.evaluate()
        score = metrics[self.task.monitor]
        improved = self.best is None or score > self.best
        if improved:
            self.best, self.bad_evals = score, 0
        else:
            self.bad_evals += 1
        if self.scheduler is not None and self.scheduler_per == "epoch":
            self.scheduler.step(metrics[self.scheduler_metric])
        record = {"event": "val", "epoch": self.epoch, "step": self.step,
                  "lr": self.optimizer.param_groups[0]["lr"], **metrics}
        self.history.append(record)
        self.log.write(record)
        if self.ctx.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            logger.info("epoch %d (step %d): %s%s", self.epoch + 1, self.step, shown, " *" if improved else "")
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if improved:
            self.save("best.pt")
        stop = self.cfg.patience is not None and self.bad_evals >= self.cfg.patience
        self.save("last.pt")
        return stop

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def fit(self) -> List[Dict[str, Any]]:
        """Train until ``epochs``, ``max_steps`` or early stopping; returns the validation history."""
        cfg = self.cfg
        bar = None
        if cfg.progress and self.ctx.is_main:
            from tqdm.auto import tqdm

            per_epoch = self.sampler.batches_per_epoch()
            total = per_epoch * cfg.epochs
            if cfg.max_steps is not None:
                total = min(total, cfg.max_steps)
            bar = tqdm(total=total, initial=min(self.step, total), unit="step", dynamic_ncols=True)
        started = time.time()
        try:
            while self.epoch < cfg.epochs and not self._reached_max_steps():
                if cfg.patience is not None and self.bad_evals >= cfg.patience:
                    self.stopped_early = True
                    break
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                for batch in self.train_loader:
                    loss = self._train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"training loss is {loss} at step {self.step}")
                    if self.step % cfg.log_every == 0:
                        self.log.write({"event": "train", "epoch": self.epoch, "step": self.step, "loss": loss,
                                        "lr": self.optimizer.param_groups[0]["lr"],
                                        "time": round(time.time() - started, 3)})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss:.4f}")
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save("last.pt")
                    if self._reached_max_steps():
                        break
                if self.batch_in_epoch < self.sampler.batches_per_epoch():  # stopped inside the epoch by max_steps
                    self.save("last.pt")
                    break
                if self._end_epoch():
                    self.stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
        return self.history
