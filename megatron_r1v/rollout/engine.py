"""The rollout engine contract: what the GRPO trainer asks of a generator.

Two implementations: ``hf_engine`` (transformers' InternVL model; the CPU default and
the reference) and, on GPU clusters, SGLang engines colocated with training. The
trainer owns tokenization and images: a request carries prompt token ids made by
``data.template.ChatTemplate.prompt_ids`` and the tiles of its images; a sample carries
the generated ids and their log-probs under the sampling distribution.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """0 means greedy decoding: the most likely token (never the image token), ``top_p``
    ignored, log-probs those of the untempered distribution (temperature 1)."""
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0
    """Sampling is reproducible for a given seed, request order and weights; with request
    streams (``RolloutRequest.stream``), sample k of a request draws from the random stream
    :func:`sample_seed` (seed, its :func:`sampling_stream`, k), whatever else the call holds."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sample ends after any of these (e.g. ``<|im_end|>``)."""
    repetition_penalty: float = 1.0
    """transformers' / vLLM's rule, applied to the raw logits before temperature, top-p and
    greedy argmax: every token id the sample has generated so far has a positive logit
    divided by this, a negative one multiplied. The prompt's ids are not penalized, as
    Skywork R1V's released inference (transformers' generate from inputs_embeds, whose
    penalty sees no prompt ids) and SGLang do. 1.0 (GRPO training) changes nothing;
    evaluation as Skywork R1V's released inference uses 1.05. Log-probs are then those of
    the penalized distribution."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={self.n}, max_new_tokens={self.max_new_tokens}")
        # "not >= 0" also rejects NaN.
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"need temperature >= 0 (0: greedy) and 0 < top_p <= 1, got temperature="
                             f"{self.temperature}, top_p={self.top_p}")
        # Finite: inf would zero every seen positive logit, NaN poison them; > 0: the rule divides by it.
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be finite and > 0 (1.0: off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: argmax decoding, the same response for every seed."""
        return self.temperature == 0


@dataclass
class RolloutRequest:
    prompt_id: str
    prompt_ids: torch.Tensor
    """[P] int64, ending with the assistant turn's opening (``<think>\\n``)."""
    pixel_values: Optional[torch.Tensor] = None
    """[tiles, 3, S, S] float32 in the order of the prompt's image tokens, or None."""
    max_new_tokens: Optional[int] = None
    """At most this many new tokens for this request (None: ``params.max_new_tokens``); the
    smaller of the two applies. Evaluators set it so that one long prompt does not shorten
    the other requests of a batch: each gets what the model's positions leave after its own
    prompt."""
    stream: Optional[int] = None
    """The random stream of this request's samples within the call's seed (:func:`sample_seed`);
    None: the request's index in the call (SGLang always seeds per sample; the HF engine keeps
    one generator for a call where no request has a stream). The GRPO trainer gives each prompt
    its position in the step's global batch, so that a prompt's samples are the same whichever
    DP replica, and whichever other requests, it is generated with (a run resumed at another
    DP size samples what the uninterrupted one did)."""


@dataclass
class RolloutSample:
    prompt_id: str
    response_ids: torch.Tensor
    """[R] int64 generated ids, the stop token included when one ended the sample."""
    logprobs: torch.Tensor
    """[R] fp32 log-probs of the generated ids under the sampling distribution (greedy:
    under the untempered one, temperature 1)."""
    finished: bool
    """A stop token ended the sample (False: cut at its token budget, :func:`token_budget`)."""
    text: str
    """The decoded response (special tokens kept: the format reward reads the tags)."""


def sample_seed(seed: int, stream: int, sample: int) -> int:
    """The seed in [0, 2**63) of sample ``sample`` of the request on ``stream`` in a call seeded
    ``seed``: a hash, so streams never overlap and need no coordination between engines."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_stream(req: "RolloutRequest", index: int) -> int:
    """The stream of ``req``, the ``index``-th request of its call: its own, else ``index``."""
    return index if req.stream is None else int(req.stream)


def token_budget(req: RolloutRequest, params: SamplingParams) -> int:
    """The most new tokens a sample of ``req`` may have: the smaller of the call's and the request's limits."""
    if req.max_new_tokens is None:
        return params.max_new_tokens
    return min(params.max_new_tokens, int(req.max_new_tokens))


def validate_request(req: RolloutRequest, image_token_id: int, tokens_per_tile: int) -> None:
    """Raises ValueError naming the request when its ids are not a non-empty 1-D integer
    tensor, its pixels not ``[tiles, 3, S, S]``, its image tokens not ``tiles x tokens_per_tile``,
    or its ``max_new_tokens`` neither None nor an integer >= 1."""
    if req.stream is not None and (isinstance(req.stream, bool) or not isinstance(req.stream, numbers.Integral)
                                   or req.stream < 0):
        raise ValueError(f"request {req.prompt_id}: stream must be None or an integer >= 0, got {req.stream!r}")
    budget = req.max_new_tokens
    # bool is an Integral but True would silently mean a budget of 1.
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1):
        raise ValueError(f"request {req.prompt_id}: max_new_tokens must be None or an integer >= 1, got {budget!r}")
    ids = req.prompt_ids
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"request {req.prompt_id}: prompt_ids must be a non-empty 1-D integer tensor, "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    pixels = req.pixel_values
    if pixels is not None and pixels.dim() != 4:
        raise ValueError(f"request {req.prompt_id}: pixel_values must be [tiles, 3, S, S], got {tuple(pixels.shape)}")
    tiles = 0 if pixels is None else pixels.shape[0]
    n_image_tokens = int((ids == image_token_id).sum())
    if n_image_tokens != tiles * tokens_per_tile:
        raise ValueError(f"request {req.prompt_id}: {n_image_tokens} image tokens (id {image_token_id}) but "
                         f"{tiles} tiles x {tokens_per_tile} tokens per tile")


class RolloutEngine(Protocol):
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[list[RolloutSample]]:
        """``params.n`` samples for each request, in request order."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads tensors named as transformers' ``InternVLForConditionalGeneration`` names
        them in memory (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
        ``model.language_model.*``, ``lm_head.weight``); a subset updates only those."""

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The engine's current weights under the same names (for the sync invariant check)."""

    def release_memory(self) -> None:
        """Frees accelerator memory between rollouts (weights may be kept on the host)."""

    def resume_memory(self) -> None:
        """Undoes :meth:`release_memory` before the next rollout."""
