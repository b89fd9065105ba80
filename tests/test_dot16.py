"""The bf16 products of the cpp kernels (csrc/cpu/dot16.h): the instructions' stand-in against their definition and
against the instructions themselves, the bf16 kernel on the stand-in against the same kernel on the unit, and the
conformance suite's bf16 cases on every path (AVKERNELS_CPU_16BIT=fp32|emulated|avx512_bf16).

Three ways to compute one instruction (``torch.ops.avkernels.dot16_dot`` / ``dot16_round`` by ``unit``): "scalar",
the definition in C++ (any CPU); "emulated", the stand-in's AVX-512F vector code the kernels use; "avx512_bf16", the
instruction. The definition is itself checked against an independent model in Python written from Intel's pseudo-code.
"""

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

import avkernels  # noqa: F401 - loads the extension
from avkernels.dispatch import backend_status

pytestmark = pytest.mark.skipif("cpp" not in avkernels.backends(), reason=f"cpp: {backend_status().get('cpp')}")

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_FLAGS = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []


def ops():
    return torch.ops.avkernels


def isa():
    return ops().cpu_isa()


def skip_unless_unit(unit):
    """Skips, naming the missing unit, when this CPU cannot run ``unit``."""
    if unit == "emulated" and isa() != "avx512":
        pytest.skip("needs AVX-512F (the emulated bf16 kernel is built for the AVX-512 variant); ISA here: " + isa())
    if unit == "avx512_bf16" and not (isa() == "avx512" and avkernels.cpu_features()["avx512_bf16"] == "true"):
        pytest.skip("needs a CPU with AVX-512 BF16 (vdpbf16ps)")


BF16_SPECIALS = [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC1, 0x7FA1,
                 0x7F7F, 0x3F80, 0xBF80, 0x0040]
FP32_SPECIALS = [0, 0x80000000, 1, 0x80000001, 0x7FFFFF, 0x800000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                 0x7F7FFFFF, 0x3F800000]


def random_words(n, generator):
    """int32 words mixing uniform bits, bf16 specials (zeros, subnormals, inf, quiet and signalling NaNs with
    payloads) and values whose products land near fp32's underflow threshold."""
    bits = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int64, generator=generator)
    special = torch.tensor(BF16_SPECIALS)[torch.randint(len(BF16_SPECIALS), (n, 2), generator=generator)]
    tiny = (torch.randint(0, 2, (n, 2), generator=generator) << 15) | (
        torch.randint(0, 24, (n, 2), generator=generator) << 7) | torch.randint(0, 128, (n, 2), generator=generator)
    kind = torch.randint(0, 4, (n,), generator=generator)
    halves = torch.stack([bits & 0xFFFF, (bits >> 16) & 0xFFFF], 1)
    halves = torch.where((kind == 1)[:, None], special, halves)
    halves = torch.where((kind == 2)[:, None], tiny, halves)
    words = halves[:, 0] | (halves[:, 1] << 16)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def random_acc(n, generator, a, b):
    bits = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int64, generator=generator).to(torch.int32)
    pick = torch.randint(len(FP32_SPECIALS), (n,), generator=generator)
    special = torch.tensor(FP32_SPECIALS, dtype=torch.int64)[pick]
    special = torch.where(special >= 2**31, special - 2**32, special).to(torch.int32)
    # minus the high product: the step's sum cancels, exposing its rounding and flushing
    hi = lambda w: ((w.to(torch.int64) >> 16) << 16).to(torch.int32).view(torch.float32)  # noqa: E731
    cancel = (-(hi(a) * hi(b))).view(torch.int32) ^ (bits & 0xFF)
    kind = torch.randint(0, 3, (n,), generator=generator)
    return torch.where(kind == 0, bits, torch.where(kind == 1, special, cancel)).view(torch.float32)


@pytest.mark.parametrize("unit", ["emulated", "avx512_bf16"])
def test_dot_matches_its_definition_bit_for_bit(unit):
    skip_unless_unit(unit)
    g = torch.Generator().manual_seed(22)
    n = 16 * 20000
    a, b = random_words(n, g), random_words(n, g)
    acc = random_acc(n, g, a, b)
    want = ops().dot16_dot(acc, a, b, "scalar").view(torch.int32)
    got = ops().dot16_dot(acc, a, b, unit).view(torch.int32)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(hex(acc.view(torch.int32)[i]), hex(a[i]), hex(b[i]), hex(got[i]), hex(want[i]))
                              for i in bad[:5].tolist()]


