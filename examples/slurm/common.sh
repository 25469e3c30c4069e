# shellcheck shell=bash
# Shared by examples/slurm/r1v2_38b_{mpo,grpo}.sbatch: sourced from the repository root,
# after the sbatch script has set R1V_NAME, R1V_CONFIG and R1V_SIGNAL_LEAD_S. Defines
# functions only; r1v_main runs a job, r1v_after_run is the post-run decision (tests call
# it on its own: `source examples/slurm/common.sh; r1v_after_run STATUS_JSON SRUN_RC`).
#
# One job = one output folder ${R1V_RUNS:-runs}/<name>-<job id>: a requeued job keeps its
# job id, so it finds its own checkpoints there and continues with --resume.
# See examples/slurm/README.md for the knobs, the layout and the signal timeline.

# Signals torchrun forwards to its workers: torch's default list plus SIGUSR1, which
# sbatch --signal=USR1@N sends N seconds before the time limit (torchrun >= 2.10).
R1V_SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Seconds kept between torchrun's give-up (SIGKILL of the workers) and the time limit:
# torchrun's own teardown plus `scontrol requeue` from the batch script.
R1V_TEARDOWN_MARGIN_S=120

r1v_log() { echo "[r1v $(date +%Y-%m-%dT%H:%M:%S)] $*"; }
r1v_die() { echo "[r1v] error: $*" >&2; exit 1; }

# Words shell-quoted on one line (what a user could paste into a shell).
r1v_quote() {
    local out="" w
    for w in "$@"; do
        if [[ -n "$w" && "$w" =~ ^[A-Za-z0-9_./:=,@+%^-]+$ ]]; then
            out+="$w "
        else
            out+="'${w//\'/\'\\\'\'}' "
        fi
    done
    printf '%s\n' "${out% }"
}

