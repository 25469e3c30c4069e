"""SGLang as the rollout engine: an in-process ``sglang.Engine`` colocated with training.

One engine per model replica, built on the replica's owner rank (first TP rank of the
first pipeline stage, which ``WeightSync`` hands buckets to) over the GPUs the replica
trains on, ``base_gpu_id .. base_gpu_id + tp_size - 1``. It loads a checkpoint in the
released InternVL-chat ("skywork") layout and takes updates under those names, which
:attr:`SGLangRolloutEngine.hf_layout` tells weight sync.

Colocated memory timeline of a GRPO step: ``generate`` (all resident) ->
``release_memory()`` (every tag; weights kept on the host by ``enable_weights_cpu_backup``,
so trainable-only syncs stay correct) -> training -> weight sync (the first
``update_weights`` resumes "weights": SGLang writes into weight memory, unmapped while
released; one ``update_weights_from_tensor`` per dtype of a bucket, ``flush_cache=False``)
-> ``resume_memory()`` ("cuda_graph", then "kv_cache") -> the next ``generate`` flushes the
prefix cache once (:meth:`~SGLangRolloutEngine.finish_weight_update`) and runs.

Written against sglang 0.5.23 (the PyPI wheel; paths under ``sglang/srt/``, 0.5.2 compared):

* ``entrypoints/engine.py``: ``generate(input_ids, image_data, sampling_params,
  return_logprob=True)`` gives per request ``output_ids``, ``text`` and ``meta_info``
  {``finish_reason`` {"type": "stop"|"length"|"abort"}, ``output_token_logprobs``
  [(logprob, id, text)]}. One request per sample: with n > 1 the tokenizer manager warms
  prompts up one at a time. ``update_weights_from_tensor(.., load_format=
  "flattened_bucket")`` takes one serialized payload per engine TP rank (rank r loads entry
  r), ``MultiprocessingSerializer.serialize({"flattened_tensor", "metadata"})`` of a
  ``weight_sync/tensor_bucket.py`` bucket; the scheduler's unpickling allow-list admits
  sglang's metadata class only, hence sglang's classes. 0.5.23 flattens to bytes, 0.5.2
  in the tensors' dtype: one dtype per bucket suits both.
* Memory tags "weights", "kv_cache", "cuda_graph" (``constants.py``; no cuda_graph in
  0.5.2); resuming an unreleased tag fails; released weights are lost without
  ``enable_weights_cpu_backup`` (sglang PR #10873, after 0.5.2). Resume order as slime's.
* ``layers/sampler.py``: sampled log-probs are ``log(softmax(logits / T))`` over the whole
  vocabulary (before top-p); temperature 0 is top_k=1 at T=1
  (``sampling/sampling_params.py``), reported as ``log_softmax(logits)``: the trainer's
  convention. ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (0.5.2: ``RETURN_ORIGINAL_LOGPROB``) makes
  them untempered and is refused. ``logit_bias`` (the image-token ban) applies before both.
* ``sampling/penaltylib/repetition_penalty.py``: ``repetition_penalty`` divides a positive
  logit by it and multiplies a negative one before temperature, like transformers and
  vLLM, and marks only the ids generated so far (``_cumulate_output_tokens``; there is no
  prompt pass), as the HF engine and Skywork R1V's released inference (transformers'
  ``generate`` from ``inputs_embeds``) do.
* ``max_new_tokens`` is per request: each gets ``engine.token_budget`` (the smaller of the
  call's and the request's limits).
* ``managers/schedule_batch.py``: samples end at ``stop_token_ids`` and at the model's EOS
  ids (``ignore_eos`` turns both off); ``output_ids`` keep the stop token.
* ``multimodal/processors/internvl.py``, ``base_processor.py``, ``managers/mm_utils.py``:
  with pre-tokenized ids InternVL takes ``{"format": "processor_output", "pixel_values"}``
  dicts only and fills the IMG_CONTEXT runs of ``input_ids`` with the tiles' embeddings in
  order; it gives each item every run, so a request's tiles go in one dict, and a bundle
  with one tile per image is split and breaks (refused). 0.5.2 has no such path.
* ``managers/mm_schedule.py``: the image-embedding cache (``SGLANG_VLM_CACHE_SIZE_MB``) is
  keyed by image content and survives weight updates and ``flush_cache``; the embeddings
  include the trained adapter (mlp1), so it is turned off.
* ``get_weights_by_name`` returns a truncated view of the fused, TP-sharded parameters.
* Per-request ``sampling_seed`` is honoured only with ``enable_deterministic_inference``
  (``rollout.deterministic``); each sample's seed is ``engine.sample_seed`` of the call's seed,
  the request's stream (``RolloutRequest.stream``) and the sample's index.

Not run on GPU: unit tests drive it through a fake engine, and tests/unit/test_sglang_source.py
checks every name it uses, and what the fake does, against the 0.5.23 wheel's source.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import torch

from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT
from megatron_r1v.rollout.engine import (
    RolloutRequest,
    RolloutSample,
    SamplingParams,
    sample_seed,
    sampling_stream,
    token_budget,
    validate_request,
)

if TYPE_CHECKING:
    from megatron_r1v.config import RolloutConfig
    from megatron_r1v.models.r1v.presets import R1VArch

logger = logging.getLogger(__name__)

ROLLOUT_EXTRA = "pip install 'megatron-r1v[rollout]'"
WEIGHTS, KV_CACHE, CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
_RESUME_ORDER = (WEIGHTS, CUDA_GRAPH, KV_CACHE)
_IMAGE_TOKEN_BIAS = -1e4  # added to the logits: exp(-1e4 / T) is 0 in fp32 for any T below ~100
# Every spelling sglang reads (srt/environ.py): importing sglang copies SGL_X to SGLANG_X (before
# the engine's processes start, which inherit it); RETURN_ORIGINAL_LOGPROB is 0.5.2's name. An
# EnvBool is true for these values, an EnvInt is int(value).
_ORIGINAL_LOGPROB_VARS = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "SGL_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")
_VLM_CACHE_VARS = ("SGLANG_VLM_CACHE_SIZE_MB", "SGL_VLM_CACHE_SIZE_MB")
_ENV_TRUE = ("true", "1", "yes", "y")


@dataclass(frozen=True)
class WeightCodec:
    """How a bucket becomes ``update_weights_from_tensor`` payloads: ``bucket_cls(named_tensors=
    [(name, tensor)])`` with ``get_flattened_tensor()`` / ``get_metadata()`` (sglang's
    ``FlattenedTensorBucket``) and ``serialize(obj)`` (sglang's
    ``MultiprocessingSerializer.serialize``: CUDA tensors travel as IPC handles)."""

    bucket_cls: Callable[..., Any]
    serialize: Callable[[Any], Any]


def _import_sglang() -> Any:
    try:
        import sglang
    except ImportError as err:
        raise ImportError(f"rollout.engine 'sglang' needs SGLang, which is not installed or cannot be imported "
                          f"({err}): {ROLLOUT_EXTRA}") from err
    return sglang


def sglang_codec() -> WeightCodec:
    _import_sglang()
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    return WeightCodec(FlattenedTensorBucket, MultiprocessingSerializer.serialize)


def flattened_payloads(
    named_tensors: Sequence[tuple[str, torch.Tensor]], tp_size: int, codec: WeightCodec
) -> list[tuple[dict, list]]:
    """One ``(payload, serialized)`` pair per dtype of the bucket, in first-seen order:
    ``payload`` = {"flattened_tensor", "metadata"} (keep it alive until the engine has
    loaded it: its tensor is what the serialized IPC handles point to) and ``tp_size``
    serializations of it, one per engine TP rank."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named_tensors:
        groups.setdefault(tensor.dtype, []).append((name, tensor.contiguous()))
    calls = []
    for group in groups.values():
        bucket = codec.bucket_cls(named_tensors=group)
        payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
        calls.append((payload, [codec.serialize(payload) for _ in range(tp_size)]))
    return calls


