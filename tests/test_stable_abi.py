"""The CPU library on PyTorch's stable ABI (csrc/common/tensor_api.h): which torch gets which build, and that the
stable build calls libtorch only through its C shims (``aoti_torch_*``, ``torch_*``), so that one binary runs on
every torch from 2.10 on. Installing a wheel into another environment: scripts/test_stable_wheel.sh.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch

import avkernels
from avkernels.ops import native

# A C++ symbol of libtorch (demangled): its layout and mangling can change with every torch release.
TORCH_CXX_SYMBOL = re.compile(r"(^|[^\w])(at|c10|torch|caffe2)::")


def _uses_stable_abi(version, environ=None):
    return native._config()["uses_stable_abi"]("CPU", version, {} if environ is None else environ)


def _torch_cxx_symbols(undefined):
    return [symbol for symbol in undefined if TORCH_CXX_SYMBOL.search(symbol)]


@pytest.mark.parametrize("version, stable", [("2.13.0+cpu", True), ("2.10.0", True), ("2.10.0a0+git123", True),
                                             ("3.0.1", True), ("2.9.1+cu128", False), ("2.4.0", False)])
def test_torch_from_2_10_gets_the_stable_build(version, stable):
    assert _uses_stable_abi(version) is stable
    assert _uses_stable_abi(version, {"AVKERNELS_STABLE_ABI": "0"}) is False  # the ATen build on request
    assert native._config()["uses_stable_abi"]("CUDA", version, {}) is False  # the CUDA library stays on ATen


def test_the_stable_flags_reach_the_build_and_its_cache_key(monkeypatch):
    lib = native._record("cpp")
    monkeypatch.delenv("AVKERNELS_STABLE_ABI", raising=False)
    stable_flags = native._flags(lib, "CXX")
    stable_key = native.build_directory("cpp")
    monkeypatch.setenv("AVKERNELS_STABLE_ABI", "0")
    assert "-DAVK_STABLE_ABI=1" not in native._flags(lib, "CXX")
    assert native.build_directory("cpp") != stable_key  # the two variants never share a cached binary
    assert ("-DAVK_STABLE_ABI=1" in stable_flags) is _uses_stable_abi(torch.__version__)


def test_the_symbol_check_tells_cxx_symbols_from_c_shims():
    undefined = ["aoti_torch_empty_strided", "torch_parallel_for", "std::runtime_error::~runtime_error()",
                 "PyModule_Create2", "at::Tensor::print() const", "c10::detail::torchCheckFail(char const*)",
                 "torch::Library::_def(c10::FunctionSchema&&)", "void caffe2::TypeMeta::x()"]
    assert _torch_cxx_symbols(undefined) == undefined[4:]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
@pytest.mark.skipif(not _uses_stable_abi(torch.__version__, os.environ), reason="this torch gets the ATen build")
def test_the_stable_build_calls_libtorch_only_through_c_shims():
    assert "cpp" in avkernels.backends(), avkernels.backend_status()["cpp"]
    path = avkernels.build("cpp")
    listing = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", path], capture_output=True, text=True,
                             check=True).stdout
    undefined = [line.split(None, 1)[1] for line in listing.splitlines() if line.strip()]
    assert not _torch_cxx_symbols(undefined), f"{path} links C++ symbols of libtorch (not the stable ABI)"
    shims = [s for s in undefined if s.startswith(("aoti_torch_", "torch_"))]
    assert len(shims) > 10, f"{path}: expected calls into torch's C shims, found {shims}"
