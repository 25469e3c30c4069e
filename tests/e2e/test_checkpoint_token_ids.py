"""End to end: a GRPO step from an imported checkpoint whose <IMG_CONTEXT> id is not the preset's.

The tiny checkpoint comes with a 600-token tokenizer, so its image token is 599 where the
recipe's preset (tiny-r1v-chat) says 639. The run used to stop at start-up (the tokenizer
was checked against the preset's id); now the trainer, its rollout engine and the
checkpoint it writes all use the tokenizer's and the checkpoint's 599 (trainer/arch.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tool_modules import load_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _make_tiny_checkpoint(out: Path, tokenizer: Path) -> dict:
    return load_tool("make_tiny_checkpoint").make_tiny_checkpoint(out, "tiny-r1v-chat", seed=0,
                                                                   tokenizer_dir=tokenizer)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args],
                          capture_output=True, text=True, timeout=900, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_grpo_step_from_a_checkpoint_with_another_image_token_id(tmp_path):
    generate_dataset(tmp_path / "data", 8, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl"], 600, tmp_path / "tok")  # <IMG_CONTEXT> = 599
    assert _make_tiny_checkpoint(tmp_path / "hf", tmp_path / "tok")["image_token_id"] == 599
    _torchrun(str(REPO / "tools" / "convert_checkpoint.py"), "import", "--hf-dir", str(tmp_path / "hf"),
              "--out", str(tmp_path / "mcore"), "--dtype", "fp32")
    assert json.loads((tmp_path / "mcore" / "r1v_checkpoint.json").read_text())["arch"]["image_token_id"] == 599
    proc = _torchrun("-m", "megatron_r1v.train", "--config", str(REPO / "examples/configs/tiny_grpo_cpu.yaml"),
                     "--set", "parallel.tp=1", "--set", f"model.checkpoint={tmp_path / 'mcore'}",
                     "--set", f"data.train_path={tmp_path / 'data' / 'prompts.jsonl'}",
                     "--set", f"data.tokenizer={tmp_path / 'tok'}", "--set", "train.steps=1",
                     "--set", "grpo.prompts_per_step=2", "--set", "rollout.n_samples=2",
                     "--set", "rollout.max_new_tokens=8", "--set", "logging.tensorboard_dir=null",
                     "--set", f"train.save_dir={tmp_path / 'run'}")
    assert "step 1/1" in proc.stdout
    saved = sorted((tmp_path / "run").glob("step_*/model/r1v_checkpoint.json"))
    assert saved and json.loads(saved[-1].read_text())["arch"]["image_token_id"] == 599
