"""The four fusion models (dense form, the official code's) and the sweeps over batch size and sequence length.

Shapes:
- ``official``: video and audio of 512 features, ``L = 16`` (Aff-Wild2 TSAV setting), batch 1 and 8 (64 with
  ``--bench-full``); every model with its default iterations (JCA 1, the others 2) and dropout 0.6.
- ``rjcma``: RJCA with three modalities of 256/128/128 features and ``L = 300`` (the RJCMA code's ``DCNLayer``).
- ``sweep``: RJCA at the official widths, over batch (``L = 16``) and over sequence length (batch 8); the plots
  join these points with the official ones.
"""

import avkernels
import harness
from avkernels.flops import fusion_cost

MODES = ("forward", "backward", "train", "inference")
MODELS = ("JCA", "RJCA", "DCA", "GRJCA")
OFFICIAL_DIMS = (512, 512)


def fusion_case(name, shape, dims, seq_len, batch):
    def make_module(backend):
        return getattr(avkernels, name)(dims, seq_len, backend=backend)

    config = make_module("reference")  # only its configuration is read by the counts
    return harness.Case(
        name, shape, {"batch": batch, "seq_len": seq_len, "dims": list(dims)}, make_module,
        harness.features(dims, batch, seq_len),
        cost=lambda mode, itemsize=4: fusion_cost(config, batch, mode=mode, itemsize=itemsize),
        key=(dims, seq_len),
    )


def official_cases(level):
    if level == "smoke":
        return [fusion_case(name, "tiny", (8, 6), 4, 1) for name in MODELS]
    batches = (1, 8, 64) if level == "full" else (1, 8)
    cases = [fusion_case(name, "official", OFFICIAL_DIMS, 16, b) for name in MODELS for b in batches]
    cases += [fusion_case("RJCA", "rjcma", (256, 128, 128), 300, b) for b in ((1, 12) if level == "full" else (1,))]
    return cases


def sweep_cases(level):
    if level == "smoke":
        return []
    full = level == "full"
    batches = (2, 4, 16, 32) if full else (2, 4, 16)
    lengths = (8, 32, 64, 128, 300) if full else (8, 32, 64)
    return [fusion_case("RJCA", "sweep", OFFICIAL_DIMS, 16, b) for b in batches] + [
        fusion_case("RJCA", "sweep", OFFICIAL_DIMS, length, 8) for length in lengths
    ]


@harness.benchmarks(official_cases, MODES)
def test_fusion(bench, case, mode, provider):
    bench(case, mode, provider)


@harness.benchmarks(sweep_cases, ("train", "inference"))
def test_fusion_sweep(bench, case, mode, provider):
    bench(case, mode, provider)
