"""Compile a fusion module ahead of time with AOTInductor, so that it runs without Python and with the fused kernels.

``torch.export`` traces a fusion (GRJCA by default, eval mode, the ``cpp`` backend, a free batch dimension) into a
graph whose fused steps are the ops ``avkernels::tanh_attention``, ``avkernels::gate`` and ``avkernels::stage_gate``
(defined in C++, ``csrc/cpu/library.cpp``), and ``torch._inductor.aoti_compile_and_package`` compiles it into one
``.pt2`` package. The package calls those ops by name through torch's dispatcher: whoever runs it loads the avkernels
op library first (``dlopen`` in C++, ``torch.ops.load_library`` in Python) and needs nothing else of avkernels.

Writes, into the output folder:

* ``model.pt2``: the package;
* ``sample.pt``: ``{"inputs": [...], "expected": [...]}``, a batch of another size than the traced one and PyTorch's
  outputs on it (``torch.save``; C++ reads it with ``torch::pickle_load``);
* ``library.txt``: the path of the op library to load (the ``avkernels._C_cpu`` this process used).

Then checks that the package calls the fused ops (the names appear in the generated code, ``--check`` on by default)
and prints the command lines that run it. ``run_aoti.cpp`` is the C++ program; ``run_aoti.py`` the Python one.

    python examples/aoti/export_aoti.py build/aoti                       # GRJCA, dense form
    python examples/aoti/export_aoti.py build/aoti --model dca --form additive
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/

import prelude  # noqa: E402,F401  (first: the installed avkernels, else the checkout's)
import avkernels  # noqa: E402
from avkernels.export import export_program  # noqa: E402
from avkernels.ops import native  # noqa: E402

MODELS = {"jca": avkernels.JCA, "rjca": avkernels.RJCA, "dca": avkernels.DCA, "grjca": avkernels.GRJCA}
FUSED_OPS = {"jca": ("tanh_attention",), "rjca": ("tanh_attention",), "dca": ("tanh_attention", "gate"),
             "grjca": ("tanh_attention", "gate", "stage_gate")}


def fused_ops_in_package(path: str) -> set:
    """The avkernels ops the package calls: the targets of its extern calls (run through torch's dispatcher), as
    listed in the package's description of them (the ``*.json`` beside the generated ``wrapper.cpp``)."""
    targets = set()
    with zipfile.ZipFile(path) as package:
        for name in package.namelist():
            if name.endswith(".wrapper.json"):
                targets |= {node["node"]["target"] for node in json.loads(package.read(name))["nodes"]}
    return {target.split("::", 1)[1] for target in targets if target.startswith("avkernels::")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder for model.pt2, sample.pt and library.txt")
    parser.add_argument("--model", choices=sorted(MODELS), default="grjca")
    parser.add_argument("--form", choices=("dense", "additive"), default="dense")
    parser.add_argument("--dims", type=int, nargs=2, default=(32, 24), metavar=("VIDEO", "AUDIO"))
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--batch", type=int, default=3, help="the sample's batch (the package takes any)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip checking that the generated code calls the fused ops")
    args = parser.parse_args(argv)

    if "cpp" not in avkernels.backends():
        print(f"the cpp backend is unavailable: {avkernels.backend_status()['cpp']}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = MODELS[args.model](tuple(args.dims), args.seq_len, form=args.form, backend="cpp").eval()

    def features(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(batch, args.seq_len, d, generator=g) for d in args.dims)

    exported = export_program(model, features(2, 0))  # the batch axis stays free
    with torch.no_grad():
        package = torch._inductor.aoti_compile_and_package(exported,
                                                           package_path=os.path.join(args.out_dir, "model.pt2"))
        inputs = features(args.batch, 1)
        expected = model(*inputs)
    torch.save({"inputs": list(inputs), "expected": list(expected)}, os.path.join(args.out_dir, "sample.pt"))
    library = native._LIBRARIES["cpp"]
    with open(os.path.join(args.out_dir, "library.txt"), "w") as f:
        f.write(library + "\n")

    if args.check:
        missing = set(FUSED_OPS[args.model]) - fused_ops_in_package(package)
        if missing:
            print(f"the package does not call avkernels::{', avkernels::'.join(sorted(missing))}", file=sys.stderr)
            return 1
        print(f"the package calls the fused ops: avkernels::{', avkernels::'.join(FUSED_OPS[args.model])}")
    print(f"wrote {package}, {os.path.join(args.out_dir, 'sample.pt')}")
    print(f"run it:  <run_aoti> {library} {package} {os.path.join(args.out_dir, 'sample.pt')}")
    print(f"         python examples/aoti/run_aoti.py {library} {package} {os.path.join(args.out_dir, 'sample.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
