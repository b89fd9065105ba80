"""Install and first use: one build per sources and torch, settled at import, never inside a traced region.

pip's default build is isolated and has no torch, so it builds no extension; the package then carries ``csrc/`` and
``import avkernels`` compiles ``avkernels._C_cpu`` into a build cache named by the content of the sources, the torch
version and the flags (``avkernels/ops/native.py``). The quick tests check, without compiling the kernels, what
import does when a build cannot run, that a compile says why and how long in one line, that the cache is found by
content from any copy of the sources, and that ``torch.compile(fullgraph=True)`` and ``torch.export`` work as the
first use in a fresh process. The slow test runs the whole route in a fresh venv: ``pip install <path>``, the build
at the first import, a second process and a force-reinstall that load that build, the examples from the clone, and
the wheel of a ``git+file://`` clone.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import pytest
import torch

import avkernels
from avkernels.ops import native
from avkernels.reference import functional as reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "avkernels", "csrc", "examples")
CPP = native._record("cpp")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """native's bookkeeping as before import settled anything, an empty build cache, and stderr to read."""
    for name in ("_LIBRARIES", "_IN_PROCESS", "_REASONS", "_NO_PREBUILT"):
        monkeypatch.setattr(native, name, {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(native.JIT_ENV_VAR, raising=False)
    monkeypatch.delenv("AVKERNELS_BACKEND", raising=False)


def _without_prebuilt(monkeypatch):
    """As if the install had built no extension (pip's isolated build)."""
    config = dict(native._config())
    config["CPU_MODULE"] = "avkernels._C_not_built_here"
    monkeypatch.setattr(native, "_config", lambda: config)


def _settle_cpp():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        native._settle(CPP)
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_import_without_a_build_falls_back_with_one_warning(fresh_state, monkeypatch):
    _without_prebuilt(monkeypatch)
    monkeypatch.setenv(native.JIT_ENV_VAR, "0")
    messages = _settle_cpp()
    assert len(messages) == 1 and "fall back to the slower reference backend" in messages[0], messages
    reason = avkernels.backend_status()["cpp"]
    assert "no prebuilt library in the package" in reason and "$AVKERNELS_JIT_BUILD=0" in reason, reason
    assert "python -m avkernels build cpp" in reason
    assert "cpp" not in avkernels.backends()
    q = torch.randn(2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning was at import: calls are silent
        out = avkernels.tanh_attention(q, q, q)
    torch.testing.assert_close(out, reference.tanh_attention(q, q, q, 0.5, 0.0, None)[0])


@pytest.mark.parametrize("missing, expected", [("ninja", "ninja (not installed: `pip install ninja`)"),
                                               ("compiler", "a C++ compiler ('/nonexistent/c++' was not found")])
def test_a_missing_toolchain_is_the_stated_reason(fresh_state, monkeypatch, missing, expected):
    from torch.utils import cpp_extension

    _without_prebuilt(monkeypatch)
    if missing == "ninja":
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    else:
        monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert len(_settle_cpp()) == 1
    assert f"building it needs {expected}" in native._REASONS["cpp"], native._REASONS["cpp"]


def _sources(tmp_path, name, files):
    """A source tree with the layout of a checkout: <root>/csrc/cpu/*.cpp."""
    root = tmp_path / name
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return str(root)


# Compiles in a second: no torch header, no op registration (this process has the real library's ops).
TINY = {"csrc/cpu/only.cpp": "extern \"C\" int avkernels_install_test() { return 1; }\n"}


def test_a_failed_build_says_why_in_one_line_and_in_the_reason(fresh_state, monkeypatch, tmp_path, capfd):
    _without_prebuilt(monkeypatch)
    monkeypatch.setattr(native, "_SOURCE_ROOTS", (_sources(tmp_path, "broken", {"csrc/cpu/only.cpp": "not C++;\n"}),))
    assert len(_settle_cpp()) == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("avkernels:")]
    assert len(lines) == 1 and " failed after " in lines[0] and "(log: " in lines[0], err
    assert "no prebuilt library in the package, and no build of these sources in the cache" in lines[0]
    reason = native._REASONS["cpp"]
    assert "its build failed: " in reason and "error" in reason and "build.log" in reason, reason


def test_a_build_prints_why_and_how_long_and_is_found_by_content_from_another_copy(fresh_state, monkeypatch,
                                                                                   tmp_path, capfd):
    """The cache folder is named by what the sources say, not where they are: a checkout and an install (csrc/
    inside the package) of the same files share one build, and a second call compiles nothing."""
    checkout = _sources(tmp_path, "checkout", TINY)
    installed = _sources(tmp_path, "site-packages/avkernels", TINY)
    assert native.build_directory("cpp", checkout) == native.build_directory("cpp", installed)
    native._LIBRARIES["cpp"] = "loaded"  # as in this process: a build replaces the cache's file, loads nothing
    monkeypatch.setattr(native, "_SOURCE_ROOTS", (checkout,))
    path = native.build("cpp", force=True)
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "cache"))
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("avkernels: building avkernels._C_cpu for torch "), err
    assert "(asked to rebuild)" in err and " done in " in err and err.rstrip().endswith(" s"), err

    monkeypatch.setattr(native, "_SOURCE_ROOTS", (installed,))
    native._LIBRARIES.pop("cpp")
    native._IN_PROCESS["cpp"] = "loaded"  # so that it is not loaded here
    with pytest.raises(RuntimeError, match="this process has loaded"):
        native._from_cache(CPP, "unused", compile=True)
    assert capfd.readouterr().err == ""  # the other copy found the build: nothing compiled


