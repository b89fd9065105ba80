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
