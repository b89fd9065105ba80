"""Functional ops, one file per op. Importing this package registers every backend that can load here."""

from avkernels.dispatch import BackendInfo, register_backend

# Plain PyTorch: every device and dtype. It closes every preference list without a rank of its own.
register_backend(BackendInfo("reference", unavailable_reason=lambda: None, input_reason=lambda inputs: None))

from avkernels.ops.gate import gate  # noqa: E402
from avkernels.ops.stage_gate import stage_gate  # noqa: E402
from avkernels.ops.tanh_attention import tanh_attention  # noqa: E402

from avkernels.ops import triton as _triton_backend  # noqa: E402,F401  (registers "triton" when usable)
from avkernels.ops import native as _native_backends  # noqa: E402,F401  (registers "cpp" and "cuda")

__all__ = ["tanh_attention", "gate", "stage_gate"]
