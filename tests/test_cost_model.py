"""benchmarks/cost_model.py and its committed table benchmarks/results/gpu-cost-model.json.

Nothing here compiles (the table took a minute of ahead-of-time compiles to make): the FLOP, transcendental and byte
counts of the table equal :mod:`avkernels.flops`'s, the MMA work read from the SASS covers the arithmetic the
kernels must do (exactly, at the official shape), the SASS reader counts a known listing right, and the launches
in the table are still the ones the launchers make (else: regenerate with ``python benchmarks/cost_model.py``).
"""

import json
import os
import sys
from collections import defaultdict

import pytest

from avkernels.flops import tanh_attention_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cost_model  # noqa: E402

with open(os.path.join(ROOT, "benchmarks", "results", "gpu-cost-model.json")) as _f:
    MODEL = json.load(_f)
ROWS = MODEL["kernels"]


def _calls():
    """Rows grouped into op calls: (shape, dtype, "forward" | "inference" | "backward") -> kernel rows."""
    calls = defaultdict(list)
    for r in ROWS:
        part = "backward" if not r["kernel"].endswith("fwd_kernel") else (
            "inference" if r["mode"] == "inference" else "forward")
        calls[(r["shape"], r["dtype"], part)].append(r)
    return calls


@pytest.mark.parametrize("key", sorted(_calls()), ids=lambda k: "-".join(k))
def test_counts_equal_avkernels_flops(key):
    rows = _calls()[key]
    s = rows[0]["sizes"]
    activation = None if s["activation"] == "none" else s["activation"]
    mode = "backward" if key[2] == "backward" else "forward"
    cost = tanh_attention_cost(s["B"], s["Mq"], s["N"], s["D"], s["E"], shared_v=s["shared_v"],
                               activation=activation, mode=mode, itemsize=s["itemsize"])
    assert len(rows) == (2 if mode == "backward" else 1)
    assert sum(r["flops"] for r in rows) == cost.flops
    assert sum(r["recompute_flops"] for r in rows) == cost.recompute_flops
    assert sum(r["transcendentals"] for r in rows) == cost.transcendentals
    assert sum(r["op_bytes"] for r in rows) == cost.bytes


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['shape']}-{r['dtype']}-{r['mode']}-{r['kernel']}")
def test_rows_follow_from_their_sizes(row):
    expected = cost_model.reference_counts(row["kernel"], row["sizes"])
    assert {k: row[k] for k in expected} == expected
    assert row["bound"] == max(row["times_s"], key=row["times_s"].get)
    assert row["predicted_s"] == row["times_s"][row["bound"]]


def test_sass_mma_work_covers_the_arithmetic():
    """MMA FLOPs read from the SASS (loop trips x instructions x shapes) against the kernels' arithmetic: never
    less, and exactly that at the official shape, which pins the trip counts and the warpgroup accounting."""
    for r in ROWS:
        assert r["mma_flops_total"] >= r["mma_flops_needed"], r["kernel"]
        assert r["mufu_per_tanh"] >= 2.0 - 1e-9  # exp2 and a reciprocal per tanh
        if r["shape"] == "official":
            assert r["mma_flops_total"] == r["mma_flops_needed"], (r["dtype"], r["kernel"])


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;            /* 0x0000000402047981 */
        /*0020*/                   HGMMA.64x32x8.F32.TF32 R24, R48, gdesc[UR8], RZ, !UPT ;
        /*0030*/                   MUFU.EX2 R5, R4 ;                           /* 0x0000000400057308 */
        /*0038*/                   IMAD.WIDE.U32 R6, R5, 0x3, RZ ;
        /*0040*/              @!P0 BRA 0x10 ;                                  /* 0xffffffc0000c9947 */
        /*0050*/                   STG.E.U16 desc[UR4][R2.64], R5 ;            /* 0x0000000502007986 */
        /*0060*/                   EXIT ;                                      /* 0x000000000000794d */
        /*0070*/                   BRA 0x70;                                   /* 0xfffffffc00fc7947 */
