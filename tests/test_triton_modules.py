"""The fusion modules (JCA, RJCA, DCA, GRJCA) compute the same function on the Triton backend as on the reference.

Every module is built once, its state dict copied into a twin, and the twins routed through ``backend="triton"``
and ``backend="reference"`` with :meth:`set_backend`. Outputs, gate values, input gradients and every parameter
gradient must agree. Dropout masks cannot be compared across backends (the fused kernels draw theirs in-kernel), so
training mode is compared at ``dropout=0.0``, and ``dropout > 0`` is checked to run and to be reproducible under a
fixed seed. Finally GRJCA goes through ``torch.compile(fullgraph=True)``, which raises on any graph break.
"""

import copy

import pytest
import torch

import avkernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODELS = {"JCA": avkernels.JCA, "RJCA": avkernels.RJCA, "DCA": avkernels.DCA, "GRJCA": avkernels.GRJCA}
DIMS = {2: (24, 16), 3: (24, 16, 8)}
SEQ_LEN = 7
BATCH = 2
TOLERANCES = {torch.float64: (1e-10, 1e-9)}  # (atol, rtol); fp32 follows the flash rule instead


def _twins(name, n_modalities, dtype, form="dense", dropout=0.0, **kwargs):
    """Two copies of one module (same weights): (triton, reference)."""
    model = MODELS[name](DIMS[n_modalities], SEQ_LEN, form=form, dropout=dropout, **kwargs).to(DEVICE, dtype)
    twin = copy.deepcopy(model)
    twin.load_state_dict(model.state_dict())
    return model.set_backend("triton"), twin.set_backend("reference")


def _features(n_modalities, dtype):
    return [torch.randn(BATCH, SEQ_LEN, d, device=DEVICE, dtype=dtype) for d in DIMS[n_modalities]]


def _flat_gates(gates):
    """The gate tensors of a ``return_gates`` dict, in a fixed order."""
    flat = []
    for key in sorted(gates):
        values = gates[key]
        for item in values:
            flat.extend(item if isinstance(item, tuple) else (item,))
    return flat


def _run(model, features, weights):
    """Forward with gates, a loss touching every output and every gate value, backward.

    Returns ``(outputs + gates, input grads, {parameter name: grad})``.
    """
    leaves = [x.detach().clone().requires_grad_(True) for x in features]
    model.zero_grad(set_to_none=True)
    outputs, gates = model(*leaves, return_gates=True)
    results = list(outputs) + _flat_gates(gates)
    assert len(results) <= len(weights), "every output and gate must reach the loss"
    loss = sum((r * w[: r.numel()].view_as(r)).sum() for r, w in zip(results, weights))
    loss.backward()
    params = {name: p.grad for name, p in model.named_parameters()}
    return [r.detach() for r in results], [x.grad for x in leaves], params


def _weights(dtype, n=16):
    """Random loss weights, one flat vector per result (sliced to each result's size)."""
    return [torch.randn(BATCH * SEQ_LEN * 64, device=DEVICE, dtype=dtype) for _ in range(n)]


