"""What every example script does first: pick the avkernels to use, and check the optional packages it needs.

The installed avkernels comes first: a script run from a clone uses the install (and so its compiled kernels), and
the checkout's own package only when none is installed. The examples' optional packages (matplotlib) are the
``examples`` extra; a script that needs a missing one stops before any work, with one line naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

EXTRA = 'pip install "avkernels[examples]"'

if importlib.util.find_spec("avkernels") is None:
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def require(module: str, purpose: str) -> None:
    """Exit with one line naming the extra unless ``module`` imports; ``purpose`` says what needs it."""
    try:
        importlib.import_module(module)
    except ImportError:
        sys.exit(f"{os.path.basename(sys.argv[0])}: {purpose} needs {module}, which is not installed: {EXTRA}")
