"""SGLangRolloutEngine driven through a fake of the ``sglang.Engine`` API (sglang needs a GPU).

The fake does what sglang 0.5.23's source does with the calls the adapter makes; that every
name it accepts exists there, with these defaults, is tests/unit/test_sglang_source.py's check."""

import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import pytest
import torch
from tool_modules import load_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.checkpoint.hf_layouts import expected_hf_shapes
from megatron_r1v.config import RolloutConfig
from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams, sample_seed
from megatron_r1v.rollout.sglang_engine import SGLangRolloutEngine, WeightCodec

ARCH = get_preset("tiny-r1v")
IMG, PER_TILE = ARCH.image_token_id, ARCH.tokens_per_tile  # 250, 4
SHAPES = expected_hf_shapes(ARCH, SKYWORK_LAYOUT)


@dataclass
class Meta:  # the fields of sglang's FlattenedTensorMetadata
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


class ByteBucket:
    """Flattens like sglang 0.5.23's FlattenedTensorBucket: raw bytes, byte offsets."""

    def __init__(self, named_tensors):
        self.metadata, parts, at = [], [], 0
        for name, t in named_tensors:
            raw = t.reshape(-1).view(torch.uint8)
            self.metadata.append(Meta(name, t.shape, t.dtype, at, at + raw.numel(), raw.numel()))
            parts.append(raw)
            at += raw.numel()
        self.flat = torch.cat(parts)

    def get_flattened_tensor(self):
        return self.flat

    def get_metadata(self):
        return self.metadata


CODEC = WeightCodec(ByteBucket, pickle.dumps)


# sglang/srt/constants.py: GPU_MEMORY_ALL_TYPES, what a call without tags releases or resumes.
MEMORY_TYPES = ("kv_cache", "weights", "cuda_graph")
# Engine.generate's parameters the adapter may pass, and the SamplingParams fields it may set (a
# dict with another key fails in sglang: SamplingParams(**sampling_params) is a kw_only struct).
GENERATE_ARGS = ("prompt", "sampling_params", "input_ids", "image_data", "return_logprob")
SAMPLING_FIELDS = ("max_new_tokens", "stop_token_ids", "temperature", "top_p", "repetition_penalty", "n",
                   "ignore_eos", "skip_special_tokens", "no_stop_trim", "logit_bias", "sampling_seed")


def check_sampling_params(sp):
    """sglang's SamplingParams(**sp) then .verify(): unknown keys and the ranges the adapter could break."""
    unknown = sorted(set(sp) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"Unexpected keyword arguments {unknown}")
    if not 0.0 < sp.get("top_p", 1.0) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {sp['top_p']}.")
    if not 0.0 < sp.get("repetition_penalty", 1.0) <= 2.0:
        raise ValueError(f"repetition_penalty must be in (0, 2], got {sp['repetition_penalty']}.")
    seed = sp.get("sampling_seed")
    if seed is not None and not (isinstance(seed, int) and -(2**63) <= seed <= 2**63 - 1):
        raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    if not all(isinstance(k, str) and int(k) >= 0 for k in sp.get("logit_bias") or {}):  # Dict[str, float]
        raise ValueError(f"logit_bias keys must be token ids as strings, got {sp['logit_bias']}")


class FakeEngine:
    """Records calls; loads weight payloads the way sglang's scheduler does (rank r takes entry r)."""

    def __init__(self, outputs=None):
        self.calls, self.loaded, self.outputs, self.generated = [], [], outputs, None
        self.offload_tags = set()

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tuple(tags)))
        self.offload_tags.update(tags or MEMORY_TYPES)

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tuple(tags)))
        for tag in tags or MEMORY_TYPES:
            self.offload_tags.remove(tag)  # as sglang's scheduler: resuming a tag not released fails

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update", load_format, flush_cache, len(named_tensors)))
        if load_format != "flattened_bucket":
            raise NotImplementedError(f"the fake loads flattened buckets only, got load_format={load_format!r}")
        per_rank = []
        for payload in named_tensors:
            data = pickle.loads(payload)
            flat = data["flattened_tensor"]
            per_rank.append([(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape))
                             for m in data["metadata"]])
        self.loaded.append((per_rank, data["flattened_tensor"]))
        return True, "Success"

    def flush_cache(self):
        self.calls.append(("flush",))
        return SimpleNamespace(success=True, message="")  # sglang's FlushCacheReqOutput

    def generate(self, **kwargs):
        unknown = sorted(set(kwargs) - set(GENERATE_ARGS))
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
        for sp in kwargs.get("sampling_params") or []:
            check_sampling_params(sp)
        self.calls.append(("generate",))
        self.generated = kwargs
        return self.outputs

    def shutdown(self):
        self.calls.append(("shutdown",))