def _assert_same(ours, ref, dtype):
    atol, rtol = TOLERANCES[dtype]
    results, input_grads, params = ours
    ref_results, ref_input_grads, ref_params = ref
    assert len(results) == len(ref_results)
    for i, (a, b) in enumerate(zip(results, ref_results)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"output/gate {i}: {m}")
    for i, (a, b) in enumerate(zip(input_grads, ref_input_grads)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"grad of features[{i}]: {m}")
    assert params.keys() == ref_params.keys()
    for name in params:
        assert params[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(params[name], ref_params[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n_modalities", [2, 3])
@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_matches_reference_fp64(name, form, n_modalities):
    ours, ref = _twins(name, n_modalities, torch.float64, form=form)
    ours.eval(), ref.eval()
    features, weights = _features(n_modalities, torch.float64), _weights(torch.float64)
    _assert_same(_run(ours, features, weights), _run(ref, features, weights), torch.float64)


def _flat(run):
    results, input_grads, params = run
    return list(results) + list(input_grads) + [params[name] for name in sorted(params)]


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", ["DCA", "GRJCA"])
def test_eval_fp32_flash_rule(name, form):
    """fp32 against an fp64 reference, measured against the fp32 reference's own error (flash-attention's rule).

    Through several layers at tau = 0.1 the max error of one small tensor is noisy (a reduction where the reference
    happens to round luckily), so the rule applies to the mean over all outputs, gates and gradients of each
    tensor's error relative to its scale. A module chains fused ops that may each be up to 2x the reference's error,
    so the mean may be up to 4x. Each tensor separately must stay within 10x plus 0.2% of its scale: a bias gradient
    of two entries that cancel over the rows (scale 3e-3 from summands near 1) has few correct digits either way.
    """
    ours, ref = _twins(name, 2, torch.float32, form=form)
    ref64 = copy.deepcopy(ref).double()
    for model in (ours, ref, ref64):
        model.eval()
    features, weights = _features(2, torch.float32), _weights(torch.float32)
    runs = [
        _flat(_run(ours, features, weights)),
        _flat(_run(ref, features, weights)),
        _flat(_run(ref64, [x.double() for x in features], [w.double() for w in weights])),
    ]
    ours_rel, ref_rel = [], []
    for i, (a, pt, exact) in enumerate(zip(*runs)):
        scale = exact.abs().max().item()
        err, pt_err = (a.double() - exact).abs().max().item(), (pt.double() - exact).abs().max().item()
        assert err <= 10 * pt_err + 2e-3 * scale, f"result {i}: error {err:.3g}, reference's {pt_err:.3g}"
        ours_rel.append(err / scale)
        ref_rel.append(pt_err / scale)
    assert sum(ours_rel) <= 4 * sum(ref_rel), f"mean relative error {sum(ours_rel) / len(ours_rel):.3g} vs reference " \
        f"{sum(ref_rel) / len(ref_rel):.3g}"


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_without_dropout_matches_reference(name, form):
    ours, ref = _twins(name, 2, torch.float64, form=form, dropout=0.0)
    ours.train(), ref.train()
    features, weights = _features(2, torch.float64), _weights(torch.float64)
    _assert_same(_run(ours, features, weights), _run(ref, features, weights), torch.float64)


def test_grjca_options_match_reference():
    """GRJCA's variants: the original inputs as unattended features, the inputs as a stage (T + 1 = 3 stages), shared
    weights."""
    ours, ref = _twins(
        "GRJCA", 3, torch.float64, gate_unattended="original", stage_include_input=True, share_weights=True
    )
    ours.eval(), ref.eval()
    features, weights = _features(3, torch.float64), _weights(torch.float64, n=32)
    _assert_same(_run(ours, features, weights), _run(ref, features, weights), torch.float64)


@pytest.mark.parametrize("form", ["dense", "additive"])
def test_dropout_is_reproducible_under_a_seed(form):
    """``dropout > 0`` in training mode runs, and repeats bit for bit under ``torch.manual_seed`` (the in-kernel
    dropout seed is drawn from torch's generator); another seed draws other masks, so dropout is really applied."""
    model, _ = _twins("GRJCA", 2, torch.float32, form=form, dropout=0.6)
    model.train()
    features, weights = _features(2, torch.float32), _weights(torch.float32)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(_run(model, features, weights))
    (first, first_inputs, first_params), (again, again_inputs, again_params), (other, _, _) = runs
    for a, b in zip(first + first_inputs, again + again_inputs):
        assert torch.equal(a, b)
    for name in first_params:
        assert torch.equal(first_params[name], again_params[name]), name
    assert all(torch.isfinite(x).all() for x in first)
    assert not torch.equal(first[0], other[0]), "another seed should draw other masks"


def _grjca_loss(model, features):
    outputs, gates = model(*features, return_gates=True)
    return sum(o.square().mean() for o in outputs) + sum(s.mean() for s in gates["stage"]), outputs


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_grjca_compiles_fullgraph(mode):
    """torch.compile(fullgraph=True) of GRJCA on the Triton backend: the forward traces without a graph break
    (fullgraph raises on one) and AOTAutograd builds the backward from the custom ops' autograd formulas. In eval mode
    the compiled step matches eager, outputs and parameter gradients. ``backend="aot_eager"`` runs the same Dynamo
    capture and AOTAutograd as the default backend, minus Inductor's code generation, which alone takes over a
    minute on a CPU-only machine."""
    model, _ = _twins("GRJCA", 2, torch.float32, dropout=0.6)
    model.train(mode == "train")
    features = [x.requires_grad_(True) for x in _features(2, torch.float32)]
    torch._dynamo.reset()
    compiled = torch.compile(_grjca_loss, fullgraph=True, backend="aot_eager")
    loss, outputs = compiled(model, features)
    loss.backward()
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(torch.isfinite(o).all() for o in outputs)
    assert all(torch.isfinite(g).all() for g in compiled_grads.values())
    if mode == "eval":
        model.zero_grad(set_to_none=True)
        eager_loss, eager_outputs = _grjca_loss(model, features)
        eager_loss.backward()
        for a, b in zip(outputs, eager_outputs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(compiled_grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
