"""avkernels: fused kernels for audio-visual fusion by joint cross-attention (JCA, RJCA, DCA, GRJCA).

Functional ops: :func:`tanh_attention`, :func:`gate`, :func:`stage_gate`. Fusion modules: :class:`JCA`,
:class:`RJCA`, :class:`DCA`, :class:`GRJCA`. Full models: :mod:`avkernels.models`. Metrics and losses:
:mod:`avkernels.metrics`, :mod:`avkernels.losses`. Backends available here: :func:`backends`; compiling the C++
ones: :func:`build`.
"""

from avkernels.dispatch import backend_status, backends
from avkernels.ops.native import build, cpu_features
from avkernels.ops import gate, stage_gate, tanh_attention
from avkernels.nn import DCA, GRJCA, JCA, RJCA
from avkernels import data, losses, metrics, models
from avkernels import export  # noqa: F401  (avkernels.export.export_onnx / export_program, without another import)

__version__ = "0.1.0"

__all__ = [
    "tanh_attention",
    "gate",
    "stage_gate",
    "JCA",
    "RJCA",
    "DCA",
    "GRJCA",
    "backends",
    "backend_status",
    "build",
    "cpu_features",
    "models",
    "data",
    "metrics",
    "losses",
    "__version__",
]
