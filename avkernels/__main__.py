"""``python -m avkernels COMMAND``: the library's command line (``python -m avkernels --help`` lists the commands)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _backends(args: argparse.Namespace) -> int:
    from avkernels import backend_status

    for name, status in backend_status(args.op).items():
        print(f"{name}: {status}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from avkernels.ops import native

    for backend in args.backend or ["cpp"]:
        try:
            path = native.build(backend, force=args.force, verbose=args.verbose)
        except (ValueError, RuntimeError) as exc:
            print(f"python -m avkernels build: error: {exc}", file=sys.stderr)
            return 1
        print(f"{backend}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from avkernels import export, predict
    from avkernels.ops import native
    from avkernels.dispatch import OPS

    parser = argparse.ArgumentParser(prog="python -m avkernels",
                                     description="avkernels: fused kernels for audio-visual joint cross-attention")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "predict", help="write a checkpoint's predictions on a dataset split in the dataset's own format",
        description=predict.__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    predict.add_arguments(p)
    p.set_defaults(handler=predict.run_from_args)
    p = commands.add_parser(
        "export", help="export a checkpoint's model to an ONNX file of standard operators (dynamic batch)",
        description="Export a checkpoint's model to ONNX (needs pip install 'avkernels[onnx]').",
    )
    export.add_arguments(p)
    p.set_defaults(handler=export.run_from_args)
    p = commands.add_parser("backends", help="the fused-op backends of this install and why any is unavailable")
    p.add_argument("--op", choices=OPS, default=None)
    p.set_defaults(handler=_backends)
    p = commands.add_parser(
        "build", help="compile the native backends' libraries for this torch (once per sources and torch)",
        description="Load each backend's library, compiling it into the build cache first if it has none for these "
                    "sources, this torch and these flags (avkernels/ops/native.py). Prints the library's file.",
    )
    p.add_argument("backend", nargs="*", metavar="BACKEND",
                   help=f"the backends to build, of {', '.join(lib.backend for lib in native.LIBRARIES)} (default: cpp)")
    p.add_argument("--force", action="store_true", help="compile again even if the cache has a build")
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    p.set_defaults(handler=_build)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
