"""The build path: a failed or impossible compile of an extension never fails the install, a successful one says
why and how long; the native backends come from data (``native.LIBRARIES``), and asking whether one can run never
builds anything.

The build tests copy setup.py, its build config and a one-file csrc/ into a temporary directory and build there (no
install, so nothing outside the temporary directory changes): ``build_ext --inplace`` and the PEP 660 editable
wheel that ``pip install -e`` builds must both succeed, report the failure, and leave the backend unbuilt.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import avkernels
from avkernels.__main__ import main
from avkernels.ops import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_with(tmp_path, source: str):
    (tmp_path / "avkernels").mkdir()
    (tmp_path / "avkernels" / "__init__.py").write_text("")
    shutil.copy(os.path.join(ROOT, "avkernels", "_build_config.py"), tmp_path / "avkernels")
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path)
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path)
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "only.cpp").write_text(source)
    return tmp_path


def _run(cwd, args, env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "case, source, env",
    [
        ("broken source", "this is not C++;\n", {}),
        ("no compiler", '#include <torch/extension.h>\n', {"CXX": "/nonexistent/c++", "CC": "/nonexistent/cc"}),
    ],
)
def test_failed_extension_build_never_fails_the_install(tmp_path, case, source, env):
    project = _project_with(tmp_path, source)
    environment = {**os.environ, **env}
    inplace = _run(project, ["setup.py", "build_ext", "--inplace"], environment)
    assert inplace.returncode == 0, f"{case}: build_ext --inplace failed:\n{inplace.stdout}\n{inplace.stderr}"
    assert "could not build avkernels._C_cpu" in inplace.stderr
    assert not list((project / "avkernels").glob("_C_cpu*"))
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    build_editable = f"from setuptools import build_meta; build_meta.build_editable({str(wheel_dir)!r})"
    editable = _run(project, ["-c", build_editable], environment)
    assert editable.returncode == 0, f"{case}: editable wheel failed:\n{editable.stdout}\n{editable.stderr}"
    assert list(wheel_dir.glob("avkernels-*.whl"))


def test_a_successful_install_build_says_why_and_how_long(tmp_path):
    project = _project_with(tmp_path, 'extern "C" int avkernels_build_test() { return 1; }\n')
    inplace = _run(project, ["setup.py", "build_ext", "--inplace"], dict(os.environ))
    assert inplace.returncode == 0, inplace.stdout + inplace.stderr
    lines = [line for line in inplace.stderr.splitlines() if line.startswith("avkernels: built")]
    assert len(lines) == 1, inplace.stderr
    assert re.fullmatch(r"avkernels: built avkernels\._C_cpu for torch \S+ \(the install's build had torch\) in \d+ s",
                        lines[0]), lines[0]


def test_native_backends_report_their_status():
    status = avkernels.backend_status()
    for lib in native.LIBRARIES:
        name = lib.backend
        assert (name in avkernels.backends()) == (status[name] == "available"), (name, status[name])
        if name not in native._LIBRARIES:
            assert f"{native._module(lib)} was not built" in status[name]


def test_build_rejects_unknown_backend(capsys):
    with pytest.raises(ValueError, match="expected one of 'cpp', 'cuda', got 'rocm'"):
        avkernels.build("rocm")
    assert main(["build", "rocm"]) == 1
    assert capsys.readouterr().err.strip() == (
        "python -m avkernels build: error: backend: expected one of 'cpp', 'cuda', got 'rocm'")


def test_build_returns_the_loaded_library(capsys):
    if "cpp" not in native._LIBRARIES:
        pytest.skip(f"the cpp library is not loaded: {avkernels.backend_status()['cpp']}")
    assert main(["build"]) == 0
    assert capsys.readouterr() == (f"cpp: {native._LIBRARIES['cpp']}\n", "")


def test_availability_is_a_lookup_that_never_builds(monkeypatch):
    """Dispatch asks whether each backend can run on every call, inside torch.compile's traced region too: the
    answer was settled at import, and nothing a call reaches may compile, load or import a library."""
    def forbidden(*args, **kwargs):
        raise AssertionError("dispatch tried to build or load a library")

    for name in ("_compile", "_from_cache", "_load_file", "_import_prebuilt", "_load_cached", "build", "_settle"):
        monkeypatch.setattr(native, name, forbidden)
    monkeypatch.setattr(native, "_LIBRARIES", {})  # also when no library is loaded
    q = torch.randn(2, 3, 4)
    torch.testing.assert_close(avkernels.tanh_attention(q, q, q), avkernels.tanh_attention(q, q, q, backend="reference"))
    assert "cpp" not in avkernels.backends()
    compiled = torch.compile(lambda x: avkernels.tanh_attention(x, x, x), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q), avkernels.tanh_attention(q, q, q, backend="reference"))


def test_native_py_has_no_code_for_one_backend():
    """Every backend-specific fact is in a record of LIBRARIES: no comparison anywhere in native.py names one."""
    import ast

    names = {lib.backend for lib in native.LIBRARIES} | {lib.config for lib in native.LIBRARIES}
    tree = ast.parse(open(native.__file__).read())
    compared = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, (ast.Compare, ast.Dict))
                and any(isinstance(c, ast.Constant) and c.value in names for c in ast.walk(node))]
    assert not compared, compared


def test_the_library_defines_the_declared_ops(monkeypatch):
    """The C++ schemas (csrc/cpu/library.cpp) are the declarations' (avkernels/ops/<op>.py), and a difference is
    named op by op: a library built from other sources is refused rather than called with the wrong arguments."""
    import dataclasses

    from avkernels.ops import declaration

    if "cpp" not in native._LIBRARIES:
        pytest.skip(f"the cpp library is not loaded: {avkernels.backend_status()['cpp']}")
    assert declaration.library_schema_mismatch() is None
    gate = next(d for d in declaration.declarations() if d.name == "gate")
    changed = dataclasses.replace(gate, schema="(Tensor attended, Tensor unattended, float tau) -> (Tensor, Tensor)")
    monkeypatch.setitem(declaration._DECLARATIONS, "gate", changed)
    mismatch = declaration.library_schema_mismatch()
    assert mismatch.startswith("gate is avkernels::gate(Tensor attended, Tensor unattended, Tensor weight, ")
    assert "expected avkernels::gate(Tensor attended, Tensor unattended, float tau) -> (Tensor, Tensor)" in mismatch
    assert "tanh_attention" not in mismatch and "gate_backward" not in mismatch