def make(outputs=None, tp_size=1, **kwargs):
    fake = FakeEngine(outputs)
    return SGLangRolloutEngine(fake, tp_size=tp_size, arch=ARCH, codec=CODEC, **kwargs), fake


def out(ids, logprobs, kind):
    return {"output_ids": list(ids), "text": "sglang text",
            "meta_info": {"finish_reason": {"type": kind}, "output_token_logprobs": [
                (lp, t, None) for lp, t in zip(logprobs, ids)]}}


def skywork_tensor(name, dtype, seed):
    return torch.randn(SHAPES[name], generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_release_and_resume_order_idempotent_and_generate_refused_while_released():
    eng, fake = make(memory_tags=("weights", "kv_cache", "cuda_graph"))
    eng.release_memory()
    eng.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        eng.generate([RolloutRequest("p", torch.tensor([1, 2]))], SamplingParams(n=1))
    eng.resume_memory()
    eng.resume_memory()
    assert fake.calls == [("release", ("weights", "kv_cache", "cuda_graph")), ("resume", ("weights",)),
                          ("resume", ("cuda_graph",)), ("resume", ("kv_cache",))]
    assert not eng.released
    assert SGLangRolloutEngine.hf_layout is SKYWORK_LAYOUT


def test_update_after_release_resumes_weights_first_then_kv_cache_last():
    eng, fake = make()
    eng.release_memory()
    eng.update_weights([("mlp1.1.bias", skywork_tensor("mlp1.1.bias", torch.bfloat16, 0))])
    eng.resume_memory()
    assert [c[0:2] for c in fake.calls] == [("release", ("weights", "kv_cache")), ("resume", ("weights",)),
                                            ("update", "flattened_bucket"), ("resume", ("kv_cache",))]


def test_buckets_flattened_per_dtype_serialized_per_tp_rank_and_round_trip_exactly():
    eng, fake = make(tp_size=2)
    bf16 = [(n, skywork_tensor(n, torch.bfloat16, i)) for i, n in enumerate(["mlp1.1.weight", "mlp1.1.bias"])]
    fp32 = [(n, skywork_tensor(n, torch.float32, 9 + i)) for i, n in
            enumerate(["vision_model.embeddings.class_embedding", "language_model.lm_head.weight"])]
    mixed = [bf16[0], fp32[0], bf16[1]]
    for bucket in (bf16, fp32, mixed):
        eng.update_weights(bucket)
    # One call per dtype of a bucket, each with one payload per engine TP rank, no flush.
    assert fake.calls == [("update", "flattened_bucket", False, 2)] * 4
    expected = [bf16, fp32, [bf16[0], bf16[1]], [fp32[0]]]
    # Bytes: (64*96 + 64) * 2 bf16; (24 + 251*64) * 4 fp32; the mixed bucket splits into both.
    assert [flat.numel() for _, flat in fake.loaded] == [12416, 64352, 12416, 96]
    for (per_rank, flat), want in zip(fake.loaded, expected):
        assert flat.dtype == torch.uint8
        assert flat.numel() == sum(t.numel() * t.element_size() for _, t in want)
        for got in per_rank:  # names unchanged, dtypes and values exact
            assert [n for n, _ in got] == [n for n, _ in want]
            for (_, g), (_, w) in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g, w)


def test_prefix_cache_flushed_once_per_sync_and_deferred_while_kv_cache_released():
    ok = [out([5], [-0.5], "length")]
    eng, fake = make(ok)
    for seed in range(3):
        eng.update_weights([("mlp1.3.bias", skywork_tensor("mlp1.3.bias", torch.bfloat16, seed))])
    assert eng.finish_weight_update() is True and eng.finish_weight_update() is False
    eng.update_weights([("mlp1.3.bias", skywork_tensor("mlp1.3.bias", torch.bfloat16, 3))])
    eng.release_memory()
    assert eng.finish_weight_update() is False  # the KV cache is released
    eng.resume_memory()
    req = [RolloutRequest("p", torch.tensor([1, 2]))]
    eng.generate(req, SamplingParams(n=1, max_new_tokens=1))
    eng.generate(req, SamplingParams(n=1, max_new_tokens=1))
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["update"] * 3 + ["flush", "update", "release", "resume", "resume", "flush", "generate", "generate"]


