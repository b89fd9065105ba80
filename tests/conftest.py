"""Test-session setup. Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before any
kernel module is imported (the @triton.jit decorator reads it), hence here, before avkernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import avkernels  # noqa: E402,F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for a module of tiny ops (small matmuls, LSTMs, GRUs): a second thread buys nothing there,
    and on a busy CPU waiting for a preempted thread made them 30-100x slower (a GRJCA forward on small dims took
    130 ms with 2 threads, 3 ms with 1). Restored afterwards, so multi-threaded kernel paths are still tested."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
