"""Bad input gets a clear error: every message names the argument, what was expected and what came.

Issue 2, point 3: wrong number of modalities, a sequence length other than the module's, mismatched batch sizes,
wrong feature sizes, mixed devices ("meta" stands in for a second device) or dtypes, integer tensors; and the
functional ops' shape, probability, activation, temperature and weight-shape checks.
"""

import re

import pytest
import torch

import avkernels

r = torch.randn
REF = {"backend": "reference"}


def esc(text):
    return re.escape(text)


# ----------------------------------------------------------------------------------------------------------------
# Fusion modules
# ----------------------------------------------------------------------------------------------------------------

MODELS = [avkernels.JCA, avkernels.RJCA, avkernels.DCA, avkernels.GRJCA]


@pytest.fixture(params=MODELS, ids=lambda cls: cls.__name__)
def model(request):
    return request.param((3, 5), 4, backend="reference")


def test_wrong_number_of_modalities(model):
    a, v = r(2, 4, 3), r(2, 4, 5)
    msg = esc("features: expected 2 tensors (one per modality, dims=(3, 5)), got ")
    with pytest.raises(ValueError, match=msg + "1"):
        model(a)
    with pytest.raises(ValueError, match=msg + "3"):
        model(a, v, v)
    with pytest.raises(ValueError, match=msg + "1"):
        model((a, v))  # a tuple passed as one argument


def test_wrong_sequence_length(model):
    with pytest.raises(ValueError, match=esc("features[0]: expected shape (2, 4, 3), got (2, 6, 3)")):
        model(r(2, 6, 3), r(2, 6, 5))
    with pytest.raises(ValueError, match=esc("features[1]: expected shape (2, 4, 5), got (2, 6, 5)")):
        model(r(2, 4, 3), r(2, 6, 5))


def test_mismatched_batch_sizes(model):
    with pytest.raises(ValueError, match=esc("features[1]: expected shape (2, 4, 5), got (3, 4, 5)")):
        model(r(2, 4, 3), r(3, 4, 5))


def test_wrong_feature_size(model):
    with pytest.raises(ValueError, match=esc("features[1]: expected shape (2, 4, 5), got (2, 4, 6)")):
        model(r(2, 4, 3), r(2, 4, 6))
    with pytest.raises(ValueError, match=esc("features[0]: expected shape (2, 4, 3), got (2, 4, 5)")):
        model(r(2, 4, 5), r(2, 4, 3))  # modalities swapped


def test_wrong_rank(model):
    with pytest.raises(ValueError, match=esc("features[0]: expected shape (B, 4, 3), got (4, 3)")):
        model(r(4, 3), r(4, 5))


def test_mixed_devices(model):
    a, v = r(2, 4, 3), r(2, 4, 5)
    msg = "features[1]: expected a tensor on cpu like features[0], got one on meta"
    with pytest.raises(ValueError, match=esc(msg)):
        model(a, v.to("meta"))
    with pytest.raises(ValueError, match=esc("features[0]: expected a tensor on cpu like the module, got meta")):
        model(a.to("meta"), v.to("meta"))


def test_mixed_dtypes(model):
    a, v = r(2, 4, 3), r(2, 4, 5)
    msg = "features[1]: expected dtype torch.float32 like features[0], got torch.float64"
    with pytest.raises(TypeError, match=esc(msg)):
        model(a, v.double())
    msg = "features[0]: expected dtype torch.float32 like the module's parameters, got torch.float64"
    with pytest.raises(TypeError, match=esc(msg)):
        model(a.double(), v.double())


