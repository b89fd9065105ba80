"""An ordinary install gets the fused cpp backend (issue 13, item 4).

pip's default build is isolated and has no torch, so it builds no extension; the package then carries ``csrc/`` and
compiles ``avkernels._C_cpu`` against the installed torch the first time dispatch asks for the cpp backend. The slow
test checks that route end to end from a fresh venv (``pip install <path>``, then the wheel of a ``git+file://``
clone); the others check, in this process and without compiling, what happens when that build cannot run.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch

import avkernels
from avkernels.ops import native
from avkernels.reference import functional as reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "avkernels", "csrc")


@pytest.fixture
def without_cpp(monkeypatch):
    """This process as if no prebuilt extension had imported and the build on first use had not been tried yet."""
    monkeypatch.setattr(native, "_LIBRARIES", {k: v for k, v in native._LIBRARIES.items() if k != "cpp"})
    monkeypatch.setattr(native, "_IMPORT_ERRORS", {**native._IMPORT_ERRORS, "cpp": "No module named 'x'"})
    monkeypatch.setattr(native, "_JIT_TRIED", False)
    monkeypatch.setattr(native, "_JIT_FAILURE", None)
    monkeypatch.delenv("AVKERNELS_BACKEND", raising=False)


def _fallback_warnings(record):
    return [w for w in record if "falls back" in str(w.message) or "fall back" in str(w.message)]


def test_no_build_on_first_use_falls_back_with_one_warning(without_cpp, monkeypatch):
    monkeypatch.setenv(native.JIT_ENV_VAR, "0")
    q = torch.randn(2, 3, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = avkernels.tanh_attention(q, q, q)
        avkernels.tanh_attention(q, q, q)
    fallback = _fallback_warnings(record)
    assert len(fallback) == 1, [str(w.message) for w in record]
    assert "reference" in str(fallback[0].message)
    torch.testing.assert_close(first, reference.tanh_attention(q, q, q, 0.5, 0.0, None)[0])
    assert "$AVKERNELS_JIT_BUILD=0" in avkernels.backend_status()["cpp"]
    assert "cpp" not in avkernels.backends()


def test_missing_ninja_is_the_stated_reason(without_cpp, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delenv(native.JIT_ENV_VAR, raising=False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="fall back to the slower reference"):
        reason = avkernels.backend_status()["cpp"]
    assert "needs ninja" in reason and "pip install ninja" in reason


def test_missing_compiler_is_the_stated_reason(without_cpp, monkeypatch):
    monkeypatch.delenv(native.JIT_ENV_VAR, raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="fall back"):
        reason = native._cpp_unavailable()
    assert "needs a C++ compiler" in reason and "/nonexistent/c++" in reason


def test_failed_compile_is_the_stated_reason(without_cpp, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'avkernels__C_cpu'\nmore compiler output")

    monkeypatch.delenv(native.JIT_ENV_VAR, raising=False)
    monkeypatch.setattr(native, "_jit_obstacle", lambda: None)
    monkeypatch.setattr(native, "build_jit", broken)
    with pytest.warns(RuntimeWarning, match="fall back"):
        assert native._cpp_unavailable() is not None
    assert "its build on first use failed (Error building extension 'avkernels__C_cpu')" in native._cpp_unavailable()
    assert native._JIT_TRIED


def test_sources_are_found_in_a_checkout():
    assert native._source_root("cpp", native._config()) in native._SOURCE_ROOTS


def _copy_project(target):
    for name in PROJECT_FILES:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, target / name)


def _venv_site_packages(venv):
    return os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")


FIRST_USE = textwrap.dedent(
    """
    import os, sys, time, warnings
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference fails the test
    import torch
    import avkernels
    from avkernels.ops import native
    from avkernels.reference import functional as reference
    assert avkernels.__file__.startswith(sys.prefix), (avkernels.__file__, sys.prefix)
    assert "cpp" not in native._LIBRARIES, "a prebuilt extension imported: nothing to test"
    start = time.time()
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    out = avkernels.tanh_attention(q, k, v)
    torch.testing.assert_close(out, reference.tanh_attention(q, k, v, 8 ** -0.5, 0.0, None)[0])
    assert avkernels.backend_status()["cpp"] == "available", avkernels.backend_status()["cpp"]
    assert avkernels.backend_status("tanh_attention")["cpp"] == "available"
    print("MODULE", native._LIBRARIES["cpp"])
    print("SECONDS", time.time() - start)
    """
)


@pytest.mark.slow
def test_pip_install_with_build_isolation_gets_the_cpp_backend(tmp_path):
    """A fresh venv, ``pip install <project>`` with build isolation on (pip fetches setuptools into the isolated
    build), then a first call that compiles the extension and runs it, and a second process that reuses the build.

    The venv sees the torch of this interpreter through a .pth line, not through --system-site-packages: that would
    also run the site-packages' .pth files, among them the editable finder of a development install of avkernels,
    which would hand the venv the checkout's prebuilt extension.
    """
    pytest.importorskip("setuptools")
    if shutil.which("ninja") is None:
        pytest.skip("ninja is not installed: the build on first use needs it (its absence is tested above)")
    project, clone_source = tmp_path / "project", tmp_path / "repository"
    project.mkdir()
    _copy_project(project)
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(_venv_site_packages(venv), "torch_from_host.pth"), "w") as f:
        f.write(torch_site + "\n")
    python = os.path.join(venv, "bin", "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "AVKERNELS_", "PYTHON"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))

    install = subprocess.run(
        [python, "-m", "pip", "install", str(project)], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=900,
    )
    if install.returncode != 0 and "No matching distribution found for setuptools" in install.stderr:
        pytest.skip("PyPI is not reachable: an isolated build cannot fetch setuptools")
    assert install.returncode == 0, install.stdout + install.stderr
    assert "Requirement already satisfied: torch" in install.stdout, install.stdout  # never another torch
    installed = os.path.join(_venv_site_packages(venv), "avkernels")
    assert os.path.isfile(os.path.join(installed, "csrc", "cpu", "library.cpp"))
    assert os.path.isfile(os.path.join(installed, "csrc", "common", "philox.h"))
    assert not [n for n in os.listdir(installed) if n.startswith("_C_cpu")], "the isolated build had a torch?"

    runs = []
    for _ in range(2):
        run = subprocess.run(
            [python, "-c", FIRST_USE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
        assert run.returncode == 0, run.stdout + run.stderr
        runs.append(run)
    first, second = runs
    assert first.stderr.count("avkernels: compiling the C++ CPU kernels for torch") == 1, first.stderr
    assert "compiling" not in second.stderr, second.stderr  # the second process loads the cached build
    module = [line.split(" ", 1)[1] for line in first.stdout.splitlines() if line.startswith("MODULE ")]
    assert module and module[0].startswith(str(tmp_path / "extensions")), first.stdout
    assert f"MODULE {module[0]}" in second.stdout

    # `pip install git+URL` builds from a clone, which holds only tracked files: its wheel must carry the sources too.
    if shutil.which("git") is None:
        return
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(clone_source)], check=True, timeout=60)
    _copy_project(clone_source)
    subprocess.run(git + ["add", "-A"], cwd=clone_source, check=True, timeout=60)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=clone_source, check=True, timeout=60)
    wheels = tmp_path / "wheels"
    wheel = subprocess.run(
        [python, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), f"git+file://{clone_source}"], env=env,
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    (built,) = wheels.glob("avkernels-*.whl")
    names = zipfile.ZipFile(built).namelist()
    assert "avkernels/csrc/cpu/library.cpp" in names and "avkernels/csrc/common/philox.h" in names, names
    assert not [n for n in names if "_C_cpu" in n], names
