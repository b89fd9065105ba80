"""The main job (``make demo``): train JCA, RJCA, DCA and GRJCA on the synthetic dataset on CPU and compare them.

Prints the validation CCC (valence, arousal; raw and smoothed) of each model, then where the gates of DCA and GRJCA
chose the unattended features: the mean gate weight on the unattended branch over validation frames that are clean,
where the gated modality itself is corrupted, and where the other modality is corrupted (the synthetic dataset
records, per frame, which modality was made uninformative or misleading).

    python examples/train_synthetic.py                     # about a few minutes on 2 CPU cores
    python examples/train_synthetic.py --epochs 20 --out-dir runs/demo
    python examples/train_synthetic.py --precision bf16    # under CPU autocast (fast only with bf16 matrix units)

Each model's run folder (``runs/demo/<model>``) holds ``log.jsonl``, ``curves.png``, ``last.pt`` and ``best.pt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_av  # noqa: E402  (puts the repository on sys.path)

from avkernels.data.synthetic import AUDIO_CORRUPTED, VIDEO_CORRUPTED  # noqa: E402

MODELS = ("jca", "rjca", "dca", "grjca")
CORRUPTION_CODE = {"video": VIDEO_CORRUPTED, "audio": AUDIO_CORRUPTED}

# Small enough for a few CPU minutes in all, large enough that the fusion matters.
DEMO_FLAGS = [
    "--dataset", "synthetic", "--synthetic-train-videos", "48", "--synthetic-val-videos", "16",
    "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "10",
    "--encoder-layers", "1", "--joint-dim", "64", "--joint-layers", "1", "--head-hidden", "32",
    "--fusion-dropout", "0.1", "--head-dropout", "0.1", "--no-progress", "--log-every", "4", "--plot",
]


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
        _, gates = model(*(batch[m] for m in modalities), return_gates=True)
        named = []
        if "final" in gates:
            named += [("final gate", gates["final"])]
        for t, per_modality in enumerate(gates.get("iterations", ())):
            named += [(f"iteration {t + 1} gate", per_modality)]
        if "stage" in gates:
            # The stage gate's first candidate is the least attended stage (iteration 1, or the inputs).
            named += [("stage gate, first stage", gates["stage"])]
        real = batch["frames"] >= 0
        for name, per_modality in named:
            for m, g in zip(modalities, per_modality):
                unattended = g[..., 0]
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
            for group in ("clean", "self", "other"):
                total, count = sums[(name, m, group)].tolist()
                row[group] = total / count if count else float("nan")
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out-dir", default=os.path.join("runs", "demo"))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seed", type=int, default=0)
    train_av.add_precision_argument(p)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; these models are so small that one thread is fastest (more threads "
                        "spend their time synchronising, and collapse when the cores are shared)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    started = time.time()
    results = {}
    for name in args.models:
        flags = DEMO_FLAGS + ["--fusion", name, "--epochs", str(args.epochs), "--seed", str(args.seed),
                              "--out-dir", os.path.join(args.out_dir, name), "--device", "cpu",
                              "--precision", args.precision]
        print(f"\n=== {name.upper()} ===", flush=True)
        result = train_av.run(train_av.build_parser().parse_args(flags))
        model = result["trainer"].model
        best = torch.load(os.path.join(args.out_dir, name, "best.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(best["model"])
        results[name] = {
            "best": result["best"],
            "seconds": result["seconds"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "gates": gate_statistics(model, result["val_set"]) if name in ("dca", "grjca") else [],
        }
    total = time.time() - started

    print(f"\nValidation CCC on the synthetic dataset (best epoch of {args.epochs}; {args.threads} CPU thread(s))")
    print(f"{'model':<7}{'params':>8}{'valence':>9}{'arousal':>9}{'mean':>8}   {'smoothed V':>10}{'smoothed A':>11}"
          f"{'epoch':>7}{'train s':>9}")
    for name, r in results.items():
        b = r["best"]
        print(f"{name.upper():<7}{r['parameters']:>8}{b['ccc_valence']:>9.4f}{b['ccc_arousal']:>9.4f}"
              f"{b['ccc_mean']:>8.4f}   {b['ccc_valence_smoothed']:>10.4f}{b['ccc_arousal_smoothed']:>11.4f}"
              f"{b['epoch'] + 1:>7}{r['seconds']:>9.1f}")
    gate_rows = [(name, row) for name, r in results.items() for row in r["gates"]]
    if gate_rows:
        print("\nMean gate weight on the UNATTENDED features over validation frames (1 = unattended only):")
        print(f"{'model':<7}{'gate':<25}{'modality':<10}{'clean':>8}{'this modality corrupted':>25}"
              f"{'other corrupted':>17}")
        for name, row in gate_rows:
            print(f"{name.upper():<7}{row['gate']:<25}{row['modality']:<10}{row['clean']:>8.3f}{row['self']:>25.3f}"
                  f"{row['other']:>17.3f}")
        print("(stage gate rows: the weight of the first, least attended stage)")
    print(f"\nTotal wall time: {total:.1f} s. Curves: {os.path.join(args.out_dir, '<model>', 'curves.png')}")


if __name__ == "__main__":
    main()
