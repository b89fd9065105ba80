#!/usr/bin/env bash
# One command from a plain checkout to a GPU report, on a machine with no network:
#
#     bash scripts/gpu_check.sh OUTDIR              # the real run (a CUDA GPU, torch with CUDA, triton, nvcc)
#     bash scripts/gpu_check.sh --dry-run OUTDIR    # the same stages on CPU: interpreter, tiny shapes, no CUDA build
#
# Stages run in order, each under its own `timeout`, and a failed or timed-out stage never stops the later ones.
# All of them together stay within GPU_CHECK_TOTAL_S (default 450 s, so the whole run fits 8 minutes): a stage gets
# the smaller of its own budget and what is left, and one that would start with under 20 s left is skipped.
# GPU time is scarce and the machine is fresh, so the order is: what must work first (build, tests), then the
# numbers (the long shape, the ops, the fusions' training steps), then the slow extra (torch.compile).
#
# Writes into OUTDIR: logs/<stage>.log, junit/<stage>.xml, bench/*.json|md, stages.tsv, summary.json and
# summary.md (printed at the end). Nothing is installed into site-packages: the extensions are built in place and
# the checkout goes first on PYTHONPATH, so the torch and triton already on the machine are used as they are.
#
# Environment: PYTHON (default python3), GPU_CHECK_TOTAL_S, GPU_CHECK_BUDGET_<STAGE> (seconds; stage names with
# '-' spelt '_', e.g. GPU_CHECK_BUDGET_TESTS_TRITON=300), MAX_JOBS (default: all cores).

set -uo pipefail

DRY_RUN=0
OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) [ -z "$OUTDIR" ] || { echo "gpu_check.sh: one OUTDIR only" >&2; exit 2; }; OUTDIR="$arg" ;;
    esac
