"""The assembled start model goes where a released one goes: assemble (the real command) ->
``convert_checkpoint.py import --tp 2`` -> ``verify_checkpoint.py --tp 2`` passes."""

import json
import subprocess
import sys
from pathlib import Path

from assemble_parts import write_internvit, write_qwen2  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[2]


def test_assembled_checkpoint_imports_and_verifies_at_tp2(torchrun, tmp_path):
    write_internvit(tmp_path / "InternViT-tiny")
    write_qwen2(tmp_path / "Qwen2-tiny", rows=656)  # padding rows past the tokenizer, as Qwen2's
    out = tmp_path / "r1v"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "assemble_checkpoint.py"),
                           "--vision", str(tmp_path / "InternViT-tiny"), "--llm", str(tmp_path / "Qwen2-tiny"),
                           "--out", str(out), "--adapter-init", "random", "--seed", "3", "--max-shard-size", "200KB"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["image_token_id"] == 639 and "assemble: 100%" in proc.stderr  # progress bar on stderr

    mcore = tmp_path / "mcore"
    torchrun("tools/convert_checkpoint.py", 2, ["import", "--hf-dir", str(out), "--out", str(mcore), "--tp", "2",
                                                "--dtype", "fp32"])
    meta = json.loads((mcore / "r1v_checkpoint.json").read_text())
    assert meta["layout"] == "skywork" and meta["arch"]["image_token_id"] == 639
    assert (mcore / "hf_extra" / "tokenizer.json").exists()
    proc = torchrun("tools/verify_checkpoint.py", 2, ["--hf-dir", str(out), "--mcore-dir", str(mcore), "--tp", "2"])
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    print(f"verify_checkpoint on the assembled model, tp=2: {result}")  # shown with pytest -s
    assert result["pass"] and result["max_abs_logit_diff"] <= 1e-4 and result["hf_layout"] == "skywork"
