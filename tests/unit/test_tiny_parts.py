"""tools/make_tiny_parts.py: tiny pretrained parts in their public formats, which assemble,
whose warm-ups learn (the vision probe names the shapes, the LM's loss falls), and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tool_modules import run_tool  # tests/ is on sys.path

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.tiny_parts import (
    LLM_DIR,
    VISION_DIR,
    PartsOptions,
    cell_class,
    cell_features,
    lm_documents,
    make_tiny_parts,
    tile_examples,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    generate_dataset(root / "data", num=24, seed=3, family="perception")
    lines = []
    summary = make_tiny_parts(PartsOptions(data=root / "data", out=root / "parts", vision_steps=200, llm_steps=30,
                                           batch_size=16), log=lines.append)
    return root, summary, lines


def test_tiles_and_cell_labels_follow_the_metadata(tmp_path):
    generate_dataset(tmp_path / "d", num=9, seed=4, family="perception")
    meta = [json.loads(line) for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    pixels, labels = tile_examples(tmp_path / "d", 56)
    assert pixels.shape == (sum(m["width"] * m["height"] // 56**2 for m in meta), 3, 56, 56)
    assert labels.shape == (len(pixels), 2, 2)
    # Every shape is one labelled cell with its own class; nothing else is labelled.
    assert int((labels > 0).sum()) == sum(len(m["objects"]) for m in meta)
    assert sorted(labels[labels > 0].tolist()) == sorted(cell_class(o) for m in meta for o in m["objects"])
    # A background pixel is the normalised background colour (ImageNet mean/std).
    first = meta[0]
    red = (first["background"][0] / 255 - 0.485) / 0.229
    assert pixels[0, 0, 0, 0].item() == pytest.approx(red, abs=1e-5)


def test_cell_features_group_the_four_patches_of_a_cell():
    hidden = torch.arange(17, dtype=torch.float32).view(1, 17, 1)  # class token 0, patches 1..16 row-major
    cells = cell_features(hidden, patches_per_side=4, per_cell=2)
    assert cells.shape == (1, 2, 2, 4)
    assert cells[0, 0, 0].tolist() == [1, 2, 5, 6] and cells[0, 1, 1].tolist() == [11, 12, 15, 16]


def test_parts_learn_and_assemble(parts, tmp_path):
    root, summary, lines = parts
    vision = json.loads((root / "parts" / VISION_DIR / "pretraining.json").read_text())["history"]
    language = json.loads((root / "parts" / LLM_DIR / "pretraining.json").read_text())["history"]
    # 18 shape classes: chance is 1/18; the probe learns to name nearly every shape.
    assert vision[0]["shape_accuracy"] < 0.3 and vision[-1]["shape_accuracy"] > 0.8
    assert language[-1]["loss"] < 0.5 * language[0]["loss"]
    assert any(line.startswith("vision step 200/200") for line in lines)
    config = json.loads((root / "parts" / VISION_DIR / "config.json").read_text())
    assert config["architectures"] == ["InternVisionModel"] and config["image_size"] == 56
    tensors = load_file(str(root / "parts" / VISION_DIR / "model.safetensors"))
    assert "embeddings.patch_embedding.weight" in tensors and "encoder.layers.1.mlp.fc2.weight" in tensors
    assert summary["tokenizer_tokens"] == 637  # the 640-token BPE without <img>, </img>, <IMG_CONTEXT>
    proc = run_tool("assemble_checkpoint", "--vision", str(root / "parts" / VISION_DIR), "--llm",
                    str(root / "parts" / LLM_DIR), "--out", str(tmp_path / "r1v"))
    assert proc.returncode == 0, proc.stderr
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    engine, arch, _ = load_hf_engine(tmp_path / "r1v")
    assert arch.image_token_id == 639 and arch.decoder.vocab_size == 646
    # The assembled tower is the warmed-up one, tensor for tensor.
    patch = dict(engine.model.named_parameters())["model.vision_tower.embeddings.patch_embeddings.projection.weight"]
    assert torch.equal(patch, tensors["embeddings.patch_embedding.weight"])


def test_documents_drop_the_image_marker(parts):
    docs = lm_documents(parts[0] / "data")
    assert len(docs) >= 24 and not any("<image>" in d for d in docs)
    assert docs[0].startswith("What color is the shape in the image?") and "\\boxed{" in docs[0]


def test_bad_input_is_refused_before_any_work(parts, tmp_path):
    root = parts[0]
    with pytest.raises(FileExistsError, match="pass --force"):
        make_tiny_parts(PartsOptions(data=root / "data", out=root / "parts"))
    with pytest.raises(ValueError, match="vision_steps: expected at least 1"):
        make_tiny_parts(PartsOptions(data=root / "data", out=tmp_path / "p", vision_steps=0))
    generate_dataset(tmp_path / "reasoning", num=3, seed=0)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_parts.py"), "--data",
                           str(tmp_path / "reasoning"), "--out", str(tmp_path / "out"), "--llm-steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "metadata.jsonl:1 (syn-000000)" in proc.stderr
    assert "needs the perception family" in proc.stderr
    assert not (tmp_path / "out").exists()  # the data is checked before anything is trained or written
    missing = run_tool("make_tiny_parts", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 1 and "prompts.jsonl is missing" in missing.stderr
