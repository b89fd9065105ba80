"""``python -m avkernels predict``: predictions of a trained checkpoint on a dataset split, in the dataset's format.

The checkpoint is a ``last.pt`` / ``best.pt`` of ``examples/train_av.py`` or ``examples/train_iemocap.py``: it holds
the model's configuration (``model_config``) and how its data were read (``data_config``), so only the data folder
and the split are given here. Outputs, per dataset:

* **Aff-Wild2** (and the synthetic dataset): ``<out>/<video>.txt`` per video, the ABAW annotation format: the header
  ``valence,arousal`` and one ``v,a`` line per frame of the video, every frame exactly once (the windows tile each
  video; padding clips are dropped).
* **RECOLA**: ``<out>/valence/<subject>.csv`` and ``<out>/arousal/<subject>.csv``, the gold-standard layout: one value
  per line, one line per 40 ms frame.
* **IEMOCAP**: ``<out>/predictions.csv``, one row per utterance: ``utterance`` (its index in the split's ``.npy``
  files), ``class`` (the arg-max) and ``prob_0 .. prob_6`` (softmax).

Valence and arousal are clipped to [-1, 1], the range of both formats (the heads are unbounded). ``--smooth`` adds the
SPEC 5 post-processing (:func:`avkernels.metrics.smooth_predictions`: a per-video moving average of 20 frames for
valence and 50 for arousal).

The output folder is written in a temporary sibling folder and put in place in one step, so an interrupted run
leaves the previous results or the new ones, complete (:mod:`avkernels.prediction_files`). An existing non-empty
folder is replaced only with ``--overwrite``, and only when it holds nothing but earlier predictions: never the
checkpoint, the data or a file predict did not write. The checkpoint is read with ``weights_only=True``
(:func:`avkernels.checkpoint.load`): a file that could run code is refused, unread.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from avkernels import checkpoint as checkpoints
from avkernels.dispatch import backend_status, registered
from avkernels.data import RECOLA, AffWild2VA, IEMOCAPFold, SyntheticAV, SyntheticAVConfig
from avkernels.metrics import SMOOTHING_WINDOWS, smooth_predictions
from avkernels.models import AVRegressor, CrossAttentionClassifier, SelfAttentionClassifier
from avkernels.nn.fusion import RecursiveJointCrossAttention
from avkernels.precision import PRECISIONS, autocast
from avkernels.prediction_files import (  # noqa: F401  (IEMOCAP_FILE and the writers are part of this module's API)
    DIMENSIONS,
    IEMOCAP_FILE,
    PredictError,
    check_output_folder,
    recover,
    write_folder_atomically,
    write_iemocap_file,
    write_recola_files,
    write_va_files,
)

MODEL_CLASSES = {cls.__name__: cls for cls in (AVRegressor, SelfAttentionClassifier, CrossAttentionClassifier)}
SPLITS = {
    "synthetic": {"train": "train", "val": "val", "validation": "val"},
    "affwild2": {"train": "Train_Set", "val": "Validation_Set", "validation": "Validation_Set", "test": "test",
                 "Train_Set": "Train_Set", "Validation_Set": "Validation_Set"},
    "recola": {"train": "train", "dev": "dev", "val": "dev", "validation": "dev"},
    "iemocap": {"train": "train", "dev": "dev", "val": "dev", "validation": "dev", "test": "test"},
}

# -- checkpoint -> model ------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> str:
    """The checkpoint file ``path`` names: itself, or for a run folder its ``best.pt``, else its ``last.pt``."""
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path}: a folder without best.pt or last.pt")
        return found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint's dict; it must hold ``model``, ``model_config`` and ``data_config``.

    ``path`` may also be a run folder (:func:`resolve_checkpoint`). The file is read with ``weights_only=True``
    (:func:`avkernels.checkpoint.load`): one that holds other Python objects is refused before any of it runs.
    """
    path = resolve_checkpoint(path)
    state = checkpoints.load(path, hint=checkpoints.CONVERT_HINT)
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        found = f"top-level keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise PredictError(f"{path}: not a checkpoint of the training scripts (no 'model' state dict; found {found})")
    missing = [key for key in ("model_config", "data_config") if key not in state]
    if missing:
        raise PredictError(
            f"{path}: the checkpoint has no {' or '.join(missing)}; it was written by a training script older than "
            "the predict command. Train with the current examples/train_av.py or train_iemocap.py, whose checkpoints "
            "hold the model and data configuration"
        )
    for key in ("model_config", "data_config"):
        if not isinstance(state[key], dict):
            raise PredictError(f"{path}: {key} should be a dict, got {type(state[key]).__name__}")
    return state


