"""Generates csrc/cpu/tanh_table.h: the fp32 tanh of the AVX-512 kernels (csrc/cpu/simd.h, tanh_vec) as piecewise
degree-DEG polynomials of a = min(|x|, CLAMP) >= 0, selected by a 32-entry table lookup (one vpermt2ps per row).

slot = (bits(a + 1/16) >> 21) & 31: the exponent and top two mantissa bits of a' = a + 1/16 in [1/16, 16), i.e.
4 intervals per binade of a' over 8 binades = 32 intervals, the first starting at a = 0. On interval j (a in
[lo_j, hi_j)) tanh(a) ~= c0 + u (c1 + u (c2 + ...)), u = a - lo_j (exact), c0 = fl32(tanh(lo_j)).
Writes the header and reports the error of an fp32 emulation (numpy) on a dense sample; the C++ tests check the
compiled function against fp64 tanh. The committed table is `python scripts/gen_tanh_table.py 5 9.5 1` (0.99 ulp
over all 2^32 fp32 inputs, measured exhaustively in C++).
Usage: python scripts/gen_tanh_table.py [DEG [CLAMP [LAWSON_ITERATIONS]]]
"""
import os
import sys

import numpy as np

DEG = int(sys.argv[1]) if len(sys.argv) > 1 else 5
OFFSET = np.float32(1.0 / 16)
CLAMP = np.float32(sys.argv[2]) if len(sys.argv) > 2 else np.float32(9.5)
LAWSON = int(sys.argv[3]) if len(sys.argv) > 3 else 40


def f32(v):
    return np.float32(v)


def fit_interval(lo, hi, deg, c0_zero):
    """Relative-error near-minimax fit (IRLS/Lawson) with c0 fixed to fp32, then c1.. rounded one at a time."""
    lo64, hi64 = float(lo), float(hi)
    span = hi64 - lo64
    ext_lo = lo64  # a >= lo always (u >= 0 is exact); extend the top by a little for rounding of a + 1/16
    ext_hi = hi64 + span * 1e-5
    k = np.arange(4000)
    nodes = (1 - np.cos(np.pi * (k + 0.5) / len(k))) / 2
    a = ext_lo + (ext_hi - ext_lo) * nodes
    u = a - lo64
    f = np.tanh(a)
    coef = [0.0 if c0_zero else float(f32(np.tanh(lo64)))]
    w = np.ones_like(a)
    for j in range(1, deg + 1):
        # fit the remaining coefficients c_j..c_deg to (f - sum_{i<j} c_i u^i) / u^j
        fixed = sum(c * u ** i for i, c in enumerate(coef))
        S = max(u.max(), 1e-30)
        A = np.stack([(u / S) ** i for i in range(j, deg + 1)], axis=1)
        rhs = f - fixed
        W = 1.0 / np.abs(f)
        wt = np.ones_like(a)
        best = None
        for it in range(max(LAWSON, 1)):  # Lawson iteration towards the minimax relative error
            sol, *_ = np.linalg.lstsq(A * (W * np.sqrt(wt))[:, None], rhs * W * np.sqrt(wt), rcond=None)
            err = np.abs((A @ sol - rhs) * W)
            if best is None or err.max() < best[0]:
                best = (err.max(), sol)
            wt = wt * (err + 1e-3 * err.max())
            wt = wt / wt.mean()
        sol = best[1] / S ** np.arange(j, deg + 1)
        coef.append(float(f32(sol[0])))
    return coef


