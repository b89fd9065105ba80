"""Rewrite a checkpoint of an older avkernels so that it loads with ``weights_only=True``, as every reader of
checkpoints now requires (``python -m avkernels predict`` and ``export``, ``--resume``).

    python examples/convert_checkpoint.py runs/aw2/last.pt runs/aw2/last.pt --trust-this-file

Older training scripts pickled numpy's RNG state as a numpy array, which weights-only loading refuses; it becomes a
tensor here, and everything else must already be tensors and plain Python values (else the script says what is
not). Reading the old file unpickles it in full, which runs any code it holds: convert only a file you wrote
yourself. Hence the flag, and the warning it prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import atomic_save, plain_numpy_state  # noqa: E402


def convert(state: dict) -> dict:
    """The checkpoint dict with every rank's numpy RNG state as a tensor (other entries as they are)."""
    for rank in state.get("rng") or []:
        if isinstance(rank, dict) and isinstance(rank.get("numpy"), tuple):
            rank["numpy"] = plain_numpy_state(rank["numpy"])
    return state


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the checkpoint to convert")
    parser.add_argument("new", help="where to write the converted checkpoint (may be the same path)")
    parser.add_argument("--trust-this-file", action="store_true", required=True,
                        help="required: reading the old file runs any code it holds")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.old):
        parser.error(f"{args.old}: no such file")
    print(f"warning: unpickling {args.old} in full (weights_only=False): any code it holds runs now", file=sys.stderr)
    state = torch.load(args.old, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        parser.error(f"{args.old}: not a checkpoint of the training scripts (a {type(state).__name__})")
    try:
        atomic_save(convert(state), args.new)
    except TypeError as error:
        parser.error(f"{args.old}: {error}")
    print(f"wrote {args.new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