def build_model(model_config: Mapping[str, Any], backend: Optional[str] = None) -> nn.Module:
    """The model a checkpoint's ``model_config`` describes, with fresh weights.

    The fused ops' backend is a property of the machine, not of the model: the one recorded at training is dropped
    and ``backend`` (``None``: the fastest for the inputs) used instead.
    """
    name = model_config.get("class")
    if name not in MODEL_CLASSES:
        raise PredictError(f"model_config: unknown model class {name!r}; expected one of {tuple(MODEL_CLASSES)}")
    kwargs = copy.deepcopy(dict(model_config.get("kwargs", {})))
    if isinstance(kwargs.get("fusion_kwargs"), dict):
        kwargs["fusion_kwargs"].pop("backend", None)
    try:
        model = MODEL_CLASSES[name](**kwargs)
    except (TypeError, ValueError) as error:
        raise PredictError(f"model_config: does not describe a {name} this version builds ({error})") from None
    for module in model.modules():
        if isinstance(module, RecursiveJointCrossAttention):
            module.set_backend(backend)
    return model


def load_model(path: str, *, device: str = "cpu", backend: Optional[str] = None):
    """``(model, data_config)`` of a checkpoint, the model in eval mode on ``device``."""
    state = load_checkpoint(path)
    model = build_model(state["model_config"], backend)
    mismatch = checkpoints.weights_mismatch(model, state["model"])
    if mismatch:
        config = state["model_config"]
        fusion = config.get("kwargs", {}).get("fusion")
        described = f"{config.get('class')}" + (f" with fusion {fusion!r}" if fusion else "")
        raise PredictError(f"{resolve_checkpoint(path)}: its weights do not fit the model its model_config describes "
                           f"({described}): {mismatch}. Were another model's weights saved under this configuration?")
    model.load_state_dict(state["model"])
    return model.to(device).eval(), dict(state["data_config"])


def check_backend(model: nn.Module, backend: Optional[str], device: torch.device, precision: str = "fp32") -> None:
    """A backend named by the user can run ``model`` on ``device`` (tried on one example input), else an error
    saying why; found before any data is read."""
    if backend is None:
        return
    status = backend_status().get(backend, "available")  # an unknown name is refused by build_model already
    if status != "available":
        raise PredictError(f"--backend {backend}: not usable on this machine: {status}")
    from avkernels.export import example_inputs

    inputs = [x.to(device) for x in example_inputs(model, batch=1)]
    was_training = model.training
    model.eval()  # no dropout: the check draws nothing from the random generators
    try:
        with torch.no_grad(), autocast(precision, device):
            model(*inputs)
    except RuntimeError as error:
        raise PredictError(f"--backend {backend}: cannot run this model on {device.type}: {error}") from None
    finally:
        model.train(was_training)


# -- data ---------------------------------------------------------------------------------------------------------


def _split_name(dataset: str, split: str) -> str:
    names = SPLITS.get(dataset)
    if names is None:
        raise PredictError(f"data_config: unknown dataset {dataset!r}; expected one of {tuple(SPLITS)}")
    if split not in names:
        raise PredictError(f"split: {dataset} has the splits {tuple(names)}, got {split!r}")
    return names[split]


