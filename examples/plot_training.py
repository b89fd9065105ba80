"""Draw the training curves of a run's ``log.jsonl`` into a PNG (matplotlib, Agg backend: no display needed).

    python examples/plot_training.py runs/dca/log.jsonl                 # writes runs/dca/curves.png
    python examples/plot_training.py runs/*/log.jsonl -o compare.png     # several runs on the same axes

Left: the training loss per logged step. Middle: every validation metric per epoch (CCCs for the regressors,
accuracies for the IEMOCAP classifiers). Right, when the log has them (the synthetic dataset): the validation CCC
by condition of the frames (``ccc_mean/<condition>``).

:func:`plot_gates` draws gate weights over one video with its corrupted segments shaded (``train_synthetic.py``
writes ``gates.png`` with it).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

import prelude

SKIPPED_KEYS = {"event", "epoch", "step", "lr", "time"}
CONDITION_PREFIX = "ccc_mean/"
MODALITY_COLOURS = {"video": "tab:blue", "audio": "tab:orange"}


def read_log(path: str) -> List[Dict]:
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_log(paths, png_path: str, labels: Optional[Sequence[str]] = None) -> str:
    """Plot one or several ``log.jsonl`` files into ``png_path``; returns ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [paths] if isinstance(paths, str) else list(paths)
    labels = list(labels) if labels is not None else [os.path.basename(os.path.dirname(p)) or p for p in paths]
    logs = [read_log(path) for path in paths]
    has_conditions = any(k.startswith(CONDITION_PREFIX) for records in logs for r in records for k in r)
    fig, axes = plt.subplots(1, 3 if has_conditions else 2, figsize=(16 if has_conditions else 11, 4))
    ax_loss, ax_val = axes[0], axes[1]
    for records, label in zip(logs, labels):
        train = [r for r in records if r.get("event") == "train"]
        val = [r for r in records if r.get("event") == "val"]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        metrics = sorted({k for r in val for k, v in r.items() if k not in SKIPPED_KEYS and isinstance(v, float)})
        for key in metrics:
            ax = axes[2] if key.startswith(CONDITION_PREFIX) else ax_val
            shown = key[len(CONDITION_PREFIX):] if key.startswith(CONDITION_PREFIX) else key
            ax.plot([r["epoch"] + 1 for r in val], [r.get(key, float("nan")) for r in val], marker="o",
                    markersize=3, label=f"{label} {shown}" if len(paths) > 1 else shown)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_val.set(xlabel="epoch", ylabel="value", title="validation")
    if has_conditions:
        axes[2].set(xlabel="epoch", ylabel="mean CCC", title="validation CCC by condition of the frames")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _segments(mask) -> List[tuple]:
    """``[(start, stop)]`` of the runs of True in a 1-D boolean sequence."""
    runs, start = [], None
    for i, on in enumerate(list(mask) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def plot_gates(traces: Dict[str, Dict[str, Sequence[float]]], corrupted, corruption_kind, png_path: str,
               title: str = "") -> str:
    """Gate weights on the unattended features over the frames of one video, one panel per gate.

    Args:
        traces: ``{gate name: {modality: (n_frames,) weights}}`` (``"video"``, ``"audio"``).
        corrupted, corruption_kind: the video's per-frame codes (``avkernels.data.synthetic``: 0 none, 1 video,
            2 audio; 0 none, 1 noise, 2 misleading): corrupted segments are shaded in the corrupted modality's
            colour, misleading ones hatched.
        png_path: where to write the PNG; returned.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from avkernels.data.synthetic import AUDIO_CORRUPTED, MISLEADING, VIDEO_CORRUPTED

    codes = {"video": VIDEO_CORRUPTED, "audio": AUDIO_CORRUPTED}
    legend = []
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 1.7 * len(traces) + 0.8), sharex=True, squeeze=False)
    for ax, (name, per_modality) in zip(axes[:, 0], traces.items()):
        for modality, code in codes.items():
            for kind_is_misleading in (False, True):
                mask = [c == code and (k == MISLEADING) == kind_is_misleading
                        for c, k in zip(corrupted, corruption_kind)]
                hatch = "///" if kind_is_misleading else None
                for start, stop in _segments(mask):
                    ax.axvspan(start - 0.5, stop - 0.5, color=MODALITY_COLOURS[modality], alpha=0.18, lw=0,
                               hatch=hatch)
                label = f"{modality} corrupted ({'misleading' if kind_is_misleading else 'noise'})"
                if any(mask) and label not in [p.get_label() for p in legend]:
                    legend.append(Patch(facecolor=MODALITY_COLOURS[modality], alpha=0.3, hatch=hatch, label=label))
        for modality, weights in per_modality.items():
            ax.plot(range(len(weights)), weights, color=MODALITY_COLOURS.get(modality), lw=1.2, label=modality)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("weight on\nunattended", fontsize=8)
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    legend += [plt.Line2D([], [], color=MODALITY_COLOURS[m], label=f"{m} gate") for m in codes]
    axes[0, 0].legend(handles=legend, fontsize=7, ncol=3, loc="upper right", bbox_to_anchor=(1.0, 1.6))
    axes[-1, 0].set_xlabel("frame")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl file(s)")
    p.add_argument("-o", "--output", help="PNG path (default: curves.png next to the first log)")
    args = p.parse_args(argv)
    prelude.require("matplotlib", "plotting")
    out = args.output or os.path.join(os.path.dirname(args.logs[0]) or ".", "curves.png")
    print(plot_log(args.logs, out))


if __name__ == "__main__":
    main()
