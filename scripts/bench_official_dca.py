"""Inference time and memory of the official DCA model: the authors' ``CAM`` against ``AVRegressor.from_official``.

Usage::

    python scripts/bench_official_dca.py DCA_DIR [--batch 64] [--rounds 7] [--threads 1]

``DCA_DIR`` holds ``models/orig_cam.py`` and its imports from praveena2j/Dynamic-CrossAttention (not part of this
repository). The script builds the official ``CAM`` (its own initialisation), loads its state dict into avkernels
with each backend, checks that the outputs agree, and times ``no_grad`` eval forwards on a batch of windows of
``(B, 16, 512)`` audio and ``(B, 16, 25088)`` visual features. Each configuration runs in a fresh process, so that
the peak resident memory it reports (``ru_maxrss``, minus the process's size before the first forward) is its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def official_cam(directory: str):
    sys.path.insert(0, os.path.abspath(directory))
    try:
        return importlib.import_module("models.orig_cam").CAM
    finally:
        sys.path.pop(0)


def measure(directory: str, which: str, batch: int, rounds: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cam = official_cam(directory)().cpu().eval()
    audio = torch.randn(batch, 16, 512)
    video = torch.relu(torch.randn(batch, 16, 25088))
    if which == "official":
        model, args = cam, (audio, video)
    else:
        sys.path.insert(0, ROOT)
        from avkernels.models import AVRegressor

        model, args = AVRegressor.from_official({"net": cam.state_dict()}, "dca", backend=which), (video, audio)
    # ru_maxrss is a high-water mark: the base is taken before any forward, and the outputs are compared after.
    base = rss_mib()
    times = []
    with torch.no_grad():
        model(*args)  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - start)
    result = {"which": which, "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
              "peak_extra_mib": rss_mib() - base}
    if which != "official":
        with torch.no_grad():
            result["max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(cam(audio, video), model(*args)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dca_dir")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.dca_dir, args.only, args.batch, args.rounds, args.threads)))
        return
    print(f"official DCA CAM, batch {args.batch} x 16 windows, {args.threads} thread(s), torch {torch.__version__}")
    for which in ("official", "reference", "cpp"):
        out = subprocess.run(
            [sys.executable, __file__, args.dca_dir, "--batch", str(args.batch), "--rounds", str(args.rounds),
             "--threads", str(args.threads), "--only", which],
            capture_output=True, text=True,
        )
        if out.returncode:
            print(f"{which}: failed\n{out.stderr[-2000:]}")
            continue
        print(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
