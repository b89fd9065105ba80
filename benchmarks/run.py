"""Run the whole benchmark suite and write its JSON, the markdown ratio table and the plots (``make bench``).

    python benchmarks/run.py [--full] [--providers reference,torch_compile,cpp] [--precisions fp32,bf16]
                             [--name cpu] [--note "..."] [-- extra pytest arguments, e.g. -k RJCA]
    python benchmarks/run.py --compare-bf16 [compare.py's options]   # issue 10's interleaved comparison

Writes ``benchmarks/results/<name>.json`` (pytest-benchmark's ``--benchmark-json``, every result carrying its
provider, backend, shape, mode, FLOP/byte counts, memory and fraction of the roofline floor in ``extra_info``, and
the machine, versions and measured roofs in ``machine_info``), ``<name>.md`` (the ratio tables, also printed) and
``plots/<name>-*.png``. ``<name>`` defaults to ``cpu`` or ``gpu``. Every provider runs at each of ``--precisions``
(default fp32 and bf16: the bf16 providers' forward runs under ``torch.autocast``, see ``harness.py``).
``--compare-bf16`` runs ``compare.py`` instead (GRJCA, official shape, batch 8 and 64, bf16 autocast with the
default backend vs ``cpp`` fp32 vs eager bf16, interleaved), passing it every other argument.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare-bf16" in argv:
        sys.path.insert(0, HERE)
        import compare

        return compare.main([a for a in argv if a != "--compare-bf16"])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="add batch 64, RJCMA batch 12 and the wide sweeps")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers (names may end in -bf16/-fp16; 'default' = backend=None)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="precisions of the default providers (fp32, bf16, fp16; default fp32,bf16)")
    parser.add_argument("--name", default=None, help="results file stem (default: cpu or gpu)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--note", default="", help="a line for the table header (e.g. 'noisy, shared machine')")
    parser.add_argument("--target-s", type=float, default=None, help="approximate timed seconds per benchmark")
    parser.add_argument("--stat", default="median", choices=("median", "min", "mean"),
                        help="statistic of the rounds in the tables and plots (min for a loaded machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a loaded shared machine)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    import torch  # after argument parsing, so that --help is instant

    name = args.name or ("gpu" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, f"{name}.json")
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE), "-p", "no:cacheprovider", "-q",
           f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=fullname"]
    if args.full:
        cmd.append("--bench-full")
    if args.providers:
        cmd.append(f"--bench-providers={args.providers}")
    cmd.append(f"--bench-precisions={args.precisions}")
    if args.threads:
        cmd.append(f"--bench-threads={args.threads}")
    if args.target_s:
        cmd.append(f"--bench-target-s={args.target_s}")
    cmd += extra
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real kernels only
    print("+", " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if not os.path.exists(json_path):
        print(f"run.py: pytest exited with {status} and wrote no {json_path}", file=sys.stderr)
        return status or 1

    sys.path.insert(0, HERE)
    import report

    report.main([json_path, "--note", args.note, "--stat", args.stat])
    if not args.no_plots:
        import plot

        plot.main([json_path, "--out-dir", os.path.join(args.out_dir, "plots"), "--stat", args.stat])
    return status


if __name__ == "__main__":
    sys.exit(main())
