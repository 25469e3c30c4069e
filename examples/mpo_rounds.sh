#!/usr/bin/env bash
# R1V2's iterative MPO: sample and score with the hybrid reward from the current model -> MPO on the
# pairs above the reward margin -> sample from the new policy, ROUNDS times (tools/generate_preferences.py,
# train.stage=mpo).
#
#   round r: tools/generate_preferences.py --model HF_{r-1} --prompts PROMPTS -> WORK/round_r/samples/preferences.jsonl
#            tools/convert_checkpoint.py import HF_{r-1} (TP)                 -> WORK/round_r/mcore_start
#            torchrun -m megatron_r1v.train train.stage=mpo (CONFIG)          -> WORK/round_r/mpo
#            tools/convert_checkpoint.py export                               -> WORK/round_r/hf = HF_r
#
# Knobs (environment): ROUNDS (2), SAMPLES (4 per prompt), TEMPERATURE (1.0), MAX_NEW_TOKENS (96),
# STEPS (MPO steps per round, 20), PAIRS_PER_STEP (mpo.pairs_per_step, 16), TP (2), CONFIG
# (examples/configs/tiny_mpo_cpu.yaml), SEQ_LENGTH (512), MAX_TILES (6), MARGIN (the reward margin a pair
# must exceed: --margin-threshold and mpo.margin_threshold, 7), MAX_PAIRS_PER_PROMPT (1), REWARD_CONFIG
# (a run config whose reward: section scores the samples; unset: the defaults), REWARD_SETS
# (space-separated reward.KEY=VALUE overrides on top, default "reward.rule_weight=10 reward.format_weight=5":
# the scale of the synthetic preference scores, 10 x correct + 5 x well formatted, on which the tiny
# config's margin 7 separates a right answer from a wrong one), ENGINE (hf or sglang) and DEVICE (the
# engine's torch device; default: the tool's), WORK (runs/mpo_rounds), MODEL (HF checkpoint folder with its
# tokenizer) and PROMPTS (prompts JSONL); relative paths are taken from the repository root. Without
# MODEL it builds the tiny CPU setup with examples/sft_rounds.sh (ROUNDS=0: synthetic data, NUM prompts
# (48), a random tiny R1V, COLD_STEPS (150) cold-start SFT steps with SFT_CONFIG
# (examples/configs/tiny_sft_cpu.yaml), in WORK/round_0), whose export is round 0's model: a random
# model scores 0 everywhere, so no pair would pass the margin. Without PROMPTS the prompts are those
# synthetic ones.
# The shared knobs, the import/train/export step and the round loop are in examples/lib/rounds.sh.
# Idempotent: a finished step of a round is skipped on a rerun (sampling resumes, training resumes
# from its last checkpoint). A round with no pair above the margin stops the loop with status 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS_NAME=mpo_rounds
TEMPERATURE="${TEMPERATURE:-1.0}"
STEPS="${STEPS:-20}"
PAIRS_PER_STEP="${PAIRS_PER_STEP:-16}"
CONFIG="${CONFIG:-examples/configs/tiny_mpo_cpu.yaml}"
MARGIN="${MARGIN:-7}"
MAX_PAIRS_PER_PROMPT="${MAX_PAIRS_PER_PROMPT:-1}"
REWARD_CONFIG="${REWARD_CONFIG:-}"
REWARD_SETS="${REWARD_SETS-reward.rule_weight=10 reward.format_weight=5}"
ENGINE="${ENGINE:-hf}"
DEVICE="${DEVICE:-}"
WORK="${WORK:-runs/mpo_rounds}"
source examples/lib/rounds.sh  # ROUNDS, SAMPLES, MAX_NEW_TOKENS, TP, SEQ_LENGTH, MAX_TILES, NUM; PY, step...

if [ -z "${MODEL:-}" ]; then  # sft_rounds.sh with no round is its tiny CPU setup and cold start
    step "tiny CPU setup in ${WORK}/round_0 (examples/sft_rounds.sh, ROUNDS=0)"
    ROUNDS=0 WORK="${WORK}" CONFIG="${SFT_CONFIG:-examples/configs/tiny_sft_cpu.yaml}" MODEL="" PROMPTS="" \
        TP="${TP}" SEQ_LENGTH="${SEQ_LENGTH}" MAX_TILES="${MAX_TILES}" bash examples/sft_rounds.sh
    MODEL="${WORK}/round_0/hf"
fi
if [ -z "${PROMPTS:-}" ]; then
    synthetic_data
    PROMPTS="${WORK}/data/prompts.jsonl"
fi

reward=()
[ -n "${REWARD_CONFIG}" ] && reward+=(--reward-config "${REWARD_CONFIG}")
for override in ${REWARD_SETS}; do reward+=(--set "${override}"); done
device=()
[ -n "${DEVICE}" ] && device=(--device "${DEVICE}")

mpo_round() {  # mpo_round ROUND DIR CURRENT: sample and score from CURRENT, MPO on the pairs above MARGIN
    local round="$1" dir="$2" current="$3"
    step "round ${round}/${ROUNDS}: ${SAMPLES} responses per prompt from ${current}, scored with the hybrid reward"
    "${PY}" tools/generate_preferences.py --model "${current}" --prompts "${PROMPTS}" --out "${dir}/samples" \
        --samples "${SAMPLES}" --temperature "${TEMPERATURE}" --max-new-tokens "${MAX_NEW_TOKENS}" \
        --max-tiles "${MAX_TILES}" --seed "${round}" --margin-threshold "${MARGIN}" \
        --max-pairs-per-prompt "${MAX_PAIRS_PER_PROMPT}" --engine "${ENGINE}" "${device[@]}" "${reward[@]}" |
        tail -n 1
    [ -s "${dir}/samples/preferences.jsonl" ] ||
        fail "round ${round}: no pair has a reward margin above ${MARGIN}" \
            "(${dir}/samples/summary.json); nothing to train on"
    step "round ${round}/${ROUNDS}: MPO on $(wc -l < "${dir}/samples/preferences.jsonl") pairs" \
        "(margin > ${MARGIN}), ${STEPS} steps"
    # The reference policy is CURRENT (the model that sampled the pairs); its log-probs are cached
    # in DIR/mpo/reference_logprobs. A pair's two sequences share a micro-batch.
    train_and_export mpo "${dir}" "${current}" "${dir}/samples/preferences.jsonl" "${STEPS}" \
        --set "mpo.data_format=preferences" --set "mpo.margin_threshold=${MARGIN}" \
        --set "mpo.pairs_per_step=${PAIRS_PER_STEP}"
}
run_rounds mpo_round
