"""tools/convert_checkpoint.py: HF <-> Megatron dist checkpoints, resharding, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tool_modules import run_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.checkpoint.hf_io import HFCheckpointReader

REPO = Path(__file__).resolve().parents[2]
CONVERT = "tools/convert_checkpoint.py"
WORKER = "tests/distributed/workers/r1v_worker.py"
# Same bound and reasoning as test_r1v_parity: fp32, only summation order differs.
LOGIT_TOL = 1e-4


def import_ckpt(torchrun, hf_dir, out, tp=1, pp=1, *extra, check=True):
    return torchrun(CONVERT, tp * pp, ["import", "--hf-dir", str(hf_dir), "--out", str(out), "--tp", str(tp),
                                       "--pp", str(pp), "--dtype", "fp32", *extra], check=check)


def export_ckpt(mcore_dir, out, *extra, process=False):
    """``convert_checkpoint.py export`` (one process): in this process (tool_modules.run_tool; main's
    return value is the exit status), or with ``process`` as a real ``python tools/convert_checkpoint.py``."""
    argv = ["export", "--mcore-dir", str(mcore_dir), "--out", str(out), *extra]
    if not process:
        return run_tool("convert_checkpoint", *argv, cwd=REPO)
    return subprocess.run([sys.executable, str(REPO / CONVERT), *argv], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def read_all(directory):
    with HFCheckpointReader(directory) as reader:
        return {name: reader.get(name) for name in reader.names()}


def assert_nothing_half_written(out: Path):
    assert not out.exists(), f"{out} was written despite the failure"
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temporary directory was left behind"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_bit_exact(tp, pp, internvl, torchrun, tmp_path):
    import_ckpt(torchrun, internvl["hf_dir"], tmp_path / "mcore", tp, pp)
    proc = export_ckpt(tmp_path / "mcore", tmp_path / "hf", "--max-shard-size", "200KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    source, back = read_all(internvl["hf_dir"]), read_all(tmp_path / "hf")
    assert set(back) == set(source)
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "--max-shard-size 200KB should give several shards"
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_export_loads_in_transformers_and_in_memory_names_import(internvl, torchrun, tmp_path):
    import transformers

    # A directory holding state_dict() names (model.vision_tower...) instead of hub names.
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(internvl["weights"], flat / "model.safetensors")
    shutil.copy(internvl["hf_dir"] / "config.json", flat / "config.json")
    import_ckpt(torchrun, flat, tmp_path / "mcore", 2, 1)
    assert export_ckpt(tmp_path / "mcore", tmp_path / "hf").returncode == 0
    model = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").float().eval()
    batch = torch.load(internvl["batches"])[0]
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    # Bit-exact weights give the reference logits up to attention-kernel choice.
    assert (logits - internvl["reference"][0]["logits"]).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def saved_at_tp2(internvl, torchrun, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2") / "mcore"
    import_ckpt(torchrun, internvl["hf_dir"], out, 2, 1)
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 2)])
def test_checkpoint_saved_at_tp2_loads_at_other_layouts(tp, pp, saved_at_tp2, internvl, torchrun, tmp_path):
    torchrun(WORKER, tp * pp, ["load", "--mcore-dir", str(saved_at_tp2), "--data-file", str(internvl["batches"]),
                               "--tp", str(tp), "--pp", str(pp), "--out", str(tmp_path)])
    logits = load_file(str(tmp_path / "logits.safetensors"))
    for i, ref in enumerate(internvl["reference"]):
        diff = (logits[f"logits_{i}"] - ref["logits"]).abs().max().item()
        assert diff <= LOGIT_TOL, f"loaded at tp={tp} pp={pp}, batch {i}: max |logit diff| {diff:.3e}"


def _broken_copy(internvl, tmp_path, edit):
    broken = tmp_path / "broken"
    shutil.copytree(internvl["hf_dir"], broken)
    edit(broken)
    return broken


def _edit_tensors(fn):
    def edit(directory):
        (path,) = directory.glob("*.safetensors")
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return edit


def _edit_config(directory):
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 2
    (directory / "config.json").write_text(json.dumps(config))


def _truncate(directory):
    (path,) = directory.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "case,edit,message",
    [
        ("missing", _edit_tensors(lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight")),
         "missing tensor 'language_model.model.layers.1.mlp.up_proj.weight'"),
        ("unexpected", _edit_tensors(lambda t: t.update({"extra_head.weight": torch.zeros(2)})),
         "unexpected tensor 'extra_head.weight'"),
        ("shape", _edit_config, "tensor 'language_model.model.layers.0.mlp.down_proj.weight' has shape (64, 96) but "
                                "config.json implies (64, 98)"),
        ("corrupt", _truncate, "is corrupt or unreadable"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(case, edit, message, internvl, torchrun, tmp_path):
    broken = _broken_copy(internvl, tmp_path, edit)
    out = tmp_path / "mcore"
    proc = import_ckpt(torchrun, broken, out, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert_nothing_half_written(out)


def test_existing_output_needs_force(saved_at_tp2, internvl, torchrun, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = import_ckpt(torchrun, internvl["hf_dir"], out, check=False)
    assert proc.returncode != 0 and f"output directory {out} exists; pass --force" in proc.stderr
    assert (out / "keep.txt").read_text() == "user data"
    proc = export_ckpt(saved_at_tp2, out, process=True)  # the script's exit status, as a real process
    assert proc.returncode != 0 and "pass --force" in proc.stderr
    assert export_ckpt(saved_at_tp2, out, "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()
    proc = export_ckpt(internvl["hf_dir"], tmp_path / "x")
    assert proc.returncode != 0 and "is not a megatron-r1v model checkpoint" in proc.stderr


@pytest.fixture(scope="module")
def skywork_dir(saved_at_tp2, tmp_path_factory):
    """The tiny model in the released (InternVL-chat) layout, made by exporting."""
    out = tmp_path_factory.mktemp("skywork") / "hf"
    proc = export_ckpt(saved_at_tp2, out, "--layout", "skywork")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_skywork_layout_names_and_config(skywork_dir):
    names = set(read_all(skywork_dir))
    for name in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                 "vision_model.embeddings.position_embedding", "vision_model.encoder.layers.1.attn.qkv.weight",
                 "vision_model.encoder.layers.1.attn.q_norm.weight", "vision_model.encoder.layers.0.ls1",
                 "vision_model.encoder.layers.0.norm2.weight", "mlp1.0.weight", "mlp1.1.bias", "mlp1.3.weight",
                 "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert name in names, name
    assert not any(".attn.q_proj" in n or "mlp1.2" in n for n in names)
    config = json.loads((skywork_dir / "config.json").read_text())
    for key in ("vision_config", "llm_config", "downsample_ratio", "ps_version", "select_layer", "force_image_size",
                "template"):
        assert key in config, key
    assert (config["ps_version"], config["select_layer"], config["force_image_size"]) == ("v2", -1, 56)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_skywork_round_trips_are_bit_exact(tp, pp, skywork_dir, internvl, torchrun, tmp_path):
    import_ckpt(torchrun, skywork_dir, tmp_path / "mcore", tp, pp)
    assert export_ckpt(tmp_path / "mcore", tmp_path / "sky").returncode == 0  # default: the source layout
    source, back = read_all(skywork_dir), read_all(tmp_path / "sky")
    assert set(back) == set(source) and all(torch.equal(back[n], t) for n, t in source.items())
    # skywork -> transformers gives back the original transformers checkpoint.
    assert export_ckpt(tmp_path / "mcore", tmp_path / "tr", "--layout", "transformers").returncode == 0
    original, converted = read_all(internvl["hf_dir"]), read_all(tmp_path / "tr")
    assert set(converted) == set(original) and all(torch.equal(converted[n], t) for n, t in original.items())


def test_ps_v1_checkpoint_cannot_go_to_transformers_layout(skywork_dir, torchrun, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(skywork_dir, v1)
    config = json.loads((v1 / "config.json").read_text())
    config["ps_version"] = "v1"
    (v1 / "config.json").write_text(json.dumps(config))
    import_ckpt(torchrun, v1, tmp_path / "mcore")
    proc = export_ckpt(tmp_path / "mcore", tmp_path / "tr", "--layout", "transformers")
    assert proc.returncode != 0 and "only expresses ps_version v2" in proc.stderr
    assert_nothing_half_written(tmp_path / "tr")


VERIFY = "tools/verify_checkpoint.py"


@pytest.mark.parametrize("source,tp,pp,packed", [("transformers", 2, 1, None), ("skywork", 1, 2, None),
                                                  ("transformers", 2, 1, 4), ("skywork", 1, 2, 3)])
def test_verify_checkpoint_passes(source, tp, pp, packed, saved_at_tp2, skywork_dir, internvl, torchrun):
    """--packed K: K samples (images of 1-3 tiles) in one row, each compared with transformers alone."""
    hf_dir = internvl["hf_dir"] if source == "transformers" else skywork_dir
    extra = [] if packed is None else ["--packed", str(packed)]
    proc = torchrun(VERIFY, tp * pp, ["--hf-dir", str(hf_dir), "--mcore-dir", str(saved_at_tp2),
                                      "--tp", str(tp), "--pp", str(pp), *extra])
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    print(f"verify_checkpoint {source} tp={tp} pp={pp} packed={packed}: {result}")  # shown with pytest -s
    assert result["pass"] and result["max_abs_logit_diff"] <= 1e-4 and result["tolerance"] == 1e-4
    assert result["hf_layout"] == source and result["packed"] == packed


def test_verify_checkpoint_fails_on_other_weights(saved_at_tp2, internvl, torchrun, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(internvl["hf_dir"], other)
    (path,) = other.glob("*.safetensors")
    tensors = load_file(str(path))
    tensors["multi_modal_projector.linear_2.bias"] += 0.01
    save_file(tensors, str(path), metadata={"format": "pt"})
    for extra in ([], ["--packed", "3"]):
        proc = torchrun(VERIFY, 1, ["--hf-dir", str(other), "--mcore-dir", str(saved_at_tp2), *extra], check=False)
        assert proc.returncode == 1
        result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        assert not result["pass"] and result["max_abs_logit_diff"] > 1e-3