"""


def test_sass_reader_counts_a_known_listing():
    instructions = cost_model.parse_sass(SASS)
    assert [i["opcode"].split(".")[0] for i in instructions] == [
        "MOV", "LDG", "HGMMA", "MUFU", "IMAD", "BRA", "STG", "EXIT", "BRA"]
    assert cost_model.loops(instructions) == [(0x10, 0x40)]  # the trap loop after EXIT is not one
    c = cost_model.count(instructions, trips=3)
    assert c["warp_instructions"] == 1 + 5 * 3 + 3
    assert c["pipes"]["mufu"] == 3 and c["pipes"]["lsu"] == 3 + 1 and c["pipes"]["alu"] == 1  # MOV
    assert c["pipes"]["imad"] == 3  # IMAD runs on the FMA-heavy pipe, not the ALU
    assert c["mma_flops"] == {"tf32": 3 * 2 * 64 * 32 * 8 / 4}  # one warp's share of the warpgroup's product
    assert c["global_load_bytes"] == 3 * 32 * 16 and c["global_store_bytes"] == 32 * 2
    assert c["opcodes"]["IMAD.WIDE.U32"] == 3


def test_fma_pipes_share_fp32_and_keep_imad_on_the_heavy_one():
    compiled = {"sass": SASS.replace("MUFU.EX2 R5, R4", "FFMA R5, R4, R4, R4"), "num_warps": 4, "registers": 32,
                "shared": 0, "local": 0, "stack": 0}
    ref = {"flops": 0, "transcendentals": 0, "bytes": 0}
    row = cost_model.predict(compiled, (132,), trips=1, elements=1, ref=ref, needed_mma=0)
    clock, lanes = cost_model.HW["clock_hz"], 4 * 32  # one program per SM, 4 warps, one IMAD and one FFMA each
    assert row["times_s"]["fma"] == pytest.approx(max(lanes / 64, 2 * lanes / 128) / clock)


def test_occupancy():
    # 93 registers -> 96 per thread, 3072 per warp: 21 warps fit, two 8-warp programs
    occ = cost_model.occupancy(93, 10240, 8)
    assert occ["blocks_per_sm"] == 2 and occ["warps_per_sm"] == 16 and occ["limited_by"] == "registers"
    occ = cost_model.occupancy(32, 200 * 1024, 4)
    assert occ["blocks_per_sm"] == 1 and occ["limited_by"] == "shared memory"


def test_the_table_models_the_launches_made_now():
    pytest.importorskip("triton")
    launches, info = cost_model.scenarios()
    assert info["official_calls_identical"] and info["official_layouts"] == MODEL["official_layouts"]
    assert len(launches) == len(ROWS)
    switches = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E", "DROPOUT", "HEAD_LOOPS", "PRECISION")
    for (shape, label, mode, (kernel, grid, _, kwargs), sizes), row in zip(launches, ROWS):
        where = f"{shape} {label} {mode} {row['kernel']}: regenerate with python benchmarks/cost_model.py"
        assert (shape, label, mode, kernel.__name__) == (row["shape"], row["dtype"], row["mode"], row["kernel"]), where
        assert sizes == row["sizes"] and grid[0] == row["grid"], where
        assert kwargs["num_warps"] == row["num_warps"], where
        assert {k: str(kwargs[k]) for k in switches} == {k: row["constexprs"][k] for k in switches}, where


def test_dropout_generator_counted_only_where_dropout_runs():
    """The Philox count keys on unsigned wide multiplies: in the inference kernels only a few outside the main loop
    (integer divisions of the grid bookkeeping), and at least one call per four keys with dropout."""
    for r in ROWS:
        calls = r["per_element"]["philox_calls"]
        if r["sizes"]["dropout_p"] == 0:
            assert calls < 0.01, (r["shape"], r["dtype"], r["mode"], r["kernel"])
        else:
            assert calls >= 0.25, (r["shape"], r["dtype"], r["mode"], r["kernel"])


GATE_ROWS = MODEL["gate_kernels"]


@pytest.mark.parametrize("row", GATE_ROWS, ids=lambda r: f"{r['op']}-{r['dtype']}-{r['mode']}")
def test_gate_counts_equal_avkernels_flops(row):
    expected = cost_model.gate_cost_counts(row["op"], row["sizes"], row["mode"] == "backward")
    assert {k: row[k] for k in expected} == expected
    assert row["predicted_s"] == max(row["times_s"].values())


def test_the_gate_rows_model_the_launches_made_now():
    pytest.importorskip("triton")
    launches = cost_model.gate_scenarios()
    assert len(launches) == len(GATE_ROWS)
    for (op, label, mode, (kernel, grid, _, kwargs), sizes), row in zip(launches, GATE_ROWS):
        where = f"{op} {label} {mode}: regenerate with python benchmarks/cost_model.py"
        assert (op, label, mode, kernel.__name__, sizes) == (row["op"], row["dtype"], row["mode"], row["kernel"],
                                                             row["sizes"]), where
        assert grid[0] == row["grid"] and kwargs["num_warps"] == row["num_warps"], where
        assert {k: str(kwargs[k]) for k in ("BLOCK_R", "BLOCK_D", "ONE_TILE")} == {
            k: row["constexprs"][k] for k in ("BLOCK_R", "BLOCK_D", "ONE_TILE")}, where