def test_names_and_shapes_checked_before_anything_is_sent():
    eng, fake = make()
    good = ("mlp1.1.bias", skywork_tensor("mlp1.1.bias", torch.bfloat16, 0))
    with pytest.raises(KeyError, match="model.multi_modal_projector.linear_1.bias"):
        eng.update_weights([good, ("model.multi_modal_projector.linear_1.bias", torch.zeros(64))])
    with pytest.raises(ValueError, match=r"mlp1.3.weight.*\(64, 63\).*\(64, 64\)"):
        eng.update_weights([good, ("mlp1.3.weight", torch.zeros(64, 63))])
    assert fake.calls == []


def test_generate_converts_outputs_and_builds_sglang_requests():
    outputs = [out([7, 8, 3], [-0.25, -1.5, -0.125], "stop"), out([9, 9], [-2.0, -0.75], "length"),
               out([4], [-0.5], "stop"), out([6, 3], [-1.0, -0.0625], "stop")]
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "|".join(map(str, ids)) + str(
        skip_special_tokens))
    eng, fake = make(outputs, tokenizer=tokenizer)
    pixels = torch.randn(2, 3, 56, 56)
    image_ids = torch.tensor([1, *[IMG] * 2 * PER_TILE, 2])  # one image of two tiles
    reqs = [RolloutRequest("a", torch.tensor([5, 6, 7])), RolloutRequest("b", image_ids, pixels)]
    groups = eng.generate(reqs, SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=3, seed=1,
                                               stop_token_ids=(3, 3, 2)))
    assert [[s.prompt_id for s in g] for g in groups] == [["a", "a"], ["b", "b"]]
    first = groups[0][0]
    assert first.response_ids.dtype == torch.int64 and first.response_ids.tolist() == [7, 8, 3]
    assert first.logprobs.dtype == torch.float32 and first.logprobs.tolist() == [-0.25, -1.5, -0.125]
    assert first.text == "7|8|3False"
    assert [s.finished for g in groups for s in g] == [True, False, True, True]
    sent = fake.generated
    assert sent["return_logprob"] is True
    assert sent["input_ids"] == [[5, 6, 7]] * 2 + [image_ids.tolist()] * 2
    assert sent["image_data"][:2] == [[], []]
    for entry in sent["image_data"][2:]:
        assert entry[0]["format"] == "processor_output" and entry[0]["pixel_values"] is pixels
    sp = sent["sampling_params"]
    assert {k: sp[0][k] for k in ("n", "temperature", "top_p", "max_new_tokens", "stop_token_ids", "no_stop_trim",
                                  "logit_bias")} == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3,
                                                     "stop_token_ids": [2, 3], "no_stop_trim": True,
                                                     "logit_bias": {"250": -1e4}}
    assert "ignore_eos" not in sp[0] and len({p["sampling_seed"] for p in sp}) == 4


def test_sampling_seeds_follow_each_requests_stream():
    """A sample's seed is sample_seed(call seed, stream, k): a request's own stream, else its
    index in the call; so a prompt sent with its stream gets the same seeds wherever it sits."""
    reqs = [RolloutRequest("a", torch.tensor([5, 6])), RolloutRequest("b", torch.tensor([7]), stream=9)]
    eng, fake = make([out([1], [-0.5], "stop")] * 4)
    eng.generate(reqs, SamplingParams(n=2, seed=3))
    seeds = [p["sampling_seed"] for p in fake.generated["sampling_params"]]
    assert seeds == [sample_seed(3, 0, 0), sample_seed(3, 0, 1), sample_seed(3, 9, 0), sample_seed(3, 9, 1)]
    eng.generate(reqs[::-1], SamplingParams(n=2, seed=3))  # "b" first now: its seeds stay, "a"'s follow index 1
    assert [p["sampling_seed"] for p in fake.generated["sampling_params"]] == seeds[2:] + [
        sample_seed(3, 1, 0), sample_seed(3, 1, 1)]
    assert len({sample_seed(s, st, k) for s in (0, 1) for st in (0, 1, 2) for k in (0, 1)}) == 12


def test_greedy_and_no_stop_ids_map_to_temperature_zero_and_ignore_eos():
    eng, fake = make([out([4, 4], [-0.5, -0.25], "length")], ban_image_token=False)
    (group,) = eng.generate([RolloutRequest("g", torch.tensor([1]))],
                            SamplingParams(n=1, temperature=0.0, top_p=0.5, max_new_tokens=2))
    (sp,) = fake.generated["sampling_params"]
    assert sp["temperature"] == 0.0 and "top_p" not in sp and sp["ignore_eos"] is True and "logit_bias" not in sp
    assert "image_data" not in fake.generated
    assert group[0].finished is False and group[0].text == "sglang text"


