"""The supported triton range (avkernels/ops/triton/_compat.py): an older triton makes the backend unavailable with
the reason, instead of failing later inside Triton's compiler; the installed one (3.9 in the main environment, 3.6 in
the oldest-triton environment of ``make test``) is supported."""

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

import avkernels  # noqa: E402
from avkernels.ops.triton import _compat  # noqa: E402

registry = importlib.import_module("avkernels.dispatch")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "version, parsed",
    [("3.6.0", (3, 6, 0)), ("3.9.0+git1a2b3c", (3, 9, 0)), ("3.10.0rc1", (3, 10, 0)), ("3.5", (3, 5)), ("dev", ())],
)
def test_parse_version(version, parsed):
    assert _compat.parse_version(version) == parsed


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.9.0", "3.10.0"])
def test_supported_versions(version):
    assert _compat.version_reason(version) is None


@pytest.mark.parametrize("version", ["3.5.1", "3.3.0", "2.3.1", "nightly"])
def test_unsupported_versions_say_why(version):
    reason = _compat.version_reason(version)
    assert reason is not None and version in reason and "3.6" in reason


def test_installed_triton_is_supported():
    assert _compat.version_reason(triton.__version__) is None
    assert avkernels.backend_status()["triton"] == "available"  # the interpreter stands in for a GPU here


def test_older_triton_makes_the_backend_unavailable(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    status = avkernels.backend_status()["triton"]
    assert "triton 3.5.1 is older than 3.6" in status
    assert "triton" not in avkernels.backends()
    with pytest.raises(RuntimeError, match=r"backend 'triton' .* triton 3\.5\.1 is older than 3\.6"):
        registry.resolve("triton", registry.Inputs("tanh_attention", CPU, torch.float32, {"Mq": 4, "N": 4}))


def test_interpreter_index_fix_only_where_needed():
    from triton.runtime import interpreter

    needed = _compat.parse_version(triton.__version__) < _compat._INDEX_FIX_VERSION
    assert getattr(interpreter._patch_lang_tensor, "_avkernels_fix", False) == needed
    assert _compat.install_interpreter_fixes(triton.__version__) is False  # installed once, at import
    assert _compat.install_interpreter_fixes("3.9.0") is False
