"""The assembled start model goes where a released one goes, for R1V's recipe (a
DeepSeek-R1-Distill-Qwen-like LLM: its <｜User｜> / <｜Assistant｜> turns, replies closed by
<｜end▁of▁sentence｜>, as its tokenizer's chat_template says): assemble (the real command) ->
``convert_checkpoint.py import --tp 2`` -> ``verify_checkpoint.py --tp 2`` passes -> a few
``train.stage=sft`` steps at TP=2 from the imported folder (no ``model.preset``: the
architecture is the checkpoint's, ``<IMG_CONTEXT>``'s id the assembled tokenizer's) lower
the loss -> the last checkpoint exports, and the export verifies against it (transformers'
InternVL on the exported folder)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from assemble_parts import CORPUS, write_internvit, write_qwen2  # tests/ is on sys.path
from tool_modules import run_tool

from megatron_r1v.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[2]
ROWS, TOKENIZER_TOKENS, IMAGE_TOKEN_ID = 656, 646, 639
STEPS, PER_STEP, LR = 5, 4, 2e-3


def _verify(torchrun, hf_dir: Path, mcore_dir: Path) -> dict:
    proc = torchrun("tools/verify_checkpoint.py", 2,
                    ["--hf-dir", str(hf_dir), "--mcore-dir", str(mcore_dir), "--tp", "2"])
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def _write_sft(data: Path) -> Path:
    """The synthetic set's conversations (images, one- and two-turn) with their texts made of
    the assembled tokenizer's training sentences: the BPE learnt only those two, so the
    synthetic texts take ~1 token per byte and pass train.seq_length (measured 501 tokens)."""
    lines = []
    for i, line in enumerate((data / "sft.jsonl").read_text().splitlines()):
        record = json.loads(line)
        for j, message in enumerate(record["messages"]):
            first, second = CORPUS[(i + j) % 2], CORPUS[(i + j + 1) % 2]
            if message["role"] == "user":
                message["content"] = ("<image>\n" if message["content"].startswith("<image>") else "") + first
            else:
                message["content"] = f"<think>\n{second}\n</think>\n\nThe answer is 42."
        lines.append(json.dumps(record))
    path = data / "sft_corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_assembled_checkpoint_imports_verifies_trains_sft_and_exports(torchrun, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    write_internvit(tmp_path / "InternViT-tiny")
    # Padding rows past the tokenizer, as Qwen2's; R1-Distill's special tokens and chat template.
    write_qwen2(tmp_path / "Qwen2-tiny", rows=ROWS, family="r1-distill")
    out = tmp_path / "r1v"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "assemble_checkpoint.py"),
                           "--vision", str(tmp_path / "InternViT-tiny"), "--llm", str(tmp_path / "Qwen2-tiny"),
                           "--out", str(out), "--adapter-init", "random", "--seed", "3", "--max-shard-size", "200KB"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["image_token_id"] == IMAGE_TOKEN_ID and "assemble: 100%" in proc.stderr  # progress bar on stderr

    mcore = tmp_path / "mcore"
    torchrun("tools/convert_checkpoint.py", 2, ["import", "--hf-dir", str(out), "--out", str(mcore), "--tp", "2",
                                                "--dtype", "fp32"])
    meta = json.loads((mcore / "r1v_checkpoint.json").read_text())
    assert meta["layout"] == "skywork" and meta["arch"]["image_token_id"] == IMAGE_TOKEN_ID
    assert (mcore / "hf_extra" / "tokenizer.json").exists()
    result = _verify(torchrun, out, mcore)
    print(f"verify_checkpoint on the assembled model, tp=2: {result}")  # shown with pytest -s
    assert result["pass"] and result["max_abs_logit_diff"] <= 1e-4 and result["hf_layout"] == "skywork"

    # SFT from the imported folder: architecture from its r1v_checkpoint.json (vocabulary 656,
    # not a preset's), token ids from the assembled tokenizer.
    generate_dataset(tmp_path / "data", STEPS * PER_STEP, seed=0)  # one epoch
    train_path = _write_sft(tmp_path / "data")
    save_dir, metrics_path = tmp_path / "sft", tmp_path / "sft.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megatron_r1v.train", "--config", str(REPO / "examples/configs/tiny_sft_cpu.yaml"),
           "--set", "model.preset=null", "--set", f"model.checkpoint={mcore}", "--set", f"data.tokenizer={out}",
           "--set", f"data.train_path={train_path}", "--set", f"train.steps={STEPS}",
           "--set", f"sft.samples_per_step={PER_STEP}", "--set", "logging.log_interval=1",
           "--set", f"train.save_interval={STEPS}", "--set", f"train.save_dir={save_dir}",
           "--set", f"logging.tensorboard_dir={tmp_path / 'tb'}", "--metrics-jsonl", str(metrics_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"SFT conversations: {STEPS * PER_STEP} (0 skipped)" in proc.stdout
    # The chat template follows the model family: read from the assembled tokenizer.
    assert (f"chat template: the chat_template of {out}: replies end with '<｜end▁of▁sentence｜>' (id "
            f"{AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids('<｜end▁of▁sentence｜>')}), thought "
            "opened by the prompt: True") in proc.stdout, proc.stdout[-3000:]
    losses = [json.loads(line)["sft/loss"] for line in metrics_path.read_text().splitlines()]
    print(f"SFT loss on the assembled model, tp=2: {losses}")
    # The random Qwen2 part predicts close to uniformly over its 656 rows: CE ~ ln 656 = 6.49
    # (measured 6.494). Measured 6.494, 6.190, 5.978, 5.800, 5.604.
    assert len(losses) == STEPS and abs(losses[0] - math.log(ROWS)) < 0.15, losses
    assert max(losses[1:]) < losses[0] and losses[-1] < losses[0] - 0.3, losses
    last = save_dir / f"step_{STEPS:06d}" / "model"
    assert json.loads((last / "r1v_checkpoint.json").read_text())["arch"] == meta["arch"]

    hf = tmp_path / "hf"
    # In this process (tool_modules.run_tool: main's return value is the exit status); the script's
    # own exit status as a process is tested by test_conversion.py and tests/e2e/test_mpo_train.py.
    export = run_tool("convert_checkpoint", "export", "--mcore-dir", str(last), "--out", str(hf), cwd=REPO)
    assert export.returncode == 0, export.stderr[-3000:]
    config = json.loads((hf / "config.json").read_text())
    assert config["llm_config"]["vocab_size"] == ROWS  # the released layout, TP padding dropped
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    assert len(tokenizer) == TOKENIZER_TOKENS and tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == IMAGE_TOKEN_ID
    assert "<｜Assistant｜>" in tokenizer.chat_template  # the family's template travels with the model
    result = _verify(torchrun, hf, last)
    print(f"verify_checkpoint on the SFT export, tp=2: {result}")
    assert result["pass"] and result["max_abs_logit_diff"] <= 1e-4 and result["hf_layout"] == "skywork"

    # Training started from the assembled weights and moved every tensor, the ViT and the
    # adapter included, by Adam's few steps of ~lr each (measured at most 0.0100 after 5):
    # a fresh initialisation would be ~0.1-1 away (norms, embeddings, layer scales).
    assembled = {}
    for shard in out.glob("*.safetensors"):
        assembled.update(load_file(str(shard)))
    exported = {}
    for shard in hf.glob("*.safetensors"):
        exported.update(load_file(str(shard)))
    assert set(exported) == set(assembled)
    for name, tensor in exported.items():
        moved = (tensor - assembled[name]).abs().max().item()
        assert 0.0 < moved <= 2 * STEPS * LR, (name, moved)
