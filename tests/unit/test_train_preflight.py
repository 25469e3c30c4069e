"""train.preflight: settings a stage needs fail before any process group exists, naming the key."""

import importlib.util

import pytest
import torch

from megatron_r1v.config import load_config
from megatron_r1v.train import preflight

BASE = ["data.train_path=p.jsonl", "data.tokenizer=tok", "rollout.engine=sglang", "grpo.micro_batch_tokens=2048"]


def test_sglang_engine_needs_a_model_dir_on_every_rank(tmp_path):
    with pytest.raises(ValueError, match="rollout.engine=sglang needs rollout.model_dir"):
        preflight(load_config(None, BASE))
    # A Megatron checkpoint without the HF side files of an import.
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match=r"ckpt/hf_extra has no config.json"):
        preflight(load_config(None, BASE + [f"model.checkpoint={tmp_path / 'ckpt'}"]))


def test_sglang_engine_needs_cuda_and_sglang(tmp_path):
    (tmp_path / "hf_extra").mkdir()
    (tmp_path / "hf_extra" / "config.json").write_text("{}")
    cfg = load_config(None, BASE + [f"model.checkpoint={tmp_path}"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            preflight(cfg)
    elif importlib.util.find_spec("sglang") is None:
        with pytest.raises(ValueError, match=r"pip install 'megatron-r1v\[rollout\]'"):
            preflight(cfg)
    else:
        preflight(cfg)  # everything it checks is there