done
[ -n "$OUTDIR" ] || { echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR"/logs "$OUTDIR"/junit "$OUTDIR"/bench
OUTDIR="$(cd "$OUTDIR" && pwd)"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONDONTWRITEBYTECODE=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # triton 3.9 warns when unset; 3.6 ignores it
cd "$ROOT" || exit 2

TOTAL_S="${GPU_CHECK_TOTAL_S:-450}"
MIN_STAGE_S=20
START=$(date +%s)
printf 'stage\tstatus\trc\tseconds\tbudget\n' > "$OUTDIR/stages.tsv"
echo "$DRY_RUN" > "$OUTDIR/dry_run"

# stage NAME BUDGET_S COMMAND...: runs COMMAND (through bash -c) with its output in logs/NAME.log.
stage() {
    local name="$1" budget="$2"; shift 2
    local var="GPU_CHECK_BUDGET_${name//-/_}"
    var="${var^^}"
    budget="${!var:-$budget}"
    local left=$(( TOTAL_S - ($(date +%s) - START) ))
    [ "$left" -lt "$budget" ] && budget="$left"
    local log="$OUTDIR/logs/$name.log"
    if [ "$budget" -lt "$MIN_STAGE_S" ]; then
        echo "skipped: a budget of ${budget}s (${left}s of the ${TOTAL_S}s total left)" > "$log"
        printf '%s\tskipped\t-\t0\t%s\n' "$name" "$budget" >> "$OUTDIR/stages.tsv"
        echo "== $name: skipped (${budget}s budget)"
        return
    fi
    echo "== $name (budget ${budget}s)"
    local t0 rc status
    t0=$(date +%s.%N)
    # -k: a stage that ignores SIGTERM (a wedged CUDA call) is killed 10 s later.
    timeout -k 10 "$budget" bash -c "$*" > "$log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case "$rc" in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$budget" >> "$OUTDIR/stages.tsv"
    echo "   $status (rc $rc, ${secs}s)"
}

# pytest exits 5 when every test was deselected or skipped (no GPU, backend not built): that is a result, not a
# failure of the stage; the report counts the skips.
pytest_stage() {
    local name="$1"; shift
    echo "$PYTHON -m pytest -p no:cacheprovider -q -rfEs --durations=10 --junitxml='$OUTDIR/junit/$name.xml' $*; r=\$?; [ \$r -eq 5 ] && r=0; exit \$r"
}

if [ "$DRY_RUN" = 1 ]; then
    # CPU stand-ins for every stage: the interpreter for Triton, tiny shapes, the reference provider.
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    stage env 60 "$PYTHON scripts/gpu_check_bench.py env --out '$OUTDIR/env.json'"
    stage build 60 "echo 'dry run: no extension build'; $PYTHON -c 'import avkernels; print(avkernels.backend_status())'"
    stage tests-cuda 60 "$(pytest_stage tests-cuda "tests/test_cuda_backend.py")"
    stage tests-triton 90 "$(pytest_stage tests-triton "tests/test_conformance.py -k 'test_tanh_attention and triton and ones and not relu and float32'")"
    stage tests-gpu 60 "$(pytest_stage tests-gpu "tests/test_gpu_paths.py")"
    stage bench-long 60 "$PYTHON scripts/gpu_check_bench.py long --tiny --target-s 0.02 --out '$OUTDIR/bench/long.json'"
    stage bench-ops 90 "$PYTHON benchmarks/run.py --name ops --out-dir '$OUTDIR/bench' --no-plots --providers reference -- --bench-smoke -k 'test_tanh_attention and full'"
    stage bench-fusion 90 "$PYTHON benchmarks/run.py --name fusion --out-dir '$OUTDIR/bench' --no-plots --providers reference -- --bench-smoke -k 'test_fusion and JCA and not RJCA and train'"
    printf '%s\tskipped\t-\t0\t0\n' bench-compile >> "$OUTDIR/stages.tsv"
    echo "dry run: torch.compile is not timed" > "$OUTDIR/logs/bench-compile.log"
else
    "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
        || echo "gpu_check.sh: no CUDA GPU visible to torch; the GPU stages will fail (--dry-run is the CPU check)" >&2
    stage env 30 "$PYTHON scripts/gpu_check_bench.py env --out '$OUTDIR/env.json'"
    # Only the device's own architecture: half the nvcc work of the default sm_80 + sm_90 list.
    ARCH="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
    # A failed extension build never fails setup.py (the library then lacks that backend): the stage checks that the
    # cuda backend came out of it, and records the backends again for the report.
    stage build 150 "TORCH_CUDA_ARCH_LIST='${ARCH:-9.0}' $PYTHON setup.py build_ext --inplace \
        && $PYTHON scripts/gpu_check_bench.py env --out '$OUTDIR/env.json' > /dev/null \
        && $PYTHON -c 'import avkernels, sys; s = avkernels.backend_status(); print(s); sys.exit(s[\"cuda\"] != \"available\")'"
    # The benchmark plugin refuses a provider that is not available: name only those the build produced.
    PROVIDERS="$(timeout 60 "$PYTHON" -c 'import avkernels; print(",".join(["reference"] + [b for b in avkernels.backends() if b in ("triton", "cuda")]))' 2>/dev/null)"
    PROVIDERS="${PROVIDERS:-reference}"
    # The conformance suite (tests/test_conformance.py) holds each op's checks for every backend: its cuda and triton
    # cases run here, beside what is particular to each backend.
    stage tests-cuda 90 "$(pytest_stage tests-cuda "tests/test_cuda_backend.py tests/test_conformance.py -k cuda")"
    # A triton that cannot compile the kernels fails every test, each after a compile attempt: stop after 50 and
    # leave the time to the benchmarks (the first 50 say what is wrong).
    stage tests-triton 150 "$(pytest_stage tests-triton "--maxfail=50 tests/test_conformance.py tests/test_triton_tanh_attention.py tests/test_triton_gates.py tests/test_triton_modules.py -k triton")"
    # Two of these compile with inductor (tens of seconds each on a fresh machine).
    stage tests-gpu 90 "$(pytest_stage tests-gpu "tests/test_gpu_paths.py")"
    stage bench-long 45 "$PYTHON scripts/gpu_check_bench.py long --out '$OUTDIR/bench/long.json'"
    stage bench-ops 60 "$PYTHON benchmarks/run.py --full --name ops --out-dir '$OUTDIR/bench' --no-plots --target-s 0.2 --providers $PROVIDERS -- -k 'official and B64 and (test_tanh_attention or test_gate or test_stage_gate)'"
    stage bench-fusion 60 "$PYTHON benchmarks/run.py --full --name fusion --out-dir '$OUTDIR/bench' --no-plots --target-s 0.3 --providers $PROVIDERS -- -k 'test_fusion and official and B64 and train'"
    # torch.compile spends most of a minute per model compiling: the main model only.
    stage bench-compile 75 "$PYTHON benchmarks/run.py --full --name compile --out-dir '$OUTDIR/bench' --no-plots --target-s 0.3 --providers torch_compile -- -k 'test_fusion and official and B64 and train and GRJCA'"
fi

# The report is never skipped: it is what the run is for.
"$PYTHON" scripts/gpu_check_report.py "$OUTDIR" --elapsed "$(( $(date +%s) - START ))"