def test_repetition_penalty_reaches_every_sglang_request():
    eng, fake = make([out([4], [-0.5], "length")])
    reqs = [RolloutRequest("a", torch.tensor([1, 2])), RolloutRequest("b", torch.tensor([3]))]
    eng.generate(reqs[:1], SamplingParams(n=1, max_new_tokens=1))
    assert fake.generated["sampling_params"][0]["repetition_penalty"] == 1.0  # the default, stated explicitly
    # Skywork R1V's evaluation setting (sampled, two requests of two samples), then greedy.
    for temperature, n in ((0.6, 2), (0.0, 1)):
        fake.outputs = [out([4], [-0.5], "length")] * (2 * n)
        eng.generate(reqs, SamplingParams(n=n, temperature=temperature, top_p=0.95, max_new_tokens=1,
                                          repetition_penalty=1.05))
        assert [sp["repetition_penalty"] for sp in fake.generated["sampling_params"]] == [1.05] * (2 * n)


def test_each_request_gets_the_smaller_of_its_and_the_calls_token_budget():
    eng, fake = make([out([4], [-0.5], "length")] * 6)
    reqs = [RolloutRequest("none", torch.tensor([1, 2])), RolloutRequest("small", torch.tensor([3]), max_new_tokens=2),
            RolloutRequest("large", torch.tensor([5]), max_new_tokens=100)]
    eng.generate(reqs, SamplingParams(n=2, max_new_tokens=5))
    assert [sp["max_new_tokens"] for sp in fake.generated["sampling_params"]] == [5, 5, 2, 2, 5, 5]


def test_request_validation_errors():
    eng, fake = make()
    params = SamplingParams(n=1)
    bad = [
        (RolloutRequest("r0", torch.tensor([[1, 2]])), "non-empty 1-D"),
        (RolloutRequest("r1", torch.tensor([1, IMG])), "1 image tokens"),
        (RolloutRequest("r2", torch.tensor([IMG] * PER_TILE), torch.zeros(3, 56, 56)), r"\[tiles, 3, S, S\]"),
        (RolloutRequest("r3", torch.tensor([*[IMG] * PER_TILE, 9, *[IMG] * PER_TILE]), torch.zeros(2, 3, 56, 56)),
         "2 images of one tile each"),
        (RolloutRequest("r4", torch.tensor([1]), max_new_tokens=0),
         "request r4: max_new_tokens must be None or an integer"),
    ]
    for req, message in bad:
        with pytest.raises(ValueError, match=message):
            eng.generate([req], params)
    assert fake.calls == []


def test_abort_and_inconsistent_outputs_raise():
    req = [RolloutRequest("x", torch.tensor([1]))]
    abort = {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "oom"},
                                             "output_token_logprobs": []}}
    with pytest.raises(RuntimeError, match="did not finish.*oom"):
        make([abort])[0].generate(req, SamplingParams(n=1))
    mismatch = out([1, 2], [-1.0, -1.0], "stop")
    mismatch["output_ids"] = [1, 3]
    with pytest.raises(RuntimeError, match="disagree"):
        make([mismatch])[0].generate(req, SamplingParams(n=1))
    with pytest.raises(RuntimeError, match="2 outputs for 1 requests"):
        make([mismatch, mismatch])[0].generate(req, SamplingParams(n=1))


def test_missing_sglang_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match=r"pip install 'megatron-r1v\[rollout\]'"):
        SGLangRolloutEngine.from_config(RolloutConfig(engine="sglang"), str(tmp_path), 1, 0, 0)


def test_untempered_logprob_switch_refused_and_no_named_weights(monkeypatch):
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "true")
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        make()
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB")
    monkeypatch.setenv("SGL_RETURN_ORIGINAL_LOGPROB", "yes")  # sglang's legacy prefix and EnvBool's "yes"
    with pytest.raises(ValueError, match="SGL_RETURN_ORIGINAL_LOGPROB"):
        make()
    monkeypatch.delenv("SGL_RETURN_ORIGINAL_LOGPROB")
    with pytest.raises(NotImplementedError, match="rollout/logprob_abs_diff"):
        make()[0].named_weights()


