"""Run an AOTInductor package of export_aoti.py from Python without avkernels' Python code: only its op library.

    python examples/aoti/run_aoti.py <op library .so> <model.pt2> <sample.pt> [tolerance]

Loads the op library with ``torch.ops.load_library`` (it registers ``torch.ops.avkernels.*`` and their C++ kernels;
nothing of the ``avkernels`` package is imported), the package with ``torch._inductor.aoti_load_package``, runs the
sample's inputs and compares with PyTorch's outputs: prints the largest absolute difference and exits with 1 when it
is above the tolerance (default 1e-4), 3 when avkernels' Python ops were imported after all.
"""

import sys

import torch


def main(argv) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    library, package, sample_path = argv[:3]
    tolerance = float(argv[3]) if len(argv) == 4 else 1e-4
    torch.ops.load_library(library)
    runner = torch._inductor.aoti_load_package(package)
    sample = torch.load(sample_path, weights_only=True)  # tensors only: a file that would run code is refused
    with torch.no_grad():
        outputs = runner(*sample["inputs"])
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    if len(outputs) != len(sample["expected"]):
        print(f"the package returned {len(outputs)} outputs, PyTorch {len(sample['expected'])}", file=sys.stderr)
        return 1
    error = max((got - expected).abs().max().item() for got, expected in zip(outputs, sample["expected"]))
    print(f"outputs: {len(outputs)}, batch {sample['inputs'][0].shape[0]}; max abs difference to PyTorch: {error:.3g}")
    python_ops = sorted(name for name in sys.modules if name == "avkernels" or name.startswith("avkernels."))
    if python_ops:
        print(f"avkernels' Python modules were imported: {python_ops}", file=sys.stderr)
        return 3
    return 0 if error <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
