#!/usr/bin/env bash
# The main job on a CPU machine: the whole R1V recipe, from pretrained parts to a model that reads
# images, on a tiny model, start to end (the README's "Quickstart" says what each stage does and why).
#
#   synthetic perception data (train: seed 0; held-out: seed HELDOUT_SEED)
#   -> tiny pretrained parts: an InternViT (standalone release layout) and a Qwen2 LM with its
#      tokenizer (Qwen2ForCausalLM folder), each warmed up on the training split (tools/make_tiny_parts.py)
#   -> tools/assemble_checkpoint.py (a fresh MLP adapter) -> import to Megatron (TP=2)
#   -> cold-start SFT on the training split's reasoning chains (train.stage=sft)
#   -> MPO pairs from the SFT model (tools/generate_preferences.py: rule + format + a tiny image-aware
#      reward model served over HTTP) -> MPO (train.stage=mpo)
#   -> GRPO + Selective Sample Buffer with the hybrid reward (rule + reward model + format)
#   -> export to HF after every stage, held-out accuracy (HF engine, greedy) at the start and after each
#   -> the GRPO model on the held-out split in public benchmark formats (MathVista testmini JSON, MMMU
#      parquet, tools/export_benchmark_formats.py) through `python -m megatron_r1v.evaluate --suite`:
#      pass@1 over BENCH_SAMPLES samples with the released inference's sampling (benchmarks/suite.md).
#
# Output under runs/quickstart/: summary.json, curves.png, TensorBoard events in tb/, the parts in
# parts/, the HF checkpoints hf_start/, hf_after_sft/, hf_after_mpo/, hf_after_grpo/, the MPO pairs in
# preferences/, each evaluation's folder eval_<stage>/, the benchmark table in benchmarks/, and every
# stage's log in logs/.
# Knobs (environment): OUT, NUM_TRAIN (1200), NUM_HELDOUT (240), HELDOUT_SEED (1; the settings were
# tuned on seed 2), PART_STEPS (300, each part's warm-up), SFT_STEPS (300), PREF_PROMPTS (600 training
# prompts sampled for MPO pairs), MPO_MARGIN (7, the reward margin a pair must exceed), MPO_STEPS (40),
# GRPO_STEPS (60), REWARD_MODEL (skywork-vl or r1v), BENCH_SAMPLES (2, responses per benchmark item).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$(date +%s)
OUT="${OUT:-runs/quickstart}"
NUM_TRAIN="${NUM_TRAIN:-1200}"
NUM_HELDOUT="${NUM_HELDOUT:-240}"
HELDOUT_SEED="${HELDOUT_SEED:-1}"
PART_STEPS="${PART_STEPS:-300}"
SFT_STEPS="${SFT_STEPS:-300}"
PREF_PROMPTS="${PREF_PROMPTS:-600}"
MPO_MARGIN="${MPO_MARGIN:-7}"
MPO_STEPS="${MPO_STEPS:-40}"
GRPO_STEPS="${GRPO_STEPS:-60}"
REWARD_MODEL="${REWARD_MODEL:-skywork-vl}"
BENCH_SAMPLES="${BENCH_SAMPLES:-2}"
MAX_TILES=4
die() { echo "error: $*" >&2; exit 2; }
for knob in NUM_TRAIN NUM_HELDOUT PART_STEPS SFT_STEPS PREF_PROMPTS MPO_STEPS GRPO_STEPS BENCH_SAMPLES; do
    [[ "${!knob}" =~ ^[1-9][0-9]*$ ]] || die "${knob} must be a positive integer (got '${!knob}')"
done
[[ "${MPO_MARGIN}" =~ ^[0-9]*\.?[0-9]+$ ]] || die "MPO_MARGIN must be a non-negative number (got '${MPO_MARGIN}')"
[[ "${HELDOUT_SEED}" =~ ^[0-9]+$ ]] || die "HELDOUT_SEED must be a non-negative integer (got '${HELDOUT_SEED}')"
[ "${HELDOUT_SEED}" != 0 ] || die "HELDOUT_SEED=0 is the training split's seed"
case "${REWARD_MODEL}" in skywork-vl|r1v) ;; *) die "REWARD_MODEL must be skywork-vl or r1v (got '${REWARD_MODEL}')" ;; esac
[ -n "${OUT}" ] && [ "${OUT}" != / ] || die "OUT must name a folder (got '${OUT}')"

