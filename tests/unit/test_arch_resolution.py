"""The architecture and token ids a run uses (trainer/arch.py): the checkpoint's record over a
preset, a preset only for random initialisation, <IMG_CONTEXT> from the tokenizer."""

import dataclasses
import json

import pytest

from megatron_r1v.checkpoint.conversion import META_NAME
from megatron_r1v.config import ModelConfig, load_config
from megatron_r1v.data.tokenizer import save_hf_tokenizer, train_tokenizer
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.trainer.arch import check_rollout_folder, resolve_arch, run_arch, with_tokenizer_ids
from megatron_r1v.validation import preflight

CHAT = get_preset("tiny-r1v-chat")  # 640-token vocabulary, the preset's image token id 639


def write_record(folder, arch):
    """A model checkpoint's architecture record (what import and training checkpoints write)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_NAME).write_text(json.dumps({"arch": dataclasses.asdict(arch)}))
    return folder


@pytest.fixture(scope="module")
def tok600(tmp_path_factory):
    """A 600-token BPE: <IMG_CONTEXT> is 599, not the preset's 639."""
    from megatron_r1v.data.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tok") / "tok600"
    save_hf_tokenizer(train_tokenizer(["some text for a tiny vocabulary"], 600), folder)
    return folder, load_tokenizer(folder)


def test_checkpoint_alone_gives_its_architecture(tmp_path):
    other = dataclasses.replace(CHAT, decoder=dataclasses.replace(CHAT.decoder, num_layers=2, vocab_size=700),
                                image_token_id=650, description="assembled elsewhere")
    ckpt = write_record(tmp_path / "ckpt", other)
    assert resolve_arch(ModelConfig(checkpoint=str(ckpt))) == other


def test_preset_agreeing_with_the_checkpoint_is_fine_whatever_its_token_id(tmp_path):
    # Descriptions and token ids are not architecture: the record's id 599 and description win.
    record = dataclasses.replace(CHAT, image_token_id=599, description="imported")
    ckpt = write_record(tmp_path / "ckpt", record)
    assert resolve_arch(ModelConfig(preset="tiny-r1v-chat", checkpoint=str(ckpt))) == record


def test_preset_disagreeing_with_the_checkpoint_names_both_and_the_fields(tmp_path):
    ckpt = write_record(tmp_path / "ckpt", get_preset("r1v3-38b"))
    with pytest.raises(ValueError) as err:
        resolve_arch(ModelConfig(preset="r1v2-38b", checkpoint=str(ckpt)))
    message = str(err.value)
    assert "model.preset 'r1v2-38b'" in message and f"model.checkpoint {ckpt}" in message
    assert str(ckpt / META_NAME) in message
    assert "decoder.vocab_size: 152064 != 151674" in message and "decoder.rms_norm_eps: 1e-05 != 1e-06" in message
    assert "decoder.max_position_embeddings: 40960 != 32768" in message and "vision." not in message
    # The same preset against a decoder-only record: the missing parts are named.
    write_record(tmp_path / "llm", get_preset("qwq-32b"))
    with pytest.raises(ValueError, match=r"vision: present != none; adapter: present != none"):
        resolve_arch(ModelConfig(preset="r1v2-38b", checkpoint=str(tmp_path / "llm")))


def test_neither_or_an_unknown_preset_or_a_missing_record_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"model\.preset must be set when model\.checkpoint is not"):
        resolve_arch(ModelConfig())
    with pytest.raises(ValueError, match=r"model\.preset: unknown preset 'nope'"):
        resolve_arch(ModelConfig(preset="nope"))
    (tmp_path / "empty").mkdir()
    empty = ModelConfig(preset="tiny-r1v-chat", checkpoint=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"model\.checkpoint: .*empty is not a megatron-r1v model checkpoint"):
        resolve_arch(empty)
    # A plan made away from the checkpoint falls back to the preset, and needs one.
    assert resolve_arch(empty, missing_checkpoint_ok=True) == CHAT
    with pytest.raises(ValueError, match=r"is not on this machine and model\.preset is not set"):
        resolve_arch(dataclasses.replace(empty, preset=None), missing_checkpoint_ok=True)


def test_config_checks_use_the_checkpoints_architecture(tmp_path):
    ckpt = write_record(tmp_path / "ckpt", get_preset("tiny-r1v"))  # 4 heads in 2 query groups
    with pytest.raises(ValueError, match=rf"parallel\.tp=4 must divide .*num_query_groups=2 \(model\.checkpoint {ckpt}"):
        load_config(None, [f"model.checkpoint={ckpt}", "parallel.tp=4"])
    with pytest.raises(ValueError, match=r"describe different architectures .*decoder\.vocab_size: 640 != 251"):
        load_config(None, [f"model.checkpoint={ckpt}", "model.preset=tiny-r1v-chat"])
    assert load_config(None, [f"model.checkpoint={ckpt}", "parallel.tp=2"]).model.preset is None
    # Not on this machine: the preset is checked now, the record by the preflight.
    assert load_config(None, [f"model.checkpoint={tmp_path / 'elsewhere'}", "model.preset=tiny-r1v"])


