"""JCA, RJCA, DCA and GRJCA (SPEC 2-3) against the independent implementation in tests/reference_spec.py.

The modules run on the "reference" backend here; each test maps the module's ``nn.Linear`` parameters to the SPEC's
orientation (``W = linear.weight.T``) and feeds them to ``reference_spec``.
"""

import itertools

import pytest
import torch

import avkernels
import reference_spec as spec  # tests/ is on sys.path (pytest's rootdir-less conftest layout)

F64 = torch.float64
MODELS = {"JCA": avkernels.JCA, "RJCA": avkernels.RJCA, "DCA": avkernels.DCA, "GRJCA": avkernels.GRJCA}
DIMS = {2: (3, 5), 3: (2, 3, 4)}  # small, odd, unequal feature sizes
L = 5


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def build(name, dims=(3, 5), seq_len=L, **kwargs):
    """A fp64 module on the reference backend with every parameter (biases included) drawn at random."""
    model = MODELS[name](dims, seq_len, backend="reference", **kwargs).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def features(dims, batch=2, seq_len=L, requires_grad=False):
    return [torch.randn(batch, seq_len, d, dtype=F64, requires_grad=requires_grad) for d in dims]


# ----------------------------------------------------------------------------------------------------------------
# Mapping module parameters to the SPEC's orientation
# ----------------------------------------------------------------------------------------------------------------


def _t(linear):
    return linear.weight.T


def block_params(block, form):
    if form == "dense":
        return {
            "Wq": _t(block.query),
            "bq": block.query.bias,
            "Wk": [_t(lin) for lin in block.keys],
            "bk": [lin.bias for lin in block.keys],
            "Wv": [_t(lin) for lin in block.values],
            "bv": [lin.bias for lin in block.values],
            "Wh": [_t(lin) for lin in block.outputs],
            "bh": [lin.bias for lin in block.outputs],
        }
    return {
        "Wj": [_t(lin) for lin in block.keys],
        "Wc": [_t(lin) for lin in block.correlations],
        "Wa": [_t(lin) for lin in block.inputs],
        "Wh": [_t(lin) for lin in block.outputs],
    }


def gate_params(gates):
    return [(_t(g.linear), g.linear.bias) for g in gates]


