"""The main job (``make demo``): train JCA, RJCA, DCA and GRJCA on the synthetic dataset on CPU and compare them.

The data are the ``gating`` preset of the synthetic dataset (``avkernels.data.synthetic.PRESETS``): the regime of
docs/gating-experiment.md where a gate beats plain recursive cross-attention (every corruption misleading, half the
segments corrupted, a faint telltale on corrupted frames, 4-frame segments inside the 16-frame windows);
``--preset default`` trains on the class defaults, where no gate helps. Every model is trained once per seed (the
seed draws both the synthetic data and the initialisation), and every number is reported as the mean over seeds
with a 95 % Student-t confidence interval. It prints:

1. the validation CCC (valence, arousal, their mean; raw and smoothed) of each model;
2. the mean CCC by condition of the validation frames: clean, video corrupted and audio corrupted, each split by
   the kind of corruption (noise: uninformative; misleading: driven by another emotion). The synthetic dataset
   records the condition of every frame;
3. the paired difference (same seed, same data) of each gated model (DCA, GRJCA) against plain recursive joint
   cross-attention (RJCA), by condition: where the papers' claim would show;
4. where the gates of DCA and GRJCA put their weight: the mean gate weight on the unattended branch over validation
   frames that are clean, where the gated modality itself is corrupted, and where the other modality is.

It writes ``gates.png`` beside the runs: the gate weights on the unattended features over time for one validation
video of the first seed, corrupted segments shaded, for DCA and each GRJCA gate.

    python examples/train_synthetic.py                          # 4 models x 3 seeds, about 2-3 CPU minutes
    python examples/train_synthetic.py --preset default         # the class defaults: no gate helps there
    python examples/train_synthetic.py --seeds 5 --models rjca dca --synthetic-set corruption_offset=1
    python examples/train_synthetic.py --precision bf16         # under CPU autocast (fast only with bf16 matrix units)

Each run folder (``runs/demo/seed<k>/<model>``) holds ``log.jsonl``, ``curves.png``, ``last.pt`` and ``best.pt``;
``--results`` also writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prelude  # noqa: E402  (first: the installed avkernels, else the checkout's)
import train_av  # noqa: E402

from avkernels.data.synthetic import (  # noqa: E402
    AUDIO_CORRUPTED, CONDITIONS, PRESETS, VIDEO_CORRUPTED,
)
from avkernels.checkpoint import load as load_checkpoint  # noqa: E402
from avkernels.metrics import mean_interval  # noqa: E402

MODELS = ("jca", "rjca", "dca", "grjca")
GATED = ("dca", "grjca")
BASELINE = "rjca"
CORRUPTION_CODE = {"video": VIDEO_CORRUPTED, "audio": AUDIO_CORRUPTED}
GATE_GROUPS = ("clean", "self", "other")

# Small enough for a few CPU minutes in all, large enough that the fusion matters.
DEMO_FLAGS = [
    "--dataset", "synthetic", "--synthetic-train-videos", "48", "--synthetic-val-videos", "16",
    "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "10",
    "--encoder-layers", "1", "--joint-dim", "64", "--joint-layers", "1", "--head-hidden", "32",
    "--fusion-dropout", "0.1", "--head-dropout", "0.1", "--no-progress", "--log-every", "4",
]


def named_gates(gates: Dict[str, object]) -> List[Tuple[str, Sequence[torch.Tensor]]]:
    """``[(name, per-modality (B, L) weights on the unattended features)]`` of a fusion's gate dict.

    The stage gate's row is the weight of its first candidate, the least attended stage (iteration 1, or the inputs).
    """
    named = []
    if "final" in gates:
        named.append(("final gate", [g[..., 0] for g in gates["final"]]))
    for t, per_modality in enumerate(gates.get("iterations", ())):
        named.append((f"iteration {t + 1} gate", [g[..., 0] for g in per_modality]))
    if "stage" in gates:
        named.append(("stage gate, first stage", [s[..., 0] for s in gates["stage"]]))
    return named


@torch.no_grad()
def gate_statistics(model, dataset, batch_size: int = 64) -> List[Dict[str, object]]:
    """Mean gate weight on the unattended features, by corruption of the validation frames.

    Returns one row per gate and modality: ``{"gate", "modality", "clean", "self", "other"}`` where ``clean`` is the
    mean over frames with no corruption, ``self`` over frames where this modality is corrupted, ``other`` where the
    other modality is (``nan`` when there is no such frame).
    """
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    modalities = dataset.modalities
    sums: Dict[tuple, torch.Tensor] = {}
    for batch in loader:
        _, gates = model(*(batch[m] for m in modalities), lengths=batch["lengths"], return_gates=True)
        real = batch["frames"] >= 0
        for name, per_modality in named_gates(gates):
            for m, unattended in zip(modalities, per_modality):
                other = [c for k, c in CORRUPTION_CODE.items() if k != m]
                groups = {
                    "clean": batch["corrupted"] == 0,
                    "self": batch["corrupted"] == CORRUPTION_CODE[m],
                    "other": torch.isin(batch["corrupted"], torch.tensor(other)),
                }
                for group, mask in groups.items():
                    mask = mask & real
                    acc = sums.setdefault((name, m, group), torch.zeros(2, dtype=torch.float64))
                    acc += torch.stack([unattended[mask].double().sum(), mask.sum().double()])
    rows = []
    for name in dict.fromkeys(k[0] for k in sums):
        for m in modalities:
            row = {"gate": name, "modality": m}
            for group in GATE_GROUPS:
                total, count = sums[(name, m, group)].tolist()
                row[group] = total / count if count else float("nan")
            rows.append(row)
    return rows


@torch.no_grad()
def gate_traces(model, dataset, video: int) -> Dict[str, Dict[str, np.ndarray]]:
    """``{gate name: {modality: (n_frames,) weight on the unattended features}}`` over one validation video.

    ``dataset`` must tile its videos (``windows="all"``, as validation sets do): every frame gets one value.
    """
    model.eval()
    items = [i for i in range(len(dataset)) if int(dataset[i]["video_index"]) == video]
    batch = torch.utils.data.default_collate([dataset[i] for i in items])
    _, gates = model(*(batch[m] for m in dataset.modalities), lengths=batch["lengths"], return_gates=True)
    traces = {}
    for name, per_modality in named_gates(gates):
        traces[name] = {}
        for m, weights in zip(dataset.modalities, per_modality):
            per_video = dataset.frame_values(np.asarray(items), weights.numpy())
            traces[name][m] = per_video[video]
    return traces


def plot_video(dataset) -> int:
    """The validation video shown in ``gates.png``: the first with both a corrupted video and a corrupted audio
    segment (the first video when none has both)."""
    for v, video in enumerate(dataset.videos):
        if {VIDEO_CORRUPTED, AUDIO_CORRUPTED} <= set(np.unique(video.extras["corrupted"]).tolist()):
            return v
    return 0


def train_one(args, name: str, seed: int, run_dir: str) -> Dict[str, object]:
    flags = DEMO_FLAGS + ["--fusion", name, "--epochs", str(args.epochs), "--seed", str(seed),
                          "--synthetic-seed", str(seed), "--synthetic-preset", args.preset,
                          "--synthetic-set", *args.synthetic_set,
                          "--out-dir", run_dir, "--device", "cpu", "--precision", args.precision]
    flags += [] if args.no_plots else ["--plot"]
    result = train_av.run(train_av.build_parser().parse_args(flags))
    model = result["trainer"].model
    best = load_checkpoint(os.path.join(run_dir, "best.pt"))
    model.load_state_dict(best["model"])
    return {
        "best": result["best"],
        "seconds": result["seconds"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "gates": gate_statistics(model, result["val_set"]) if name in GATED else [],
        "model": model,
        "val_set": result["val_set"],
    }


def _cell(values: Sequence[float], width: int, signed: bool = False) -> str:
    """``mean±half-width`` of the 95 % interval over seeds, right-aligned in ``width``."""
    mean, half = mean_interval(values)
    if math.isnan(mean):
        return f"{'-':>{width}}"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    if not math.isnan(half):
        text += f"±{half:.3f}"
    return f"{text:>{width}}"


def report(runs: Dict[str, List[Dict[str, object]]], args) -> Dict[str, object]:
    """Print the tables over seeds; returns every per-seed number (what ``--results`` writes)."""
    n = len(args.seeds_used)
    print(f"\nValidation CCC on the synthetic dataset, preset {args.preset!r}"
          f"{' with ' + ' '.join(args.synthetic_set) if args.synthetic_set else ''} (best epoch of {args.epochs}; "
          f"mean ± 95 % CI over {n} seed(s): {args.seeds_used})")
    print(f"{'model':<7}{'params':>8}{'valence':>15}{'arousal':>15}{'mean':>15}{'smoothed mean':>15}{'train s':>9}")
    for name, per_seed in runs.items():
        best = [r["best"] for r in per_seed]
        print(f"{name.upper():<7}{per_seed[0]['parameters']:>8}"
              + "".join(_cell([b[k] for b in best], 15)
                        for k in ("ccc_valence", "ccc_arousal", "ccc_mean", "ccc_mean_smoothed"))
              + f"{np.mean([r['seconds'] for r in per_seed]):>9.1f}")

    conditions = [c for c in CONDITIONS if f"ccc_mean/{c}" in next(iter(runs.values()))[0]["best"]]
    by_condition = {name: {c: [r["best"][f"ccc_mean/{c}"] for r in per_seed] for c in conditions}
                    for name, per_seed in runs.items()}
    width = 19
    print("\nMean CCC (valence, arousal) by condition of the validation frames:")
    print(f"{'model':<7}" + "".join(f"{c:>{width}}" for c in conditions))
    for name, cells in by_condition.items():
        print(f"{name.upper():<7}" + "".join(_cell(cells[c], width) for c in conditions))

    differences = {}
    if BASELINE in runs:
        for name in (g for g in GATED if g in runs):
            differences[name] = {c: [a - b for a, b in zip(by_condition[name][c], by_condition[BASELINE][c])]
                                 for c in conditions}
            differences[name]["all frames"] = [a["best"]["ccc_mean"] - b["best"]["ccc_mean"]
                                               for a, b in zip(runs[name], runs[BASELINE])]
    if differences:
        print(f"\nGated minus {BASELINE.upper()}, paired by seed (> 0: the gate helps; an interval that holds 0: no "
              "difference shown):")
        print(f"{'model':<7}{'all frames':>{width}}" + "".join(f"{c:>{width}}" for c in conditions))
        for name, cells in differences.items():
            print(f"{name.upper():<7}{_cell(cells['all frames'], width, True)}"
                  + "".join(_cell(cells[c], width, True) for c in conditions))

    gate_rows = {}
    for name, per_seed in runs.items():
        for k, row in enumerate(per_seed[0]["gates"]):
            gate_rows[(name, row["gate"], row["modality"])] = [r["gates"][k] for r in per_seed]
    if gate_rows:
        print("\nMean gate weight on the UNATTENDED features over validation frames (1 = unattended only) on clean "
              "frames,\nand its change, paired by seed, where this modality or the other one is corrupted (the papers' "
              "mechanism:\n> 0 where the other modality is corrupted):")
        print(f"{'model':<7}{'gate':<25}{'modality':<10}{'clean':>15}{'this corrupted':>16}{'other corrupted':>16}")
        for (name, gate, modality), rows in gate_rows.items():
            changes = [_cell([r[g] - r["clean"] for r in rows], 16, True) for g in ("self", "other")]
            print(f"{name.upper():<7}{gate:<25}{modality:<10}{_cell([r['clean'] for r in rows], 15)}{''.join(changes)}")
        print("(stage gate rows: the weight of the first, least attended stage)")
    return {
        "preset": args.preset, "synthetic_set": args.synthetic_set, "epochs": args.epochs, "seeds": args.seeds_used,
        "runs": {name: [{k: r[k] for k in ("best", "seconds", "parameters", "gates")} for r in per_seed]
                 for name, per_seed in runs.items()},
        "by_condition": by_condition, "differences": differences,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out-dir", default=os.path.join("runs", "demo"))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds --seed, --seed + 1, ...; each draws its own synthetic data and initialisation")
    p.add_argument("--preset", choices=tuple(PRESETS), default="gating",
                   help="synthetic regime (avkernels.data.synthetic.PRESETS; 'gating': docs/gating-experiment.md)")
    p.add_argument("--synthetic-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override fields of the preset (SyntheticAVConfig), e.g. corrupt_share=0.5")
    p.add_argument("--results", help="also write every number (per seed) to this JSON file")
    p.add_argument("--no-plots", "--no-gate-plot", dest="no_plots", action="store_true",
                   help="write no PNG (neither gates.png nor the runs' curves.png): then matplotlib is not needed")
    train_av.add_precision_argument(p)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; these models are so small that one thread is fastest (more threads "
                        "spend their time synchronising, and collapse when the cores are shared)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected a positive count, got {args.seeds}")
    if not args.no_plots:
        prelude.require("matplotlib", "drawing gates.png and curves.png (--no-plots skips them)")
    args.seeds_used = list(range(args.seed, args.seed + args.seeds))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    started = time.time()
    runs: Dict[str, List[Dict[str, object]]] = {name: [] for name in args.models}
    for seed in args.seeds_used:
        for name in args.models:
            print(f"\n=== {name.upper()}, seed {seed} ===", flush=True)
            runs[name].append(train_one(args, name, seed, os.path.join(args.out_dir, f"seed{seed}", name)))
    results = report(runs, args)

    gated = [name for name in GATED if name in runs]
    if gated and not args.no_plots:
        from plot_training import plot_gates

        val_set = runs[gated[0]][0]["val_set"]
        video = plot_video(val_set)
        traces = {f"{name.upper()} {gate}": per_modality for name in gated
                  for gate, per_modality in gate_traces(runs[name][0]["model"], val_set, video).items()}
        extras = val_set.videos[video].extras
        title = f"{val_set.videos[video].name} (seed {args.seeds_used[0]}, preset {args.preset!r})"
        png = plot_gates(traces, extras["corrupted"], extras["corruption_kind"],
                         os.path.join(args.out_dir, "gates.png"), title=title)
        print(f"\nGate weights over time: {png}")
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    curves = "" if args.no_plots else f" Curves: {os.path.join(args.out_dir, 'seed<k>', '<model>', 'curves.png')}"
    print(f"\nTotal wall time: {time.time() - started:.1f} s.{curves}")


if __name__ == "__main__":
    main()