@pytest.mark.parametrize("unit", ["emulated", "avx512_bf16"])
def test_round_matches_its_definition_bit_for_bit(unit):
    skip_unless_unit(unit)
    g = torch.Generator().manual_seed(23)
    bits = torch.randint(-2**31, 2**31 - 1, (32 * 20000,), dtype=torch.int32, generator=g)
    ties = (bits & ~0xFFFF) | 0x8000 | (torch.randint(0, 2, bits.shape, dtype=torch.int32, generator=g) << 16)
    special = torch.tensor([0, -2**31, 1, 0x7FFFFF, 0x7F800000, 0x7F7FFFFF, 0x7F800001, 0x7FC00000, -1, 0x7F7F8000])
    x = torch.cat([bits, ties, special.to(torch.int32).repeat(32)]).view(torch.float32)
    assert torch.equal(ops().dot16_round(x, unit), ops().dot16_round(x, "scalar"))


# --------------------------------------------------------------------------------------------- the definition itself


def bf16_value(h):
    return np.array([h << 16], dtype=np.uint32).view(np.float32)[0]


def model_step(acc, x, y):
    """One step of Intel's pseudo-code, srcdest += make_fp32(x) * make_fp32(y), for finite normal operands whose
    exact sum fits a double: one rounding to fp32."""
    exact = Fraction(float(acc)) + Fraction(float(bf16_value(x))) * Fraction(float(bf16_value(y)))
    return np.float32(float(exact))  # exact in a double for these operands, so one rounding


def test_scalar_definition_matches_the_pseudo_code():
    """Finite normal operands within 2^+-6 (so that every exact sum fits a double): the odd pair is added first,
    each step rounded once to nearest even."""
    rng = np.random.default_rng(0)
    n = 4000
    halves = ((rng.integers(0, 2, (n, 4)) << 15) | (rng.integers(121, 133, (n, 4)) << 7) |
              rng.integers(0, 128, (n, 4))).astype(np.int64)
    acc = (rng.standard_normal(n) * 8).astype(np.float32)
    a = halves[:, 0] | (halves[:, 1] << 16)
    b = halves[:, 2] | (halves[:, 3] << 16)
    want = [model_step(model_step(acc[i], a[i] >> 16, b[i] >> 16), a[i] & 0xFFFF, b[i] & 0xFFFF) for i in range(n)]
    to32 = lambda w: torch.from_numpy(np.where(w >= 2**31, w - 2**32, w).astype(np.int32))  # noqa: E731
    got = ops().dot16_dot(torch.from_numpy(acc), to32(a), to32(b), "scalar").numpy()
    assert np.array_equal(got.view(np.uint32), np.array(want, dtype=np.float32).view(np.uint32))


# (acc bits, a word, b word) -> result bits: NaN order (a, then b, then acc, per step; the low pair's step comes last),
# quieting, the default NaN of an invalid step, flushing of subnormal inputs and results. Measured on a Zen 4.
SPECIAL_CASES = [
    (0x3F800000, 0x3F803F80, 0x3F803F80, 0x40400000),  # 1 + 1 + 1
    (0x7F800011, 0x3F803F80, 0x3F803F80, 0x7FC00011),  # signalling NaN acc comes out quieted
    (0x3F800000, 0x7FE23F80, 0x3F803F80, 0x7FE20000),  # a's NaN
    (0x7FC00022, 0x3F803F80, 0x3F80FFD3, 0xFFD30000),  # b's NaN beats acc's
    (0x3F800000, 0x7FA1FFD3, 0x3F803F80, 0xFFD30000),  # the low step's NaN comes last and wins
    (0x3F800000, 0xFFD37FA1, 0x3F803F80, 0x7FE10000),  # ... quieted
    (0x3F800000, 0x7F803F80, 0x00003F80, 0xFFC00000),  # inf * 0: the default NaN
    (0xFFC00033, 0x7F803F80, 0x00003F80, 0xFFC00033),  # ... unless acc is a NaN
    (0x3F800000, 0x7F80FF80, 0x3F803F80, 0xFFC00000),  # inf - inf
    (0x3F800000, 0x00010001, 0x7F007F00, 0x3F800000),  # subnormal bf16 inputs read as zero
    (0x00000001, 0x00000000, 0x00000000, 0x00000000),  # subnormal acc read as zero
    (0x00800000, 0x00000080, 0x00000000 | 0xBF00, 0x00000000),  # 2^-126 - 2^-127: subnormal result flushed
    (0x00800000, 0x295E0635, 0x8A210257, 0x00000000),  # 2^-126 - 1.7 2^-151: tiny after rounding, flushed
    (0x80800000, 0x8A710000, 0x942D0000, 0x80800000),  # -2^-126 + 2^-193: rounds to -2^-126, kept
]