def fake_sglang(monkeypatch):
    """A stand-in ``sglang`` package with the names the adapter imports; returns the built engines."""
    built = []

    class Engine(FakeEngine):
        def __init__(self, **kwargs):
            super().__init__()
            self.kwargs = kwargs
            built.append(self)

    attrs = {"sglang": {"Engine": Engine, "__version__": "0.5.23"},
             "sglang.srt": {}, "sglang.srt.constants": {"GPU_MEMORY_TYPE_CUDA_GRAPH": "cuda_graph"},
             "sglang.srt.utils": {"MultiprocessingSerializer": SimpleNamespace(serialize=pickle.dumps)},
             "sglang.srt.weight_sync": {},
             "sglang.srt.weight_sync.tensor_bucket": {"FlattenedTensorBucket": ByteBucket}}
    for name, values in attrs.items():
        module = ModuleType(name)
        module.__dict__.update(values)
        monkeypatch.setitem(sys.modules, name, module)
    return built


def test_from_config_reads_the_skywork_checkpoint_and_builds_a_colocated_engine(monkeypatch, tmp_path):
    tool = load_tool("make_tiny_checkpoint")
    ckpt = tmp_path / "ckpt"
    tool.make_tiny_checkpoint(ckpt)
    built = fake_sglang(monkeypatch)
    monkeypatch.delenv("SGLANG_VLM_CACHE_SIZE_MB", raising=False)
    cfg = RolloutConfig(engine="sglang", mem_fraction_static=0.3, max_running_requests=64)
    eng = SGLangRolloutEngine.from_config(cfg, str(ckpt), 2, 4, 7, trust_remote_code=True)
    assert built[0].kwargs == {"model_path": str(ckpt), "tp_size": 2, "base_gpu_id": 4, "mem_fraction_static": 0.3,
                               "random_seed": 7, "enable_memory_saver": True, "enable_weights_cpu_backup": True,
                               "trust_remote_code": True, "max_running_requests": 64}
    # rollout.deterministic: SGLang honours sampling_seed only under deterministic inference.
    SGLangRolloutEngine.from_config(RolloutConfig(engine="sglang", deterministic=True), str(ckpt), 1, 0, 7)
    assert built[1].kwargs["enable_deterministic_inference"] is True
    assert "enable_deterministic_inference" not in built[0].kwargs
    assert os.environ["SGLANG_VLM_CACHE_SIZE_MB"] == "0"
    assert (eng.image_token_id, eng.tokens_per_tile, eng.tp_size) == (639, 4, 2)
    assert eng.memory_tags == ("weights", "kv_cache", "cuda_graph") and eng.tokenizer is not None
    eng.update_weights([("mlp1.1.bias", torch.ones(SHAPES["mlp1.1.bias"], dtype=torch.bfloat16))])
    assert built[0].calls == [("update", "flattened_bucket", False, 2)]  # sglang's codec: one payload per rank
    monkeypatch.setenv("SGLANG_VLM_CACHE_SIZE_MB", "100")
    with pytest.raises(ValueError, match="SGLANG_VLM_CACHE_SIZE_MB=100"):
        SGLangRolloutEngine.from_config(cfg, str(ckpt), 1, 0, 0)
    # Importing sglang copies SGL_VLM_CACHE_SIZE_MB over SGLANG_VLM_CACHE_SIZE_MB.
    monkeypatch.setenv("SGLANG_VLM_CACHE_SIZE_MB", "0")
    monkeypatch.setenv("SGL_VLM_CACHE_SIZE_MB", "100")
    with pytest.raises(ValueError, match="SGL_VLM_CACHE_SIZE_MB=100"):
        SGLangRolloutEngine.from_config(cfg, str(ckpt), 1, 0, 0)
    monkeypatch.delenv("SGL_VLM_CACHE_SIZE_MB")
    # A training checkpoint's hf_extra/ (config and tokenizer, no weights): SGLang starts from
    # dummy weights, which the trainer's first full sync replaces.
    extra = tmp_path / "hf_extra"
    shutil.copytree(ckpt, extra, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    monkeypatch.delenv("SGLANG_VLM_CACHE_SIZE_MB", raising=False)
    eng = SGLangRolloutEngine.from_config(cfg, str(extra), 2, 0, 7)
    assert built[-1].kwargs["load_format"] == "dummy" and built[-1].kwargs["model_path"] == str(extra)
    assert "load_format" not in built[0].kwargs and eng.image_token_id == 639
    shutil.copytree(ckpt, tmp_path / "bad")
    config = json.loads((ckpt / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="qwen2-layout checkpoint"):
        SGLangRolloutEngine.from_config(cfg, str(tmp_path / "bad"), 1, 0, 0)
