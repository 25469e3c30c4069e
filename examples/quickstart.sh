#!/usr/bin/env bash
# The main job on a CPU machine: synthetic visual-reasoning data, a tokenizer for the
# tiny model, a tiny reward model served over HTTP, then GRPO + Selective Sample Buffer
# on the tiny R1V with TP=2 (torchrun, 2 processes). Output under runs/quickstart/:
# data/, tokenizer/, metrics.jsonl and TensorBoard events in tb/.
# (The MPO stage, HF checkpoint in/out and plots join this script with issue 8.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/ensure_venv.sh
export PYTHONSAFEPATH=1 OMP_NUM_THREADS=1
OUT=runs/quickstart
STEPS="${STEPS:-4}"
rm -rf "${OUT}" && mkdir -p "${OUT}"

echo "[quickstart] 1/4 synthetic data"
"${PY}" -m megatron_r1v.data.synthetic --out "${OUT}/data" --num 64 --seed 0
"${PY}" -m megatron_r1v.data.validate "${OUT}/data/prompts.jsonl" --kind prompts

echo "[quickstart] 2/4 tokenizer (640 tokens, <IMG_CONTEXT> = 639 as preset tiny-r1v-chat expects)"
"${PY}" -m megatron_r1v.data.tokenizer --corpus "${OUT}/data/prompts.jsonl" "${OUT}/data/preferences.jsonl" \
    --vocab-size 640 --out "${OUT}/tokenizer"

echo "[quickstart] 3/4 a tiny random reward model, served on localhost"
cp -r "${OUT}/tokenizer" "${OUT}/reward_model"
"${PY}" -c "import sys; from megatron_r1v.rewards.reward_model import save_random_reward_model as s; s(sys.argv[1], 640)" \
    "${OUT}/reward_model"
"${PY}" tools/serve_reward_model.py --model "${OUT}/reward_model" --port 0 > "${OUT}/rm.url" 2> "${OUT}/rm.log" &
RM_PID=$!
trap 'kill ${RM_PID} 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do [ -s "${OUT}/rm.url" ] && break; sleep 1; done
RM_URL=$("${PY}" -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['url'])" "${OUT}/rm.url")
echo "[quickstart] reward model at ${RM_URL}"

echo "[quickstart] 4/4 GRPO + SSB, ${STEPS} steps, TP=2"
"${PY}" -m torch.distributed.run --standalone --nproc_per_node 2 -m megatron_r1v.train \
    --config examples/configs/tiny_grpo_cpu.yaml \
    --set "train.steps=${STEPS}" \
    --set "data.train_path=${OUT}/data/prompts.jsonl" --set "data.tokenizer=${OUT}/tokenizer" \
    --set "reward.reward_model_url=${RM_URL}" --set reward.model_weight=1.0 --set reward.model_calibration=sigmoid \
    --set "logging.tensorboard_dir=${OUT}/tb" --metrics-jsonl "${OUT}/metrics.jsonl"
echo "[quickstart] done: ${OUT}/metrics.jsonl, TensorBoard: tensorboard --logdir ${OUT}/tb"
