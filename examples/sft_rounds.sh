#!/usr/bin/env bash
# R1V's iterative SFT: rejection-sample from the current model -> SFT on the accepted responses
# -> rejection-sample from the new model, ROUNDS times (tools/rejection_sample.py, train.stage=sft).
#
#   round r: tools/rejection_sample.py --model HF_{r-1} --prompts PROMPTS   -> WORK/round_r/samples/sft.jsonl
#            tools/convert_checkpoint.py import HF_{r-1} (TP)              -> WORK/round_r/mcore_start
#            torchrun -m megatron_r1v.train train.stage=sft (CONFIG)       -> WORK/round_r/sft
#            tools/convert_checkpoint.py export                            -> WORK/round_r/hf = HF_r
#
# Knobs (environment): ROUNDS (2), SAMPLES (4 per prompt), KEEP_SHORTEST (unset: every accepted
# response), TEMPERATURE (0.6), MAX_NEW_TOKENS (96), STEPS (SFT steps per round, 40), TP (2),
# CONFIG (examples/configs/tiny_sft_cpu.yaml), SEQ_LENGTH (512), WORK (runs/sft_rounds),
# MODEL (HF checkpoint folder with its tokenizer) and PROMPTS (prompts JSONL). Without MODEL and
# PROMPTS it builds the tiny CPU setup of the quickstart: synthetic data (NUM prompts, 48), a random
# tiny R1V in the skywork layout and a cold-start SFT on the synthetic conversations (COLD_STEPS, 150),
# whose export is round 0's model (a random model accepts nothing to train on).
# Idempotent: a finished step of a round is skipped on a rerun (sampling resumes, training resumes
# from its last checkpoint). A round with no accepted response stops the loop with status 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/ensure_venv.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ROUNDS="${ROUNDS:-2}"
SAMPLES="${SAMPLES:-4}"
KEEP_SHORTEST="${KEEP_SHORTEST:-}"
TEMPERATURE="${TEMPERATURE:-0.6}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-96}"
STEPS="${STEPS:-40}"
TP="${TP:-2}"
CONFIG="${CONFIG:-examples/configs/tiny_sft_cpu.yaml}"
SEQ_LENGTH="${SEQ_LENGTH:-512}"
WORK="${WORK:-runs/sft_rounds}"
NUM="${NUM:-48}"
COLD_STEPS="${COLD_STEPS:-150}"
MAX_TILES="${MAX_TILES:-6}"
TORCHRUN=("${PY}" -m torch.distributed.run --standalone --nproc_per_node "${TP}")
mkdir -p "${WORK}"
step() { echo; echo "[sft_rounds] $*"; }

sft_and_export() {  # sft_and_export DIR HF_START DATA STEPS: import HF_START, SFT on DATA, export DIR/hf
    local dir="$1" start="$2" data="$3" steps="$4"
    if [ -f "${dir}/hf/config.json" ]; then
        echo "${dir}/hf exists: skipping its SFT"
        return
    fi
    if [ ! -d "${dir}/mcore_start" ]; then  # written atomically: there means complete
        "${TORCHRUN[@]}" tools/convert_checkpoint.py import --hf-dir "${start}" --out "${dir}/mcore_start" \
            --tp "${TP}" --dtype fp32
    fi
    local resume=()
    [ -f "${dir}/sft/latest" ] && resume=(--resume)
    "${TORCHRUN[@]}" -m megatron_r1v.train --config "${CONFIG}" "${resume[@]}" \
        --set "train.stage=sft" --set "parallel.tp=${TP}" --set "train.steps=${steps}" \
        --set "train.seq_length=${SEQ_LENGTH}" --set "sft.micro_batch_tokens=$((2 * SEQ_LENGTH))" \
        --set "data.max_tiles=${MAX_TILES}" \
        --set "data.train_path=${data}" --set "data.tokenizer=${start}" \
        --set "model.checkpoint=${dir}/mcore_start" --set "train.save_dir=${dir}/sft" \
        --set "logging.tensorboard_dir=${dir}/tb"
    "${PY}" tools/convert_checkpoint.py export --mcore-dir "${dir}/sft/$(cat "${dir}/sft/latest")/model" \
        --out "${dir}/hf"
}

if [ -z "${MODEL:-}" ] || [ -z "${PROMPTS:-}" ]; then
    step "tiny CPU setup in ${WORK}/round_0: ${NUM} synthetic prompts, a random tiny R1V," \
        "${COLD_STEPS} cold-start SFT steps"
    [ -f "${WORK}/data/prompts.jsonl" ] ||
        "${PY}" -m megatron_r1v.data.synthetic --out "${WORK}/data" --num "${NUM}" --seed 0
    [ -f "${WORK}/hf_random/config.json" ] ||
        "${PY}" tools/make_tiny_checkpoint.py --out "${WORK}/hf_random" --seed 0
    sft_and_export "${WORK}/round_0" "${WORK}/hf_random" "${WORK}/data/sft.jsonl" "${COLD_STEPS}"
    MODEL="${MODEL:-${WORK}/round_0/hf}"
    PROMPTS="${PROMPTS:-${WORK}/data/prompts.jsonl}"
fi

current="${MODEL}"
for round in $(seq 1 "${ROUNDS}"); do
    dir="${WORK}/round_${round}"
    step "round ${round}/${ROUNDS}: rejection sampling ${SAMPLES} responses per prompt from ${current}"
    keep=()
    [ -n "${KEEP_SHORTEST}" ] && keep=(--keep-shortest "${KEEP_SHORTEST}")
    "${PY}" tools/rejection_sample.py --model "${current}" --prompts "${PROMPTS}" --out "${dir}/samples" \
        --samples "${SAMPLES}" --temperature "${TEMPERATURE}" --max-new-tokens "${MAX_NEW_TOKENS}" \
        --max-tiles "${MAX_TILES}" --seed "${round}" "${keep[@]}" | tail -n 1
    if [ ! -s "${dir}/samples/sft.jsonl" ]; then
        echo "[sft_rounds] round ${round}: no response was accepted (${dir}/samples/summary.json);" \
            "nothing to train on" >&2
        exit 1
    fi
    step "round ${round}/${ROUNDS}: SFT on $(wc -l < "${dir}/samples/sft.jsonl") accepted responses, ${STEPS} steps"
    sft_and_export "${dir}" "${current}" "${dir}/samples/sft.jsonl" "${STEPS}"
    current="${dir}/hf"
done
step "done: the model of the last round is ${current}"