# A JSON scalar of a flat object in FILE: true/false/null/number, or a string's text.
r1v_json_field() {  # FILE KEY
    local text
    text="$(<"$1")"
    if [[ "$text" =~ \"$2\"[[:space:]]*:[[:space:]]*(\"([^\"]*)\"|[^,}[:space:]]+) ]]; then
        if [[ "${BASH_REMATCH[1]}" == \"* ]]; then
            printf '%s\n' "${BASH_REMATCH[2]}"
        else
            printf '%s\n' "${BASH_REMATCH[1]}"
        fi
    fi
}

# A resumable checkpoint exists: exactly what trainer/checkpoint.py:latest_checkpoint keys
# on (the `latest` marker a complete save writes last). A marker naming a broken folder
# still counts, so train.py reports it instead of the job silently restarting at step 0.
r1v_has_checkpoint() { [[ -f "$1/latest" ]]; }

# R1V_EXTRA_ARGS: whitespace-separated `key=value` overrides (a `--set` before each is
# optional), e.g. R1V_EXTRA_ARGS="train.steps=100 --set parallel.pp=4". Sets R1V_EXTRA_SETS.
r1v_parse_extra() {
    local words w
    R1V_EXTRA_SETS=()
    read -r -a words <<< "${R1V_EXTRA_ARGS:-}"
    for w in "${words[@]}"; do
        case "$w" in
            --set) continue ;;
            --set=*) w="${w#--set=}" ;;
            -*) r1v_die "R1V_EXTRA_ARGS holds config overrides (key=value), not '$w'; torchrun flags go in R1V_TORCHRUN_ARGS" ;;
        esac
        [[ "$w" == *=* ]] || r1v_die "R1V_EXTRA_ARGS: '$w' is not key=value"
        R1V_EXTRA_SETS+=(--set "$w")
    done
}

# VAR must be set, or R1V_EXTRA_ARGS must set one of the recipe KEYs instead.
r1v_require() {  # VAR WHAT KEY...
    local var="$1" what="$2" key
    shift 2
    [[ -n "${!var:-}" ]] && return 0
    for key in "$@"; do
        [[ " ${R1V_EXTRA_SETS[*]} " == *" $key="* ]] && return 0
    done
    r1v_die "set $var ($what), or --set $1=... in R1V_EXTRA_ARGS"
}

# Builds everything one attempt needs; sets R1V_OUT, R1V_SAVE_DIR, R1V_SETS, R1V_RESUME,
# R1V_LAUNCH (srun + container flags), R1V_CONFIG_CMD and R1V_CMD.
r1v_prepare() {
    : "${R1V_NAME:?}" "${R1V_CONFIG:?}" "${R1V_SIGNAL_LEAD_S:?}"
    : "${SLURM_JOB_ID:?not inside a Slurm job (submit with sbatch)}"
    : "${SLURM_JOB_NODELIST:?not inside a Slurm job (submit with sbatch)}"
    local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?}}"
    # R1V_OUT (an existing job's folder) lets a new submission continue that job.
    R1V_OUT="${R1V_OUT:-${R1V_RUNS:-runs}/$R1V_NAME-$SLURM_JOB_ID}"
    [[ "$R1V_OUT" == /* ]] || R1V_OUT="$PWD/$R1V_OUT"
    R1V_SAVE_DIR="$R1V_OUT/checkpoints"
    [[ -f "$R1V_CONFIG" ]] || r1v_die "$R1V_CONFIG not found: submit from the repository root"

    r1v_parse_extra
    r1v_require DATA "the training JSONL" data.train_path
    r1v_require TOKENIZER "the tokenizer / HF model folder" data.tokenizer
    local knob var what keys
    # The stage's own, from its sbatch script: "VAR|what|key other.key" (any key will do).
    for knob in ${R1V_REQUIRED_KNOBS[@]+"${R1V_REQUIRED_KNOBS[@]}"}; do
        IFS='|' read -r var what keys <<< "$knob"
        read -r -a keys <<< "$keys"
        r1v_require "$var" "$what" "${keys[@]}"
    done
    R1V_SETS=()
    [[ -n "${DATA:-}" ]] && R1V_SETS+=(--set "data.train_path=$DATA")
    [[ -n "${TOKENIZER:-}" ]] && R1V_SETS+=(--set "data.tokenizer=$TOKENIZER")
    [[ -n "${CKPT:-}" ]] && R1V_SETS+=(--set "model.checkpoint=$CKPT")
    [[ -n "${RM_URL:-}" ]] && R1V_SETS+=(--set "reward.reward_model_url=$RM_URL")
    # The job's own folders come last, so nothing in R1V_EXTRA_ARGS moves them.
    R1V_SETS+=("${R1V_EXTRA_SETS[@]}" --set "train.save_dir=$R1V_SAVE_DIR" --set "logging.tensorboard_dir=$R1V_OUT/tb")

    R1V_RESUME=()
    r1v_has_checkpoint "$R1V_SAVE_DIR" && R1V_RESUME=(--resume)

    # The rendezvous host: the first node (`scontrol show hostnames` read whole, not through
    # `| head -n1`, whose early exit would fail the pipeline with SIGPIPE under pipefail).
    local head port shutdown nodes=()
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    head="${R1V_RDZV_HOST:-${nodes[0]:-}}"
    [[ -n "$head" ]] || r1v_die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed nothing"
    # Below Linux's ephemeral range (32768+), different for jobs that share a first node.
    port="${R1V_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
    # torchrun waits this long for its workers after forwarding a signal, then SIGKILLs them.
    shutdown="${R1V_SHUTDOWN_TIMEOUT_S:-$((R1V_SIGNAL_LEAD_S - R1V_TEARDOWN_MARGIN_S))}"
    (( shutdown > 0 )) || r1v_die "torchrun's shutdown timeout would be $shutdown s: raise R1V_SIGNAL_LEAD_S"

    local container=()
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        local mounts="$PWD:$PWD"
        [[ "$R1V_OUT" == "$PWD"/* ]] || mounts+=",$R1V_OUT:$R1V_OUT"
        [[ -n "${CONTAINER_MOUNTS:-}" ]] && mounts+=",$CONTAINER_MOUNTS"
        container=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir="$PWD")
    fi
    local python="${R1V_PYTHON:-python}" extra_torchrun=()
    read -r -a extra_torchrun <<< "${R1V_TORCHRUN_ARGS:-}"
    # --kill-on-bad-exit=0: after a signal every node's torchrun exits non-zero (it re-raises
    # the signal), and killing the step at the first one could stop rank 0 before it writes
    # run_status.json. --cpu-bind=none: one task per node must not be pinned to the cores
    # of one task slot; torchrun's 8 workers and their data loaders need the whole node.
    R1V_LAUNCH=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=0 --cpu-bind=none "${container[@]}")
    R1V_CONFIG_CMD=("$python" -m megatron_r1v.config --config "$R1V_CONFIG" "${R1V_SETS[@]}")
    R1V_CMD=("${R1V_LAUNCH[@]}"
        "${R1V_TORCHRUN:-torchrun}" --nnodes "$nnodes" --nproc-per-node "${R1V_GPUS_PER_NODE:-8}"
        --rdzv-backend c10d --rdzv-endpoint "$head:$port" --rdzv-id "$SLURM_JOB_ID" --max-restarts 0
        --signals-to-handle "$R1V_SIGNALS" --shutdown-timeout "$shutdown" "${extra_torchrun[@]}"
        -m megatron_r1v.train --config "$R1V_CONFIG" "${R1V_SETS[@]}" "${R1V_RESUME[@]}")
}

r1v_environment() {
    # Megatron: TP / sequence-parallel communication must be issued in order on one CUDA
    # hardware queue for its compute/communication overlap to be correct.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # Run the installed megatron_r1v (in a container: the image's copy), not whatever
    # checkout is the working directory (python -m puts it first on sys.path otherwise).
    export PYTHONSAFEPATH=1
    # NCCL's own warnings (IB / topology failures) instead of a bare collective timeout.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # A failed or timed-out collective kills the process (so torchrun and the job end)
    # instead of hanging until the time limit; 3 (no communicator clean-up) is torch's
    # default, stated so that a site-wide 0 cannot turn it off.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
    # On a collective timeout every rank dumps its last collectives (flight recorder) into
    # the job's folder, which shows the rank that hung. Two names: older / newer torch.
    export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
    export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE="${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$R1V_OUT/logs/nccl_trace/rank_}"
    export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-$TORCH_NCCL_DEBUG_INFO_TEMP_FILE}"
    # Triton compiles the log-prob / GRPO kernels per rank: keep its cache node-local
    # rather than 64 ranks racing in one cache on a shared home file system.
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache-${USER:-r1v}-$SLURM_JOB_ID}"
    # gloo (CPU-side groups) finds its interface from the host name unless told; follow
    # NCCL_SOCKET_IFNAME when that names interfaces (not a ^exclusion / =exact pattern).
    if [[ -n "${NCCL_SOCKET_IFNAME:-}" && "$NCCL_SOCKET_IFNAME" != "^"* && "$NCCL_SOCKET_IFNAME" != "="* ]]; then
        export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}"
    fi
    # Cluster-specific, left to the environment you submit from (sbatch exports it):
    # NCCL_SOCKET_IFNAME (bootstrap interface), NCCL_IB_HCA (which HCAs carry NCCL traffic,
    # e.g. to leave out a storage NIC), NCCL_IB_GID_INDEX (RoCE). See the README.
}

# The post-run decision. STATUS_JSON: <train.save_dir>/run_status.json written by rank 0;
# SRUN_RC: srun's exit status; PREV_COMPLETED: completed_steps of the previous attempt
# (empty on the first). Requeues the job (same id, so the same folder and --resume) when
# the run stopped on SIGUSR1 before its last step; returns the job's exit status.
r1v_after_run() {  # STATUS_JSON SRUN_RC [PREV_COMPLETED]
    local status="$1" rc="$2" prev="${3:-}"
    if [[ ! -f "$status" ]]; then
        r1v_log "no $status: the run did not reach its exit handler (srun exit $rc)"
        return "$rc"
    fi
    local finished signal completed total
    finished="$(r1v_json_field "$status" finished)"
    signal="$(r1v_json_field "$status" signal)"
    completed="$(r1v_json_field "$status" completed_steps)"
    total="$(r1v_json_field "$status" total_steps)"
    r1v_log "run status: $completed/$total steps, finished=$finished, signal=$signal, srun exit $rc"
    if [[ "$finished" == true ]]; then
        return 0
    fi
    if [[ "$signal" != SIGUSR1 ]]; then
        # SIGTERM is scancel or the time limit itself (preemption requeues on its own):
        # no requeue. A run that stopped early without a signal (--stop-after) is fine.
        return "$rc"
    fi
    local attempt="${SLURM_RESTART_COUNT:-0}" max="${R1V_MAX_REQUEUES:-20}"
    if (( attempt >= max )); then
        r1v_log "not requeueing: $attempt requeues already (R1V_MAX_REQUEUES=$max)"
        return 1
    fi
    if [[ -n "$prev" && "$completed" =~ ^[0-9]+$ ]] && (( completed <= prev )); then
        r1v_log "not requeueing: no step completed since the previous attempt ($prev), raise the signal lead"
        return 1
    fi
    r1v_log "stopped on SIGUSR1 at step $completed/$total: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || { r1v_log "scontrol requeue failed"; return 1; }
    return 0
}

r1v_main() {
    r1v_prepare
    if [[ "${R1V_DRY_RUN:-0}" == 1 ]]; then
        echo "out: $R1V_OUT"
        echo "config: $(r1v_quote "${R1V_CONFIG_CMD[@]}")"
        echo "run: $(r1v_quote "${R1V_CMD[@]}")"
        return 0
    fi
    mkdir -p "$R1V_OUT/logs/nccl_trace" "$R1V_SAVE_DIR"
    local attempt="${SLURM_RESTART_COUNT:-0}"
    exec > >(tee -a "$R1V_OUT/logs/job.out") 2>&1
    r1v_log "job $SLURM_JOB_ID attempt $attempt on $SLURM_JOB_NODELIST: $R1V_OUT"
    r1v_environment

    # The resolved configuration, in the environment the training runs in.
    local resolve=("${R1V_CONFIG_CMD[@]}")
    [[ -n "${CONTAINER_IMAGE:-}" ]] && resolve=("${R1V_LAUNCH[@]/--nodes=*/--nodes=1}" --ntasks=1 "${R1V_CONFIG_CMD[@]}")
    "${resolve[@]}" > "$R1V_OUT/config.yaml.tmp" || r1v_die "the configuration does not resolve (see above)"
    mv "$R1V_OUT/config.yaml.tmp" "$R1V_OUT/config.yaml"

    # The folder is this job's own (its id is in the name): a lock in it was left by an
    # earlier attempt of this job, whose processes Slurm has ended before requeueing it.
    if [[ -f "$R1V_SAVE_DIR/.lock" ]]; then
        r1v_log "removing $R1V_SAVE_DIR/.lock left by an earlier attempt of this job: $(cat "$R1V_SAVE_DIR/.lock")"
        rm -f "$R1V_SAVE_DIR/.lock"
    fi
    local status="$R1V_SAVE_DIR/run_status.json" prev=""
    if [[ -f "$status" ]]; then  # the previous attempt's: keep it, but never decide on it
        prev="$(r1v_json_field "$status" completed_steps)"
        mv "$status" "$R1V_OUT/logs/run_status.before-attempt-$attempt.json"
    fi
    r1v_log "$(r1v_quote "${R1V_CMD[@]}")"
    local rc=0
    "${R1V_CMD[@]}" || rc=$?
    r1v_after_run "$status" "$rc" "$prev" || exit $?
}