def build_dataset(data_config: Mapping[str, Any], split: str, data_root: Optional[str] = None, *,
                  drop_no_video: bool = False):
    """The split as a dataset whose items cover every frame (``windows="all"``) or every utterance once."""
    dataset = data_config["dataset"]
    split_name = _split_name(dataset, split)
    if dataset == "synthetic":
        return SyntheticAV(split_name, SyntheticAVConfig(**data_config["synthetic"]), windows="all")
    if data_root is None:
        raise PredictError(f"--data-root is required for {dataset} (layouts: docs/datasets.md)")
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"{data_root}: {dataset} data folder not found")
    if dataset == "iemocap":
        return IEMOCAPFold(data_root, split_name, modalities=data_config["modalities"], drop_no_video=drop_no_video)
    common = dict(seq_len=data_config["seq_len"], clip_stride=data_config["clip_stride"], windows="all")
    if dataset == "recola":
        return RECOLA(data_root, split_name, modalities=data_config["modalities"], **common)
    features = {m: os.path.join(data_root, "features", m) for m in data_config["modalities"]}
    if split_name == "test":
        return AffWild2VA(None, features, videos=os.path.join(data_root, "test_set.txt"), name="Aff-Wild2 test",
                          **common)
    return AffWild2VA(os.path.join(data_root, "annotations", split_name), features, name=f"Aff-Wild2 {split}",
                      **common)


def _check_inputs(model: nn.Module, dataset) -> None:
    if isinstance(model, AVRegressor):
        got = tuple(dataset.feature_dims[m] for m in dataset.modalities)
        if got != tuple(model.input_dims):
            raise PredictError(
                f"{dataset.name}: feature sizes {dict(zip(dataset.modalities, got))}, but the checkpoint's model takes "
                f"{tuple(model.input_dims)}"
            )


# -- prediction ---------------------------------------------------------------------------------------------------


def _batches(loader: DataLoader, progress: bool, desc: str):
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)


def predict_frames(model: nn.Module, dataset, *, device: torch.device, precision: str = "fp32", batch_size: int = 64,
                   num_workers: int = 0, progress: bool = False) -> Dict[str, List[np.ndarray]]:
    """Raw per-frame ``{"valence": [...], "arousal": [...]}``, one float64 array per video of the dataset."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    windows, outputs = [], {d: [] for d in DIMENSIONS}
    with torch.no_grad():
        for batch in _batches(loader, progress, f"predict {dataset.name}"):
            with autocast(precision, device):
                valence, arousal = model(*(batch[m].to(device) for m in dataset.modalities),
                                         lengths=batch["lengths"].to(device))
            windows.append(batch["window"])
            outputs["valence"].append(valence.float().cpu())
            outputs["arousal"].append(arousal.float().cpu())
    windows = torch.cat(windows).numpy()
    per_video = {d: dataset.frame_values(windows, torch.cat(outputs[d]).numpy()) for d in DIMENSIONS}
    for d in DIMENSIONS:
        for video, values in zip(dataset.videos, per_video[d]):
            if np.isnan(values).any():  # frame_values leaves NaN on frames no window covered
                raise PredictError(f"{dataset.name}: {int(np.isnan(values).sum())} frames of {video.name!r} got no "
                                   f"{d} prediction")
    return per_video


def predict_classes(model: nn.Module, dataset, *, device: torch.device, precision: str = "fp32",
                    batch_size: int = 64, num_workers: int = 0, progress: bool = False) -> np.ndarray:
    """``(N, C)`` float64 class probabilities, one row per utterance of the dataset."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probabilities = []
    with torch.no_grad():
        for batch in _batches(loader, progress, f"predict IEMOCAP {dataset.split}"):
            with autocast(precision, device):
                lengths = {m: batch[f"{m}_length"].to(device) for m in dataset.modalities if f"{m}_length" in batch}
                logits = model(*(batch[m].to(device) for m in dataset.modalities), lengths=lengths)
            probabilities.append(torch.softmax(logits.double().cpu(), dim=-1))
    return torch.cat(probabilities).numpy()


def postprocess(per_video: Mapping[str, List[np.ndarray]], smooth: bool) -> Dict[str, List[np.ndarray]]:
    """Clip to [-1, 1] (the formats' range), or the SPEC 5 smoothing, which clips first."""
    if smooth:
        return {d: smooth_predictions(list(values), SMOOTHING_WINDOWS[d]) for d, values in per_video.items()}
    return {d: [np.clip(v, -1.0, 1.0) for v in values] for d, values in per_video.items()}


# -- the command --------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA GPU is visible")
    return torch.device(name)