def test_token_ids_come_from_the_tokenizer_not_the_preset(tok600):
    folder, tokenizer = tok600
    source = f"data.tokenizer {folder}"
    # Random initialisation: the preset's 639 gives way to the tokenizer's 599.
    arch = run_arch(ModelConfig(preset="tiny-r1v-chat"), tokenizer, source)
    assert arch.image_token_id == 599 and dataclasses.replace(arch, image_token_id=639) == CHAT
    # The 38B presets carry no id at all.
    assert get_preset("r1v2-38b").image_token_id is None
    assert with_tokenizer_ids(get_preset("r1v2-38b"), tokenizer, source, "x").image_token_id == 599
    # A tokenizer the vocabulary cannot hold, or one without <IMG_CONTEXT>.
    with pytest.raises(ValueError, match=r"has 600 tokens, more than the vocabulary of model\.preset 'tiny-r1v' \(251\)"):
        run_arch(ModelConfig(preset="tiny-r1v"), tokenizer, source)


def test_checkpoint_id_must_agree_with_the_tokenizer_naming_both_files(tmp_path, tok600):
    folder, tokenizer = tok600
    source = f"data.tokenizer {folder}"
    agreeing = write_record(tmp_path / "agree", dataclasses.replace(CHAT, image_token_id=599))
    assert run_arch(ModelConfig(preset="tiny-r1v-chat", checkpoint=str(agreeing)), tokenizer, source) \
        .image_token_id == 599
    unset = write_record(tmp_path / "unset", dataclasses.replace(CHAT, image_token_id=None))
    assert run_arch(ModelConfig(checkpoint=str(unset)), tokenizer, source).image_token_id == 599
    other = write_record(tmp_path / "other", CHAT)  # records 639
    with pytest.raises(ValueError) as err:
        run_arch(ModelConfig(checkpoint=str(other)), tokenizer, source)
    assert f"data.tokenizer {folder}: <IMG_CONTEXT> has id 599, but {other / META_NAME} records image_token_id 639" \
        in str(err.value)


def test_preflight_accepts_a_checkpoint_whose_image_id_is_not_the_presets(tmp_path, tok600):
    """What used to stop a run at start-up (the tokenizer checked against the preset's id)."""
    folder, tokenizer = tok600
    (tmp_path / "p.jsonl").write_text("")
    ckpt = write_record(tmp_path / "ckpt", dataclasses.replace(CHAT, image_token_id=599))
    cfg = load_config(None, [f"data.train_path={tmp_path / 'p.jsonl'}", f"data.tokenizer={folder}",
                             "model.preset=tiny-r1v-chat", f"model.checkpoint={ckpt}", "grpo.micro_batch_tokens=2048"])
    preflight(cfg)
    assert run_arch(cfg.model, tokenizer, "data.tokenizer").image_token_id == 599
    with pytest.raises(ValueError, match=r"model\.preset must be set when model\.checkpoint is not"):
        preflight(dataclasses.replace(cfg, model=ModelConfig()))


def test_sglang_model_folder_must_describe_the_runs_architecture(tmp_path):
    from megatron_r1v.models.r1v.hf_config import skywork_config

    (tmp_path / "config.json").write_text(json.dumps(skywork_config(dataclasses.replace(CHAT, image_token_id=599))))
    check_rollout_folder(str(tmp_path), CHAT, "model.preset 'tiny-r1v-chat'")  # ids are not compared
    with pytest.raises(ValueError, match=r"model\.preset 'tiny-r1v' and the SGLang model folder \(.*config\.json\) "
                                         r"describe different architectures \(run != folder\): decoder\.vocab_size: "
                                         r"251 != 640; decoder\.max_position_embeddings: 512 != 2048"):
        check_rollout_folder(str(tmp_path), get_preset("tiny-r1v"), "model.preset 'tiny-r1v'")
    (tmp_path / "config.json").write_text("{}")  # not the skywork layout: the engine itself refuses it
    check_rollout_folder(str(tmp_path), CHAT, "x")


def test_import_refuses_a_config_whose_image_id_is_not_its_tokenizers(tmp_path, tok600):
    """conversion._arch_of (import): the id r1v_checkpoint.json will record must be the tokenizer's."""
    import shutil

    from megatron_r1v.checkpoint.conversion import _arch_of
    from megatron_r1v.checkpoint.hf_io import CheckpointError
    from megatron_r1v.models.r1v.hf_config import skywork_config

    folder, _ = tok600
    shutil.copytree(folder, tmp_path / "hf")
    config = skywork_config(CHAT)  # img_context_token_id 639; the tokenizer says 599
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: <IMG_CONTEXT> has id 599, but .*config\.json gives 639"):
        _arch_of(tmp_path / "hf", config, "skywork", None)
    with pytest.raises(CheckpointError, match=r"has id 599, but --image-token-id gives 7"):
        _arch_of(tmp_path / "hf", {**config, "img_context_token_id": None}, "skywork", 7)
    assert _arch_of(tmp_path / "hf", {**config, "img_context_token_id": None}, "skywork", None).image_token_id == 599
