#!/usr/bin/env bash
# GRPO with and without the Selective Sample Buffer (R1V2 section 3.3), same seeds, data,
# starting checkpoint and steps; only ssb.enabled differs.
#
# Starts from the MPO checkpoint of the quickstart (runs/quickstart/mpo), so run
# `bash examples/quickstart.sh` first, or set START=<model checkpoint dir> and DATA=<dir
# with prompts.jsonl> and TOKENIZER=<dir>. Output under runs/ssb_ablation/: one folder per
# run (TensorBoard events, metrics, held-out accuracy in eval.json), ablation.png
# (ssb/effective_ratio_batch and accuracy per step, both runs) and ablation.json (each
# run's final numbers). Knobs (environment): STEPS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/ensure_venv.sh
export OMP_NUM_THREADS=1
QS=runs/quickstart
OUT=runs/ssb_ablation
STEPS="${STEPS:-40}"
DATA="${DATA:-${QS}/data/train}"
HELDOUT="${HELDOUT:-${QS}/data/heldout/prompts.jsonl}"
TOKENIZER="${TOKENIZER:-${QS}/hf_start}"
if [ -z "${START:-}" ]; then
    if [ ! -f "${QS}/mpo/latest" ]; then
        echo "error: no MPO checkpoint in ${QS}/mpo: run 'bash examples/quickstart.sh' first, or set START" >&2
        exit 2
    fi
    START="${QS}/mpo/$(cat "${QS}/mpo/latest")/model"
fi
rm -rf "${OUT}" && mkdir -p "${OUT}"

for run in with_ssb without_ssb; do
    enabled=true; [ "${run}" = without_ssb ] && enabled=false
    echo; echo "[ssb_ablation] GRPO ${run} (ssb.enabled=${enabled}), ${STEPS} steps from ${START}"
    "${PY}" -m torch.distributed.run --standalone --nproc_per_node 2 -m megatron_r1v.train \
        --config examples/configs/quickstart_grpo.yaml --set "ssb.enabled=${enabled}" \
        --set "train.steps=${STEPS}" --set "data.train_path=${DATA}/prompts.jsonl" --set "data.tokenizer=${TOKENIZER}" \
        --set "model.checkpoint=${START}" --set "train.save_dir=${OUT}/${run}/ckpt" \
        --set "logging.tensorboard_dir=${OUT}/${run}/tb" --metrics-jsonl "${OUT}/${run}/metrics.jsonl"
    "${PY}" tools/convert_checkpoint.py export --mcore-dir "${OUT}/${run}/ckpt/$(cat "${OUT}/${run}/ckpt/latest")/model" \
        --out "${OUT}/${run}/hf" > "${OUT}/${run}/export.log" 2>&1
    "${PY}" -m megatron_r1v.evaluate --model "${OUT}/${run}/hf" --data "${HELDOUT}" --max-tiles 6 \
        --max-new-tokens 160 --out "${OUT}/${run}/eval.json" 2> "${OUT}/${run}/eval.log" | tail -n 1
done

"${PY}" tools/run_report.py ablation --run "with_ssb=${OUT}/with_ssb" --run "without_ssb=${OUT}/without_ssb" \
    --out "${OUT}"
