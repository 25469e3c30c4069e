"""validation.preflight: what a stage needs fails before any process group exists, naming the key."""

import importlib.util
import json
from dataclasses import asdict

import pytest
import torch

from megatron_r1v.config import load_config
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.validation import preflight


@pytest.fixture()
def base(tmp_path):
    """Overrides naming a data file and a tokenizer folder that exist, with the SGLang engine."""
    (tmp_path / "p.jsonl").write_text("")
    (tmp_path / "tok").mkdir()
    return [f"data.train_path={tmp_path / 'p.jsonl'}", f"data.tokenizer={tmp_path / 'tok'}", "rollout.engine=sglang",
            "grpo.micro_batch_tokens=2048", "model.preset=tiny-r1v-chat"]


def test_sglang_engine_needs_a_model_dir_on_every_rank(tmp_path, base):
    with pytest.raises(ValueError, match="rollout.engine=sglang needs rollout.model_dir"):
        preflight(load_config(None, base))
    # A Megatron checkpoint without the HF side files of an import.
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match=r"ckpt/hf_extra has no config.json"):
        preflight(load_config(None, base + [f"model.checkpoint={tmp_path / 'ckpt'}"]))


def test_sglang_engine_needs_cuda_and_sglang(tmp_path, base):
    (tmp_path / "hf_extra").mkdir()
    (tmp_path / "hf_extra" / "config.json").write_text("{}")
    # The architecture record every model checkpoint has (trainer/arch.py reads it).
    (tmp_path / "r1v_checkpoint.json").write_text(json.dumps({"arch": asdict(get_preset("tiny-r1v-chat"))}))
    cfg = load_config(None, base + [f"model.checkpoint={tmp_path}"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            preflight(cfg)
    elif importlib.util.find_spec("sglang") is None:
        with pytest.raises(ValueError, match=r"pip install 'megatron-r1v\[rollout\]'"):
            preflight(cfg)
    else:
        preflight(cfg)  # everything it checks is there


def test_inputs_must_exist(tmp_path, base):
    hf = [o for o in base if not o.startswith("rollout.engine")]
    preflight(load_config(None, hf))  # all there: nothing to say
    cases = [
        ("data.train_path=", r"data\.train_path must be set for the grpo stage"),
        (f"data.train_path={tmp_path / 'missing.jsonl'}", r"data\.train_path: .*missing\.jsonl is not a file"),
        (f"data.tokenizer={tmp_path / 'p.jsonl'}", r"data\.tokenizer: .*p\.jsonl is not a folder"),
        (f"model.checkpoint={tmp_path / 'nope'}", r"model\.checkpoint: .*nope is not a folder"),
        (f"rollout.model_dir={tmp_path / 'nope'}", r"rollout\.model_dir: .*nope is not a folder"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            preflight(load_config(None, hf + [override]))


def test_settings_that_cannot_run_here(base):
    hf = [o for o in base if not o.startswith("rollout.engine")]
    with pytest.raises(ValueError, match=r"reward\.model_weight=1 needs reward\.reward_model_url"):
        preflight(load_config(None, hf + ["reward.model_weight=1.0"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"model\.params_dtype=bf16: the CPU mode runs fp32 only"):
            preflight(load_config(None, hf + ["model.params_dtype=bf16"]))
        with pytest.raises(ValueError, match=r"model\.fp8\.format=hybrid needs Transformer Engine layers"):
            preflight(load_config(None, hf + ["model.fp8.format=hybrid"]))
        with pytest.raises(ValueError, match=r"parallel\.cp=2: context parallelism needs CUDA"):
            preflight(load_config(None, hf + ["parallel.cp=2"]))


def test_reward_server_must_answer_before_the_first_step(base, monkeypatch, caplog):
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    hf = [o for o in base if not o.startswith("rollout.engine")]
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = hf + ["reward.model_weight=1.0", f"reward.reward_model_url=http://127.0.0.1:{port}",
                 "reward.model_retry_s=0.3", "reward.model_backoff_s=0.1"]
    with caplog.at_level("WARNING", logger="megatron_r1v.rewards.reward_model"):
        with pytest.raises(ValueError, match=rf"reward\.reward_model_url: reward model server at "
                                             rf"http://127\.0\.0\.1:{port}/health failed \d attempt"):
            preflight(load_config(None, down))
    assert any("attempt 1 failed (cannot connect" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("RANK", "3")
    preflight(load_config(None, down))  # one request per job: rank 0's

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("RANK", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        up = hf + ["reward.model_weight=1.0", f"reward.reward_model_url=http://127.0.0.1:{server.server_address[1]}"]
        preflight(load_config(None, up))
    finally:
        server.shutdown()
        server.server_close()
