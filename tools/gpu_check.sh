#!/usr/bin/env bash
# What only a GPU can check and measure, on one GPU in under 8 minutes (docs/benchmarks.md,
# "GPU check"). Each part runs under its own time budget and the script goes on past a
# part that fails or runs out of time:
#
#   kernels    device-to-device copy bandwidth; tools/bench_kernels.py (compiled Triton GRPO loss,
#              naive torch, Liger-Kernel's triton_grpo_loss when importable) at T in {16384, 32768}
#              x V/tp in {19008, 152064}, bf16, quoted against that copy bandwidth; the compiled
#              kernels against the fp32 torch reference at the same shapes (the tests' bounds)
#   train      bf16 forward + backward of a 2.1B R1V-shaped model (tools/gpu_check.py TRAIN_ARCHS),
#              local backend, then TE + FP8 where transformer_engine imports: tokens/s, MFU
#   isolation  packed-row isolation on CUDA (local backend), then the CUDA-only tests with pytest
#              (compiled Triton kernel cases, TE varlen isolation, bf16 training)
#   generate   HF rollout engine generation tokens/s (0.5B R1V-shaped model, batch 16)
#
# Usage: bash tools/gpu_check.sh   (from anywhere; it runs in the repository root)
# Environment:
#   OUT=DIR        where gpu_check.json, gpu_check_rows.md and gpu_check.log go (./gpu_check_out)
#   WHEELS=DIR     wheels to install (--no-deps --no-index) when their distribution is missing:
#                  Liger-Kernel, megatron-core, ... (default: shared/wheels, else .whl)
#   PYTHON=EXE     the interpreter (default: .venv/bin/python, else python3, whichever imports torch)
#   PARTS="..."    the parts to run (default: kernels train isolation generate)
#   BUDGET_KERNELS, BUDGET_TRAIN, BUDGET_ISOLATION, BUDGET_GENERATE   seconds per part
# Without a CUDA device it prints "no CUDA device: nothing measured", writes a gpu_check.json
# that says so and exits 0 (CI runs it as a smoke test). Exit status otherwise: 0 when every
# part passed, 1 when one failed or ran out of time (the record is written either way).

set -uo pipefail  # no -e: a failing part must not stop the others

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-./gpu_check_out}
PARTS=${PARTS:-kernels train isolation generate}
# Budgets sum to 7 min, leaving ~1 min of the 8 for setup and the report.
BUDGET_KERNELS=${BUDGET_KERNELS:-130}
BUDGET_TRAIN=${BUDGET_TRAIN:-130}
BUDGET_ISOLATION=${BUDGET_ISOLATION:-100}
BUDGET_GENERATE=${BUDGET_GENERATE:-60}
export PYTHONUNBUFFERED=1

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
        return
    fi
    local candidate
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    echo python3
}

# The no-CUDA record; a bare printf when even Python cannot write it (no torch, no python).
record_nothing() {
    local reason=$1
    echo "no CUDA device: nothing measured ($reason)"
    if ! "$PY" tools/gpu_check.py nothing --out "$OUT" --reason "$reason" >/dev/null 2>&1; then
        printf '{"cuda": false, "measured": false, "message": "%s", "date": "%s"}\n' \
            "no CUDA device: nothing measured ($reason)" "$(date +%F)" >"$OUT/gpu_check.json"
    fi
}

wheel_dir() {
    local dir
    for dir in "${WHEELS:-}" shared/wheels .whl; do
        if [ -n "$dir" ] && [ -d "$dir" ]; then
            echo "$dir"
            return
        fi
    done
}