def test_the_cache_key_is_content_torch_and_flags(tmp_path, monkeypatch):
    first = native.build_directory("cpp", _sources(tmp_path, "a", TINY))
    edited = native.build_directory("cpp", _sources(tmp_path, "b", {"csrc/cpu/only.cpp": "int x;\n"}))
    renamed = native.build_directory("cpp", _sources(tmp_path, "c", {"csrc/cpu/other.cpp": TINY["csrc/cpu/only.cpp"]}))
    assert len({first, edited, renamed}) == 3
    config = dict(native._config())
    config["CPU_CXX_FLAGS"] = (*config["CPU_CXX_FLAGS"], "-DX")
    monkeypatch.setattr(native, "_config", lambda: config)
    assert native.build_directory("cpp", str(tmp_path / "a")) != first
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert "torch2.99.0" in native.build_directory("cpp", str(tmp_path / "a"))


def test_sources_are_found_in_a_checkout():
    assert native._source_root(CPP) in native._SOURCE_ROOTS


def _python_without_avkernels(tmp_path, pip=False):
    """A venv that sees this interpreter's torch through a .pth line, and no avkernels. Not --system-site-packages:
    that would also run the site-packages' .pth files, among them the editable finder of a development install of
    avkernels, which would hand the venv the checkout's prebuilt extension."""
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", *([] if pip else ["--without-pip"]), venv], check=True, timeout=300)
    site = os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    with open(os.path.join(site, "torch_from_host.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    return venv, os.path.join(venv, "bin", "python"), site


def _environment(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "AVKERNELS_", "PYTHON", "TRITON"))}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


FIRST_USE_TRACED = textwrap.dedent(
    """
    import sys, time, warnings
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference fails the test
    start = time.time()
    import torch
    import avkernels
    from avkernels.ops import native
    from avkernels.export import export_program
    print("IMPORT", time.time() - start)
    print("MODULE", native._LIBRARIES["cpp"])
    print("AVKERNELS", avkernels.__file__)
    model = avkernels.GRJCA((8, 6), 5).eval()
    video, audio = torch.randn(3, 5, 8), torch.randn(3, 5, 6)
    compiled = torch.compile(model, fullgraph=True, backend=sys.argv[1])(video, audio)  # the process's first call
    program = export_program(model, (video, audio))
    with torch.no_grad():
        expected = model(video, audio)
        exported = program.module()(video[:2], audio[:2])
    for got, want in zip(compiled, expected):
        torch.testing.assert_close(got, want)
    for got, want in zip(exported, expected):
        torch.testing.assert_close(got, want[:2])
    assert any("avkernels.tanh_attention" in str(n.target) for n in program.graph.nodes)
    assert avkernels.backend_status("tanh_attention")["cpp"] == "available"
    print("PASSED")
    """
)


