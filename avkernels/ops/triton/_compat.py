"""Which triton releases the ``"triton"`` backend supports, and the one fix it applies to older ones.

Supported: triton 3.6 (pinned by torch 2.11) through 3.9 (torch 2.13); CI runs the interpreter and ahead-of-time
compile tests with both ends (``make test``; the oldest in the venv made by ``scripts/test_oldest_triton.sh``). The
kernels are written to the subset both ends accept, so there is one code path; the only version-keyed code is
:func:`install_interpreter_fixes`.
"""

import re
from typing import Optional, Tuple

MIN_VERSION = (3, 6)
NEWEST_TESTED = (3, 9)
# The first release whose interpreter converts scalar tensors to Python ints under numpy >= 2.4 by itself
# (triton-lang/triton#9171). 3.6 does not; 3.7 and 3.8 were not tested, so they get the fix too (it is idempotent).
_INDEX_FIX_VERSION = (3, 9)


def parse_version(version: str) -> Tuple[int, ...]:
    """``"3.6.0"``, ``"3.9.0+git1a2b"``, ``"3.10.0rc1"`` -> ``(3, 6, 0)``, ``(3, 9, 0)``, ``(3, 10, 0)``."""
    parts = []
    for piece in version.split(".")[:3]:
        found = re.match(r"\d+", piece)
        if found is None:
            break
        parts.append(int(found.group()))
    return tuple(parts)


def _fmt(version: Tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def version_reason(version: str) -> Optional[str]:
    """Why triton ``version`` cannot run this backend, or None when it can."""
    parsed = parse_version(version)
    if not parsed:
        return f"cannot parse the triton version {version!r}; the triton backend needs triton>={_fmt(MIN_VERSION)}"
    if parsed < MIN_VERSION:
        return (f"triton {version} is older than {_fmt(MIN_VERSION)}, the oldest release this backend supports "
                f"(its kernels do not compile with it); pip install 'triton>={_fmt(MIN_VERSION)}' (torch>=2.11 pins "
                f"a supported one)")
    return None


def install_interpreter_fixes(version: str) -> bool:
    """Backport to the interpreter of triton < 3.9 the scalar-to-index conversion of newer releases.

    The interpreter holds a scalar as a one-element numpy array and converts it with ``int(array)``, which numpy 2.4
    made an error: every ``range`` over a runtime bound (all our kernels' loops) then fails with "only 0-dimensional
    arrays can be converted to Python scalars". Kernels cannot avoid it without giving up ``for`` loops (a ``while``
    loop would lose software pipelining on GPU). The interpreter re-installs its tensor methods from
    ``_patch_lang_tensor`` at every launch, so that function is wrapped to replace ``__index__`` with the upstream
    fix. Compiled kernels never use this path. Returns whether the fix was installed.
    """
    if parse_version(version) >= _INDEX_FIX_VERSION:
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_avkernels_fix", False):
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._avkernels_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
