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
# CONFIG (examples/configs/tiny_sft_cpu.yaml), SEQ_LENGTH (512), MAX_TILES (grid tiles per image in
# sampling and SFT, 6), WORK (runs/sft_rounds), MODEL (HF checkpoint folder with its tokenizer) and
# PROMPTS (prompts JSONL); relative paths are taken from the repository root. Without PROMPTS the
# prompts are synthetic (NUM prompts, 48, written to WORK/data). Without MODEL it builds a tiny CPU
# setup: those synthetic data, a random tiny R1V in the skywork layout and a
# cold-start SFT on the synthetic conversations (COLD_STEPS, 150), whose export is round 0's model
# (a random model accepts nothing to train on).
# The shared knobs, the import/train/export step and the round loop are in examples/lib/rounds.sh.
# Idempotent: a finished step of a round is skipped on a rerun (sampling resumes, training resumes
# from its last checkpoint). A round with no accepted response stops the loop with status 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS_NAME=sft_rounds
KEEP_SHORTEST="${KEEP_SHORTEST:-}"
TEMPERATURE="${TEMPERATURE:-0.6}"
STEPS="${STEPS:-40}"
CONFIG="${CONFIG:-examples/configs/tiny_sft_cpu.yaml}"
WORK="${WORK:-runs/sft_rounds}"
COLD_STEPS="${COLD_STEPS:-150}"
source examples/lib/rounds.sh  # ROUNDS, SAMPLES, MAX_NEW_TOKENS, TP, SEQ_LENGTH, MAX_TILES, NUM; PY, step...

if [ -z "${MODEL:-}" ] || [ -z "${PROMPTS:-}" ]; then  # the synthetic data: prompts and cold-start conversations
    synthetic_data
    PROMPTS="${PROMPTS:-${WORK}/data/prompts.jsonl}"
fi
if [ -z "${MODEL:-}" ]; then
    step "tiny CPU setup in ${WORK}/round_0: ${NUM} synthetic conversations, a random tiny R1V," \
        "${COLD_STEPS} cold-start SFT steps"
    [ -f "${WORK}/hf_random/config.json" ] ||
        "${PY}" tools/make_tiny_checkpoint.py --out "${WORK}/hf_random" --seed 0
    train_and_export sft "${WORK}/round_0" "${WORK}/hf_random" "${WORK}/data/sft.jsonl" "${COLD_STEPS}"
    MODEL="${WORK}/round_0/hf"
fi

sft_round() {  # sft_round ROUND DIR CURRENT: rejection-sample from CURRENT, SFT on the kept responses
    local round="$1" dir="$2" current="$3" keep=()
    step "round ${round}/${ROUNDS}: rejection sampling ${SAMPLES} responses per prompt from ${current}"
    [ -n "${KEEP_SHORTEST}" ] && keep=(--keep-shortest "${KEEP_SHORTEST}")
    "${PY}" tools/rejection_sample.py --model "${current}" --prompts "${PROMPTS}" --out "${dir}/samples" \
        --samples "${SAMPLES}" --temperature "${TEMPERATURE}" --max-new-tokens "${MAX_NEW_TOKENS}" \
        --max-tiles "${MAX_TILES}" --seed "${round}" "${keep[@]}" | tail -n 1
    [ -s "${dir}/samples/sft.jsonl" ] ||
        fail "round ${round}: no response was accepted (${dir}/samples/summary.json);" "nothing to train on"
    step "round ${round}/${ROUNDS}: SFT on $(wc -l < "${dir}/samples/sft.jsonl") kept responses" \
        "(accepted, each distinct text once), ${STEPS} steps"
    train_and_export sft "${dir}" "${current}" "${dir}/samples/sft.jsonl" "${STEPS}"
}
run_rounds sft_round