source tools/ensure_venv.sh
export OMP_NUM_THREADS=1
TORCHRUN=("${PY}" -m torch.distributed.run --standalone --nproc_per_node 2)
rm -rf "${OUT}" && mkdir -p "${OUT}/logs"
mark() { date +%s > "${OUT}/logs/$1.t"; }
step() { echo; echo "[quickstart] $*"; }

evaluate() {  # evaluate NAME HF_DIR: held-out accuracy, greedy (eval_NAME/result.json, samples.jsonl)
    "${PY}" -m megatron_r1v.evaluate --benchmark project --data "${OUT}/data/heldout/prompts.jsonl" --model "$2" \
        --samples 1 --temperature 0 --repetition-penalty 1 --max-new-tokens 96 --batch-size 64 \
        --max-tiles "${MAX_TILES}" --out "${OUT}/eval_$1" 2> "${OUT}/logs/eval_$1.log" | tail -n 1 | cut -c1-300
}
train_stage() {  # train_stage NAME CONFIG STEPS DATA_FILE START_CHECKPOINT [--set K=V...]: torchrun, then export
    local name="$1" config="$2" steps="$3" data="$4" start="$5"
    shift 5
    mark "${name}_start"
    "${TORCHRUN[@]}" -m megatron_r1v.train --config "${config}" \
        --set "train.steps=${steps}" --set "data.max_tiles=${MAX_TILES}" \
        --set "data.train_path=${data}" --set "data.tokenizer=${OUT}/hf_start" \
        --set "model.checkpoint=${start}" --set "train.save_dir=${OUT}/${name}" \
        --set "logging.tensorboard_dir=${OUT}/tb/${name}" --metrics-jsonl "${OUT}/logs/${name}_metrics.jsonl" "$@"
    mark "${name}_end"
    "${PY}" tools/convert_checkpoint.py export --mcore-dir "${OUT}/${name}/$(cat "${OUT}/${name}/latest")/model" \
        --out "${OUT}/hf_after_${name}" > "${OUT}/logs/export_${name}.log" 2>&1
}
latest() { echo "${OUT}/$1/$(cat "${OUT}/$1/latest")/model"; }

step "1/11 synthetic perception data: ${NUM_TRAIN} training samples (seed 0), ${NUM_HELDOUT} held-out (seed ${HELDOUT_SEED})"
"${PY}" -m megatron_r1v.data.synthetic --family perception --out "${OUT}/data/train" --num "${NUM_TRAIN}" --seed 0
"${PY}" -m megatron_r1v.data.synthetic --family perception --out "${OUT}/data/heldout" --num "${NUM_HELDOUT}" \
    --seed "${HELDOUT_SEED}"

step "2/11 tiny pretrained parts: an InternViT and a Qwen2 LM, each warmed up for ${PART_STEPS} steps"
mark parts_start
"${PY}" tools/make_tiny_parts.py --data "${OUT}/data/train" --out "${OUT}/parts" \
    --vision-steps "${PART_STEPS}" --llm-steps "${PART_STEPS}" | tee "${OUT}/logs/parts.log" |
    cut -c1-200
mark parts_end

step "3/11 assemble the parts with a fresh adapter, import to Megatron (TP=2)"
"${PY}" tools/assemble_checkpoint.py --vision "${OUT}/parts/InternViT-tiny" --llm "${OUT}/parts/Qwen2-tiny" \
    --out "${OUT}/hf_start" 2> "${OUT}/logs/assemble.log" | tee -a "${OUT}/logs/assemble.log" | cut -c1-200