# Wheels whose distribution is not installed go into a private folder on PYTHONPATH, nothing
# fetched (the GPU machine may have no network). The project itself is installed editable
# when megatron_r1v.kernels does not import (kernels/ maps to it only through the install).
setup_python() {
    local dir whl dist missing=()
    SITE="$WORK/site"
    mkdir -p "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    dir=$(wheel_dir)
    if [ -n "$dir" ]; then
        for whl in "$dir"/*.whl; do
            [ -e "$whl" ] || continue
            dist=$(basename "$whl")
            dist=${dist%%-*}
            if ! "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" >/dev/null 2>&1; then
                missing+=("$whl")
            fi
        done
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing from $dir (--no-deps --no-index): ${missing[*]##*/}"
        "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "${missing[@]}" \
            || echo "WARNING: installing the wheels of $dir failed"
    fi
    if ! "$PY" -c "import megatron_r1v.kernels" >/dev/null 2>&1; then
        echo "megatron_r1v.kernels does not import: pip install --no-deps --no-index -e ."
        "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . \
            || echo "WARNING: installing the project failed; the parts will fail"
    fi
    if ! "$PY" -c "import liger_kernel" >/dev/null 2>&1; then
        echo "Liger-Kernel is not importable and no liger_kernel wheel was found (WHEELS=${dir:-none}):" \
            "the Liger comparison is skipped"
    fi
}

part_kernels() {
    "$PY" tools/gpu_check.py kernels --json "$WORK/kernels.json" --bench-timeout "$BUDGET_KERNELS"
}

part_train() {
    local rc=0
    "$PY" tools/gpu_check.py train --backend local --json "$WORK/train.json" || rc=1
    "$PY" tools/gpu_check.py train --backend te --fp8 --json "$WORK/train.json" || rc=1
    return "$rc"
}

part_isolation() {
    local rc=0 keyword="triton or te_backend or bf16_training_on_gpu"
    local selection=(tests/unit/test_kernels.py tests/distributed/test_packed_attention.py
                     tests/distributed/test_decoder_training.py)
    "$PY" tools/gpu_check.py isolation --json "$WORK/isolation.json" || rc=1
    "$PY" -m pytest -q -rA --junitxml "$WORK/pytest.xml" "${selection[@]}" -k "$keyword" || rc=1
    "$PY" tools/gpu_check.py junit --xml "$WORK/pytest.xml" --json "$WORK/isolation.json" \
        --keyword "$keyword" --selection "${selection[@]}" || rc=1
    return "$rc"
}

part_generate() {
    "$PY" tools/gpu_check.py generate --json "$WORK/generate.json"
}

# Runs one part in a child of this script under `timeout` (a shell function cannot be timed
# out by itself), then writes the part's status file for the report.
run_part() {
    local name=$1 budget=$2 start=$SECONDS rc status
    echo "=== part $name (budget ${budget} s)"
    timeout --signal=TERM --kill-after=15 "$budget" bash "$REPO/tools/gpu_check.sh" --part "$name"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "=== part $name: $status (exit $rc, $((SECONDS - start)) s)"
    printf '{"status": "%s", "rc": %d, "seconds_s": %d, "budget_s": %d}\n' \
        "$status" "$rc" "$((SECONDS - start))" "$budget" >"$WORK/$name.status.json"
    [ "$status" = ok ]
}

main() {
    local failed=0 part budget
    PY=$(pick_python)
    mkdir -p "$OUT"
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        record_nothing "torch.cuda.is_available() is False or torch does not import ($PY)"
        return 0
    fi
    WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
    export PY WORK
    setup_python
    export PYTHONPATH
    "$PY" tools/gpu_check.py env
    for part in $PARTS; do
        case $part in
            kernels) budget=$BUDGET_KERNELS ;;
            train) budget=$BUDGET_TRAIN ;;
            isolation) budget=$BUDGET_ISOLATION ;;
            generate) budget=$BUDGET_GENERATE ;;
            *) echo "unknown part $part (kernels, train, isolation, generate)"; failed=1; continue ;;
        esac
        run_part "$part" "$budget" || failed=1
    done
    "$PY" tools/gpu_check.py report --work "$WORK" --out "$OUT" || failed=1
    echo "wrote $OUT/gpu_check.json and $OUT/gpu_check_rows.md in $SECONDS s"
    return "$failed"
}

if [ "${1:-}" = "--part" ]; then
    # The child run_part starts: PY, WORK and PYTHONPATH come from the parent's environment.
    case ${2:-} in
        kernels) part_kernels ;;
        train) part_train ;;
        isolation) part_isolation ;;
        generate) part_generate ;;
        *) echo "--part takes kernels, train, isolation or generate"; exit 2 ;;
    esac
    exit $?
fi
mkdir -p "$OUT"
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