def test_scalar_definition_special_values():
    as32 = lambda xs: torch.tensor([x - 2**32 if x >= 2**31 else x for x in xs], dtype=torch.int32)  # noqa: E731
    acc, a, b, want = (as32([c[i] for c in SPECIAL_CASES] * 16) for i in range(4))
    got = ops().dot16_dot(acc.view(torch.float32), a, b, "scalar").view(torch.int32)
    assert got.tolist() == want.tolist()


def test_units_are_refused_by_name():
    x = torch.zeros(16)
    with pytest.raises(RuntimeError, match="unit must be 'scalar', 'emulated' or 'avx512_bf16', got 'amx'"):
        ops().dot16_dot(x, x.int(), x.int(), "amx")
    with pytest.raises(RuntimeError, match="a multiple of 32"):
        ops().dot16_round(torch.zeros(16), "scalar")


# ------------------------------------------------------------------------------------------------------ the kernels

KERNEL_CHECK = """
import torch, avkernels
ops = torch.ops.avkernels
assert avkernels.cpu_features()["compute_16bit"] == {unit!r}, avkernels.cpu_features()
g = torch.Generator().manual_seed(7)
results = []
for (B, M, N, D, E) in ((3, 37, 71, 13, 19), (2, 70, 130, 16, 16), (1, 5, 3, 1, 2)):
    q, k, v, do = (torch.randn(*s, generator=g).bfloat16() for s in ((B, M, D), (B, N, D), (1, N, E), (B, M, E)))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    for act in ("none", "tanh_relu"):
        for p in (0.0, 0.4):
            seed = torch.tensor([11])
            o, mask = ops.tanh_attention(q, k, v.expand(B, -1, -1), seed, 0.3, p, act, p > 0)
            results += [o, mask, *ops.tanh_attention_backward(do, q, k, v, o, seed, 0.3, p, act)]
torch.save(results, {path!r})
"""


def run_kernels(unit, path):
    env = {**os.environ, "AVKERNELS_CPU_16BIT": unit}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK.format(unit=unit, path=str(path))], env=env,
                          cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


def test_bf16_kernel_on_the_stand_in_is_the_kernel_on_the_unit(tmp_path):
    """Forward and backward (strided q, shared v, partial tiles, dropout, both activations): the stand-in gives the
    bits the unit gives, and the same dropout mask."""
    skip_unless_unit("avx512_bf16")
    native = run_kernels("avx512_bf16", tmp_path / "native.pt")
    emulated = run_kernels("emulated", tmp_path / "emulated.pt")
    for i, (x, y) in enumerate(zip(native, emulated)):
        assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if y.dtype == torch.bfloat16 else y), i


@pytest.mark.parametrize("unit", ["avx512_bf16", "emulated", "fp32"])
def test_conformance_suite_on_every_16bit_path(unit):
    """The conformance suite's bf16 cases of cpp (outputs and every gradient against fp64, dropout masks replayed
    by the reference) with AVKERNELS_CPU_16BIT=unit: on the unit where this CPU has it, on the stand-in, and
    widened to fp32."""
    skip_unless_unit(unit)
    env = {**os.environ, "AVKERNELS_CPU_16BIT": unit}
    check = (f"import torch, avkernels; f = avkernels.cpu_features()['compute_16bit']; "
             f"assert f == {unit!r}, f")
    done = subprocess.run([sys.executable, "-c", check], env=env, cwd=os.path.dirname(HERE), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         os.path.join(HERE, "test_conformance.py"), "-k", "cpp and bfloat16 and tanh_attention"],
        env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