"${TORCHRUN[@]}" tools/convert_checkpoint.py import --hf-dir "${OUT}/hf_start" --out "${OUT}/mcore_start" \
    --tp 2 --dtype fp32 > "${OUT}/logs/import.log" 2>&1
echo "held-out accuracy at the start (HF engine, greedy):"
evaluate start "${OUT}/hf_start"

step "4/11 cold-start SFT, ${SFT_STEPS} steps, on the training split's reasoning chains"
train_stage sft examples/configs/quickstart_sft.yaml "${SFT_STEPS}" "${OUT}/data/train/sft.jsonl" "${OUT}/mcore_start"
step "5/11 held-out accuracy after SFT"
evaluate after_sft "${OUT}/hf_after_sft"

step "6/11 a tiny image-aware ${REWARD_MODEL} reward model, served over HTTP"
source examples/lib/reward_server.sh  # start_reward_server, stop_reward_server (at exit)
start_reward_server "${REWARD_MODEL}" "${OUT}" "${OUT}/hf_start"
REWARD=(--set "reward.reward_model_url=${RM_URL}")

step "7/11 MPO pairs: 4 responses to each of ${PREF_PROMPTS} training prompts from the SFT model, scored with the hybrid reward"
head -n "${PREF_PROMPTS}" "${OUT}/data/train/prompts.jsonl" > "${OUT}/data/train/mpo_prompts.jsonl"
"${PY}" tools/generate_preferences.py --model "${OUT}/hf_after_sft" --prompts "${OUT}/data/train/mpo_prompts.jsonl" \
    --out "${OUT}/preferences" --reward-config examples/configs/quickstart_mpo.yaml "${REWARD[@]}" \
    --samples 4 --temperature 1.0 --max-new-tokens 96 --max-tiles "${MAX_TILES}" --margin-threshold "${MPO_MARGIN}" \
    --batch-size 32 2> "${OUT}/logs/preferences.log" | cut -c1-300
[ -s "${OUT}/preferences/preferences.jsonl" ] ||
    { echo "error: no pair above the margin ${MPO_MARGIN} (${OUT}/preferences/summary.json)" >&2; exit 1; }

step "8/11 MPO, ${MPO_STEPS} steps, on $(wc -l < "${OUT}/preferences/preferences.jsonl") pairs, from the SFT checkpoint"
train_stage mpo examples/configs/quickstart_mpo.yaml "${MPO_STEPS}" "${OUT}/preferences/preferences.jsonl" \
    "$(latest sft)" "${REWARD[@]}" --set "mpo.margin_threshold=${MPO_MARGIN}"
evaluate after_mpo "${OUT}/hf_after_mpo"

step "9/11 GRPO + Selective Sample Buffer, ${GRPO_STEPS} steps, hybrid reward, from the MPO checkpoint"
train_stage grpo examples/configs/quickstart_grpo.yaml "${GRPO_STEPS}" "${OUT}/data/train/prompts.jsonl" \
    "$(latest mpo)" "${REWARD[@]}"
evaluate after_grpo "${OUT}/hf_after_grpo"
stop_reward_server

step "10/11 the GRPO model on the held-out split in MathVista and MMMU formats, ${BENCH_SAMPLES} samples each"
mark bench_start
"${PY}" tools/export_benchmark_formats.py --prompts "${OUT}/data/heldout/prompts.jsonl" --out "${OUT}/data/formats" \
    > "${OUT}/logs/formats.log"
"${PY}" -m megatron_r1v.evaluate --suite "${OUT}/data/formats/suite.yaml" --model "${OUT}/hf_after_grpo" \
    --samples "${BENCH_SAMPLES}" --max-new-tokens 96 --batch-size 64 --max-tiles "${MAX_TILES}" \
    --out "${OUT}/benchmarks" 2> "${OUT}/logs/benchmarks.log" > "${OUT}/logs/benchmarks.jsonl"
mark bench_end
cat "${OUT}/benchmarks/suite.md"

step "11/11 summary and curves"
"${PY}" tools/run_report.py quickstart --run-dir "${OUT}" --started "${T0}"
