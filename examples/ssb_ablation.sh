#!/usr/bin/env bash
# GRPO with and without the Selective Sample Buffer (R1V2 section 3.3), same seeds, data,
# starting checkpoint and steps; only ssb.enabled differs.
#
# Starts from the MPO checkpoint of the quickstart (runs/quickstart/mpo), so run
# `bash examples/quickstart.sh` first, or set START=<model checkpoint dir> and DATA=<dir
# with prompts.jsonl> and TOKENIZER=<dir>. Output under OUT (runs/ssb_ablation/): one folder
# per run (TensorBoard events, metrics, the trainer's output in train.log, held-out
# accuracy in eval/result.json), ablation.png (ssb/effective_ratio_batch, accuracy, reward and
# reward-model term per step, both runs) and ablation.json (each run's final numbers and
# second-half means).
#
# Knobs (environment):
#   STEPS          GRPO steps per run (default 40)
#   OUT            output folder (default runs/ssb_ablation; replaced on every run)
#   REWARD_MODEL   skywork-vl (default) or r1v: the hybrid reward of quickstart_grpo.yaml
#                  (rule + format 0.25 + reward model 0.1 after a sigmoid) with a tiny random
#                  image-aware reward model of that kind (tools/make_tiny_checkpoint.py
#                  --reward-model, written to OUT/reward_model), served by
#                  tools/serve_reward_model.py on a free port for both runs;
#                  none: rule + format rewards only (reward.model_weight=0)
#   SSB_MIN_STD    ssb.min_reward_std for both runs (unset: the config's, auto)
#   START, DATA, HELDOUT, TOKENIZER  as above
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$(date +%s)
QS=runs/quickstart
OUT="${OUT:-runs/ssb_ablation}"
STEPS="${STEPS:-40}"
DATA="${DATA:-${QS}/data/train}"
HELDOUT="${HELDOUT:-${QS}/data/heldout/prompts.jsonl}"
TOKENIZER="${TOKENIZER:-${QS}/hf_start}"
REWARD_MODEL="${REWARD_MODEL:-skywork-vl}"
SSB_MIN_STD="${SSB_MIN_STD:-}"
die() { echo "error: $*" >&2; exit 2; }

case "${REWARD_MODEL}" in
    none|skywork-vl|r1v) ;;
    *) die "REWARD_MODEL must be skywork-vl, r1v or none (got '${REWARD_MODEL}')" ;;
esac
if [ -n "${SSB_MIN_STD}" ] && ! [[ "${SSB_MIN_STD}" =~ ^(auto|[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?)$ ]]; then
    die "SSB_MIN_STD must be 'auto' or a non-negative number (got '${SSB_MIN_STD}')"
fi
[[ "${STEPS}" =~ ^[1-9][0-9]*$ ]] || die "STEPS must be a positive integer (got '${STEPS}')"
[ -n "${OUT}" ] && [ "${OUT}" != / ] || die "OUT must name a folder (got '${OUT}')"
if [ -z "${START:-}" ]; then
    if [ ! -f "${QS}/mpo/latest" ]; then
        die "no MPO checkpoint in ${QS}/mpo: run 'bash examples/quickstart.sh' first, or set START"
    fi
    START="${QS}/mpo/$(cat "${QS}/mpo/latest")/model"
fi
[ -d "${START}" ] || die "START=${START} is not a folder"
[ -f "${DATA}/prompts.jsonl" ] || die "no ${DATA}/prompts.jsonl (set DATA)"
[ -f "${HELDOUT}" ] || die "no held-out prompts ${HELDOUT} (set HELDOUT)"
[ -d "${TOKENIZER}" ] || die "TOKENIZER=${TOKENIZER} is not a folder"
source tools/ensure_venv.sh
export OMP_NUM_THREADS=1
rm -rf "${OUT}" && mkdir -p "${OUT}"

# Settings both runs share: everything but ssb.enabled.
COMMON=(--set "train.steps=${STEPS}" --set "data.train_path=${DATA}/prompts.jsonl" --set "data.tokenizer=${TOKENIZER}"
        --set "model.checkpoint=${START}")
[ -n "${SSB_MIN_STD}" ] && COMMON+=(--set "ssb.min_reward_std=${SSB_MIN_STD}")

source examples/lib/reward_server.sh  # start_reward_server, stop_reward_server (at exit)
if [ "${REWARD_MODEL}" = none ]; then
    COMMON+=(--set reward.model_weight=0)
else
    echo "[ssb_ablation] a tiny random ${REWARD_MODEL} reward model in ${OUT}/reward_model"
    start_reward_server "${REWARD_MODEL}" "${OUT}" "${TOKENIZER}"
    COMMON+=(--set "reward.reward_model_url=${RM_URL}")
fi
echo "[ssb_ablation] shared settings: ${COMMON[*]}"

for run in with_ssb without_ssb; do
    enabled=true; [ "${run}" = without_ssb ] && enabled=false
    echo; echo "[ssb_ablation] GRPO ${run} (ssb.enabled=${enabled}), ${STEPS} steps from ${START}"
    mkdir -p "${OUT}/${run}"
    "${PY}" -m torch.distributed.run --standalone --nproc_per_node 2 -m megatron_r1v.train \
        --config examples/configs/quickstart_grpo.yaml --set "ssb.enabled=${enabled}" "${COMMON[@]}" \
        --set "train.save_dir=${OUT}/${run}/ckpt" \
        --set "logging.tensorboard_dir=${OUT}/${run}/tb" --metrics-jsonl "${OUT}/${run}/metrics.jsonl" \
        2>&1 | tee "${OUT}/${run}/train.log"
    "${PY}" tools/convert_checkpoint.py export --mcore-dir "${OUT}/${run}/ckpt/$(cat "${OUT}/${run}/ckpt/latest")/model" \
        --out "${OUT}/${run}/hf" > "${OUT}/${run}/export.log" 2>&1
    "${PY}" -m megatron_r1v.evaluate --benchmark project --data "${HELDOUT}" --model "${OUT}/${run}/hf" \
        --samples 1 --temperature 0 --repetition-penalty 1 --max-new-tokens 96 --batch-size 64 --max-tiles 4 \
        --out "${OUT}/${run}/eval" 2> "${OUT}/${run}/eval.log" | tail -n 1 | cut -c1-300
done
stop_reward_server

"${PY}" tools/run_report.py ablation --run "with_ssb=${OUT}/with_ssb" --run "without_ssb=${OUT}/without_ssb" \
    --out "${OUT}"
echo "[ssb_ablation] done in $(( $(date +%s) - T0 )) s"