def test_a_cached_build_is_loaded_by_another_copy_and_compile_works_as_the_first_use(tmp_path):
    """A fresh process, with no prebuilt extension in its copy of the package, loads the build another copy put in
    the cache (here the library this process runs, copied in) in about a second, compiles nothing, and runs
    ``torch.compile(fullgraph=True)`` and ``torch.export`` as its very first use of avkernels."""
    if "cpp" not in native._LIBRARIES:
        pytest.skip(f"the cpp library is not loaded here: {avkernels.backend_status()['cpp']}")
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(cache))
        seeded = native._built_file(CPP, native.build_directory("cpp"))
    os.makedirs(os.path.dirname(seeded))
    shutil.copy(native._LIBRARIES["cpp"], seeded)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(os.path.join(ROOT, "avkernels"), copy / "avkernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), copy / "avkernels" / "csrc")  # an install's layout
    _, python, _ = _python_without_avkernels(tmp_path)
    run = subprocess.run([python, "-c", FIRST_USE_TRACED, "eager"], cwd=copy, capture_output=True, text=True,
                         timeout=600, env=_environment(TORCH_EXTENSIONS_DIR=str(cache), AVKERNELS_JIT_BUILD="0"))
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout + run.stderr
    assert f"MODULE {seeded}" in run.stdout, run.stdout
    assert "avkernels: building" not in run.stderr, run.stderr


BLOCK_MATPLOTLIB = textwrap.dedent(
    """
    import runpy, sys
    class NoMatplotlib:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "matplotlib":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NoMatplotlib())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def test_the_demo_without_matplotlib(tmp_path):
    """Without the examples extra the demo stops at once with one line naming it; --no-plots needs no matplotlib."""
    script = os.path.join(ROOT, "examples", "train_synthetic.py")
    tiny = ["--models", "rjca", "--seeds", "1", "--epochs", "1", "--out-dir", str(tmp_path / "runs")]
    env = _environment(PYTHONPATH=ROOT)
    stopped = subprocess.run([sys.executable, "-c", BLOCK_MATPLOTLIB, script, *tiny], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().splitlines() == [
        "train_synthetic.py: drawing gates.png and curves.png (--no-plots skips them) needs matplotlib, which is not "
        'installed: pip install "avkernels[examples]"'], stopped.stderr
    assert not (tmp_path / "runs").exists()
    ran = subprocess.run([sys.executable, "-c", BLOCK_MATPLOTLIB, script, *tiny, "--no-gate-plot"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Validation CCC on the synthetic dataset" in ran.stdout
    assert not list((tmp_path / "runs").rglob("*.png"))


def test_the_examples_use_the_checkout_only_without_an_install(tmp_path):
    _, python, _ = _python_without_avkernels(tmp_path)
    show = "import sys; sys.path.insert(0, sys.argv[1]); import prelude, avkernels; print(avkernels.__file__)"
    run = subprocess.run([python, "-c", show, os.path.join(ROOT, "examples")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=_environment(AVKERNELS_JIT_BUILD="0"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == os.path.join(ROOT, "avkernels", "__init__.py")


def _copy_project(target):
    for name in PROJECT_FILES:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, target / name)


@pytest.mark.slow
def test_pip_install_with_build_isolation_gets_the_cpp_backend(tmp_path):
    """A fresh venv, ``pip install <project>`` with build isolation on (pip fetches setuptools into the isolated
    build); the first import compiles the extension (one line) and a traced first use runs it; a second process, a
    force-reinstall and an example run from the clone load that build without compiling."""
    pytest.importorskip("setuptools")
    if shutil.which("ninja") is None:
        pytest.skip("ninja is not installed: the build at import needs it (its absence is tested above)")
    project, clone_source = tmp_path / "project", tmp_path / "repository"
    project.mkdir()
    _copy_project(project)
    _, python, site = _python_without_avkernels(tmp_path, pip=True)
    env = _environment(TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))

    def pip_install(*args):
        install = subprocess.run([python, "-m", "pip", "install", *args, str(project)], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=900)
        if install.returncode != 0 and "No matching distribution found for setuptools" in install.stderr:
            pytest.skip("PyPI is not reachable: an isolated build cannot fetch setuptools")
        assert install.returncode == 0, install.stdout + install.stderr
        return install

    assert "Requirement already satisfied: torch" in pip_install().stdout  # never another torch
    installed = os.path.join(site, "avkernels")
    assert os.path.isfile(os.path.join(installed, "csrc", "cpu", "library.cpp"))
    assert os.path.isfile(os.path.join(installed, "csrc", "common", "philox.h"))
    assert not [n for n in os.listdir(installed) if n.startswith("_C_cpu")], "the isolated build had a torch?"

    def first_use(backend="eager"):
        run = subprocess.run([python, "-c", FIRST_USE_TRACED, backend], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=900)
        assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout + run.stderr
        assert f"AVKERNELS {os.path.join(installed, '__init__.py')}" in run.stdout
        return run

    first = first_use()
    lines = [line for line in first.stderr.splitlines() if line.startswith("avkernels:")]
    assert len(lines) == 1 and lines[0].startswith("avkernels: building avkernels._C_cpu for torch "), first.stderr
    assert " done in " in lines[0], first.stderr
    (module,) = [line.split(" ", 1)[1] for line in first.stdout.splitlines() if line.startswith("MODULE ")]
    assert module.startswith(str(tmp_path / "extensions")), first.stdout

    started = time.time()
    pip_install("--force-reinstall", "--no-deps")
    print(f"force-reinstall: {time.time() - started:.0f} s")
    again = first_use()
    assert "avkernels: building" not in again.stderr, again.stderr  # the reinstall loads the same build
    assert f"MODULE {module}" in again.stdout
    show = ("import sys; sys.path.insert(0, sys.argv[1]); import prelude, avkernels; from avkernels.ops import native; "
            "print(avkernels.__file__, native._LIBRARIES['cpp'])")
    example = subprocess.run([python, "-c", show, str(project / "examples")], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert example.returncode == 0 and "avkernels: building" not in example.stderr, example.stderr
    assert example.stdout.split() == [os.path.join(installed, "__init__.py"), module], example.stdout

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