def test_integer_and_non_tensor_features(model):
    with pytest.raises(TypeError, match=esc("features[0]: expected a floating-point tensor") + ".*got torch.int64"):
        model(torch.ones(2, 4, 3, dtype=torch.int64), r(2, 4, 5))
    with pytest.raises(TypeError, match=esc("features[1]: expected a torch.Tensor, got list")):
        model(r(2, 4, 3), [[0.0] * 5] * 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dims=(3,)), "dims: expected a sequence of >= 2 positive ints (one per modality), got (3,)"),
        (dict(dims=(3, 0)), "dims: expected a sequence of >= 2 positive ints (one per modality), got (3, 0)"),
        (dict(seq_len=0), "seq_len: expected a positive int, got 0"),
        (dict(seq_len=4.0), "seq_len: expected a positive int, got 4.0"),
        (dict(iterations=0), "iterations: expected a positive int, got 0"),
        (dict(hidden=-1), "hidden: expected a positive int, got -1"),
        (dict(form="sparse"), "form: expected one of ('dense', 'additive'), got 'sparse'"),
        (dict(dropout=1.0), "dropout: expected a float in [0, 1), got 1.0"),
        (dict(dropout="0.5"), "dropout: expected a float in [0, 1), got '0.5'"),
        (dict(tau=0.0), "tau: expected a finite positive number, got 0.0"),
        (dict(stage_tau=-1.0), "stage_tau: expected a finite positive number, got -1.0"),
        (dict(gate_unattended="first"), "gate_unattended: expected one of ('previous', 'original'), got 'first'"),
        (dict(backend="gpu"), "backend: expected None or one of ('reference', 'triton', 'cpp', 'cuda'), got 'gpu'"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    args = {"dims": (3, 5), "seq_len": 4, **kwargs}
    with pytest.raises(ValueError, match=esc(message)):
        avkernels.GRJCA(args.pop("dims"), args.pop("seq_len"), **args)


def test_bad_set_backend():
    with pytest.raises(ValueError, match=esc("backend: expected None or one of")):
        avkernels.JCA((3, 5), 4).set_backend("torch")


# ----------------------------------------------------------------------------------------------------------------
# tanh_attention
# ----------------------------------------------------------------------------------------------------------------

q, k, v = r(2, 3, 4), r(2, 5, 4), r(2, 5, 6)


@pytest.mark.parametrize(
    "args, message",
    [
        ((r(3, 4), k, v), "q: expected shape (B, Mq, D), got (3, 4)"),
        ((q, r(2, 5, 3), v), "k: expected shape (2, N, 4), got (2, 5, 3)"),
        ((q, r(3, 5, 4), v), "k: expected shape (2, N, 4), got (3, 5, 4)"),
        ((q, k, r(2, 6, 6)), "v: expected shape (B or 1, 5, E), got (2, 6, 6)"),
        ((q, k, r(6, 6)), "v: expected shape (5, E), got (6, 6)"),
        ((q, k, r(2, 2, 5, 6)), "v: expected shape (B or 1, 5, E), got (2, 2, 5, 6)"),
        ((q, k, r(3, 5, 6)), "v: expected batch size 2 (like q) or 1 (shared), got 3"),
    ],
)
def test_tanh_attention_shapes(args, message):
    with pytest.raises(ValueError, match=esc(message)):
        avkernels.tanh_attention(*args, **REF)


def test_tanh_attention_devices_dtypes_integers():
    with pytest.raises(ValueError, match=esc("k: expected a tensor on cpu like q, got one on meta")):
        avkernels.tanh_attention(q, k.to("meta"), v, **REF)
    with pytest.raises(TypeError, match=esc("v: expected dtype torch.float32 like q, got torch.float64")):
        avkernels.tanh_attention(q, k, v.double(), **REF)
    with pytest.raises(TypeError, match=esc("q: expected a floating-point tensor") + ".*got torch.int64"):
        avkernels.tanh_attention(q.long(), k, v, **REF)
    with pytest.raises(TypeError, match=esc("k: expected a torch.Tensor, got ndarray")):
        avkernels.tanh_attention(q, k.numpy(), v, **REF)


def test_tanh_attention_on_meta_infers_shapes():
    o = avkernels.tanh_attention(q.to("meta"), k.to("meta"), v.to("meta"), **REF)
    assert o.shape == (2, 3, 6) and o.device.type == "meta"


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "0.1", True, None, float("nan"), float("inf")])
def test_tanh_attention_bad_dropout_p(p):
    with pytest.raises(ValueError, match=esc(f"dropout_p: expected a float in [0, 1), got {p!r}")):
        avkernels.tanh_attention(q, k, v, dropout_p=p, training=False, **REF)  # checked even outside training


@pytest.mark.parametrize("activation", ["relu", "none", "tanh"])
def test_tanh_attention_bad_activation(activation):
    with pytest.raises(ValueError, match=esc(f"activation: expected one of (None, 'tanh_relu'), got {activation!r}")):
        avkernels.tanh_attention(q, k, v, activation=activation, **REF)


def test_tanh_attention_bad_scale():
    with pytest.raises(TypeError, match=esc("scale: expected a float or None, got str")):
        avkernels.tanh_attention(q, k, v, scale="0.5", **REF)
    for scale in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=esc(f"scale: expected a finite number, got {scale!r}")):
            avkernels.tanh_attention(q, k, v, scale=scale, **REF)


# ----------------------------------------------------------------------------------------------------------------
# gate and stage_gate
# ----------------------------------------------------------------------------------------------------------------

