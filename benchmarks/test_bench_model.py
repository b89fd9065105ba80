"""The full audio-visual valence/arousal regressor (SPEC 4): encoders, GRJCA fusion, joint BiLSTM, two heads.

Official setting: 512-d video and audio features, ``L = 16``, batch 1 and 8 (64 with ``--bench-full``); the training
step is forward, backward (random output gradients) and an Adam step. FLOPs: torch's ``FlopCounterMode`` on the
reference (it does not see the LSTM recurrences, counted by hand with :func:`avkernels.flops.lstm_cost`); bytes are
not counted for this model, so its floor is the arithmetic one.
"""

import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import harness
from avkernels.flops import Cost, lstm_cost

MODES = ("train", "inference")
DIMS, SEQ_LEN = (512, 512), 16


def regressor_class():
    try:
        from avkernels import models
    except ImportError as exc:
        raise harness.Unavailable(f"avkernels.models is not in this build ({exc})") from None
    cls = getattr(models, "AudioVisualRegressor", None) or getattr(models, "AVRegressor", None)
    if cls is None:
        raise harness.Unavailable("avkernels.models has no AudioVisualRegressor")
    return cls


def make_model(backend):
    return regressor_class()(DIMS, SEQ_LEN, fusion="grjca", fusion_kwargs={"backend": backend})


def data_features(batch):
    """Inputs are data (precomputed features): no gradient flows to them."""
    make = harness.features(DIMS, batch, SEQ_LEN)
    return lambda dev, requires_grad: make(dev, False)


@functools.lru_cache(maxsize=None)
def model_cost(batch: int, mode: str) -> Cost:
    torch.manual_seed(0)
    model = make_model("reference")
    model.train(mode != "inference")
    inputs = data_features(batch)(torch.device("cpu"), False)
    lstm = Cost()
    for module in model.modules():
        if isinstance(module, nn.LSTM):
            lstm = lstm + lstm_cost(batch, SEQ_LEN, module.input_size, module.hidden_size,
                                    num_layers=module.num_layers, bidirectional=module.bidirectional,
                                    mode=mode if mode != "inference" else "forward")
    with FlopCounterMode(display=False) as counter:  # with grad enabled: its module tracker needs autograd
        outs = model(*inputs)
        if mode == "train":
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return Cost(flops=counter.get_total_flops() + lstm.flops, transcendentals=lstm.transcendentals)


def model_case(batch):
    return harness.Case(
        "AVRegressor-GRJCA", "official", {"batch": batch, "seq_len": SEQ_LEN, "dims": list(DIMS)}, make_model,
        data_features(batch), cost=lambda mode, itemsize=4: model_cost(batch, mode), key=(DIMS, SEQ_LEN),
    )


def model_cases(level):
    regressor_class()
    if level == "smoke":
        return []
    return [model_case(b) for b in ((1, 8, 64) if level == "full" else (1, 8))]


@harness.benchmarks(model_cases, MODES)
def test_model(bench, case, mode, provider):
    bench(case, mode, provider)
