#!/usr/bin/env bash
# The Triton tests again, with the oldest triton the backend supports (3.6, what torch 2.11 pins), in a venv of their
# own: the main environment keeps the newest (torch 2.13's 3.9). `make test` runs this after the main suite.
#
# The venv (.venv-triton36, git-ignored) sees the main environment's packages (torch, numpy, pytest) and adds only
# triton; it is reused while it holds the right triton. Runs the interpreter tests of the kernels (the Triton files
# and the conformance suite's triton cases) and the default (subset) ahead-of-time compile tests, stopping at the
# first failure: about 3 minutes on 2 cores once the venv exists. Not the model-level tests
# (tests/test_triton_modules.py: the same kernels through the nn modules, 3 more minutes) nor AVKERNELS_AOT_FULL.
#
# Without network, triton cannot be installed: that is an error under CI=true, otherwise a loud skip (exit 0).
# Environment: PYTHON (default python3), TRITON_OLDEST (default 3.6.0), TRITON_OLDEST_VENV (default .venv-triton36).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VERSION=${TRITON_OLDEST:-3.6.0}
VENV=${TRITON_OLDEST_VENV:-.venv-triton36}
VPY=$VENV/bin/python

installed() {
    [ -x "$VPY" ] && [ "$("$VPY" -c 'import triton; print(triton.__version__)' 2>/dev/null)" = "$VERSION" ]
}

if installed; then
    echo "oldest-triton tests: reusing $VENV (triton $VERSION)"
else
    echo "oldest-triton tests: creating $VENV with triton $VERSION"
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    if ! "$VPY" -m pip install -q "triton==$VERSION" || ! installed; then
        rm -rf "$VENV"
        msg="oldest-triton tests: could not install triton==$VERSION (no network or no wheel for this Python); the Triton backend was NOT tested with its oldest supported triton"
        if [ "${CI:-}" = "true" ]; then
            echo "ERROR: $msg" >&2
            exit 1
        fi
        printf '\n!!!!!!!!\n!!! SKIPPED: %s\n!!!!!!!!\n\n' "$msg" >&2
        exit 0
    fi
fi

# PYTHONPATH: this checkout, ahead of any editable install of the package that the venv inherits.
exec env -u AVKERNELS_AOT_FULL PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VPY" -m pytest -x -q -p no:cacheprovider \
    tests/test_triton_versions.py tests/test_triton_tanh_attention.py tests/test_triton_gates.py \
    tests/test_triton_compile.py tests/test_conformance.py -k triton
