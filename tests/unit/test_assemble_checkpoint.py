"""tools/assemble_checkpoint.py / checkpoint/assemble.py: an R1V checkpoint from a standalone
InternViT, a Qwen2 LLM and a fresh or copied adapter (parts built by tests/assemble_parts.py)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from assemble_parts import DECODER, QWEN_TOKENS, VISION, write_internvit, write_qwen2  # tests/ is on sys.path
from safetensors.torch import load_file, save_file
from tool_modules import load_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.checkpoint.assemble import AssemblyOptions, assemble_checkpoint
from megatron_r1v.checkpoint.hf_io import HFCheckpointReader, ShardedSafetensorsWriter
from megatron_r1v.checkpoint.hf_layouts import detect_layout
from megatron_r1v.data.tokenizer import load_tokenizer
from megatron_r1v.models.r1v.hf_config import arch_from_skywork_config

NEW_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
PADDED_ROWS = 656  # past the 637 + 9 tokens, as Qwen2's 152064 rows are past its ~151.7k tokens
ADAPTER = ["mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight", "mlp1.1.bias", "mlp1.3.weight", "mlp1.3.bias"]


def read_all(directory):
    with HFCheckpointReader(directory) as reader:
        return {name: reader.get(name) for name in reader.names()}


def assemble(parts, out, **kw):
    opts = AssemblyOptions(vision=kw.pop("vision", parts["vision"]), llm=kw.pop("llm", parts["llm"]), out=out,
                           max_shard_bytes=200_000, progress=False, **kw)
    return assemble_checkpoint(opts)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    vision = write_internvit(root / "InternViT-tiny")
    write_qwen2(root / "Qwen2-tiny", rows=PADDED_ROWS)
    return {"vision": root / "InternViT-tiny", "llm": root / "Qwen2-tiny", "vision_tensors": vision,
            "llm_tensors": read_all(root / "Qwen2-tiny"), "root": root}


@pytest.fixture(scope="module")
def assembled(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("assembled") / "r1v"
    return out, assemble(parts, out)


def test_output_is_the_released_layout_and_config(assembled):
    out, report = assembled
    tensors = read_all(out)
    config = json.loads((out / "config.json").read_text())
    assert detect_layout(config, list(tensors)) == "skywork"
    for name in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
                 "vision_model.encoder.layers.1.attn.qkv.weight", "vision_model.encoder.layers.1.ls2", *ADAPTER,
                 "language_model.model.embed_tokens.weight", "language_model.model.layers.3.mlp.down_proj.weight",
                 "language_model.model.norm.weight", "language_model.lm_head.weight"):
        assert name in tensors, name
    assert len(tensors) == 4 + 13 * VISION.num_layers + 6 + 3 + 12 * DECODER.num_layers
    assert len(report.files) > 1 and (out / "model.safetensors.index.json").exists()
    assert (config["architectures"], config["model_type"]) == (["InternVLChatModel"], "internvl_chat")
    assert (config["downsample_ratio"], config["ps_version"], config["select_layer"]) == (0.5, "v2", -1)
    assert (config["force_image_size"], config["template"], config["img_context_token_id"]) == (56, "internvl2_5", 639)
    assert config["vision_config"]["architectures"] == ["InternVisionModel"]
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert config["llm_config"]["vocab_size"] == PADDED_ROWS and "auto_map" not in config["vision_config"]
    assert config["llm_config"]["initializer_range"] == 0.02  # the LLM's own keys come along
    arch = arch_from_skywork_config(config, 639)
    assert arch.vision == VISION and arch.decoder.hidden_size == DECODER.hidden_size
    assert (out / "generation_config.json").exists() and json.loads((out / "assembly.json").read_text())["llm"]
    assert not list(out.parent.glob(".r1v.partial-*")), "a temporary folder was left behind"


def test_vision_tensors_are_bit_identical(parts, assembled):
    tensors = read_all(assembled[0])
    for name, source in parts["vision_tensors"].items():
        got = tensors[f"vision_model.{name}"]
        assert got.dtype == source.dtype and torch.equal(got, source), name


def test_llm_tensors_are_bit_identical_on_the_original_rows(parts, assembled):
    tensors = read_all(assembled[0])
    for name, source in parts["llm_tensors"].items():
        out_name = "language_model.lm_head.weight" if name == "lm_head.weight" else f"language_model.{name}"
        got = tensors[out_name]
        assert got.dtype == source.dtype and got.shape == source.shape, name
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            # old tokens' rows and the padding rows past the new ids are untouched
            assert torch.equal(got[:QWEN_TOKENS], source[:QWEN_TOKENS]), name
            assert torch.equal(got[QWEN_TOKENS + 9:], source[QWEN_TOKENS + 9:]), name
        else:
            assert torch.equal(got, source), name


def test_new_token_rows_are_the_mean_of_the_old_tokens_rows(parts, assembled):
    tensors = read_all(assembled[0])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        source = parts["llm_tensors"][name]
        mean = source[:QWEN_TOKENS].double().mean(0).float()  # padding rows are not in the mean
        out_name = "language_model.lm_head.weight" if name == "lm_head.weight" else f"language_model.{name}"
        new_rows = tensors[out_name][QWEN_TOKENS:QWEN_TOKENS + 9]
        torch.testing.assert_close(new_rows, mean.expand(9, -1), rtol=0, atol=1e-7)
        assert (mean - source[:PADDED_ROWS].double().mean(0).float()).abs().max() > 1e-4, "padding would show"


def test_tokenizer_gets_the_internvl_tokens_after_its_own(parts, assembled):
    out, report = assembled
    before, after = load_tokenizer(parts["llm"]), load_tokenizer(out)
    assert len(before) == QWEN_TOKENS and len(after) == QWEN_TOKENS + 9
    assert [after.convert_tokens_to_ids(t) for t in NEW_TOKENS] == list(range(QWEN_TOKENS, QWEN_TOKENS + 9))
    assert report.added_tokens == dict(zip(NEW_TOKENS, range(QWEN_TOKENS, QWEN_TOKENS + 9)))
    text = "The answer is 42. Think step by step."
    assert after(text)["input_ids"] == before(text)["input_ids"]
    ids = after("<img><IMG_CONTEXT><IMG_CONTEXT></img>")["input_ids"]
    assert ids == [637, 639, 639, 638] and after.decode(ids, skip_special_tokens=True) == ""
    assert report.image_token_id == 639 and not report.resized


def test_fresh_adapter_is_initialised_as_internvl_does_and_seeded(parts, assembled, tmp_path):
    tensors = read_all(assembled[0])
    width = VISION.hidden_size * 4  # (1 / 0.5)^2 patches per token
    assert torch.equal(tensors["mlp1.0.weight"], torch.ones(width))
    assert torch.equal(tensors["mlp1.0.bias"], torch.zeros(width))
    for name, shape, fan_in in (("mlp1.1.weight", (64, width), width), ("mlp1.1.bias", (64,), width),
                                ("mlp1.3.weight", (64, 64), 64), ("mlp1.3.bias", (64,), 64)):
        t = tensors[name]
        bound = 1 / math.sqrt(fan_in)
        assert t.shape == shape and t.dtype == torch.float32 and t.abs().max() <= bound, name
        if t.numel() > 1000:  # U(-b, b) has std b / sqrt(3)
            assert abs(t.std().item() - bound / math.sqrt(3)) < 0.05 * bound, name
    again = assemble(parts, tmp_path / "same", seed=0)
    other = assemble(parts, tmp_path / "other", seed=1)
    assert again.adapter == "random (seed 0)" and other.adapter == "random (seed 1)"
    same, different = read_all(tmp_path / "same"), read_all(tmp_path / "other")
    assert all(torch.equal(same[n], tensors[n]) for n in ADAPTER)
    assert not torch.equal(different["mlp1.1.weight"], tensors["mlp1.1.weight"])


def test_adapter_from_copies_mlp1_bit_identically(parts, tmp_path):
    source = tmp_path / "source"
    assemble(parts, source, seed=7)  # any R1V checkpoint in the released layout
    report = assemble(parts, tmp_path / "out", adapter_from=source, seed=0)
    copied, original = read_all(tmp_path / "out"), read_all(source)
    assert report.adapter == str(source)
    assert all(torch.equal(copied[n], original[n]) for n in ADAPTER)


def test_vocabulary_grows_only_when_new_ids_pass_its_rows(parts, tmp_path):
    write_qwen2(tmp_path / "exact", rows=QWEN_TOKENS)  # no padding rows: the 9 new ids need 9 more
    source = read_all(tmp_path / "exact")
    report = assemble(parts, tmp_path / "out", llm=tmp_path / "exact")
    assert report.resized and (report.source_vocab_rows, report.vocab_rows) == (QWEN_TOKENS, QWEN_TOKENS + 9)
    tensors = read_all(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["llm_config"]["vocab_size"] == QWEN_TOKENS + 9
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        got = tensors["language_model.lm_head.weight" if name == "lm_head.weight" else f"language_model.{name}"]
        assert got.shape == (QWEN_TOKENS + 9, DECODER.hidden_size)
        assert torch.equal(got[:QWEN_TOKENS], source[name])
        torch.testing.assert_close(got[QWEN_TOKENS:], source[name].double().mean(0).float().expand(9, -1),
                                   rtol=0, atol=1e-7)


def test_tokens_the_llm_has_are_not_added_again(parts, tmp_path):
    llm = tmp_path / "with_image_tokens"
    write_qwen2(llm, rows=PADDED_ROWS, with_image_tokens=True)  # <img> </img> <IMG_CONTEXT> at 637-639
    report = assemble(parts, tmp_path / "out", llm=llm)
    assert report.image_token_id == 639
    assert report.added_tokens == dict(zip(NEW_TOKENS[3:], range(640, 646)))
    source, tensors = read_all(llm)["lm_head.weight"], read_all(tmp_path / "out")["language_model.lm_head.weight"]
    assert torch.equal(tensors[:640], source[:640]) and torch.equal(tensors[646:], source[646:])


def test_parts_of_an_internvl_chat_checkpoint_reassemble_to_it(assembled, tmp_path):
    """R1V3's path: InternVL3-38B's vision_model / language_model / mlp1 taken from the one
    InternVL-chat folder; its tokenizer has the InternVL tokens already."""
    source = tmp_path / "InternVL-chat"
    shutil.copytree(assembled[0], source)
    (source / "modeling_internvl_chat.py").write_text("# remote code of a release\n")
    config = json.loads((source / "config.json").read_text())
    _write_json(source / "config.json", {**config, "auto_map": {"AutoModel": "modeling_internvl_chat.X"}})
    report = assemble({"vision": source, "llm": source}, tmp_path / "again", adapter_from=source)
    assert report.added_tokens == {} and report.image_token_id == 639 and not report.resized
    again, original = read_all(tmp_path / "again"), read_all(source)
    assert set(again) == set(original) and all(torch.equal(again[n], t) for n, t in original.items())
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["auto_map"] == {"AutoModel": "modeling_internvl_chat.X"}
    assert (tmp_path / "again" / "modeling_internvl_chat.py").exists()  # so trust_remote_code loads it
    assert {k: v for k, v in written.items() if k != "auto_map"} == config


# --- bad input: exit 1 naming the problem, nothing written ------------------------------

def assert_nothing_written(out: Path):
    assert not out.exists(), f"{out} was written despite the failure"
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


def _copy_parts(parts, tmp_path):
    vision, llm = tmp_path / "vision", tmp_path / "llm"
    shutil.copytree(parts["vision"], vision)
    shutil.copytree(parts["llm"], llm)
    return vision, llm


def _drop_tensor(folder: Path, name: str):
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shard = folder / (index["weight_map"].pop(name) if index else "model.safetensors")
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if index:
        index_path.write_text(json.dumps(index))


def _edit_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _narrow_adapter(folder: Path):
    """An InternVL-chat checkpoint whose mlp1 maps 96 -> 32 (a 32-wide LLM) instead of -> 64."""
    folder.mkdir()
    shapes = {"mlp1.0.weight": (96,), "mlp1.0.bias": (96,), "mlp1.1.weight": (32, 96), "mlp1.1.bias": (32,),
              "mlp1.3.weight": (32, 32), "mlp1.3.bias": (32,)}
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", {"architectures": ["InternVLChatModel"], "downsample_ratio": 0.5,
                                         "ps_version": "v2"})


def _write_json(path: Path, value):
    path.write_text(json.dumps(value))


CASES = {
    "vision config missing": (lambda v, l, t: (v / "config.json").unlink(), [], "config.json is missing"),
    "vision weights missing": (lambda v, l, t: (v / "model.safetensors").unlink(), [],
                               "has neither model.safetensors.index.json nor model.safetensors"),
    "vision tensor missing": (lambda v, l, t: _drop_tensor(v, "encoder.layers.1.attn.k_norm.weight"), [],
                              "--vision {v}: missing tensor 'encoder.layers.1.attn.k_norm.weight'"),
    "vision is not an InternViT": (lambda v, l, t: shutil.copy(l / "config.json", v / "config.json"), [],
                                   "is neither a standalone InternViT (InternVisionModel)"),
    "llm is not Qwen2": (lambda v, l, t: _edit_config(l, architectures=["LlamaForCausalLM"], model_type="llama"), [],
                         "architectures ['LlamaForCausalLM'] (model_type 'llama') is not a Qwen2-family LLM"),
    "llm tensor missing": (lambda v, l, t: _drop_tensor(l, "model.layers.1.mlp.up_proj.weight"), [],
                           "--llm {l}: missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    "llm tensor shape": (lambda v, l, t: _edit_config(l, intermediate_size=98), [],
                         "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (96, 64) but config.json implies "
                         "(98, 64)"),
    "llm tokenizer missing": (lambda v, l, t: [p.unlink() for p in l.glob("tokenizer*")], [],
                              "--llm {l} holds no tokenizer"),
    "adapter width mismatch": (lambda v, l, t: _narrow_adapter(t / "narrow"), ["--adapter-from", "{t}/narrow"],
                               "tensor 'mlp1.1.weight' has shape (32, 96), but this model's adapter maps vision "
                               "hidden 24 x (1/0.5)^2 = 96 -> LLM hidden 64, which needs (64, 96)"),
    "adapter source has none": (lambda v, l, t: None, ["--adapter-from", "{l}"], "no adapter tensors (mlp1.0.weight"),
    "downsample ratio not 1/n": (lambda v, l, t: None, ["--downsample-ratio", "0.3"],
                                 "--downsample-ratio 0.3: must be 1/n for an integer n"),
    "downsample ratio does not fit": (lambda v, l, t: None, ["--downsample-ratio", "0.2"],
                                      "1/0.2 = 5 does not divide the 4 patches per side"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_1_naming_it_and_writes_nothing(case, parts, tmp_path, capsys):
    edit, extra, message = CASES[case]
    vision, llm = _copy_parts(parts, tmp_path)
    edit(vision, llm, tmp_path)
    out = tmp_path / "out"
    fmt = {"v": vision, "l": llm, "t": tmp_path}
    argv = ["--vision", str(vision), "--llm", str(llm), "--out", str(out), *[a.format(**fmt) for a in extra]]
    assert load_tool("assemble_checkpoint").main(argv) == 1
    err = capsys.readouterr().err
    assert message.format(**fmt) in err, err
    assert_nothing_written(out)


def test_pixel_shuffle_flags_must_match_the_adapter_source(parts, assembled, tmp_path, capsys):
    argv = ["--vision", str(parts["vision"]), "--llm", str(parts["llm"]), "--out", str(tmp_path / "out"),
            "--adapter-from", str(assembled[0]), "--ps-version", "v1"]
    assert load_tool("assemble_checkpoint").main(argv) == 1
    assert "--ps-version v1 differs from ps_version='v2'" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_force_and_survives_a_failed_write(parts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    argv = ["--vision", str(parts["vision"]), "--llm", str(parts["llm"]), "--out", str(out)]
    assert load_tool("assemble_checkpoint").main(argv) == 1
    assert f"output directory {out} exists; pass --force" in capsys.readouterr().err
    # never over an input
    assert load_tool("assemble_checkpoint").main([*argv, "--out", str(parts["llm"]), "--force"]) == 1
    assert "would replace --llm" in capsys.readouterr().err

    written = []

    def disk_full_after_ten(self, name, tensor):
        if len(written) == 10:
            raise OSError(28, "No space left on device")
        written.append(name)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", disk_full_after_ten)
    assert load_tool("assemble_checkpoint").main([*argv, "--force"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data" and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()
    assert load_tool("assemble_checkpoint").main([*argv, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
