"""What ``lengths=`` changes in the demo's models: validation CCC on frames in partly padded windows, before and after.

    python benchmarks/lengths_ccc.py [--frames 250] [--seeds 2] [--epochs 8] [--models jca rjca dca grjca]

Trains each model of ``make demo`` (``examples/train_synthetic.py``'s flags, ``gating`` preset) twice per seed on
the same data and initialisation: ``before`` with ``--no-lengths`` (the padding clips of a video's last window fed
to the model as if real, as before ``lengths=`` existed) and ``after`` with the windows' lengths, in training and
evaluation. The demo's videos (256 frames) fill their 16-clip windows exactly, so this run uses ``--frames`` that
leave the last window of every video partly padded. Reports the mean of the valence and arousal CCCs of the last
epoch's model over all validation frames and over the frames of partly padded windows, and writes
``benchmarks/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import train_av  # noqa: E402  (puts the repository on sys.path)
import train_synthetic  # noqa: E402

from avkernels.metrics import ccc  # noqa: E402


@torch.no_grad()
def frame_predictions(model, dataset, use_lengths: bool):
    """Per-video predictions of valence and arousal, and per-video flags of frames in partly padded windows."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False)
    windows, values, padded = [], {"valence": [], "arousal": []}, []
    for batch in loader:
        lengths = batch["lengths"] if use_lengths else None
        valence, arousal = model(*(batch[m] for m in dataset.modalities), lengths=lengths)
        windows.append(batch["window"])
        values["valence"].append(valence)
        values["arousal"].append(arousal)
        padded.append((batch["lengths"] < dataset.seq_len).unsqueeze(1).expand(-1, dataset.seq_len).double())
    windows = torch.cat(windows).numpy()
    per_video = {d: dataset.frame_values(windows, torch.cat(v).numpy()) for d, v in values.items()}
    in_padded = dataset.frame_values(windows, torch.cat(padded).numpy())
    return per_video, np.concatenate(in_padded) > 0


def scores(model, dataset, use_lengths: bool):
    per_video, in_padded = frame_predictions(model, dataset, use_lengths)
    labels = np.concatenate(dataset.frame_labels())
    out = {}
    for group, frames in (("all", np.ones_like(in_padded)), ("padded windows", in_padded)):
        cccs = []
        for k, dim in enumerate(("valence", "arousal")):
            target = labels[:, k]
            keep = frames & (target != -5)
            cccs.append(ccc(np.concatenate(per_video[dim])[keep], target[keep]))
        out[group] = sum(cccs) / 2
    out["n_padded_frames"] = int((in_padded & (labels[:, 0] != -5)).sum())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=250)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--models", nargs="+", default=list(train_synthetic.MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="runs/lengths-ccc")
    p.add_argument("--name", default="lengths-ccc")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.time(), os.getloadavg()[0]
    rows = {}
    for model_name in args.models:
        for variant in ("before", "after"):
            for seed in range(args.seeds):
                flags = train_synthetic.DEMO_FLAGS + [
                    "--synthetic-preset", "gating", "--synthetic-frames", str(args.frames), "--fusion", model_name,
                    "--epochs", str(args.epochs), "--seed", str(seed), "--synthetic-seed", str(seed), "--device", "cpu",
                    "--out-dir", os.path.join(args.out_dir, variant, f"seed{seed}", model_name),
                ] + (["--no-lengths"] if variant == "before" else [])
                flags.remove("--plot")
                result = train_av.run(train_av.build_parser().parse_args(flags))
                model = result["trainer"].model
                rows.setdefault((model_name, variant), []).append(scores(model, result["val_set"], variant == "after"))
                print(model_name, variant, seed, rows[(model_name, variant)][-1], flush=True)
    lines = [
        "# Validation CCC with and without `lengths=` (benchmarks/lengths_ccc.py)",
        "",
        f"`make demo`'s models and flags (`gating` preset, {args.epochs} epochs), videos of {args.frames} frames (the "
        f"last 16-clip window of each is partly padding), seeds {list(range(args.seeds))}; mean of the valence and "
        "arousal CCCs of the last epoch's model, averaged over seeds; `before`: trained and evaluated with "
        "`--no-lengths`, `after`: with the windows' lengths. "
        f"{time.time() - started:.0f} s, load average {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end, {args.threads} thread(s).",
        "",
        "| model | all frames, before | all frames, after | padded-window frames, before | padded-window frames, "
        "after | labelled frames in padded windows (seed 0) |",
        "|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        b, a = rows[(model_name, "before")], rows[(model_name, "after")]

        def mean(rs, key):
            return statistics.mean(r[key] for r in rs)

        lines.append(f"| {model_name} | {mean(b, 'all'):.4f} | {mean(a, 'all'):.4f} | {mean(b, 'padded windows'):.4f} "
                     f"| {mean(a, 'padded windows'):.4f} | {b[0]['n_padded_frames']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(HERE, "results", f"{args.name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
