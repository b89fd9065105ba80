"""Issue 10's comparison as one interleaved run: GRJCA fusion at the official shape under bf16 autocast with the
default CPU backend, against ``cpp`` in fp32 and against eager PyTorch under the same autocast.

    python benchmarks/compare.py [--batches 8,64] [--modes train,inference]
                                 [--providers default-bf16,cpp,reference-bf16] [--context]
                                 [--rounds 15] [--budget-s 600] [--threads 2] [--profile]
                                 [--name issue10-bf16] [--note "..."]
    python benchmarks/compare.py --refloor benchmarks/results/<name>.json   # its floors at this machine's peaks
    make bench BENCH_ARGS="--compare-bf16"     # the same through run.py

Why interleaved: on a machine shared with other work the load changes from minute to minute, and a provider timed
in one block and another ten minutes later can differ by 2x for no reason of their own. Here every round times
every (batch, mode, provider) once, in an order rotated by one each round, so that each provider sees the same
load; the ratios are given both as ratios of medians and as the median of the per-round ratios (each a pair timed
seconds apart).

Providers are the harness's (``harness.build_mode``: the same modules, inputs and training step as ``make bench``:
forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, backward, Adam at learning rate 0 on fp32
parameters, dropout 0.6); ``default`` is ``backend=None``, whatever the library's dispatch picks. ``--context`` adds
eager fp32 and ``cpp-bf16``. A provider that cannot run is reported with its reason and left out of the rounds.

Writes ``benchmarks/results/<name>.json`` (every round's time, medians, the roofs measured at the start and the end
of the run, peak memory) and ``<name>.md`` (the table, the ratios, the roofline fractions and, with ``--profile``,
where each provider's batch-8 training step spends its time: see ``profile_step.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ISSUE_PROVIDERS = ("default-bf16", "cpp", "reference-bf16")
CONTEXT_PROVIDERS = ("reference", "cpp-bf16")
# (numerator, denominator): numerator time / denominator time = how much faster the denominator runs
RATIOS = (("cpp", "default-bf16", "cpp fp32 / default bf16"),
          ("reference-bf16", "default-bf16", "eager bf16 / default bf16"),
          ("cpp", "cpp-bf16", "cpp fp32 / cpp bf16"),
          ("reference", "reference-bf16", "eager fp32 / eager bf16"),
          ("reference", "default-bf16", "eager fp32 / default bf16"))


def _iqr(values: List[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


class Entry:
    """One (case, mode, provider) of the run: its timed call, its times and what it measured."""

    def __init__(self, case, mode: str, provider: str):
        self.case, self.mode, self.provider = case, mode, provider
        self.times: List[float] = []
        self.error: Optional[str] = None
        self.setup = self.fn = None
        self.record: Dict[str, object] = {}

    @property
    def label(self) -> str:
        return f"B{self.case.params['batch']} {self.mode} {self.provider}"


def prepare(entry: Entry, dev) -> None:
    """Build the call and warm it up (twice for torch.compile or a slow first call, as the harness does)."""
    import harness

    harness.forget_dispatch()
    try:
        entry.setup, entry.fn = harness.build_mode(entry.case, entry.provider, entry.mode, dev)
        once = harness._timed_call(entry.setup, entry.fn, dev)
        if harness.split_provider(entry.provider)[0] == "torch_compile" or once > harness.COMPILE_SUSPECT_S:
            harness._timed_call(entry.setup, entry.fn, dev)
    except Exception as exc:
        entry.error = harness.failure_reason(exc)
        entry.record.update(harness._labels(entry.case, entry.provider, entry.mode, dev))


def interleave(entries: List[Entry], dev, rounds: int, min_rounds: int, budget_s: float, clock: str = "wall") -> int:
    """Time every runnable entry once per round (on ``clock``, see ``harness.CLOCKS``), rotating the order; stop
    after ``rounds`` rounds, or earlier once ``budget_s`` (wall) has passed and ``min_rounds`` are done. Returns the
    number of rounds run."""
    import harness

    live = [e for e in entries if e.error is None]
    start = time.perf_counter()
    done = 0
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for entry in order:
            try:
                entry.times.append(harness._timed_call(entry.setup, entry.fn, dev, clock))
            except Exception as exc:  # a failure after warm-up: keep what was timed, say why it stopped
                entry.error = harness.failure_reason(exc)
        live = [e for e in live if e.error is None]
        done = r + 1
        elapsed = time.perf_counter() - start
        print(f"round {done}: {elapsed:.0f} s", flush=True)
        if done >= min_rounds and elapsed * (done + 1) / done > budget_s:
            break
    return done


def measure(entry: Entry, dev, rates: Dict[str, float]) -> None:
    import harness

    if not entry.times:
        return
    precision = harness.split_provider(entry.provider)[1]
    costs = harness.costs_by_precision(entry.case, entry.mode)
    peak = retained = None
    if entry.error is None:
        try:
            harness.forget_dispatch()
            peak, retained = harness._cpu_peak(entry.setup, entry.fn)
        except Exception as exc:
            entry.error = f"memory measurement: {harness.failure_reason(exc)}"
    entry.record.update(harness._labels(entry.case, entry.provider, entry.mode, dev))  # right after its own call
    entry.record.update({
        "median_s": statistics.median(entry.times), "min_s": min(entry.times), "iqr_s": _iqr(entry.times),
        "rounds": len(entry.times), **costs[precision].as_dict(), **{f"bytes_{p}": c.bytes for p, c in costs.items()},
        "peak_bytes": peak, "retained_bytes": retained,
    })
    entry.record.update(floors(entry.record, rates))


def floors(record: Dict[str, object], rates: Dict[str, object]) -> Dict[str, object]:
    """The floor at the record's own precision and the best floor over every precision, and the fractions of both
    that its median reaches, at the roofs ``rates``."""
    import roofs

    def at(precision):
        return roofs.floor_seconds(record["flops"], record[f"bytes_{precision}"], record["transcendentals"], rates,
                                   precision)

    best_floor, best_precision = min((at(p), p) for p in roofs.PRECISIONS)
    floor = at(record["precision"])
    return {"floor_s": floor, "best_floor_s": best_floor, "best_floor_precision": best_precision,
            "fraction_of_floor": floor / record["median_s"], "fraction_of_best_floor": best_floor / record["median_s"]}


def refloor(path: str) -> Dict[str, object]:
    """A recorded run's floors again at this machine's physical peaks (``roofs.py``), for a run recorded on this
    machine before its peaks were measured; refuses a run from another CPU."""
    import roofs

    with open(path) as f:
        result = json.load(f)
    here = roofs.cpu_identity()
    ident = f"cpu family {here['family']} model {here['model']};"
    if not str(result.get("cpu_flags", "")).startswith(ident) or result["machine_info"]["cpu_model"] != \
            here["model_name"]:
        raise SystemExit(f"compare.py --refloor: {path} was recorded on {result['machine_info']['cpu_model']} "
                         f"({result.get('cpu_flags')}), this is {here['model_name']} ({ident}): its floors need "
                         f"that machine's peaks; rerun the comparison there")
    machine = result["machine_info"]
    machine.update(roofs.rates(roofs.peaks(), int(machine["torch_threads"])))
    for record in result["entries"]:
        if record.get("times_s"):
            record.update(floors(record, machine))
    return result


def ratios(entries: List[Entry]) -> List[Dict[str, object]]:
    """For each batch and mode, each ratio of :data:`RATIOS` whose two providers were timed: the ratio of medians
    and the median of the per-round ratios."""
    by_key = {(e.case.params["batch"], e.mode, e.provider): e for e in entries if e.times}
    out = []
    for batch, mode in sorted({(k[0], k[1]) for k in by_key}):
        for num, den, label in RATIOS:
            a, b = by_key.get((batch, mode, num)), by_key.get((batch, mode, den))
            if not a or not b:
                continue
            paired = [x / y for x, y in zip(a.times, b.times)]
            out.append({"batch": batch, "mode": mode, "numerator": num, "denominator": den, "label": label,
                        "ratio_of_medians": statistics.median(a.times) / statistics.median(b.times),
                        "median_paired_ratio": statistics.median(paired), "pairs": len(paired)})
    return out


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.1 else f"{100 * x:.2g}%"


def render(result: Dict[str, object]) -> str:
    sys.path.insert(0, HERE)
    from report import roofs_line

    m = result["machine_info"]
    lines = [
        f"## Issue 10 comparison: GRJCA, official shape (dims 512/512, L = 16, 2 iterations, dropout 0.6), "
        f"one interleaved run",
        "",
        f"Run of {result['datetime']} on **{m['cpu_model']}** ({m['cpu_cores']} CPU cores, {m['torch_threads']} "
        f"torch threads; {result.get('cpu_flags', '')}), torch {m['torch_version']}, avkernels "
        f"{m['avkernels_version']} (backends: {', '.join(m['avkernels_backends'])}), commit "
        f"{result['commit'][:10]}. {result['rounds']} interleaved rounds ({result['wall_s']:.0f} s), "
        + ("calls timed by the process's CPU time (time.process_time, one thread)."
           if result.get("clock") == "cpu" else "calls timed by wall clock."),
        roofs_line(m) + f" Load average (1 min) at start / end: {m.get('load_average_start')} / "
        f"{m.get('load_average_end')}.",
    ]
    if result.get("note"):
        lines.append(result["note"])
    lines += [
        "",
        "Providers: `default-bf16` = `backend=None` under `torch.autocast(\"cpu\", dtype=torch.bfloat16)` "
        "(resolved backend in brackets), `cpp` = the cpp backend in fp32, `reference-bf16` = eager PyTorch under the "
        "same autocast; the training step is forward (under autocast), backward, Adam (fp32 parameters). "
        "'of best floor' = roofline floor at the best roof this machine has / median; "
        "'of own floor' = the same at the roofs of the provider's precision.",
        "",
        "| B | mode | provider | median ms | IQR ms | rounds | of best floor | of own floor | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["entries"]:
        name = e["provider"] + (f" ({e['resolved_backend']})" if e.get("resolved_backend") else "")
        if "median_s" not in e:
            lines.append(f"| {e['batch']} | {e['mode']} | {name} | failed: {e['error']} | | | | | |")
            continue
        peak = f"{e['peak_bytes'] / 2**20:.1f}" if e.get("peak_bytes") is not None else "-"
        lines.append(f"| {e['batch']} | {e['mode']} | {name} | {_ms(e['median_s'])} | {_ms(e['iqr_s'])} | "
                     f"{e['rounds']} | {_pct(e['fraction_of_best_floor'])} | {_pct(e['fraction_of_floor'])} | "
                     f"{peak} |")
    failed = [e for e in result["entries"] if e.get("error") and "median_s" in e]
    for e in failed:
        lines.append(f"\n{e['provider']} B{e['batch']} {e['mode']} stopped: {e['error']}")
    passed = sorted({f"{e['provider']}: {op}: {why}" for e in result["entries"]
                     for op, why in (e.get("passed_over") or {}).items()})
    if passed:
        lines += ["", "Backends that `backend=None` passed over (last call of each op):", ""]
        lines += [f"- {line}" for line in passed]
    lines += ["", "Ratios (above 1x: the denominator is faster):", "",
              "| B | mode | ratio | of medians | median of per-round ratios (pairs) |", "|---|---|---|---|---|"]
    for r in result["ratios"]:
        lines.append(f"| {r['batch']} | {r['mode']} | {r['label']} | **{r['ratio_of_medians']:.2f}x** | "
                     f"{r['median_paired_ratio']:.2f}x ({r['pairs']}) |")
    if result.get("profile"):
        import profile_step

        lines += ["", profile_step.markdown(result["profile"], result["profile_title"])]
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    """The family/model and the matrix/vector extensions that decide the 16-bit story (none of AMX, AVX-512 BF16
    here means torch's bf16 GEMM has no fast kernel)."""
    import roofs

    cpu = roofs.cpu_identity()
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    return (f"cpu family {cpu['family']} model {cpu['model']}; ISA: "
            + ", ".join(f"{w} {'yes' if cpu['isa'][w] else 'no'}" for w in wanted))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="GRJCA")
    parser.add_argument("--batches", default="8,64")
    parser.add_argument("--modes", default="train,inference")
    parser.add_argument("--providers", default=",".join(ISSUE_PROVIDERS))
    parser.add_argument("--context", action="store_true", help="add eager fp32 and cpp-bf16")
    parser.add_argument("--rounds", type=int, default=15, help="most interleaved rounds")
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=900, help="stop starting rounds after about this long")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="time calls by wall clock, or by the process's CPU time (with --threads 1 on a machine "
                             "shared with other work: it leaves out the time spent waiting for a core)")
    parser.add_argument("--profile", action="store_true", help="add the batch-8 training-step profile per provider")
    parser.add_argument("--name", default="issue10-bf16")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--note", default="")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 rounds: a check that the script runs")
    parser.add_argument("--refloor", metavar="JSON", default=None,
                        help="no run: recompute a recorded run's floors at this machine's physical peaks and write "
                             "its JSON and markdown again (same CPU only)")
    args = parser.parse_args(argv)
    if args.refloor:
        result = refloor(args.refloor)
        write(result, args.refloor[: -len(".json")] if args.refloor.endswith(".json") else args.refloor)
        return 0

    import torch

    import harness
    from test_bench_fusion import OFFICIAL_DIMS, fusion_case

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = harness.device()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.context:
        providers += [p for p in CONTEXT_PROVIDERS if p not in providers]
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.smoke:
        cases = [fusion_case(args.model, "tiny", (8, 6), 4, b) for b in (1, 2)]
        args.rounds, args.min_rounds = 2, 1
    else:
        cases = [fusion_case(args.model, "official", OFFICIAL_DIMS, 16, b) for b in batches]

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rates = harness.machine_rates(dev.type, args.smoke)  # the start-of-run roofs
    entries = [Entry(case, mode, provider) for case in cases for mode in modes for provider in providers]
    t0 = time.perf_counter()
    for entry in entries:
        prepare(entry, dev)
        print(f"warm: {entry.label}" + (f" FAILED {entry.error}" if entry.error else ""), flush=True)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("compare.py: --clock cpu needs --threads 1 (with more threads, CPU time adds up the "
                         "threads' time instead of measuring the call's duration)")
    rounds = interleave(entries, dev, args.rounds, args.min_rounds, args.budget_s, args.clock)
    wall = time.perf_counter() - t0
    machine = harness.machine_info(dev, quick=args.smoke)  # the roofs again at the end, the better one kept
    for entry in entries:
        measure(entry, dev, machine)

    records = []
    for e in entries:
        records.append(dict(e.record, times_s=e.times, **({"error": e.error} if e.error else {})))
    result: Dict[str, object] = {
        "datetime": started, "commit": _commit(), "machine_info": machine, "cpu_flags": cpu_flags(),
        "rounds": rounds, "wall_s": wall, "clock": args.clock, "note": args.note, "providers": providers,
        "entries": records,
        "ratios": ratios(entries),
    }
    if args.profile:
        import profile_step

        case = next(c for c in cases if c.params["batch"] == min(batches)) if not args.smoke else cases[0]
        steps = 1 if args.smoke else 3
        result["profile"] = profile_step.profile_all(case, providers, "train", steps)
        result["profile_title"] = (f"### Profile: {args.model} training step, batch {case.params['batch']}, "
                                   f"{torch.get_num_threads()} threads, mean of {steps} profiled steps, ms per step")

    os.makedirs(args.out_dir, exist_ok=True)
    write(result, os.path.join(args.out_dir, args.name))
    return 0


def write(result: Dict[str, object], stem: str) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = render(result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    sys.stdout.write(text)
    print(f"wrote {stem}.json, {stem}.md")


if __name__ == "__main__":
    sys.exit(main())
