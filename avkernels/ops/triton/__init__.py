"""The ``"triton"`` backend: Triton kernels for every op, one file per op (kernels, launchers, registration).

Runs on CUDA tensors, and on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this
package was imported (how the test suite runs it on machines without a GPU). Never the default on CPU: the
interpreter is a correctness tool, far slower than the reference.
"""

import os

import torch

from avkernels.dispatch import BackendInfo, Inputs, dtype_reason, register_backend
from avkernels.ops.triton import _compat

try:
    import triton

    _IMPORT_ERROR = None
except ImportError as exc:  # the package works without triton; the backend then says why it is missing
    _IMPORT_ERROR = exc

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version_reason():
    # Read at each call (not cached at import) so that tests can stand in an unsupported version.
    return _compat.version_reason(triton.__version__)


def _unavailable_reason():
    if _IMPORT_ERROR is not None:
        return f"triton is not installed ({_IMPORT_ERROR}); pip install 'triton>={_compat._fmt(_compat.MIN_VERSION)}'"
    version_reason = _version_reason()
    if version_reason is not None:
        return version_reason
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA GPU is visible and TRITON_INTERPRET=1 was not set before importing avkernels"
    return None


# float64 only in the interpreter (for gradcheck): the GPU kernels have no fp64 MMA path worth compiling.
_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRETER_DTYPES = _GPU_DTYPES + (torch.float64,)


def _input_reason(inputs: Inputs):
    if inputs.device.type == "cuda":
        return dtype_reason(inputs.dtype, _GPU_DTYPES, "triton")
    if inputs.device.type == "cpu" and INTERPRET:
        return dtype_reason(inputs.dtype, _INTERPRETER_DTYPES, "triton")
    return (f"Triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got "
            f"{inputs.device.type} tensors")


# First choice on CUDA; no rank on CPU, where the interpreter is a correctness tool slower than the reference.
register_backend(BackendInfo("triton", _unavailable_reason, _input_reason, preference={"cuda": 0}))

# An unsupported triton is not imported further: its reason is reported, and nothing it cannot compile is defined.
if _IMPORT_ERROR is None and _version_reason() is None:
    _compat.install_interpreter_fixes(triton.__version__)
    # Each op module registers its implementation on import.
    from avkernels.ops.triton import gate, stage_gate, tanh_attention  # noqa: F401
