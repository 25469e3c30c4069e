"""Config: YAML recipes, overrides, and the errors users see."""

import pytest
import yaml

from megatron_r1v.config import RunConfig, apply_override, field_docs, load_config, main


def write(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_yaml_and_overrides(tmp_path):
    path = write(tmp_path, {"parallel": {"tp": 2}, "optimizer": {"lr": 3e-4}, "train": {"steps": 7}})
    cfg = load_config(path, ["train.steps=9", "optimizer.weight_decay=0.1", "train.save_dir=/tmp/x"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 1)
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.weight_decay == 0.1
    assert cfg.train.steps == 9 and cfg.train.save_dir == "/tmp/x"
    # An int given for a float field is accepted and converted.
    assert isinstance(load_config(None, ["optimizer.lr=1"]).optimizer.lr, float)


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train\.stpes'"):
        load_config(write(tmp_path, {"train": {"stpes": 3}}))
    with pytest.raises(ValueError, match=r"unknown config key 'bogus'"):
        load_config(write(tmp_path, {"bogus": {}}))
    with pytest.raises(ValueError, match=r"unknown config key 'parallel\.tpp'"):
        load_config(None, ["parallel.tpp=2"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=ten", r"'train\.steps': expected int, got str 'ten'"),
        ("train.steps=1.5", r"'train\.steps': expected int, got float"),
        ("parallel.sequence_parallel=3", r"'parallel\.sequence_parallel': expected true/false"),
        ("model.backend=cuda", r"'model\.backend': 'cuda' is not one of \['auto', 'local', 'te'\]"),
        ("optimizer=3", r"'optimizer': expected a mapping"),
    ],
)
def test_bad_types_name_key_and_value(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_tp_not_dividing_heads_is_a_clear_error():
    # tiny-qwen2 has 4 query heads in 2 groups.
    tiny = "model.preset=tiny-qwen2"
    with pytest.raises(ValueError, match=r"parallel\.tp=3 must divide the decoder's num_attention_heads=4"):
        load_config(None, [tiny, "parallel.tp=3"])
    with pytest.raises(ValueError, match=r"parallel\.tp=4 must divide .* num_query_groups=2"):
        load_config(None, [tiny, "parallel.tp=4"])
    with pytest.raises(ValueError, match=r"parallel\.pp=3 must divide the decoder's num_layers=4"):
        load_config(None, [tiny, "parallel.pp=3"])
    with pytest.raises(ValueError, match=r"model\.preset: unknown preset 'nope'"):
        load_config(None, ["model.preset=nope"])
    assert load_config(None, ["model.preset=qwq-32b", "parallel.tp=8", "parallel.pp=4"]).parallel.tp == 8


def test_cross_field_checks():
    with pytest.raises(ValueError, match="sequence_parallel needs parallel.tp > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ValueError, match=r"grpo\.micro_batch_tokens \(64\) must be >= train\.seq_length \(128\)"):
        load_config(None, ["grpo.micro_batch_tokens=64", "train.seq_length=128"])
    with pytest.raises(ValueError, match=r"mpo\.micro_batch_tokens \(200\) must be >= 2 \* train\.seq_length"):
        load_config(None, ["train.stage=mpo", "mpo.micro_batch_tokens=200", "train.seq_length=128"])
    with pytest.raises(ValueError, match=r"sft\.micro_batch_tokens \(100\) must be >= train\.seq_length \(128\)"):
        load_config(None, ["train.stage=sft", "sft.micro_batch_tokens=100", "train.seq_length=128"])
    assert load_config(None, ["train.stage=sft", "sft.micro_batch_tokens=128", "train.seq_length=128"]).sft.\
        micro_batch_tokens == 128
    # Fields nothing read are gone: setting one is an error, not a silent no-op.
    for removed in ("train.micro_batch_size", "train.global_batch_size", "train.load_dir", "data.eval_path"):
        with pytest.raises(ValueError, match=f"unknown config key '{removed}'"):
            load_config(None, [f"{removed}=1"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("ssb.capacity=0", "ssb.capacity"),
        ("model.fp8.margin=-1", "model.fp8.margin"),
        ("rollout.n_samples=0", "rollout.n_samples"),
        ("rollout.n_samples=1", "rollout.n_samples"),
        ("rollout.top_p=2.0", "rollout.top_p"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("grpo.clip_low=1.5", "grpo.clip_low"),
        ("grpo.prompts_per_step=0", "grpo.prompts_per_step"),
        ("grpo.ppo_epochs=0", "grpo.ppo_epochs"),
        ("logging.log_interval=0", "logging.log_interval"),
        ("optimizer.adam_beta2=1.0", "optimizer.adam_beta2"),
        ("mpo.beta=0", "mpo.beta"),
        ("sft.samples_per_step=0", "sft.samples_per_step"),
        ("sft.micro_batch_tokens=0", "sft.micro_batch_tokens"),
        ("reward.model_batch_size=0", "reward.model_batch_size"),
        ("train.steps=0", "train.steps"),
        ("rollout.mem_fraction_static=1.5", "rollout.mem_fraction_static"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_the_key(override, key):
    # Each of these used to pass load_config and fail only after distributed init and the
    # model build (or after the first rollout, or as a ZeroDivisionError after step 1).
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + " must be"):
        load_config(None, [override])


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="must look like section.key=value"):
        apply_override({}, "train.steps")


def test_every_field_is_documented():
    rows = field_docs()
    paths = [p for p, _, _ in rows]
    assert "parallel.tp" in paths and "optimizer.clip_grad" in paths and "model.fp8.margin" in paths
    assert dict((p, d) for p, _, d in rows)["parallel.tp"] == "Tensor-parallel size."
    undocumented = [p for p, _, d in rows if not d]
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_cli_prints_resolved_yaml(capsys):
    assert main(["--set", "parallel.pp=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["parallel"]["pp"] == 2
    assert main(["--set", "parallel.nope=1"]) == 2
    assert "unknown config key 'parallel.nope'" in capsys.readouterr().err


def test_example_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.yaml"))
    assert recipes, "no example recipes found"
    for recipe in recipes:
        load_config(recipe)


def test_exponent_floats_without_a_dot_parse():
    # YAML 1.1 (PyYAML) reads 3e-4 as a string; --set optimizer.lr=3e-4 must still be a float.
    cfg = load_config(None, ["optimizer.lr=3e-4", "grpo.kl_beta=1E-3"])
    assert cfg.optimizer.lr == 3e-4 and cfg.grpo.kl_beta == 1e-3
    with pytest.raises(ValueError, match="expected float"):
        load_config(None, ["optimizer.lr=3e-4x"])