def spec_forward(model, X, name, form, **options):
    """Runs reference_spec.fusion with ``model``'s parameters."""
    T = model.iterations
    per_iter = [model.blocks[0 if model.share_weights else t] for t in range(T)]
    kwargs = dict(model=name, tau=options.get("tau", 0.1), tau_s=options.get("stage_tau", 0.1))
    if name == "DCA":
        kwargs["final_gates"] = gate_params(model.final_gates)
    if name == "GRJCA":
        kwargs["iteration_gates"] = [
            gate_params(model.iteration_gates[0 if model.share_weights else t]) for t in range(T)
        ]
        kwargs["stage_gates"] = gate_params(model.stage_gates)
        kwargs["gate_unattended"] = options.get("gate_unattended", "previous")
        kwargs["stage_include_input"] = options.get("stage_include_input", False)
    return spec.fusion(X, [block_params(b, form) for b in per_iter], form, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Shapes and parameter counts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_output_shapes(name, n_mod, form):
    dims = DIMS[n_mod]
    model = MODELS[name](dims, L, form=form, backend="reference")
    X = [torch.randn(4, L, d) for d in dims]
    out = model(*X)
    assert isinstance(out, tuple) and len(out) == n_mod
    for o, d in zip(out, dims):
        assert o.shape == (4, L, d) and o.dtype == torch.float32


def test_parameter_counts():
    # Dense block, dims (512, 512), L = 16, d = 1024; every nn.Linear has a bias:
    #   W_q  Linear(1024, 1024):        1024*1024 + 1024 = 1,049,600
    #   W_km Linear(16, 16)  x 2:       2 * (16*16 + 16)  =       544
    #   W_vm Linear(512, 512) x 2:      2 * (512*512 + 512) =   525,312
    #   W_hm Linear(1024, 512) x 2:     2 * (1024*512 + 512) = 1,049,600
    #   block total                                         = 2,625,056
    block = 2_625_056
    assert n_params(avkernels.JCA((512, 512), 16)) == block
    # RJCA: T = 2 blocks, weights not shared.
    assert n_params(avkernels.RJCA((512, 512), 16)) == 2 * block == 5_250_112
    # DCA: RJCA + one gate Linear(512, 2) per modality = 2 * (512*2 + 2) = 2,052.
    gates = 2 * (512 * 2 + 2)
    assert n_params(avkernels.DCA((512, 512), 16)) == 2 * block + gates == 5_252_164
    # GRJCA: per iteration a block and two gates (2 * 2,052), then one stage gate Linear(2*512, 2) per modality
    #   = 2 * (1024*2 + 2) = 4,100.
    stage = 2 * (2 * 512 * 2 + 2)
    assert n_params(avkernels.GRJCA((512, 512), 16)) == 2 * (block + gates) + stage == 5_258_316
    # Shared weights: one block, one set of iteration gates, the stage gate unchanged.
    assert n_params(avkernels.GRJCA((512, 512), 16, share_weights=True)) == block + gates + stage == 2_631_208
    # Inputs as a stage candidate: stage gate Linear(3*512, 3) per modality = 2 * (1536*3 + 3) = 9,222.
    assert n_params(avkernels.GRJCA((512, 512), 16, stage_include_input=True)) == 2 * (block + gates) + 9_222
    # Additive block, k = 32, no biases: W_jm 2*16*16 = 512, W_cm 2*1024*32 = 65,536, W_am 2*16*32 = 1,024,
    #   W_hm 2*32*16 = 1,024; total 68,096.
    assert n_params(avkernels.JCA((512, 512), 16, form="additive")) == 68_096
    # Three modalities dims (4, 5, 6), L = 3, d = 15: W_q 15*15+15 = 240; W_km 3*(9+3) = 36;
    #   W_vm (16+4)+(25+5)+(36+6) = 92; W_hm (15*4+4)+(15*5+5)+(15*6+6) = 240; total 608.
    assert n_params(avkernels.JCA((4, 5, 6), 3)) == 608


def test_default_iterations_and_initialisation():
    assert avkernels.JCA((3, 5), L).iterations == 1
    for name in ("RJCA", "DCA", "GRJCA"):
        assert MODELS[name]((3, 5), L).iterations == 2
    model = avkernels.GRJCA((3, 5), L)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in linears)  # official init: zero biases
    assert all(lin.weight.abs().max() > 0 for lin in linears)


# ----------------------------------------------------------------------------------------------------------------
# Values against the SPEC implementation
# ----------------------------------------------------------------------------------------------------------------


def _assert_outputs(out, expected):
    assert len(out) == len(expected)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_spec(name, n_mod, form):
    dims = DIMS[n_mod]
    model = build(name, dims, form=form).eval()
    X = features(dims, batch=3)
    out = model(*X)
    expected, _ = spec_forward(model, X, name, form)
    _assert_outputs(out, expected)


@pytest.mark.parametrize("name", ["DCA", "GRJCA"])
def test_non_contiguous_features(name):
    model = build(name, form="dense").eval()
    X = [torch.randn(2, d, L, dtype=F64).transpose(1, 2) for d in (3, 5)]  # (B, L, d_m) views of (B, d_m, L)
    assert not any(x.is_contiguous() for x in X)
    _assert_outputs(model(*X), spec_forward(model, X, name, "dense")[0])


@pytest.mark.parametrize("form", ["dense", "additive"])
def test_float32_close_to_spec(form):
    model = build("GRJCA", (3, 5, 4), form=form, tau=0.5, stage_tau=0.5).eval()
    X = features((3, 5, 4), batch=3)
    expected, _ = spec_forward(model, X, "GRJCA", form, tau=0.5, stage_tau=0.5)
    out = model.float()(*[x.float() for x in X])
    for o, e in zip(out, expected):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("name", ["RJCA", "GRJCA"])
def test_iterations_match_spec(name, iterations):
    model = build(name, iterations=iterations).eval()
    X = features((3, 5))
    _assert_outputs(model(*X), spec_forward(model, X, name, "dense")[0])


