"""``lengths=``: padded time steps change nothing of the valid steps (SPEC 3.1).

For every fusion (both forms, 2 and 3 modalities), the regressor and the IEMOCAP classifiers, on every backend that
runs on this machine's CPU and in fp64, fp32 and bf16, with dropout on and replayed through the seed: random values
(and NaN) in the padded steps leave the valid outputs, the gates and every gradient of a loss on the valid steps
bit-identical, and the outputs at padded steps are 0. ``lengths`` all equal to ``L`` is bit-identically no
``lengths``. Also the errors, the packed BiLSTM against the truncated sequence, and the loaders' lengths.
"""

import numpy as np
import pytest
import torch

import avkernels
from avkernels.dispatch import Inputs, registered, why_not
from avkernels.data import AVVideo, AVWindowDataset
from avkernels.models import AVRegressor, CrossAttentionClassifier, ModalitySpec, ResidualBiLSTM, SelfAttentionClassifier

pytestmark = pytest.mark.usefixtures("single_torch_thread")

L = 5
LENGTHS = [5, 2, 0]  # full, partly padded, all padding
FUSIONS = {"JCA": avkernels.JCA, "RJCA": avkernels.RJCA, "DCA": avkernels.DCA, "GRJCA": avkernels.GRJCA}
MODALITY_DIMS = {"2mod": (4, 3), "3mod": (4, 3, 5)}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {"tanh_attention": {"B": 3, "Mq": 12, "N": 5, "D": L, "E": L}, "gate": {"B": 3, "L": L, "d": 4},
         "stage_gate": {"T": 2, "B": 3, "L": L, "d": 4}}


def interpreted(backend):
    return backend == "triton" and not torch.cuda.is_available()


def cases(*axes, interpreter_keeps=lambda combo: True):
    """The product of ``axes`` (the last two: the backend and the dtype name). The Triton interpreter takes about
    0.25 s per kernel call, so it runs only the combinations ``interpreter_keeps`` accepts, marked slow; its kernels
    see exactly what the compiled ones see (the masking happens before the call), and the conformance suite tests
    them on every shape and dtype."""
    import itertools

    out = []
    for combo in itertools.product(*axes):
        if not interpreted(combo[-2]):
            out.append(pytest.param(*combo))
        elif interpreter_keeps(combo):
            out.append(pytest.param(*combo, marks=pytest.mark.slow))
    return out


def skip_unless_cpu(backend, dtype):
    reasons = [r for op, sizes in SIZES.items() for r in why_not(backend, Inputs(op, torch.device("cpu"), dtype, sizes))]
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(dict.fromkeys(reasons)))


def garbage(xs, lengths, nan=True):
    """Copies of ``xs`` with random values in the padded steps, and NaN in the samples of length 0."""
    out = []
    for x in xs:
        y = x.detach().clone()
        for b, n in enumerate(lengths.tolist()):
            y[b, n:] = torch.randn_like(y[b, n:]) * 100
            if n == 0 and nan:
                y[b] = float("nan")
        out.append(y)
    return out


def valid_mask(lengths, steps):
    return torch.arange(steps) < lengths.unsqueeze(1)


def run(model, xs, loss_fn, seed=7, **kwargs):
    """Outputs and the gradients of ``loss_fn(outputs)`` w.r.t. every parameter and input, dropout drawn from ``seed``."""
    xs = [x.detach().requires_grad_(True) for x in xs]
    torch.manual_seed(seed)
    outputs = model(*xs, **kwargs)
    leaves = list(model.parameters()) + xs
    grads = torch.autograd.grad(loss_fn(outputs), leaves, allow_unused=True)
    return outputs, [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def flat(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for key in sorted(outputs) for t in flat(outputs[key])]
    return [t for o in outputs for t in flat(o)]


def assert_identical(a, b, what):
    a, b = flat(a), flat(b)
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}[{k}] differs (max {float((x.double() - y.double()).abs().max()):.3g})"


def per_step_loss(tensors, lengths, weights):
    """A loss that reads every valid step of every ``(B, L, ...)`` tensor, with fixed random weights."""
    valid = valid_mask(lengths, L)
    return sum((t[valid].float() * w[valid]).sum() for t, w in zip(tensors, weights))


def fixed_weights(tensors):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(t.shape, generator=g) for t in tensors]


# ------------------------------------------------------------------------------------------------------------------
# Fusions
# ------------------------------------------------------------------------------------------------------------------


