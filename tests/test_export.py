"""ONNX export with the default backends: every fusion (both forms) and the full models export to standard ONNX
operators, and ONNX Runtime reproduces PyTorch at batch sizes other than the one exported with.

The exporters need the optional ``onnx`` extra (onnx, onnxscript, onnxruntime); without it these tests skip and say
so. The tests of what export registers (nothing global) and of the compiled paths need none of it.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

import avkernels
from avkernels import export as avexport
from avkernels.models import AVRegressor, CrossAttentionClassifier, ModalitySpec, SelfAttentionClassifier

MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(
    bool(MISSING), reason=f"ONNX export tests need {', '.join(MISSING)} (pip install 'avkernels[onnx]')"
)

FUSIONS = {"jca": avkernels.JCA, "rjca": avkernels.RJCA, "dca": avkernels.DCA, "grjca": avkernels.GRJCA}
DIMS, L = (8, 6), 4

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _features(batch, dims=DIMS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, L, d, generator=g) for d in dims)


def _fusion(name, form):
    torch.manual_seed(0)
    # Dropout on: eval mode must drop it from the graph; GRJCA with the inputs as a stage exercises T + 1 stages.
    extra = {"stage_include_input": True} if name == "grjca" else {}
    return FUSIONS[name](DIMS, L, form=form, dropout=0.4, **extra)


def _assert_standard_onnx(path):
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(model)
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard domains in the graph: {domains}"
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"Dropout", "RandomUniformLike", "RandomUniform", "Bernoulli"}, ops


def _assert_matches_torch(model, path, batches=(1, 5)):
    for batch in batches:
        x = _features(batch, seed=batch)
        with torch.no_grad():
            expected = model(*x)
        got = avexport.run_onnx(path, x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape)
            np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5)


def test_the_default_cpu_backend_is_what_gets_exported():
    # What the issue reported: export failed with the default backend, cpp when built. Record which one ran here.
    status = avkernels.backend_status("tanh_attention")
    assert status["reference"] == "available"
    if "cpp" not in avkernels.backends():
        pytest.skip(f"the cpp backend is not built here ({status.get('cpp')}); the export tests ran on the reference")


@needs_onnx
@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("name", list(FUSIONS))
def test_fusion_exports_and_runs_in_onnxruntime(tmp_path, name, form):
    import onnx

    model = _fusion(name, form)
    path = str(tmp_path / f"{name}.onnx")
    avexport.export_onnx(model, _features(3), path)
    assert model.training, "export_onnx must restore training mode"
    model.eval()
    _assert_standard_onnx(path)
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["video", "audio"]
    assert [o.name for o in graph.output] == ["video_fused", "audio_fused"]
    _assert_matches_torch(model, path)


@needs_onnx
@pytest.mark.parametrize("spatial", [False, True])
def test_av_regressor_exports_and_runs_in_onnxruntime(tmp_path, spatial):
    torch.manual_seed(0)
    kwargs = dict(spatial_attention=True, spatial_channels=2, spatial_positions=4) if spatial else {}
    model = AVRegressor(DIMS, L, fusion="grjca", encoder_layers=1, joint_dim=8, joint_layers=1, head_hidden=4,
                        **kwargs).eval()
    path = str(tmp_path / "regressor.onnx")
    avexport.export_onnx(model, _features(1, model.input_dims), path)  # a batch of 1 must not fix the axis
    _assert_standard_onnx(path)
    import onnx

    assert [o.name for o in onnx.load(path).graph.output] == ["valence", "arousal"]
    for batch in (1, 4):
        x = _features(batch, model.input_dims, seed=batch)
        with torch.no_grad():
            expected = model(*x)
        for g, e in zip(avexport.run_onnx(path, x), expected):
            np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5)


@needs_onnx
@pytest.mark.parametrize("cls", [SelfAttentionClassifier, CrossAttentionClassifier])
def test_iemocap_classifiers_export(tmp_path, cls):
    torch.manual_seed(0)
    specs = {"video": ModalitySpec(6, 5), "audio": ModalitySpec(8, 4)}
    model = cls(("video", "audio"), specs=specs, rnn_hidden=6, num_heads=2, fc_hidden=5).eval()
    x = (torch.randn(3, 6, 5), torch.randn(3, 8, 4))
    path = str(tmp_path / "classifier.onnx")
    avexport.export_onnx(model, x, path)
    _assert_standard_onnx(path)
    import onnx

    graph = onnx.load(path).graph
    assert ([i.name for i in graph.input], [o.name for o in graph.output]) == (["video", "audio"], ["logits"])
    x = (torch.randn(2, 6, 5), torch.randn(2, 8, 4))
    with torch.no_grad():
        expected = model(*x)
    np.testing.assert_allclose(avexport.run_onnx(path, x)[0], expected.numpy(), rtol=1e-4, atol=1e-5)


@needs_onnx
@pytest.mark.parametrize("name", ["dca", "grjca"])
def test_plain_torch_onnx_export_works_with_the_default_backend(tmp_path, name):
    # No helper: what a user who only imported avkernels would write, with either of torch's exporters.
    model = _fusion(name, "dense").eval()
    batch = torch.export.Dim("batch")
    path = str(tmp_path / "dynamo.onnx")
    torch.onnx.export(model, _features(3), path, dynamo=True, external_data=False,
                      dynamic_shapes=(({0: batch}, {0: batch}),))
    _assert_standard_onnx(path)
    _assert_matches_torch(model, path)

    path = str(tmp_path / "torchscript.onnx")
    torch.onnx.export(model, _features(3), path, dynamo=False, opset_version=17, input_names=["video", "audio"],
                      dynamic_axes={"video": {0: "batch"}, "audio": {0: "batch"}})
    _assert_standard_onnx(path)
    _assert_matches_torch(model, path)


def test_missing_optional_dependencies_are_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(avexport.ExportError, match=r"onnxscript.*avkernels\[onnx\]"):
        avexport.export_onnx(_fusion("jca", "dense"), _features(2), os.devnull)


def test_nothing_global_is_registered_and_torch_export_keeps_the_fused_ops():
    # ONNX export needs no entry in torch's decomposition table: Inductor reads that table too, and with $CI set it
    # refuses to fall back to an op that has one ("make_fallback(...): a decomposition exists").
    from torch._decomp import decomposition_table

    assert not [op for op in decomposition_table if str(op).startswith("avkernels.")]
    model = _fusion("grjca", "dense").eval()
    x = _features(2)
    program = avexport.export_program(model, x).run_decompositions()
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    if "cpp" in avkernels.backends():
        assert "avkernels.tanh_attention.default" in targets and "avkernels.stage_gate.default" in targets
    with torch.no_grad():
        for got, expected in zip(program.module()(*x), model(*x)):
            torch.testing.assert_close(got, expected)


def test_ops_take_the_reference_path_only_while_an_onnx_exporter_traces(monkeypatch):
    from avkernels.dispatch import runs_reference

    assert not runs_reference("cpp") and runs_reference("reference")
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert runs_reference("cpp") and runs_reference("triton")
    with pytest.raises(avexport.ExportError, match=r"tanh_attention: dropout_p=0.4 at ONNX export; call model.eval"):
        runs_reference("cpp", 0.4, "tanh_attention")
    model = _fusion("dca", "dense").train()  # dropout on: the exporter must be told, not given a wrong graph
    with pytest.raises(avexport.ExportError, match="call model.eval"):
        model(*_features(2))


def test_compile_with_dynamic_shapes_still_runs_the_fused_op():
    # Dynamic sizes: FakeTensor runs the ops' fakes on symbolic sizes; training (dropout) and eval both compile.
    model = _fusion("grjca", "dense")
    compiled = torch.compile(model, dynamic=True, backend="aot_eager")
    for batch in (2, 3):
        out = compiled(*_features(batch))
        assert all(o.shape == (batch, L, d) for o, d in zip(out, DIMS))
        sum(o.sum() for o in out).backward()
    model.eval()
    with torch.no_grad():
        x = _features(4)
        expected = model(*x)
        for got, e in zip(compiled(*x), expected):
            torch.testing.assert_close(got, e)


@needs_onnx
def test_export_command_on_a_checkpoint(tmp_path, capsys):
    from avkernels.__main__ import main

    torch.manual_seed(0)
    kwargs = dict(dims=DIMS, seq_len=L, fusion="rjca", fusion_kwargs={"form": "additive", "backend": "reference"},
                  encoder_layers=1, joint_dim=8, joint_layers=1, head_hidden=4)
    model = AVRegressor(**kwargs)
    checkpoint = str(tmp_path / "best.pt")
    torch.save({"model": model.state_dict(), "model_config": {"class": "AVRegressor", "kwargs": kwargs},
                "data_config": {"dataset": "synthetic"}}, checkpoint)
    path = str(tmp_path / "model.onnx")
    assert main(["export", checkpoint, path]) == 0
    assert "max abs difference" in capsys.readouterr().out
    _assert_standard_onnx(path)
    x = _features(4, seed=4)
    with torch.no_grad():
        expected = model.eval()(*x)
    for g, e in zip(avexport.run_onnx(path, x), expected):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5)
    assert main(["export", str(tmp_path / "missing.pt"), path]) == 2