def build(deg):
    slots = {}
    for k in range(-4, 4):
        for q in range(4):
            ap_lo = f32(2.0 ** k * (1 + q / 4))
            ap_hi = f32(2.0 ** k * (1 + (q + 1) / 4))
            lo, hi = f32(ap_lo - OFFSET), f32(ap_hi - OFFSET)
            bits = ap_lo.view(np.uint32)
            slot = int((bits >> 21) & 31)
            assert slot not in slots
            if lo > CLAMP:
                slots[slot] = (lo, [float(f32(np.tanh(float(lo))))] + [0.0] * deg)
                continue
            slots[slot] = (lo, fit_interval(lo, min(hi, f32(CLAMP * 1.001)), deg, lo == 0))
    assert len(slots) == 32
    lo_tab = np.array([slots[s][0] for s in range(32)], dtype=np.float32)
    c_tab = np.array([slots[s][1] for s in range(32)], dtype=np.float32)  # (32, deg+1)
    return lo_tab, c_tab


def fma32(a, b, c):
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def emulate(x, lo_tab, c_tab, deg):
    x = x.astype(np.float32)
    a = np.minimum(np.abs(x), CLAMP).astype(np.float32)
    ap = (a + OFFSET).astype(np.float32)
    slot = (ap.view(np.uint32) >> 21) & 31
    u = (a - lo_tab[slot]).astype(np.float32)
    y = c_tab[slot, deg]
    for i in range(deg - 1, -1, -1):
        y = fma32(y, u, c_tab[slot, i])
    return np.copysign(y, x).astype(np.float32)


def ulp_err(y, x):
    ref = np.tanh(x.astype(np.float64))
    m, e = np.frexp(ref)
    ulp = np.ldexp(1.0, np.maximum(e - 1, -126) - 23)
    return np.abs(y.astype(np.float64) - ref) / ulp


if __name__ == "__main__":
    lo_tab, c_tab = build(DEG)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(0, 10, 4_000_000), np.exp(rng.uniform(np.log(1e-30), np.log(10), 4_000_000)),
          rng.uniform(0, 1, 4_000_000)]
    # all floats near interval boundaries
    bnd = np.concatenate([lo_tab.astype(np.float32)])
    near = (bnd.view(np.int32)[:, None] + np.arange(-64, 65)[None, :]).ravel()
    xs.append(np.abs(near.view(np.float32)).astype(np.float64))
    x = np.concatenate(xs).astype(np.float32)
    x = x[np.isfinite(x)]
    err = ulp_err(emulate(x, lo_tab, c_tab, DEG), x)
    i = np.argmax(err)
    sat = emulate(np.array([CLAMP, 1e30, np.inf], dtype=np.float32), lo_tab, c_tab, DEG)
    print(f"deg {DEG} clamp {CLAMP} lawson {LAWSON}: fp32 emulation max ulp {err[i]:.4f} at x = {x[i]!r}; "
          f"mean {err.mean():.4f}; saturation value {sat!r}; max |c| {np.abs(c_tab).max():.3g}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc", "cpu", "tanh_table.h")
    rows = [lo_tab] + [c_tab[:, i] for i in range(DEG + 1)]
    with open(out, "w") as fh:
        fh.write(f"// Generated by scripts/gen_tanh_table.py {' '.join(sys.argv[1:])}; do not edit.\n")
        fh.write("// The fp32 tanh of the AVX-512 kernels (simd.h, tanh_vec): row 0 is each interval's start lo, rows 1..\n")
        fh.write(f"// are c0 .. c{DEG} of tanh(a) ~= c0 + u (c1 + u (c2 + ...)), u = a - lo; column = (bits(a + 1/16) >> 21) & 31.\n")
        fh.write("#pragma once\n\nnamespace avk {\nnamespace cpu {\n\n")
        fh.write(f"constexpr int kTanhDegree = {DEG};\nconstexpr float kTanhClamp = {float(CLAMP)!r}f;\n")
        fh.write(f"alignas(64) inline constexpr float kTanhTable[{DEG + 2}][32] = {{\n")
        for row in rows:
            vals = [f"{v:.9e}f" for v in row]
            lines = [", ".join(vals[i:i + 6]) for i in range(0, 32, 6)]
            fh.write("    {" + ",\n     ".join(lines) + "},\n")
        fh.write("};\n\n}  // namespace cpu\n}  // namespace avk\n")
    print("wrote", os.path.normpath(out))