a, u, w, b = r(2, 3, 4), r(2, 3, 4), r(2, 4), r(2)


@pytest.mark.parametrize(
    "args, message",
    [
        ((r(3, 4), r(3, 4), w, b), "attended: expected shape (B, L, d), got (3, 4)"),
        ((a, r(2, 3, 5), w, b), "unattended: expected shape (2, 3, 4), got (2, 3, 5)"),
        ((a, r(2, 4, 4), w, b), "unattended: expected shape (2, 3, 4), got (2, 4, 4)"),
        ((a, u, r(4, 2), b), "weight: expected shape (2, 4), got (4, 2)"),
        ((a, u, r(3, 4), b), "weight: expected shape (2, 4), got (3, 4)"),
        ((a, u, w, r(3)), "bias: expected shape (2,), got (3,)"),
    ],
)
def test_gate_shapes(args, message):
    with pytest.raises(ValueError, match=esc(message)):
        avkernels.gate(*args, **REF)


def test_gate_devices_dtypes_integers():
    with pytest.raises(TypeError, match=esc("weight: expected dtype torch.float32 like attended, got torch.float64")):
        avkernels.gate(a, u, w.double(), b, **REF)
    with pytest.raises(ValueError, match=esc("bias: expected a tensor on cpu like attended, got one on meta")):
        avkernels.gate(a, u, w, b.to("meta"), **REF)
    with pytest.raises(TypeError, match=esc("unattended: expected a floating-point tensor") + ".*got torch.int32"):
        avkernels.gate(a, u.int(), w, b, **REF)


@pytest.mark.parametrize("tau", [0, 0.0, -1.0, "0.1", float("nan"), float("inf"), float("-inf")])
def test_gate_bad_tau(tau):
    with pytest.raises(ValueError, match=esc(f"tau: expected a finite positive number, got {tau!r}")):
        avkernels.gate(a, u, w, b, tau=tau, **REF)
    with pytest.raises(ValueError, match=esc(f"tau: expected a finite positive number, got {tau!r}")):
        avkernels.stage_gate([a, u], r(2, 8), r(2), tau=tau, **REF)


@pytest.mark.parametrize(
    "args, message",
    [
        (([a, u], r(2, 7), r(2)), "weight: expected shape (2, 8), got (2, 7)"),
        (([a, u], r(8, 2), r(2)), "weight: expected shape (2, 8), got (8, 2)"),
        (([a, u], r(2, 8), r(3)), "bias: expected shape (2,), got (3,)"),
        (([a, r(2, 3, 5)], r(2, 8), r(2)), "stages[1]: expected shape (2, 3, 4), got (2, 3, 5)"),
        (([r(3, 4)], r(1, 4), r(1)), "stages[0]: expected shape (B, L, d), got (3, 4)"),
    ],
)
def test_stage_gate_shapes(args, message):
    with pytest.raises(ValueError, match=esc(message)):
        avkernels.stage_gate(*args, **REF)


def test_stage_gate_bad_stages():
    msg = "stages: expected a non-empty list or tuple of (B, L, d) tensors, got "
    with pytest.raises(TypeError, match=esc(msg + "list")):
        avkernels.stage_gate([], r(0, 0), r(0), **REF)
    with pytest.raises(TypeError, match=esc(msg + "Tensor")):
        avkernels.stage_gate(torch.stack([a, u]), r(2, 8), r(2), **REF)
    msg = "stages[1]: expected dtype torch.float32 like stages[0], got torch.float64"
    with pytest.raises(TypeError, match=esc(msg)):
        avkernels.stage_gate([a, u.double()], r(2, 8), r(2), **REF)
    with pytest.raises(ValueError, match=esc("stages[1]: expected a tensor on cpu like stages[0], got one on meta")):
        avkernels.stage_gate([a, u.to("meta")], r(2, 8), r(2), **REF)
    with pytest.raises(TypeError, match=esc("stages[0]: expected a floating-point tensor") + ".*got torch.int64"):
        avkernels.stage_gate([a.long(), u], r(2, 8), r(2), **REF)


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    o = avkernels.tanh_attention(q, k, v, scale=np.float32(0.5), dropout_p=np.float64(0.2), training=True, **REF)
    assert o.shape == (2, 3, 6)
    _, g = avkernels.gate(a, u, w, b, tau=np.float32(0.3), **REF)
    assert g.shape == (2, 3, 2)
    assert avkernels.GRJCA((3, 5), 4, dropout=np.float64(0.1), tau=np.float32(0.2)).iterations == 2