def test_additive_hidden_size():
    model = build("JCA", form="additive", hidden=7).eval()
    assert model.blocks[0].correlations[0].weight.shape == (7, 8)
    X = features((3, 5))
    _assert_outputs(model(*X), spec_forward(model, X, "JCA", "additive")[0])


GRJCA_OPTIONS = [
    dict(gate_unattended=gu, stage_include_input=si, share_weights=sw)
    for gu, si, sw in itertools.product(["previous", "original"], [False, True], [False, True])
]


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("options", GRJCA_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_grjca_options_match_spec(options, form):
    # Distinct temperatures check that tau goes to the iteration gates and stage_tau to the stage gate.
    model = build("GRJCA", form=form, tau=0.7, stage_tau=0.3, **options).eval()
    X = features((3, 5))
    out, gates = model(*X, return_gates=True)
    expected, expected_gates = spec_forward(model, X, "GRJCA", form, tau=0.7, stage_tau=0.3, **options)
    _assert_outputs(out, expected)
    for got, want in zip(gates["iterations"], expected_gates["iterations"]):
        _assert_outputs(got, want)
    _assert_outputs(gates["stage"], expected_gates["stage"])


def test_dca_tau_matches_spec():
    model = build("DCA", tau=0.45).eval()
    X = features((3, 5))
    out, gates = model(*X, return_gates=True)
    expected, expected_gates = spec_forward(model, X, "DCA", "dense", tau=0.45)
    _assert_outputs(out, expected)
    _assert_outputs(gates["final"], expected_gates["final"])


def test_gate_unattended_option_matters():
    # Guards against an option that is accepted but ignored: with the same weights, the two readings differ.
    X = features((3, 5))
    previous = build("GRJCA").eval()
    original = build("GRJCA", gate_unattended="original").eval()
    original.load_state_dict(previous.state_dict())
    assert not torch.allclose(previous(*X)[0], original(*X)[0])


def test_share_weights_reuses_one_block():
    model = build("RJCA", share_weights=True, iterations=3).eval()
    assert len(model.blocks) == 1
    X = features((3, 5))
    once = model.blocks[0](X)
    thrice = model.blocks[0](model.blocks[0](once))
    _assert_outputs(model(*X), thrice)


# ----------------------------------------------------------------------------------------------------------------
# return_gates
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_return_gates(name):
    dims, B = DIMS[3], 4
    model = build(name, dims, iterations=3 if name != "JCA" else 1).eval()
    X = features(dims, batch=B)
    out, gates = model(*X, return_gates=True)
    _assert_outputs(out, model(*X))  # return_gates does not change the outputs
    expected_out, expected = spec_forward(model, X, name, "dense")
    _assert_outputs(out, expected_out)
    if name in ("JCA", "RJCA"):
        assert gates == {}
        return
    if name == "DCA":
        assert set(gates) == {"final"}
        assert len(gates["final"]) == 3
        assert all(g.shape == (B, L, 2) for g in gates["final"])
        _assert_outputs(gates["final"], expected["final"])
        return
    assert set(gates) == {"iterations", "stage"}
    assert len(gates["iterations"]) == 3 and all(len(per_t) == 3 for per_t in gates["iterations"])
    assert all(g.shape == (B, L, 2) for per_t in gates["iterations"] for g in per_t)
    assert len(gates["stage"]) == 3 and all(s.shape == (B, L, 3) for s in gates["stage"])
    for got, want in zip(gates["iterations"], expected["iterations"]):
        _assert_outputs(got, want)
    _assert_outputs(gates["stage"], expected["stage"])
    for g in [*itertools.chain(*gates["iterations"]), *gates["stage"]]:
        torch.testing.assert_close(g.sum(-1), torch.ones(B, L, dtype=F64))


def test_return_gates_stage_include_input():
    model = build("GRJCA", stage_include_input=True).eval()
    _, gates = model(*features((3, 5)), return_gates=True)
    assert all(s.shape == (2, L, 3) for s in gates["stage"])  # T + 1 candidates


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gradcheck_inputs(name, form):
    dims = (2, 3)
    model = build(name, dims, seq_len=3, form=form, hidden=3).eval()
    X = features(dims, batch=2, seq_len=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: model(*x), X)


def test_gradcheck_parameters_grjca():
    # One parameter of each kind (block, iteration gate, stage gate); every parameter's gradient is also compared
    # with the SPEC implementation's in test_gradients_match_spec.
    dims = (2, 3)
    model = build("GRJCA", dims, seq_len=3, tau=0.5, stage_tau=0.5).eval()
    X = tuple(features(dims, batch=2, seq_len=3))
    checked = [
        "blocks.0.query.weight", "blocks.1.keys.0.bias", "blocks.0.values.1.weight", "blocks.1.outputs.0.weight",
        "iteration_gates.0.1.linear.weight", "iteration_gates.1.0.linear.bias",
        "stage_gates.0.linear.weight", "stage_gates.1.linear.bias",
    ]
    params = dict(model.named_parameters())
    leaves = tuple(params[n].detach().clone().requires_grad_() for n in checked)

    def fn(*ps):
        return torch.func.functional_call(model, {**params, **dict(zip(checked, ps))}, X)

    assert torch.autograd.gradcheck(fn, leaves)


def test_gradients_match_spec():
    model = build("GRJCA", gate_unattended="original", stage_include_input=True, tau=0.6, stage_tau=0.8).eval()
    X = features((3, 5), requires_grad=True)
    out = model(*X)
    weights = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), [*X, *model.parameters()])
    expected_out, _ = spec_forward(
        model, X, "GRJCA", "dense", gate_unattended="original", stage_include_input=True, tau=0.6, stage_tau=0.8
    )
    expected = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(expected_out, weights)), [*X, *model.parameters()]
    )
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Dropout, determinism
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_train_mode_is_random_eval_mode_is_deterministic(name, form):
    model = build(name, form=form, dropout=0.5)
    X = features((3, 5))
    model.train()
    a, b = model(*X), model(*X)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    model.eval()
    a, b = model(*X), model(*X)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    _assert_outputs(a, spec_forward(model, X, name, form)[0])


