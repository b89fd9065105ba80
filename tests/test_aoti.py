"""The fused CPU kernels without Python's ops (issue 13, item 3): examples/aoti end to end.

A fusion module is exported with torch.export and compiled by AOTInductor into a package (examples/aoti/
export_aoti.py, in a subprocess, with a dynamic batch); the package must call the fused ops by name. It then runs
(a) in a Python process that only loads the op library (run_aoti.py: it fails if any avkernels module was imported),
and (b) in the C++ program run_aoti.cpp, built with CMake (or, without CMake, the documented g++ line), which loads
the library with dlopen; both compare with PyTorch's outputs on a batch of another size. Without the op library the
package cannot run, which shows that it runs the library's kernels. The library itself needs neither libpython nor
libtorch_python.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import avkernels
from avkernels.ops import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "aoti")
TIMEOUT = 600

pytestmark = pytest.mark.skipif("cpp" not in avkernels.backends(),
                                reason=f"the cpp backend is unavailable: {avkernels.backend_status()['cpp']}")


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env=env, **kwargs)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(op library, model.pt2, sample.pt) of GRJCA, dense form, which calls all three fused ops."""
    out = tmp_path_factory.mktemp("aoti")
    done = _run([sys.executable, os.path.join(EXAMPLE, "export_aoti.py"), str(out), "--model", "grjca"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the package calls the fused ops: avkernels::tanh_attention, avkernels::gate, avkernels::stage_gate" in (
        done.stdout)
    library = (out / "library.txt").read_text().strip()
    assert library == native._LIBRARIES["cpp"]
    return library, str(out / "model.pt2"), str(out / "sample.pt")


def test_package_calls_the_fused_ops(package):
    sys.path.insert(0, EXAMPLE)
    try:
        import export_aoti
    finally:
        sys.path.remove(EXAMPLE)
    assert export_aoti.fused_ops_in_package(package[1]) == {"tanh_attention", "gate", "stage_gate"}


def test_python_runs_the_package_with_only_the_op_library(package):
    done = _run([sys.executable, os.path.join(EXAMPLE, "run_aoti.py"), *package])
    assert done.returncode == 0, done.stdout + done.stderr  # 3 would mean avkernels' Python modules were imported
    assert "max abs difference to PyTorch" in done.stdout and "batch 3" in done.stdout


def _torch_lib():
    return os.path.join(os.path.dirname(torch.__file__), "lib")


def _build_runner(build_dir) -> str:
    """run_aoti built with CMake when it is installed, else with the g++ line of the README."""
    if shutil.which("cmake"):
        prefix = f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"
        configure = _run(["cmake", "-S", EXAMPLE, "-B", str(build_dir), prefix])
        assert configure.returncode == 0, configure.stdout + configure.stderr
        build = _run(["cmake", "--build", str(build_dir)])
        assert build.returncode == 0, build.stdout + build.stderr
        return str(build_dir / "run_aoti")
    from torch.utils.cpp_extension import include_paths

    runner = str(build_dir / "run_aoti")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    lib = _torch_lib()
    build = _run(["g++", "-std=c++20", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in include_paths()],
                  os.path.join(EXAMPLE, "run_aoti.cpp"), "-o", runner, f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch",
                  "-ltorch_cpu", "-lc10", "-ldl"])
    assert build.returncode == 0, build.stdout + build.stderr
    return runner


@pytest.mark.skipif(shutil.which("cmake") is None and shutil.which("g++") is None, reason="needs cmake or g++")
def test_cpp_program_runs_the_package(package, tmp_path):
    runner = _build_runner(tmp_path / "build")
    assert "libpython" not in _run(["ldd", runner]).stdout
    done = _run([runner, *package])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max abs difference to PyTorch" in done.stdout and "batch 3" in done.stdout
    # Another library in place of the op library: the package's calls of the fused ops find no op.
    libm = next(p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6", "libm.so.6") if
                p == "libm.so.6" or os.path.exists(p))
    done = _run([runner, libm, *package[1:]])
    assert done.returncode == 2 and "Could not find schema for avkernels::" in done.stderr, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("ldd") is None, reason="needs nm and ldd")
def test_op_library_needs_no_python():
    library = native._LIBRARIES["cpp"]
    needed = _run(["ldd", library]).stdout
    assert "libpython" not in needed and "libtorch_python" not in needed, needed
    undefined = _run(["nm", "-D", "-u", library]).stdout.splitlines()
    python = [line.split() for line in undefined if line.split()[-1].startswith(("Py", "_Py"))]
    # Only the module stub's one call, weak ("w"): a program without libpython loads the library anyway.
    assert python == [["w", "PyModule_Create2"]], python
