"""Write tests/data/official_cam_golden.json by running the authors' own CAM code (not part of this repository).

Usage::

    python tests/data/make_official_golden.py JCA_DIR RJCA_DIR DCA_DIR

where each directory holds ``models/orig_cam.py`` and the modules it imports (``av_crossatten.py``,
``dense_coattn.py``, ``layer.py``, ``audguide_att.py``) from, respectively,

- praveena2j/Joint-Cross-Attention-for-Audio-Visual-Fusion,
- praveena2j/RecurrentJointAttentionwithLSTMs,
- praveena2j/Dynamic-CrossAttention,

e.g. ``git --git-dir=<mirror> show HEAD:models/orig_cam.py > JCA_DIR/models/orig_cam.py``. A ``SOURCE`` file in a
directory (``<repository> <commit>``) is copied into the golden file.

For each repository it builds the official ``CAM()``, records its state-dict names and shapes (in order), loads the
deterministic float64 weights of tests/official_golden.py, runs ``cam(audio, video)`` in eval mode on the
deterministic inputs there and records ``(valence, arousal)``. Nothing else of the official code is kept.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for official_golden

from official_golden import GOLDEN_PATH, golden_inputs, golden_state_dict  # noqa: E402

REPOS = ("jca", "rjca", "dca")


def official_cam_class(directory: str):
    # The three repositories name their package "models" alike, so each import starts from a clean slate.
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[name]
    sys.path.insert(0, os.path.abspath(directory))
    try:
        return importlib.import_module("models.orig_cam").CAM
    finally:
        sys.path.pop(0)


def run(directory: str) -> dict:
    cam = official_cam_class(directory)().cpu().double()
    keys = [(name, list(t.shape)) for name, t in cam.state_dict().items()]
    cam.load_state_dict(golden_state_dict(keys), strict=True)
    cam.eval()
    audio, video = golden_inputs()
    with torch.no_grad():
        valence, arousal = cam(audio, video)  # the official argument order: audio first
    source_file = os.path.join(directory, "SOURCE")
    source = open(source_file).read().strip() if os.path.exists(source_file) else "unrecorded"
    return {"source": source, "keys": keys, "valence": valence.tolist(), "arousal": arousal.tolist()}


def main(argv) -> None:
    if len(argv) != len(REPOS):
        raise SystemExit(__doc__)
    golden = {
        "about": "made by tests/data/make_official_golden.py from the official CAM code; weights and inputs: "
                 "tests/official_golden.py; outputs are float64 (valence, arousal), each (batch, 16)",
        "torch": torch.__version__,
    }
    for repo, directory in zip(REPOS, argv):
        golden[repo] = run(directory)
    with open(GOLDEN_PATH, "w") as f:
        json.dump(golden, f, indent=1)
    print(f"wrote {GOLDEN_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