def fusion_case(name, form, dims, backend, dtype):
    skip_unless_cpu(backend, dtype)
    model = FUSIONS[name](dims, L, form=form, dropout=0.3, hidden=4, backend=backend).to(dtype).train()
    xs = [torch.randn(3, L, d, dtype=dtype) for d in dims]
    return model, xs


@pytest.mark.parametrize(
    "name, form, dims, backend, dtype",
    cases(list(FUSIONS), ["dense", "additive"], list(MODALITY_DIMS), registered(), list(DTYPES),
          interpreter_keeps=lambda c: c[2:5:2] == ("2mod", "fp32") or c[:3] == ("GRJCA", "dense", "3mod")),
)
def test_fusion_padding_changes_nothing_valid(name, form, dims, backend, dtype):
    model, xs = fusion_case(name, form, MODALITY_DIMS[dims], backend, DTYPES[dtype])
    lengths = torch.tensor(LENGTHS)
    weights = None

    def loss(result):
        nonlocal weights
        outputs, gates = result
        tensors = flat(outputs) + flat(gates)
        weights = weights or fixed_weights(tensors)
        return per_step_loss(tensors, lengths, weights)

    clean, clean_grads = run(model, xs, loss, lengths=lengths, return_gates=True)
    dirty, dirty_grads = run(model, garbage(xs, lengths), loss, lengths=lengths, return_gates=True)
    assert_identical(clean, dirty, "outputs and gates")
    n_params = len(list(model.parameters()))
    assert_identical(clean_grads[:n_params], dirty_grads[:n_params], "parameter gradients")
    padded = ~valid_mask(lengths, L)
    for x, g_clean, g_dirty in zip(xs, clean_grads[n_params:], dirty_grads[n_params:]):
        assert torch.equal(g_clean[~padded], g_dirty[~padded])
        assert not g_dirty[padded].any(), "a padded input step received a gradient"
    for t in flat(dirty):
        assert not t[padded].any(), "outputs and gates at padded steps are 0"
    assert all(torch.isfinite(t).all() for t in flat(dirty) + dirty_grads)


@pytest.mark.parametrize(
    "name, form, backend, dtype",
    cases(list(FUSIONS), ["dense", "additive"], registered(), ["fp32"], interpreter_keeps=lambda c: c[0] == "GRJCA"),
)
def test_full_lengths_are_bit_identical_to_none(name, form, backend, dtype):
    model, xs = fusion_case(name, form, (4, 3), backend, torch.float32)
    weights = fixed_weights([torch.empty(3, L, 4)] * 16)

    def loss(result):
        return sum((t.float() * w[..., : t.shape[-1]]).sum() for t, w in zip(flat(result), weights))

    without = run(model, xs, loss, return_gates=True)
    full = run(model, xs, loss, lengths=torch.full((3,), L), return_gates=True)
    assert_identical(without, full, "lengths == L against no lengths")


