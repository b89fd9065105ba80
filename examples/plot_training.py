"""Draw the training curves of a run's ``log.jsonl`` into a PNG (matplotlib, Agg backend: no display needed).

    python examples/plot_training.py runs/dca/log.jsonl                 # writes runs/dca/curves.png
    python examples/plot_training.py runs/*/log.jsonl -o compare.png     # several runs on the same axes

Left: the training loss per logged step. Right: every validation metric per epoch (CCCs for the regressors,
accuracies for the IEMOCAP classifiers).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

SKIPPED_KEYS = {"event", "epoch", "step", "lr", "time"}


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
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for path, label in zip(paths, labels):
        records = read_log(path)
        train = [r for r in records if r.get("event") == "train"]
        val = [r for r in records if r.get("event") == "val"]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        metrics = sorted({k for r in val for k, v in r.items() if k not in SKIPPED_KEYS and isinstance(v, float)})
        for key in metrics:
            ax_val.plot([r["epoch"] + 1 for r in val], [r.get(key, float("nan")) for r in val], marker="o",
                        markersize=3, label=f"{label} {key}" if len(paths) > 1 else key)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_val.set(xlabel="epoch", ylabel="value", title="validation")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl file(s)")
    p.add_argument("-o", "--output", help="PNG path (default: curves.png next to the first log)")
    args = p.parse_args(argv)
    out = args.output or os.path.join(os.path.dirname(args.logs[0]) or ".", "curves.png")
    print(plot_log(args.logs, out))


if __name__ == "__main__":
    main()
