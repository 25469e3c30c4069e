# shellcheck shell=bash
# A tiny random image-aware reward model, served over HTTP for the run's hybrid reward (Eq. 7),
# shared by examples/quickstart.sh and examples/ssb_ablation.sh. Source it once PY is set
# (tools/ensure_venv.sh); it installs an EXIT trap that stops the server. Defines
#   start_reward_server KIND DIR [TOKENIZER]   write a tiny KIND (skywork-vl or r1v) reward model to
#                                              DIR/reward_model (tools/make_tiny_checkpoint.py
#                                              --reward-model; an r1v one reads with TOKENIZER),
#                                              serve it on a free port (tools/serve_reward_model.py)
#                                              and set RM_URL once it listens (up to 120 s)
#   stop_reward_server                         stop it (also at exit)
RM_PID=""
RM_URL=""
stop_reward_server() {
    if [ -n "${RM_PID}" ] && kill -0 "${RM_PID}" 2> /dev/null; then
        kill -TERM "${RM_PID}" 2> /dev/null || true
        for _ in $(seq 50); do kill -0 "${RM_PID}" 2> /dev/null || break; sleep 0.2; done
        kill -KILL "${RM_PID}" 2> /dev/null || true
        wait "${RM_PID}" 2> /dev/null || true
    fi
    RM_PID=""
}
trap stop_reward_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_reward_server() {  # start_reward_server KIND DIR [TOKENIZER]
    local kind="$1" dir="$2" tokenizer="${3:-}"
    local rm_args=(--reward-model "${kind}" --out "${dir}/reward_model" --seed 0 --force)
    [ "${kind}" = r1v ] && rm_args+=(--tokenizer "${tokenizer}")
    "${PY}" tools/make_tiny_checkpoint.py "${rm_args[@]}" > "${dir}/reward_model.json"
    # First stdout line: {"event": "listening", "url": ...}; the rest of its output is stderr.
    "${PY}" tools/serve_reward_model.py --model "${dir}/reward_model" --port 0 \
        > "${dir}/reward_server.out" 2> "${dir}/reward_server.log" &
    RM_PID=$!
    RM_URL=""
    for _ in $(seq 600); do
        if [ -s "${dir}/reward_server.out" ]; then
            RM_URL=$("${PY}" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["url"])' \
                "${dir}/reward_server.out" 2> /dev/null || true)
            [ -n "${RM_URL}" ] && break
        fi
        kill -0 "${RM_PID}" 2> /dev/null || break
        sleep 0.2
    done
    if [ -z "${RM_URL}" ]; then
        echo "error: the reward server printed no startup line; its stderr (${dir}/reward_server.log):" >&2
        tail -n 30 "${dir}/reward_server.log" >&2 || true
        exit 1
    fi
    echo "reward server ${RM_URL} (pid ${RM_PID}, ${kind}, log ${dir}/reward_server.log)"
}