def predict(
    checkpoint: str,
    split: str,
    out_dir: str,
    *,
    data_root: Optional[str] = None,
    smooth: bool = False,
    precision: str = "fp32",
    batch_size: int = 64,
    device: str = "auto",
    backend: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = False,
    num_workers: int = 0,
    drop_no_video: bool = False,
) -> Dict[str, Any]:
    """Write the predictions of ``checkpoint`` on ``split`` into ``out_dir`` (module doc: formats and options).

    Returns:
        ``{"out_dir", "files", "dataset", "frames"}``: the written paths and, for valence-arousal data, the frame count
        of each video (``{}`` for IEMOCAP, ``"utterances"`` instead).
    """
    if precision not in PRECISIONS:
        raise PredictError(f"precision: expected one of {tuple(PRECISIONS)}, got {precision!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"batch_size: expected a positive int, got {batch_size!r}")
    inputs = dict(checkpoint=resolve_checkpoint(checkpoint), data_root=data_root)  # what out_dir must not destroy
    recover(out_dir)
    check_output_folder(out_dir, overwrite, **inputs)
    dev = _device(device)
    model, data_config = load_model(checkpoint, device=str(dev), backend=backend)
    check_backend(model, backend, dev, precision)
    try:
        dataset = build_dataset(data_config, split, data_root, drop_no_video=drop_no_video)
    except KeyError as key:
        raise PredictError(f"{inputs['checkpoint']}: its data_config has no {key} entry") from None
    options = dict(device=dev, precision=precision, batch_size=batch_size, num_workers=num_workers,
                   progress=progress)
    result: Dict[str, Any] = {"out_dir": os.path.abspath(out_dir), "dataset": data_config["dataset"], "frames": {}}
    if data_config["dataset"] == "iemocap":
        probabilities = predict_classes(model, dataset, **options)
        utterances = dataset._keep  # indices into the split's files, also when utterances without video were left out
        result["files"] = write_folder_atomically(
            out_dir, overwrite, lambda folder: write_iemocap_file(folder, utterances, probabilities), **inputs)
        result["utterances"] = len(utterances)
        return result
    _check_inputs(model, dataset)
    per_video = postprocess(predict_frames(model, dataset, **options), smooth)
    names = [video.name for video in dataset.videos]
    writer = write_recola_files if data_config["dataset"] == "recola" else write_va_files
    result["files"] = write_folder_atomically(out_dir, overwrite, lambda folder: writer(folder, names, per_video),
                                              **inputs)
    result["frames"] = {video.name: video.n_frames for video in dataset.videos}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="best.pt or last.pt written by examples/train_av.py or train_iemocap.py, "
                                           "or their run folder (best.pt, else last.pt)")
    parser.add_argument("--split", required=True,
                        help="affwild2: train | validation | test; recola: train | dev; iemocap: train | dev | test; "
                             "synthetic: train | val")
    parser.add_argument("--data-root", "--data", "--fold-dir", dest="data_root",
                        help="the dataset folder (IEMOCAP: the fold folder); not needed for the synthetic dataset")
    parser.add_argument("--out", "--out-dir", "--output", "-o", dest="out", required=True,
                        help="output folder (created; see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument("--smooth", action="store_true",
                        help="SPEC 5 post-processing: clip, then a per-video moving average of 20 (valence) and 50 "
                             "(arousal) frames")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype of the forward")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--backend", help=f"backend of the fused ops, one of {', '.join(registered())} (default: the "
                                          "fastest for the device)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--drop-no-video", action="store_true",
                        help="IEMOCAP: leave out utterances without video frames, as the paper's protocol does")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so that a temporary folder being written is removed


def run_from_args(args: argparse.Namespace) -> int:
    handler = signal.signal(signal.SIGTERM, _terminated)
    try:
        result = predict(
            args.checkpoint, args.split, args.out, data_root=args.data_root, smooth=args.smooth,
            precision=args.precision, batch_size=args.batch_size, device=args.device, backend=args.backend,
            overwrite=args.overwrite, progress=not args.no_progress, num_workers=args.num_workers,
            drop_no_video=args.drop_no_video,
        )
    except (ValueError, OSError) as exc:  # PredictError, CheckpointError, DataFormatError, a missing file ...
        print(f"avkernels predict: error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    what = f"{result['utterances']} utterances" if "utterances" in result else (
        f"{len(result['frames'])} videos, {sum(result['frames'].values())} frames")
    print(f"wrote {len(result['files'])} files ({what}) to {result['out_dir']}")
    return 0
