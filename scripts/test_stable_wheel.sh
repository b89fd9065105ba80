#!/usr/bin/env bash
# Builds a wheel of this checkout against the installed torch and checks that it is the stable-ABI one: tagged abi3,
# its CPU library calls libtorch only through the C shims; then installs it into fresh virtual environments and runs
# a smoke test there (the cpp backend loads the wheel's library, without compiling, and agrees with the reference).
#
#   scripts/test_stable_wheel.sh                  # a venv that sees this Python's torch (--system-site-packages)
#   TORCH_VERSIONS="2.10.0 2.11.0" scripts/test_stable_wheel.sh
#                                                 # also one venv per torch version, from PyTorch's CPU index
#                                                 # (about 200 MB each; needs the network)
#   TORCH_VERSIONS=2.14.1 TORCH_PIP_ARGS= scripts/test_stable_wheel.sh
#                                                 # torch from pip's configured indexes instead
#
# Writes only under a temporary folder (kept when KEEP=1) and setuptools' build/ folder of the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
work=$(mktemp -d)
[[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT

echo "== wheel (torch $($python -c 'import torch; print(torch.__version__)'))"
$python -m pip wheel --no-build-isolation --no-deps -q -w "$work/dist" . >"$work/wheel.log" 2>&1 ||
  { tail -30 "$work/wheel.log"; exit 1; }
wheel=$(ls "$work"/dist/avkernels-*.whl)
echo "$(basename "$wheel")"
[[ $(basename "$wheel") == *-abi3-* ]] || { echo "FAIL: the wheel is not tagged abi3"; exit 1; }
mkdir "$work/unpacked" && (cd "$work/unpacked" && $python -m zipfile -e "$wheel" .)
library=$(ls "$work"/unpacked/avkernels/_C_cpu*.so)
if nm -D --undefined-only --demangle "$library" | grep -E '(^|[^[:alnum:]_])(at|c10|torch|caffe2)::'; then
  echo "FAIL: $(basename "$library") links the C++ symbols above (not the stable ABI)"; exit 1
fi
echo "$(basename "$library"): $(nm -D --undefined-only "$library" | grep -cE ' (aoti_torch|torch)_') torch C shim calls, no libtorch C++ symbol"

smoke='
import os, sys, torch, avkernels
from avkernels.ops import native
assert "cpp" in avkernels.backends(), avkernels.backend_status()["cpp"]
library = native.build("cpp")
assert library.startswith(sys.prefix), f"loaded {library}, not the wheel in {sys.prefix}"
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((2, 7, 5), (2, 11, 5), (2, 11, 3)))
out = avkernels.tanh_attention(q, k, v, backend="cpp")
out.sum().backward()
grads = [t.grad.clone() for t in (q, k, v)]
for t in (q, k, v): t.grad = None
ref = avkernels.tanh_attention(q, k, v, backend="reference")
ref.sum().backward()
torch.testing.assert_close(out, ref)
for got, t in zip(grads, (q, k, v)): torch.testing.assert_close(got, t.grad)
print(f"  ok: torch {torch.__version__}, {os.path.basename(library)}, {avkernels.cpu_features()}")
'

smoke_in() {  # venv folder, pip arguments for torch (none: the system site's)
  local venv=$1; shift
  "$venv/bin/python" -m pip install -q --no-deps "$wheel"
  (cd "$work" && "$venv/bin/python" -c "$smoke")
}

echo "== venv with this torch (system site packages)"
$python -m venv --system-site-packages "$work/venv-system"
smoke_in "$work/venv-system"

for version in ${TORCH_VERSIONS:-}; do
  echo "== venv with torch $version"
  $python -m venv "$work/venv-$version"
  # shellcheck disable=SC2086  # the pip arguments are words
  "$work/venv-$version/bin/python" -m pip install -q "torch==$version" numpy tqdm \
    ${TORCH_PIP_ARGS---index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple}
  smoke_in "$work/venv-$version"
done
echo "PASS"