def _check_ok(result: Any, what: str) -> None:
    if isinstance(result, (tuple, list)) and result and result[0] is False:  # (success, message)
        raise RuntimeError(f"SGLang {what} failed: {result[1:]}")


class SGLangRolloutEngine:
    """A :class:`~megatron_r1v.rollout.engine.RolloutEngine` on an in-process ``sglang.Engine``.

    ``engine``: a built engine (tests pass a fake), else one is built from ``model_dir`` (a
    skywork-layout checkpoint; extra keyword arguments go to ``sglang.Engine``). ``arch``
    (read from ``model_dir`` when building): image token, tokens per tile, and the names and
    shapes ``update_weights`` accepts. ``tokenizer`` decodes ``RolloutSample.text`` (else
    SGLang's text). ``ban_image_token``: a ``logit_bias`` that keeps the image token out of
    responses (log-probs are then renormalized without it, a negligible change).
    """

    hf_layout = SKYWORK_LAYOUT
    """The names weight sync must stream: sglang's InternVL loads checkpoint names."""

    def __init__(self, engine: Any = None, *, model_dir: Optional[str] = None, tp_size: int = 1,
                 base_gpu_id: int = 0, mem_fraction_static: float = 0.35, max_running_requests: Optional[int] = None,
                 seed: int = 0, tokenizer: Any = None, arch: Optional["R1VArch"] = None,
                 codec: Optional[WeightCodec] = None, memory_tags: Optional[Sequence[str]] = None,
                 ban_image_token: bool = True, **engine_kwargs: Any) -> None:
        for var in _ORIGINAL_LOGPROB_VARS:
            if os.environ.get(var, "").strip().lower() in _ENV_TRUE:
                raise ValueError(f"{var} is set: SGLang would report untempered log-probs, but the trainer needs "
                                 "those of the temperature-scaled policy; unset it")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if engine is None:
            sgl = _import_sglang()
            if model_dir is None:
                raise ValueError("SGLangRolloutEngine needs model_dir (a skywork-layout checkpoint) or an engine")
            if arch is None:
                arch, tokenizer = _read_skywork_model(str(model_dir), tokenizer)
            if not _has_weight_files(str(model_dir)):
                # Config and tokenizer only (a training checkpoint's hf_extra/): SGLang starts
                # from random weights, which the trainer's first (full) sync replaces.
                engine_kwargs.setdefault("load_format", "dummy")
            _disable_vlm_embedding_cache()
            kwargs = dict(model_path=str(model_dir), tp_size=tp_size, base_gpu_id=base_gpu_id,
                          mem_fraction_static=mem_fraction_static, random_seed=seed, enable_memory_saver=True,
                          enable_weights_cpu_backup=True, **engine_kwargs)
            if max_running_requests is not None:
                kwargs["max_running_requests"] = max_running_requests
            version = getattr(sgl, "__version__", "unknown")
            try:
                engine = sgl.Engine(**kwargs)
            except TypeError as err:
                raise TypeError(f"sglang {version} rejected the engine arguments ({err}); this adapter was written "
                                "against sglang 0.5.23") from err
            logger.info("sglang %s engine on GPUs %d..%d from %s", version, base_gpu_id, base_gpu_id + tp_size - 1,
                        model_dir)
            codec = codec or sglang_codec()
            memory_tags = memory_tags or _sglang_memory_tags()
        elif engine_kwargs:
            raise TypeError(f"engine arguments {sorted(engine_kwargs)} given together with a built engine")
        self.engine = engine
        self.tp_size = tp_size
        self.tokenizer = tokenizer
        self.arch = arch
        self.image_token_id = None if arch is None else arch.image_token_id
        self.tokens_per_tile = None if arch is None or arch.vision is None else arch.tokens_per_tile
        self.ban_image_token = ban_image_token
        self.memory_tags = tuple(memory_tags or (WEIGHTS, KV_CACHE))
        unknown = sorted(set(self.memory_tags) - set(_RESUME_ORDER))
        if unknown:
            raise ValueError(f"unknown SGLang memory tags {unknown}; known: {list(_RESUME_ORDER)}")
        self._codec = codec
        self._released: set[str] = set()
        self._flush_pending = False
        self._expected: Optional[dict[str, tuple[int, ...]]] = None

    @classmethod
    def from_config(cls, rollout_cfg: "RolloutConfig", model_dir: str, tp_size: int, base_gpu_id: int, seed: int,
                    tokenizer: Any = None, **engine_kwargs: Any) -> "SGLangRolloutEngine":
        """The real engine for ``rollout_cfg`` (``mem_fraction_static``, ``max_running_requests``,
        ``deterministic``: SGLang's enable_deterministic_inference, which honours ``sampling_seed``)."""
        if rollout_cfg.deterministic:
            engine_kwargs.setdefault("enable_deterministic_inference", True)
        return cls(model_dir=model_dir, tp_size=tp_size, base_gpu_id=base_gpu_id,
                   mem_fraction_static=rollout_cfg.mem_fraction_static,
                   max_running_requests=rollout_cfg.max_running_requests, seed=seed, tokenizer=tokenizer,
                   **engine_kwargs)

    @property
    def released(self) -> bool:
        return bool(self._released)


    def release_memory(self) -> None:
        """Releases every memory tag still held (idempotent)."""
        tags = [t for t in self.memory_tags if t not in self._released]
        if tags:
            self.engine.release_memory_occupation(tags=tags)
            self._released.update(tags)

    def resume_memory(self) -> None:
        """Resumes the released tags one call each: weights, CUDA graphs, KV cache (idempotent)."""
        self._resume([t for t in _RESUME_ORDER if t in self._released])

    def _resume(self, tags: Sequence[str]) -> None:
        for tag in tags:
            self.engine.resume_memory_occupation(tags=[tag])
            self._released.discard(tag)


    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads one bucket under skywork names; the whole bucket is checked first. Resumes
        the "weights" tag if released. The prefix cache is flushed once per sync, by
        :meth:`finish_weight_update` (which the next :meth:`generate` calls)."""
        items = list(named_tensors)
        if not items:
            return
        self._check_names(items)
        if WEIGHTS in self._released:
            self._resume([WEIGHTS])
        if self._codec is None:
            self._codec = sglang_codec()
        for payload, serialized in flattened_payloads(items, self.tp_size, self._codec):
            result = self.engine.update_weights_from_tensor(named_tensors=serialized, load_format="flattened_bucket",
                                                            flush_cache=False)
            _check_ok(result, f"update_weights_from_tensor ({len(payload['metadata'])} tensors)")
        self._flush_pending = True

    def finish_weight_update(self) -> bool:
        """Flushes SGLang's prefix cache after the buckets of a sync; returns whether it did.
        Deferred (until the next call) while the KV cache is released."""
        if not self._flush_pending or KV_CACHE in self._released:
            return False
        result = self.engine.flush_cache()
        if getattr(result, "success", True) is False:
            raise RuntimeError(f"SGLang flush_cache after a weight update failed: {result}")
        self._flush_pending = False
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()  # frees the flat buckets the engine has let go of
        return True

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        raise NotImplementedError(
            "SGLang cannot give back its weights under checkpoint names (get_weights_by_name returns a truncated "
            "view of its fused, TP-sharded parameters); weight-sync correctness is monitored with "
            "rollout/logprob_abs_diff instead"
        )

    def _check_names(self, items: list[tuple[str, torch.Tensor]]) -> None:
        if self.arch is None:
            return
        if self._expected is None:
            from megatron_r1v.checkpoint.hf_layouts import expected_hf_shapes

            self._expected = expected_hf_shapes(self.arch, SKYWORK_LAYOUT)
        for name, tensor in items:
            shape = self._expected.get(name)
            if shape is None:
                raise KeyError(f"SGLang engine has no weight {name!r}: weight sync must stream the skywork "
                               "(InternVL-chat) names of SGLangRolloutEngine.hf_layout")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"weight {name!r}: got shape {tuple(tensor.shape)}, the engine holds {shape}")


    def _check_request(self, req: RolloutRequest) -> None:
        if self.image_token_id is None:
            if req.pixel_values is not None and req.pixel_values.shape[0]:
                raise ValueError(f"request {req.prompt_id} has images but the engine was given no architecture")
            validate_request(req, -1, 0)  # no id is -1: only the ids' and pixels' shapes are checked
            return
        validate_request(req, self.image_token_id, self.tokens_per_tile or 0)
        tiles = 0 if req.pixel_values is None else req.pixel_values.shape[0]
        is_image = req.prompt_ids == self.image_token_id
        runs = int((is_image[1:] & ~is_image[:-1]).sum()) + int(is_image[0])
        if runs > 1 and runs == tiles:
            raise ValueError(f"request {req.prompt_id}: {runs} images of one tile each; SGLang's InternVL splits "
                             "such a bundle per image and then misplaces the embeddings (see the module docstring)")

    def _sampling_params(self, params: SamplingParams, stream: int, sample: int, max_new_tokens: int) -> dict:
        """SGLang's sampling dict for sample ``sample`` of the request on random stream ``stream``
        (``engine.sampling_stream``), which may generate ``max_new_tokens`` tokens (its
        :func:`token_budget`)."""
        sp: dict[str, Any] = {"n": 1, "max_new_tokens": max_new_tokens, "no_stop_trim": True,
                              "skip_special_tokens": False, "sampling_seed": sample_seed(params.seed, stream, sample)}
        if params.greedy:
            sp["temperature"] = 0.0
        else:
            sp["temperature"], sp["top_p"] = params.temperature, params.top_p
        if params.stop_token_ids:
            sp["stop_token_ids"] = sorted(set(params.stop_token_ids))
        else:
            sp["ignore_eos"] = True  # the protocol stops only at stop_token_ids
        if self.ban_image_token and self.image_token_id is not None:
            sp["logit_bias"] = {str(self.image_token_id): _IMAGE_TOKEN_BIAS}
        # Always sent (1.0 is SGLang's default and its "off"), so the request states what was asked.
        sp["repetition_penalty"] = params.repetition_penalty
        return sp

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[list[RolloutSample]]:
        """``params.n`` samples per request, in request order, one SGLang request each."""
        if self._released:
            raise RuntimeError(f"generate() while SGLang memory {sorted(self._released)} is released: call "
                               "resume_memory() first")
        if not requests:
            return []
        for req in requests:
            self._check_request(req)
        self.finish_weight_update()
        n = params.n
        input_ids, image_data, sampling = [], [], []
        for i, req in enumerate(requests):
            ids = req.prompt_ids.tolist()
            pv = req.pixel_values if req.pixel_values is not None and req.pixel_values.shape[0] else None
            budget = token_budget(req, params)
            for k in range(n):  # a dict per sample: sglang builds its items from it
                input_ids.append(ids)
                image_data.append([] if pv is None else [{"format": "processor_output", "pixel_values": pv}])
                sampling.append(self._sampling_params(params, sampling_stream(req, i), k, budget))
        kwargs: dict[str, Any] = {"input_ids": input_ids, "sampling_params": sampling, "return_logprob": True}
        if any(image_data):
            kwargs["image_data"] = image_data
        outputs = self.engine.generate(**kwargs)
        if len(outputs) != len(input_ids):
            raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {len(input_ids)} requests")
        return [[self._to_sample(req.prompt_id, outputs[i * n + k]) for k in range(n)]
                for i, req in enumerate(requests)]

    def _to_sample(self, prompt_id: str, out: dict) -> RolloutSample:
        meta = out["meta_info"]
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else None
        if kind not in ("stop", "length"):
            raise RuntimeError(f"SGLang did not finish a sample of request {prompt_id}: finish_reason={reason!r}")
        ids = [int(e[1]) for e in meta["output_token_logprobs"]]
        logprobs = [e[0] for e in meta["output_token_logprobs"]]
        if any(lp is None for lp in logprobs):
            raise RuntimeError(f"SGLang returned no log-prob for some tokens of request {prompt_id}")
        output_ids = out.get("output_ids")
        if output_ids is not None and [int(t) for t in output_ids] != ids:
            raise RuntimeError(f"request {prompt_id}: SGLang's output_ids disagree with its log-prob token ids")
        text = (self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None
                else out.get("text") or "")
        return RolloutSample(prompt_id, torch.tensor(ids, dtype=torch.int64),
                             torch.tensor(logprobs, dtype=torch.float32), kind == "stop", text)

    def shutdown(self) -> None:
        """Stops the engine's processes (the GPU memory is free when this returns)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _sglang_memory_tags() -> tuple[str, ...]:
    import sglang.srt.constants as constants

    return (WEIGHTS, KV_CACHE) + ((CUDA_GRAPH,) if hasattr(constants, "GPU_MEMORY_TYPE_CUDA_GRAPH") else ())


