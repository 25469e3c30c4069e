# shellcheck shell=bash
# The part that examples/sft_rounds.sh and examples/mpo_rounds.sh share, sourced by both from the
# repository root once they have set ROUNDS_NAME (the prefix of their messages) and their own knobs
# (CONFIG, WORK, STEPS, TEMPERATURE, ...). It sources tools/ensure_venv.sh (PY), sets the knobs both
# read, with the same defaults: ROUNDS (2), SAMPLES (4 per prompt), MAX_NEW_TOKENS (96), TP (2),
# SEQ_LENGTH (512), MAX_TILES (grid tiles per image in sampling and training, 6) and NUM (synthetic
# prompts, 48), creates WORK and defines
#   step MESSAGE...                  a progress line: [ROUNDS_NAME] MESSAGE
#   fail MESSAGE...                  the same on stderr, then exit 1
#   synthetic_data                   the synthetic prompts and conversations in WORK/data (once)
#   train_and_export STAGE DIR HF_START DATA STEPS [--set KEY=VALUE...]
#                                    import HF_START, train STAGE (sft or mpo) on DATA, export DIR/hf
#   run_rounds ROUND_FN              ROUND_FN ROUND DIR CURRENT for ROUND 1..ROUNDS, each from the
#                                    export of the round before (MODEL for the first)
source tools/ensure_venv.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ROUNDS="${ROUNDS:-2}"
SAMPLES="${SAMPLES:-4}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-96}"
TP="${TP:-2}"
SEQ_LENGTH="${SEQ_LENGTH:-512}"
MAX_TILES="${MAX_TILES:-6}"
NUM="${NUM:-48}"
TORCHRUN=("${PY}" -m torch.distributed.run --standalone --nproc_per_node "${TP}")
mkdir -p "${WORK}"

step() { echo; echo "[${ROUNDS_NAME}] $*"; }

fail() { echo "[${ROUNDS_NAME}] $*" >&2; exit 1; }

synthetic_data() {  # NUM synthetic prompts (WORK/data/prompts.jsonl) and their SFT conversations
    [ -f "${WORK}/data/prompts.jsonl" ] ||
        "${PY}" -m megatron_r1v.data.synthetic --out "${WORK}/data" --num "${NUM}" --seed 0
}

# train_and_export STAGE DIR HF_START DATA STEPS [--set KEY=VALUE...]: import HF_START into
# DIR/mcore_start (TP), train STAGE (CONFIG, train.stage=STAGE, the extra --set overrides) on DATA for
# STEPS steps into DIR/STAGE, export its last checkpoint to DIR/hf. Idempotent: a finished export is
# skipped, a finished import is kept, the training resumes from its last checkpoint.
train_and_export() {
    local stage="$1" dir="$2" start="$3" data="$4" steps="$5"
    shift 5
    if [ -f "${dir}/hf/config.json" ]; then
        echo "${dir}/hf exists: skipping its ${stage^^}"
        return
    fi
    if [ ! -d "${dir}/mcore_start" ]; then  # written atomically: there means complete
        "${TORCHRUN[@]}" tools/convert_checkpoint.py import --hf-dir "${start}" --out "${dir}/mcore_start" \
            --tp "${TP}" --dtype fp32
    fi
    local resume=()
    [ -f "${dir}/${stage}/latest" ] && resume=(--resume)
    "${TORCHRUN[@]}" -m megatron_r1v.train --config "${CONFIG}" "${resume[@]}" \
        --set "train.stage=${stage}" --set "parallel.tp=${TP}" --set "train.steps=${steps}" \
        --set "train.seq_length=${SEQ_LENGTH}" --set "${stage}.micro_batch_tokens=$((2 * SEQ_LENGTH))" \
        "$@" --set "data.max_tiles=${MAX_TILES}" \
        --set "data.train_path=${data}" --set "data.tokenizer=${start}" \
        --set "model.checkpoint=${dir}/mcore_start" --set "train.save_dir=${dir}/${stage}" \
        --set "logging.tensorboard_dir=${dir}/tb"
    "${PY}" tools/convert_checkpoint.py export \
        --mcore-dir "${dir}/${stage}/$(cat "${dir}/${stage}/latest")/model" --out "${dir}/hf"
}

run_rounds() {  # run_rounds ROUND_FN: the loop; ROUND_FN trains WORK/round_ROUND/hf from CURRENT
    local round_fn="$1" current="${MODEL}" round
    for round in $(seq 1 "${ROUNDS}"); do
        "${round_fn}" "${round}" "${WORK}/round_${round}" "${current}"
        current="${WORK}/round_${round}/hf"
    done
    step "done: the model of the last round is ${current}"
}
