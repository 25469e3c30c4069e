"""tools/make_tiny_checkpoint.py and layouts.convert_layout: a tiny R1V2 in the released layout."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tool_modules import load_tool, run_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.checkpoint.hf_io import HFCheckpointReader
from megatron_r1v.checkpoint.hf_layouts import convert_layout, detect_layout
from megatron_r1v.models.r1v.hf_config import arch_from_skywork_config
from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_FILE_LAYOUT, TRANSFORMERS_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.rollout.hf_engine import HFRolloutEngine

REPO = Path(__file__).resolve().parents[2]
ARCH = get_preset("tiny-r1v-chat")


@pytest.fixture(scope="module")
def tool():
    return load_tool("make_tiny_checkpoint")


@pytest.fixture(scope="module")
def tiny(tool, tmp_path_factory):
    """The default checkpoint: tiny-r1v-chat, seed 0, tokenizer trained by the tool."""
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    summary = tool.make_tiny_checkpoint(out)
    return out, summary


def read_all(directory):
    with HFCheckpointReader(directory) as reader:
        return {name: reader.get(name) for name in reader.names()}


def engine_weights(seed):
    return dict(HFRolloutEngine.from_arch(ARCH, seed=seed).named_weights())


def arch_parts(arch):
    return arch.decoder, arch.vision, arch.adapter, arch.image_token_id


def test_folder_is_a_skywork_checkpoint_of_the_preset(tiny):
    out, summary = tiny
    config = json.loads((out / "config.json").read_text())
    with HFCheckpointReader(out) as reader:
        names = reader.names()
        assert detect_layout(config, names) == "skywork"
        assert {reader.read(n).dtype for n in names} == {torch.float32}
    assert arch_parts(arch_from_skywork_config(config, 639)) == arch_parts(ARCH)
    assert config["torch_dtype"] == "float32" and config["img_context_token_id"] == 639
    assert (out / "model.safetensors.index.json").exists()
    assert summary["num_tensors"] == len(names) and summary["num_parameters"] == ARCH.parameter_counts()["total"]
    assert not list(out.parent.glob(".ckpt*")), "a temporary folder was left behind"


def test_tokenizer_loads_with_the_preset_image_token(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny[0]))
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == 639 and len(tokenizer) == 640
    assert tokenizer.decode(tokenizer("The answer is \\boxed{7}.")["input_ids"]) == "The answer is \\boxed{7}."


def test_weights_are_the_transformers_init_under_skywork_names(tiny):
    """Spot checks written out by hand (not through hf_mapping), then every tensor back."""
    sky, tr = read_all(tiny[0]), engine_weights(seed=0)
    v, d = "vision_model.encoder.layers.1.", "model.vision_tower.encoder.layer.1."
    qkv = torch.cat([tr[d + f"attention.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(sky[v + "attn.qkv.weight"], qkv)
    assert torch.equal(sky[v + "ls2"], tr[d + "lambda_2"])
    assert torch.equal(sky["mlp1.3.weight"], tr["model.multi_modal_projector.linear_2.weight"])
    assert torch.equal(sky["language_model.lm_head.weight"], tr["lm_head.weight"])
    assert torch.equal(sky["language_model.model.layers.2.self_attn.k_proj.bias"],
                       tr["model.language_model.layers.2.self_attn.k_proj.bias"])
    back = dict(convert_layout(sky.__getitem__, ARCH, SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT))
    assert set(back) == set(tr) and all(torch.equal(back[n], t) for n, t in tr.items())


def test_same_seed_gives_identical_bytes(tool, tiny, tmp_path):
    shards = sorted(p.name for p in tiny[0].glob("*.safetensors"))
    tool.make_tiny_checkpoint(tmp_path / "again", seed=0, tokenizer_dir=tiny[0])
    tool.make_tiny_checkpoint(tmp_path / "other", seed=1, tokenizer_dir=tiny[0])
    assert sorted(p.name for p in (tmp_path / "again").glob("*.safetensors")) == shards
    for name in shards + ["model.safetensors.index.json", "config.json", "tokenizer.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (tiny[0] / name).read_bytes(), name
    assert (tmp_path / "other" / shards[0]).read_bytes() != (tiny[0] / shards[0]).read_bytes()


def test_cli_errors_name_the_problem(tool, tiny, tmp_path, capsys):
    from megatron_r1v.data.tokenizer import save_hf_tokenizer, train_tokenizer

    assert tool.main(["--out", str(tiny[0])]) == 2
    assert f"output {tiny[0]} exists; pass --force" in capsys.readouterr().err
    wide = tmp_path / "wide_tokenizer"
    save_hf_tokenizer(train_tokenizer(["some text"], 1024), wide)  # <IMG_CONTEXT> = 1023
    assert tool.main(["--out", str(tmp_path / "x"), "--tokenizer", str(wide)]) == 2
    assert f"--tokenizer {wide} has 1024 tokens, more than the vocabulary of preset 'tiny-r1v-chat' (640)" in \
        capsys.readouterr().err
    assert tool.main(["--out", str(tmp_path / "y"), "--preset", "tiny-qwen2"]) == 2
    assert "has no vision tower" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wide_tokenizer"], "a temporary folder was left behind"


def test_convert_layout_refuses_what_the_target_cannot_express():
    v1 = get_preset("tiny-r1v-ps-v1")
    weights = dict(HFRolloutEngine.from_arch(get_preset("tiny-r1v"), seed=0).named_weights())
    sky = dict(convert_layout(weights.__getitem__, v1, TRANSFORMERS_LAYOUT, SKYWORK_LAYOUT))  # v1 is fine here
    with pytest.raises(ValueError, match="only expresses ps_version v2"):
        next(convert_layout(sky.__getitem__, v1, SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT))
    del sky["mlp1.1.bias"]
    with pytest.raises(KeyError, match="no tensor 'mlp1.1.bias' \\(part of adapter.mlp.linear_fc1.bias\\)"):
        dict(convert_layout(sky.__getitem__, get_preset("tiny-r1v"), SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT))


def test_converter_imports_it_at_tp2_and_exports_transformers_files(tiny, torchrun, tmp_path):
    """The repo's converter reads the folder like a released checkpoint: import at TP=2,
    export to the transformers layout, and the files equal transformers' own save_pretrained."""
    torchrun("tools/convert_checkpoint.py", 2, ["import", "--hf-dir", str(tiny[0]), "--out", str(tmp_path / "mcore"),
                                               "--tp", "2", "--dtype", "fp32"], timeout=300)
    # In this process (tool_modules.run_tool: main's return value is the exit status); the script's
    # own exit status as a process is tested by tests/distributed/test_conversion.py.
    proc = run_tool("convert_checkpoint", "export", "--mcore-dir", str(tmp_path / "mcore"), "--out",
                    str(tmp_path / "tr"), "--layout", "transformers", cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    HFRolloutEngine.from_arch(ARCH, seed=0).model.save_pretrained(tmp_path / "reference")
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    exported = read_all(tmp_path / "tr")
    assert set(exported) == set(reference) and all(torch.equal(exported[n], t) for n, t in reference.items())
    # ... which is also what convert_layout makes of the in-memory weights.
    weights = engine_weights(seed=0)
    files = dict(convert_layout(weights.__getitem__, ARCH, TRANSFORMERS_LAYOUT, TRANSFORMERS_FILE_LAYOUT))
    assert set(files) == set(reference) and all(torch.equal(files[n], t) for n, t in reference.items())