def _disable_vlm_embedding_cache() -> None:
    """SGLang's scheduler processes inherit the environment at spawn."""
    for var in _VLM_CACHE_VARS:
        value = os.environ.get(var)
        if value is not None and not _is_zero(value):
            raise ValueError(f"{var}={value}: SGLang's image-embedding cache survives weight updates and would "
                             "serve embeddings of the previous adapter; unset it or set it to 0")
    os.environ.setdefault("SGLANG_VLM_CACHE_SIZE_MB", "0")


def _is_zero(value: str) -> bool:
    try:
        return int(value) == 0
    except ValueError:
        return False


def _read_skywork_model(model_dir: str, tokenizer: Any) -> tuple["R1VArch", Any]:
    """(architecture, tokenizer) of a skywork-layout checkpoint, the layout SGLang loads."""
    from megatron_r1v.checkpoint.hf_io import HFCheckpointReader
    from megatron_r1v.checkpoint.hf_layouts import CheckpointError, detect_layout
    from megatron_r1v.data.tokenizer import load_tokenizer
    from megatron_r1v.models.r1v.hf_config import arch_from_skywork_config
    from megatron_r1v.rollout.hf_engine import _skywork_image_token_id

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: the SGLang engine needs a checkpoint folder in the "
                                "skywork (InternVL-chat) layout")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    names: list[str] = []
    if _has_weight_files(model_dir):
        with HFCheckpointReader(model_dir) as reader:
            names = reader.names()
    try:
        layout = detect_layout(config, names)
    except CheckpointError as err:
        raise ValueError(f"{config_path}: {err}; SGLang's InternVL loads the skywork (InternVL-chat) layout") from None
    if layout != "skywork":
        raise ValueError(f"{config_path}: a {layout}-layout checkpoint; SGLang's InternVL loads the skywork "
                         "(InternVL-chat) layout (convert with tools/convert_checkpoint.py)")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    try:
        arch = arch_from_skywork_config(config, _skywork_image_token_id(model_dir, config, tokenizer, model_dir))
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    return arch, tokenizer


def _has_weight_files(model_dir: str) -> bool:
    return any(name.endswith((".safetensors", ".bin")) for name in os.listdir(model_dir))
