"""tanh_attention alone at GRJCA's official shape (q (B, 1024, 16), k and v (B, 512, 16), bf16, tanh_relu): forward
without and with dropout 0.6, and backward with dropout, on whichever bf16 path AVKERNELS_CPU_16BIT picks.

    AVKERNELS_CPU_16BIT=fp32 python benchmarks/bf16_op.py 8
    AVKERNELS_CPU_16BIT=avx512_bf16 python benchmarks/bf16_op.py 8     # alternate the two, several times

Times are the calling thread's CPU time (one intra-op thread), medians of 7 interleaved rounds: on a shared,
overloaded machine wall time measures the other processes as much as the kernel.
"""

import statistics
import sys
import time

import torch

import avkernels  # noqa: F401 - loads the extension

ops = torch.ops.avkernels
torch.set_num_threads(1)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 8
q, do = torch.randn(B, 1024, 16).bfloat16(), torch.randn(B, 1024, 16).bfloat16()
k, v = torch.randn(B, 512, 16).bfloat16(), torch.randn(B, 512, 16).bfloat16()
seed = torch.tensor([3])
o = ops.tanh_attention(q, k, v, seed, 0.03, 0.6, "tanh_relu", False)[0]
fns = {
    "fwd p=0": lambda: ops.tanh_attention(q, k, v, seed, 0.03, 0.0, "tanh_relu", False),
    "fwd p=.6": lambda: ops.tanh_attention(q, k, v, seed, 0.03, 0.6, "tanh_relu", False),
    "bwd p=.6": lambda: ops.tanh_attention_backward(do, q, k, v, o, seed, 0.03, 0.6, "tanh_relu"),
}
for f in fns.values():
    f()
times = {name: [] for name in fns}
for _ in range(7):
    for name, f in fns.items():
        start = time.thread_time()
        f()
        times[name].append(time.thread_time() - start)
print(avkernels.cpu_features()["compute_16bit"], {n: f"{1e3 * statistics.median(t):.2f} ms" for n, t in times.items()})