def test_padding_is_absent_from_the_time_maps():
    """The valid outputs do not depend on what the padded steps hold, but they do depend on the lengths: a zero
    step is not an absent one (a zero-padded batch without lengths lets the bias of Q reach the contraction)."""
    model = avkernels.RJCA((4, 3), L, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases too, which the initialisation leaves at 0
    xs = [torch.randn(2, L, d) for d in (4, 3)]
    lengths = torch.tensor([3, 3])
    zero_padded = [torch.cat([x[:, :3], torch.zeros_like(x[:, 3:])], dim=1) for x in xs]
    with_lengths = model(*zero_padded, lengths=lengths)
    without = model(*zero_padded)
    assert not torch.allclose(with_lengths[0][:, :3], without[0][:, :3])


# ------------------------------------------------------------------------------------------------------------------
# Regressor and classifiers
# ------------------------------------------------------------------------------------------------------------------

REGRESSORS = {
    "grjca": dict(fusion="grjca"),
    "dca-spatial": dict(fusion="dca", spatial_attention=True, spatial_channels=4, spatial_positions=3),
    "jca-3mod-additive": dict(dims=(4, 6, 2), fusion="jca", fusion_kwargs=dict(form="additive")),
}


@pytest.mark.parametrize(
    "config, backend, dtype",
    cases(list(REGRESSORS), registered(), list(DTYPES), interpreter_keeps=lambda c: c[0] == "grjca" and c[2] == "fp32"),
)
def test_regressor_padding_changes_nothing_valid(config, backend, dtype):
    skip_unless_cpu(backend, DTYPES[dtype])
    kwargs = {**dict(dims=(4, 6), seq_len=L, joint_dim=6, head_hidden=5, encoder_layers=2), **REGRESSORS[config]}
    kwargs["fusion_kwargs"] = dict(kwargs.get("fusion_kwargs", {}), backend=backend, dropout=0.3)
    model = AVRegressor(**kwargs).train()
    # bf16 the way the models run it: autocast over float32 parameters (the recurrent layers stay float32).
    model = model.double() if dtype == "fp64" else model
    dtype_in = torch.float64 if dtype == "fp64" else torch.float32
    xs = [torch.randn(3, L, d, dtype=dtype_in) for d in model.input_dims]
    lengths = torch.tensor(LENGTHS)
    weights = fixed_weights([torch.empty(3, L)] * 2)

    def loss(result):
        (valence, arousal), _ = result
        return per_step_loss([valence, arousal], lengths, weights)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        clean = run(model, xs, loss, lengths=lengths, return_gates=True)
        dirty = run(model, garbage(xs, lengths), loss, lengths=lengths, return_gates=True)
        without = run(model, xs, loss, return_gates=True)
        full = run(model, xs, loss, lengths=torch.full((3,), L), return_gates=True)
    n_params = len(list(model.parameters()))
    assert_identical(clean[0], dirty[0], "predictions and gates")
    assert_identical(clean[1][:n_params], dirty[1][:n_params], "parameter gradients")
    padded = ~valid_mask(lengths, L)
    assert not any(t[padded].any() for t in flat(dirty[0])), "predictions and gates at padded steps are 0"
    assert_identical(without, full, "lengths == L against no lengths")


def test_packed_bilstm_equals_the_truncated_sequence():
    lstm = ResidualBiLSTM(4, 6, num_layers=2, dropout=0.0).double().eval()
    x = torch.randn(3, L, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1])
    out = lstm(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = lstm(x[b : b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone[0], rtol=1e-12, atol=1e-12)
        assert not out[b, n:].any()


SPECS = {"text": ModalitySpec(6, 5, input_dropout=0.25), "video": ModalitySpec(7, 4, conv_length=3),
         "audio": ModalitySpec(8, 3, conv_length=4)}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("modalities", [("text", "video", "audio"), ("text", "audio")], ids=["tri", "bi"])
@pytest.mark.parametrize("cls", [SelfAttentionClassifier, CrossAttentionClassifier], ids=["self", "cross"])
def test_classifier_padding_changes_nothing_valid(cls, modalities, dtype):
    model = cls(modalities, specs=SPECS, rnn_hidden=4, num_heads=2, fc_hidden=5).train()
    model = model.double() if dtype == "fp64" else model
    dtype_in = torch.float64 if dtype == "fp64" else torch.float32
    xs = [torch.randn(3, SPECS[m].length, SPECS[m].dim, dtype=dtype_in) for m in modalities]
    lengths = {m: torch.tensor([SPECS[m].length, 3, 0]) for m in modalities}
    dirty_xs = [garbage([x], lengths[m])[0] for x, m in zip(xs, modalities)]
    weights = torch.randn(3, 7)

    def loss(logits):
        return (logits.float() * weights).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        clean = run(model, xs, loss, lengths=lengths)
        dirty = run(model, dirty_xs, loss, lengths=lengths)
        without = run(model, xs, loss)
        full = run(model, xs, loss, lengths=[torch.full((3,), SPECS[m].length) for m in modalities])
    n_params = len(list(model.parameters()))
    assert_identical(clean[0], dirty[0], "logits")
    assert_identical(clean[1][:n_params], dirty[1][:n_params], "parameter gradients")
    assert torch.isfinite(dirty[0]).all()
    assert_identical(without, full, "lengths == L against no lengths")


def test_classifier_one_lengths_tensor_for_every_modality():
    specs = {"text": ModalitySpec(6, 5), "audio": ModalitySpec(6, 3)}
    model = SelfAttentionClassifier(("text", "audio"), specs=specs, rnn_hidden=4, num_heads=2).eval()
    xs = [torch.randn(2, 6, 5), torch.randn(2, 6, 3)]
    lengths = torch.tensor([6, 2])
    as_dict = model(*xs, lengths={"text": lengths, "audio": lengths})
    assert torch.equal(model(*xs, lengths=lengths), as_dict)
    assert torch.equal(model(*garbage(xs, lengths), lengths=lengths), as_dict)
    with pytest.raises(ValueError, match="lengths: keys \\['video'\\]"):
        model(*xs, lengths={"video": lengths})


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths, error, message",
    [
        (torch.tensor([4, 6]), ValueError, r"lengths: expected values in \[0, seq_len=5\], got values in \[4, 6\]"),
        (torch.tensor([-1, 2]), ValueError, r"lengths: expected values in \[0, seq_len=5\]"),
        (torch.tensor([2.0, 3.0]), TypeError, r"lengths: expected an integer tensor .* got torch.float32"),
        (torch.tensor([True, False]), TypeError, r"lengths: expected an integer tensor .* got torch.bool"),
        (torch.tensor([[2], [3]]), ValueError, r"lengths: expected shape \(2,\) \(one length per sample\), got \(2, 1\)"),
        (torch.tensor([2, 3, 4]), ValueError, r"lengths: expected shape \(2,\)"),
        ([2, 3], TypeError, r"lengths: expected None or a \(2,\) integer torch.Tensor, got list"),
        (torch.tensor([2, 3], device="meta"), ValueError, r"lengths: expected a tensor on cpu like the features, got one on meta"),
    ],
    ids=["above", "negative", "float", "bool", "2d", "batch", "list", "device"],
)
@pytest.mark.parametrize("model", ["GRJCA", "AVRegressor"])
def test_bad_lengths_are_clear_errors(model, lengths, error, message):
    if model == "GRJCA":
        module, dims = avkernels.GRJCA((4, 3), L), (4, 3)
    else:
        module = AVRegressor((4, 6), L, joint_dim=6, head_hidden=5)
        dims = module.input_dims
    with pytest.raises(error, match=message):
        module(*[torch.randn(2, L, d) for d in dims], lengths=lengths)


def test_wrong_length_error_says_to_pad_and_pass_lengths():
    with pytest.raises(ValueError, match=r"seq_len=5. Pad shorter sequences to 5 steps and pass lengths=.*seq_len=7"):
        avkernels.DCA((4, 3), L)(torch.randn(2, 7, 4), torch.randn(2, 7, 3))
    with pytest.raises(ValueError, match=r"seq_len=5. Pad .* pass lengths="):
        AVRegressor((4, 6), L, joint_dim=6)(torch.randn(2, 3, 4), torch.randn(2, 3, 6))


# ------------------------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_frames, seq_len, stride", [(23, 4, 1), (45, 4, 8), (16, 4, 4)])
def test_window_lengths_are_the_real_clips(n_frames, seq_len, stride):
    rng = np.random.default_rng(0)
    video = AVVideo("v", {"video": rng.normal(size=(n_frames, 3)), "audio": rng.normal(size=(n_frames, 2))},
                    rng.uniform(-1, 1, size=(n_frames, 2)).astype(np.float32))
    dataset = AVWindowDataset([video], seq_len, stride, windows="all")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    real = batch["frames"] >= 0
    assert batch["lengths"].dtype == torch.int64
    assert torch.equal(batch["lengths"], real.sum(dim=1))
    assert torch.equal(real, valid_mask(batch["lengths"], seq_len)), "real clips come first"
    assert torch.equal(real, batch["valence"] != -5)
    assert bool((batch["lengths"] < seq_len).any()) == bool(n_frames % (seq_len * stride))


def test_training_task_passes_the_windows_lengths():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from train_av import VARegressionTask

    seen = {}

    def model(*features, lengths=None):
        seen["lengths"] = lengths
        return features[0].sum(-1), features[1].sum(-1)

    batch = {"video": torch.randn(2, L, 3), "audio": torch.randn(2, L, 2), "lengths": torch.tensor([5, 2])}
    VARegressionTask(("video", "audio")).predict(model, batch)
    assert seen["lengths"] is batch["lengths"]
    VARegressionTask(("video", "audio"), use_lengths=False).predict(model, batch)
    assert seen["lengths"] is None


def test_iemocap_lengths_from_the_marks_in_the_files(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    import make_samples
    from avkernels.data import IEMOCAPFold

    fold = str(tmp_path / "fold01")
    written = make_samples.write_iemocap_fold(fold)
    tokens = written["train"]["nlp_trans"].copy()
    tokens[0, 7:] = 0  # utterance 0: 7 tokens, then padding
    tokens[2, :] = 0  # utterance 2: no token at all
    np.save(os.path.join(fold, "train_nlp_trans.npy"), tokens)
    dataset = IEMOCAPFold(fold, "train", modalities=("text", "video"), drop_no_video=False)
    items = [dataset[i] for i in range(len(dataset))]
    assert [int(item["text_length"]) for item in items][:3] == [7, 128, 0]
    assert [int(item["video_length"]) for item in items] == written["train"]["video_seqN"].tolist()
    assert "audio_length" not in items[0]