@pytest.mark.parametrize("form", ["dense", "additive"])
def test_train_mode_without_dropout_equals_eval(form):
    model = build("GRJCA", form=form, dropout=0.0)
    X = features((3, 5))
    train_out = model.train()(*X)
    eval_out = model.eval()(*X)
    assert all(torch.equal(x, y) for x, y in zip(train_out, eval_out))


def test_residual_dropout_rate_and_scaling():
    # Dense block with W_h = 0 and b_h = 5: ReLU(H W_h + b_h) = 5 everywhere, so X' - X = Drop_p(5) takes the values
    # 0 and 5/(1-p) only, and the fraction kept is 1-p (6-sigma bound).
    p, dims, B = 0.6, (3, 5), 100
    model = build("JCA", dims, dropout=p)
    with torch.no_grad():
        for lin in model.blocks[0].outputs:
            lin.weight.zero_()
            lin.bias.fill_(5.0)
    X = features(dims, batch=B)
    out = model.train()(*X)
    delta = torch.cat([(o - x).flatten() for o, x in zip(out, X)])
    kept = torch.isclose(delta, torch.tensor(5.0 / (1 - p), dtype=F64), rtol=1e-9, atol=0)
    dropped = delta.abs() < 1e-9
    assert torch.logical_or(kept, dropped).all()
    n = delta.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 6 * ((p * (1 - p) / n) ** 0.5)


# ----------------------------------------------------------------------------------------------------------------
# NaN and empty inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_nan_propagates_within_its_sample(name, form):
    # A NaN in one feature of one sample reaches every output of that sample (through J and the (d_m x d) maps)
    # and nothing of the other samples.
    model = build(name, form=form).eval()
    X = features((3, 5))
    X[0][0, 2, 1] = float("nan")
    for o in model(*X):
        assert torch.isnan(o[0]).all()
        assert not torch.isnan(o[1]).any()


@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_empty_batch(name, form):
    model = build(name, form=form)
    X = features((3, 5), batch=0, requires_grad=True)
    out, gates = model(*X, return_gates=True)
    assert [o.shape for o in out] == [(0, L, 3), (0, L, 5)]
    sum(o.sum() for o in out).backward()
    assert all(x.grad.shape == x.shape for x in X)
