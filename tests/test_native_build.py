"""The build path: a failed or impossible compile of an extension never fails the install.

Each test copies setup.py, its build config and a one-file csrc/ into a temporary directory and builds there (no
install, so nothing outside the temporary directory changes): ``build_ext --inplace`` and the PEP 660 editable
wheel that ``pip install -e`` builds must both succeed, report the failure, and leave the backend unbuilt.
"""

import os
import shutil
import subprocess
import sys

import pytest

import avkernels
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


def test_native_backends_report_their_status():
    status = avkernels.backend_status()
    for name, module in (("cpp", "avkernels._C_cpu"), ("cuda", "avkernels._C_cuda")):
        assert (name in avkernels.backends()) == (status[name] == "available"), (name, status[name])
        if name not in native._LIBRARIES:
            assert f"{module} was not built" in status[name]


def test_build_jit_rejects_unknown_backend():
    with pytest.raises(ValueError, match="expected 'cpp' or 'cuda'"):
        native.build_jit("rocm")


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
