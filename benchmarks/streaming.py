"""The streaming case: a trained :class:`~avkernels.models.AVRegressor` predicting one video, four ways of shipping it.

    python benchmarks/streaming.py [--fusion grjca] [--precisions fp32,bf16]
                                   [--providers eager,compile,onnxruntime,aoti] [--minutes 10] [--batch 64]
                                   [--latency-calls 20] [--rounds 5] [--threads 2] [--name streaming-cpu]

Two workloads, both in eval mode with the library's default backends (the fused ``cpp`` kernels on CPU):

* **latency**: one window (``L = 16`` clips, batch 1), what a live system pays per new window; the median of
  ``--latency-calls`` calls.
* **throughput**: a ``--minutes``-long video at 30 frames per second. Every frame is the end of exactly one clip of one
  window (SPEC 6), so ``minutes * 60 * 30 / L`` windows, run in batches of ``--batch`` (the last one partial). Reported
  as the time for the whole video and its real-time factor (video seconds per wall second).

Providers, each in fp32 and under bf16 autocast where it can run:

* ``eager``: the model called from Python (bf16: ``torch.autocast("cpu", torch.bfloat16)``, as training does).
* ``compile``: ``torch.compile(model)`` of the same model (a compile per input shape, done before timing).
* ``onnxruntime``: the file written by :func:`avkernels.export.export_onnx` (dynamic batch) in an ONNX Runtime CPU
  session with ``--threads`` intra-op threads. The fused ops are written as standard ONNX operators.
* ``aoti``: ``torch.export`` (dynamic batch) + AOTInductor, loaded with ``aoti_load_package``; the package calls the
  fused C++ ops through the dispatcher.

A provider that cannot run a precision is reported with the error it gave, not left out silently. Every provider's
output is compared with eager fp32 on the same window (max |diff| in the table), so that the numbers belong to the
same model. Rounds are interleaved (each round times every provider once, the order rotated by one per round) and
the tables give medians with the interquartile range: see ``compare.py`` for why.

Writes ``benchmarks/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import avkernels  # noqa: E402
import compare  # noqa: E402
import harness  # noqa: E402
from avkernels.models import AVRegressor  # noqa: E402

FPS = 30  # Aff-Wild2's frame rate; RECOLA's 25 Hz labels would give fewer windows per minute
PROVIDERS = ("eager", "compile", "onnxruntime", "aoti")
PRECISIONS = ("fp32", "bf16")


def autocast(precision: str):
    return harness.autocast(torch.device("cpu"), precision)


class Provider:
    """One way of running the model at one precision: ``run(video, audio) -> (valence, arousal)`` and its timings."""

    def __init__(self, kind: str, precision: str):
        self.kind, self.precision = kind, precision
        self.name = f"{kind}-{precision}"
        self.run: Optional[Callable] = None
        self.error: Optional[str] = None
        self.build_s: Optional[float] = None
        self.max_abs_diff: Optional[float] = None
        self.latency: List[float] = []  # per round: median seconds of one batch-1 window
        self.video: List[float] = []  # per round: seconds for the whole video


def build(provider: Provider, model: torch.nn.Module, example, workdir: str, threads: int) -> None:
    """Make ``provider.run``: export/compile as that provider needs, timing the build."""
    start = time.perf_counter()
    kind, precision = provider.kind, provider.precision
    if kind == "eager":

        def run(*xs):
            with torch.inference_mode(), autocast(precision):
                return model(*xs)

    elif kind == "compile":
        compiled = torch.compile(model)

        def run(*xs):
            with torch.inference_mode(), autocast(precision):
                return compiled(*xs)

    elif kind == "onnxruntime":
        import onnxruntime

        from avkernels.export import export_onnx

        path = os.path.join(workdir, f"model-{precision}.onnx")
        with autocast(precision):
            export_onnx(model, example, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(*xs):
            outs = session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
            return tuple(torch.from_numpy(o) for o in outs)

    elif kind == "aoti":
        from avkernels.export import export_program

        # torch.export reads the LSTMs' flat weight list, which nn.LSTM keeps as a plain attribute: harmless here.
        warnings.filterwarnings("ignore", message="The tensor attributes .*_flat_weights")
        with autocast(precision):
            program = export_program(model, example)
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(workdir, f"model-{precision}.pt2")
        )
        loaded = torch._inductor.aoti_load_package(package)

        def run(*xs):
            with torch.inference_mode():
                return loaded(*xs)

    else:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {kind!r}")
    provider.run = run
    run(*example)  # compile and warm up every shape the timings use before the clock starts
    provider.build_s = time.perf_counter() - start


def failure_reason(exc: BaseException) -> str:
    """The exception's first line and, when it wraps another, the first line of the innermost one (an exporter's
    own message is generic; what failed is in its cause), without the terminal colours some exporters print."""

    def first_line(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"

    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return first_line(exc) if root is exc else f"{first_line(exc)} (cause: {first_line(root)})"


def video_batches(windows: int, batch: int, dims: Sequence[int], seq_len: int, seed: int) -> List[tuple]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, windows, batch):
        b = min(batch, windows - start)
        batches.append(tuple(torch.randn(b, seq_len, d, generator=generator) for d in dims))
    return batches


def time_round(provider: Provider, window: tuple, batches: List[tuple], latency_calls: int) -> None:
    calls = []
    for _ in range(latency_calls):
        start = time.perf_counter()
        provider.run(*window)
        calls.append(time.perf_counter() - start)
    provider.latency.append(statistics.median(calls))
    start = time.perf_counter()
    for xs in batches:
        provider.run(*xs)
    provider.video.append(time.perf_counter() - start)


def summarise(providers: List[Provider], video_s: float, windows: int) -> List[Dict[str, object]]:
    rows = []
    eager = {p.precision: p for p in providers if p.kind == "eager" and p.error is None}
    for p in providers:
        row: Dict[str, object] = {"provider": p.name, "error": p.error, "build_s": p.build_s,
                                  "max_abs_diff_vs_eager_fp32": p.max_abs_diff}
        if p.error is None and p.latency:
            lat, vid = statistics.median(p.latency), statistics.median(p.video)
            row.update(latency_ms=1e3 * lat, latency_iqr_ms=1e3 * compare._iqr(p.latency), video_s=vid,
                       video_iqr_s=compare._iqr(p.video), windows_per_s=windows / vid, realtime_factor=video_s / vid)
            base = eager.get(p.precision)
            if base is not None and base.latency:
                # median of per-round ratios: each pair was timed seconds apart, under the same load
                row["latency_speedup_vs_eager"] = statistics.median(
                    b / x for b, x in zip(base.latency, p.latency))
                row["video_speedup_vs_eager"] = statistics.median(b / x for b, x in zip(base.video, p.video))
        rows.append(row)
    return rows


def render(result: Dict[str, object]) -> str:
    cfg = result["config"]
    lines = [
        f"# Streaming inference: {cfg['fusion'].upper()} AVRegressor on CPU",
        "",
        f"{result['date']}, commit `{result['commit'][:10]}`, {result['machine']['cpu_model']} "
        f"({result['machine']['cpu_flags']}), {cfg['threads']} threads, torch {result['machine']['torch']}, "
        f"onnxruntime {result['machine']['onnxruntime']}. Model: dims {cfg['dims']}, L = {cfg['seq_len']}, default "
        f"backends ({result['machine']['backends']}), eval mode, random weights (the timings do not depend on them).",
        "",
        f"- **latency**: one window (batch 1, {cfg['seq_len']} clips), median of {cfg['latency_calls']} calls per "
        "round.",
        f"- **video**: a {cfg['minutes']}-minute video at {FPS} fps = {result['windows']} windows "
        f"({result['windows'] * cfg['seq_len']} clips), batches of {cfg['batch']}.",
        f"- {result['rounds']} interleaved rounds; medians (IQR); speedups are medians of per-round ratios against "
        "eager at the same precision. `build` is the export/compile time paid once, before the first call.",
        "",
        "| provider | latency ms (IQR) | vs eager | video s (IQR) | windows/s | real-time x | vs eager | build s | "
        "max abs diff vs eager fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["error"] is not None:
            lines.append(f"| {row['provider']} | not run: {row['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {row['provider']} | {row['latency_ms']:.2f} ({row['latency_iqr_ms']:.2f}) | "
            f"{row.get('latency_speedup_vs_eager', float('nan')):.2f}x | "
            f"{row['video_s']:.2f} ({row['video_iqr_s']:.2f}) | "
            f"{row['windows_per_s']:.0f} | {row['realtime_factor']:.0f} | "
            f"{row.get('video_speedup_vs_eager', float('nan')):.2f}x | {row['build_s']:.1f} | "
            f"{row['max_abs_diff_vs_eager_fp32']:.1e} |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fusion", default="grjca")
    parser.add_argument("--dims", default="512,512", help="feature sizes, video first (the official ones: 512,512)")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--latency-calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="streaming-cpu")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = tuple(int(d) for d in args.dims.split(","))
    kinds = [k for k in args.providers.split(",") if k]
    precisions = [p for p in args.precisions.split(",") if p]
    for kind in kinds:
        if kind not in PROVIDERS:
            parser.error(f"--providers: expected names from {PROVIDERS}, got {kind!r}")
    for precision in precisions:
        if precision not in PRECISIONS:
            parser.error(f"--precisions: expected names from {PRECISIONS}, got {precision!r}")

    model = AVRegressor(dims, args.seq_len, fusion=args.fusion).eval()
    window = tuple(torch.randn(1, args.seq_len, d) for d in dims)
    windows = math.ceil(args.minutes * 60 * FPS / args.seq_len)
    batches = video_batches(windows, args.batch, dims, args.seq_len, seed=1)
    with torch.inference_mode():
        expected = model(*window)

    providers = [Provider(kind, precision) for precision in precisions for kind in kinds]
    with tempfile.TemporaryDirectory(prefix="avkernels-streaming-") as workdir:
        for provider in providers:
            print(f"building {provider.name} ...", flush=True)
            try:
                build(provider, model, window, workdir, args.threads)
                for xs in (batches[0], batches[-1]):
                    provider.run(*xs)  # the video pass's two batch sizes: compile and warm them too
                got = provider.run(*window)
                provider.max_abs_diff = max(float((g.float() - e).abs().max()) for g, e in zip(got, expected))
            except Exception as exc:  # noqa: BLE001 - a provider that cannot run is reported with its reason
                provider.error = failure_reason(exc)
                traceback.print_exc()
            print(f"  {provider.name}: {provider.error or f'built in {provider.build_s:.1f} s'}", flush=True)

        live = [p for p in providers if p.error is None]
        for r in range(args.rounds):
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            for provider in order:
                time_round(provider, window, batches, args.latency_calls)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    import onnxruntime

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": compare._commit(),
        # where the files went is the caller's business (and an absolute path would name this machine)
        "config": {**{k: v for k, v in vars(args).items() if k != "out_dir"}, "dims": dims},
        "windows": windows,
        "rounds": args.rounds,
        "machine": {
            "cpu_model": harness.cpu_model(),
            "cpu_flags": compare.cpu_flags(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "backends": ", ".join(avkernels.backends()),
            "load_average": os.getloadavg()[0],
        },
        "rows": summarise(providers, args.minutes * 60, windows),
        "per_round": {p.name: {"latency_s": p.latency, "video_s": p.video} for p in providers},
        "note": args.note,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out_dir, f"{args.name}.md"), "w") as f:
        f.write(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
