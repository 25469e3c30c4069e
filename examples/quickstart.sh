#!/usr/bin/env bash
# The main job on a CPU machine: the whole R1V2 recipe on a tiny model, start to end.
#
#   synthetic visual-reasoning data (train + held-out) -> a tiny random R1V2 checkpoint in
#   the released (skywork) HF layout -> import to Megatron (TP=2) -> MPO -> GRPO with the
#   Selective Sample Buffer (both under torchrun, 2 processes) -> export back to HF,
#   with held-out accuracy measured by the HF engine at the start, after MPO and after GRPO.
#
# Output under runs/quickstart/: summary.json, curves.png, TensorBoard events in tb/,
# the HF checkpoints hf_start/, hf_after_mpo/, hf_after_grpo/, and every stage's log.
# Knobs (environment): OUT, MPO_STEPS, GRPO_STEPS, NUM_TRAIN, NUM_HELDOUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$(date +%s)
source tools/ensure_venv.sh
export OMP_NUM_THREADS=1
OUT="${OUT:-runs/quickstart}"
MPO_STEPS="${MPO_STEPS:-300}"
GRPO_STEPS="${GRPO_STEPS:-60}"
NUM_TRAIN="${NUM_TRAIN:-1200}"
NUM_HELDOUT="${NUM_HELDOUT:-240}"
MAX_TILES=6
TORCHRUN=("${PY}" -m torch.distributed.run --standalone --nproc_per_node 2)
rm -rf "${OUT}" && mkdir -p "${OUT}/logs"
mark() { date +%s > "${OUT}/logs/$1.t"; }
step() { echo; echo "[quickstart] $*"; }

step "1/8 synthetic data: ${NUM_TRAIN} training samples (seed 0), ${NUM_HELDOUT} held-out prompts (seed 1)"
"${PY}" -m megatron_r1v.data.synthetic --out "${OUT}/data/train" --num "${NUM_TRAIN}" --seed 0
"${PY}" -m megatron_r1v.data.synthetic --out "${OUT}/data/heldout" --num "${NUM_HELDOUT}" --seed 1
"${PY}" -m megatron_r1v.data.validate "${OUT}/data/train/preferences.jsonl" --kind preferences

step "2/8 a tiny random R1V2 checkpoint in the released HF layout, with its tokenizer"
"${PY}" tools/make_tiny_checkpoint.py --out "${OUT}/hf_start" --seed 0

step "3/8 import to Megatron, TP=2"
"${TORCHRUN[@]}" tools/convert_checkpoint.py import --hf-dir "${OUT}/hf_start" --out "${OUT}/mcore_start" \
    --tp 2 --dtype fp32

evaluate() {  # evaluate NAME HF_DIR
    "${PY}" -m megatron_r1v.evaluate --model "$2" --data "${OUT}/data/heldout/prompts.jsonl" \
        --max-tiles "${MAX_TILES}" --max-new-tokens 160 --out "${OUT}/eval_$1.json" \
        --samples-out "${OUT}/logs/eval_$1.samples.jsonl" 2> "${OUT}/logs/eval_$1.log" | tail -n 1
}
train_stage() {  # train_stage NAME CONFIG STEPS DATA_FILE START_CHECKPOINT: train under torchrun, export to HF
    mark "$1_start"
    "${TORCHRUN[@]}" -m megatron_r1v.train --config "$2" \
        --set "train.steps=$3" --set "data.max_tiles=${MAX_TILES}" \
        --set "data.train_path=$4" --set "data.tokenizer=${OUT}/hf_start" \
        --set "model.checkpoint=$5" --set "train.save_dir=${OUT}/$1" \
        --set "logging.tensorboard_dir=${OUT}/tb/$1" --metrics-jsonl "${OUT}/logs/$1_metrics.jsonl"
    mark "$1_end"
    "${PY}" tools/convert_checkpoint.py export --mcore-dir "${OUT}/$1/$(cat "${OUT}/$1/latest")/model" \
        --out "${OUT}/hf_after_$1" > "${OUT}/logs/export_$1.log" 2>&1
}

step "4/8 held-out accuracy at the start (HF engine, greedy)"
evaluate start "${OUT}/hf_start"

step "5/8 MPO, ${MPO_STEPS} steps (reference log-probs cached first)"
train_stage mpo examples/configs/tiny_mpo_cpu.yaml "${MPO_STEPS}" "${OUT}/data/train/preferences.jsonl" \
    "${OUT}/mcore_start"
step "6/8 held-out accuracy after MPO"
evaluate after_mpo "${OUT}/hf_after_mpo"

step "7/8 GRPO + Selective Sample Buffer, ${GRPO_STEPS} steps, from the MPO checkpoint"
train_stage grpo examples/configs/quickstart_grpo.yaml "${GRPO_STEPS}" "${OUT}/data/train/prompts.jsonl" \
    "${OUT}/mpo/$(cat "${OUT}/mpo/latest")/model"
step "8/8 held-out accuracy after GRPO, summary and curves"
evaluate after_grpo "${OUT}/hf_after_grpo"

"${PY}" tools/run_report.py quickstart --run-dir "${OUT}" --started "${T0}"
