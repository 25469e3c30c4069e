"""transformers' ``InternVLForConditionalGeneration`` as a rollout engine (the CPU default).

Generation is a plain sampling loop over the model with its KV cache, not
``model.generate``: the loop controls the random stream, the stop rule and the
log-probs exactly, and is short.

* Batching: the prompts of one ``generate`` call are left-padded into one batch
  (position ids count real tokens only, so padding changes no number) and prefilled
  once, images included; the KV cache is then repeated ``n`` times, so the vision
  tower and the prompt run once per request, not once per sample.
* Randomness (:class:`RowDraws`); the global RNG is never touched. A call whose requests carry
  a ``stream`` (the GRPO trainer's: each prompt's position in the step's global batch) gives
  every sample a ``torch.Generator`` of its own, seeded ``engine.sample_seed(params.seed,
  stream, k)`` (a request without one: its index in the call), drawing once per decode step
  until the sample ends (``torch.multinomial``'s rule, the same draws as multinomial on that
  row alone). A sample then depends on its seed, stream and the weights, not on the other
  requests of the call (up to the floats of a batched forward: a batch's shape may change a
  logit's rounding, which moves a draw only when it falls within that rounding of a boundary
  of the distribution), so GRPO's samples do not depend on the DP layout. A call without
  streams (evaluation, MPO pairs, the prompt pool) draws every step's tokens of all rows with
  one ``torch.multinomial`` from one generator seeded ``params.seed``: reproducible for a seed,
  request order and weights (sample k of a request may change when other requests join the
  call), the same draws as before streams existed, so those tools' outputs did not change.
  Per-sample streams cost ``rows`` generator calls per step; ``tools/bench_hf_sampling.py``
  measured sampled generation on the tiny model (where the forward is cheapest) at 1.19x the
  greedy time with streams, 1.14x with the call's one generator.
* Repetition penalty (``params.repetition_penalty``, transformers' and vLLM's rule): a
  per-row bool mask [rows, V] of the ids the row has generated so far, empty at the first
  step and updated each step; a seen id's positive logit is divided by the penalty, a
  negative one multiplied, before temperature, top-p and greedy argmax. The prompt is not
  marked, as in Skywork R1V's released inference (``model.chat`` calls transformers'
  ``generate`` with ``inputs_embeds`` and no ``input_ids``, so its penalty sees only the
  generated ids) and in SGLang. At 1.0 the mask is never built and no number changes.
* Log-probs: ``logprobs[t] = log_softmax(penalized(logits_t) / temperature)[token_t]``
  over the whole vocabulary. With penalty 1.0, which GRPO training keeps, that is the
  temperature-scaled policy the GRPO loss evaluates (``losses.grpo``, ``temperature``);
  with another penalty (evaluation) it is the penalized, tempered distribution the
  sampler draws from, which the loss does not know. Either way NOT renormalized over the
  top-p nucleus. The sampler draws from that distribution truncated to the nucleus and
  with the image token banned; a sampled token's nucleus log-prob is its policy log-prob
  minus the log of the nucleus mass. With ``top_p=1`` the two coincide up to the banned
  image token, whose mass is negligible for a trained model (and whose appearance in a
  response would break the trainer's image-token count, hence the ban).
* Greedy (``temperature == 0``): each step takes the most likely token that is not the
  image token, ``top_p`` and the seed play no part, and log-probs are those of the
  untempered (but penalized) distribution (``log_softmax(penalized(logits))``). The ``n``
  samples of a request are then identical.
* Token budgets: each row may generate ``engine.token_budget`` tokens (the smaller of
  ``params.max_new_tokens`` and its request's ``max_new_tokens``) and is cut there
  (``finished=False``). Rows that have ended, by a stop token or their budget, keep
  decoding in the batch (their tokens are dropped) until every row has ended or the
  largest budget is reached: rows of a batch never interact, so a request's samples do not
  depend on the budgets of the others.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import torch

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
    from transformers import InternVLForConditionalGeneration

    from megatron_r1v.models.r1v.presets import R1VArch


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` on a mask: where ``seen_BV``, a
    negative logit times ``penalty``, another one divided by it (the same ``where`` as
    transformers, so the same floats); elsewhere the logit unchanged."""
    penalized_BV = torch.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return torch.where(seen_BV, penalized_BV, logits_BV)


class RowDraws:
    """Where a decode step's random tokens come from (module docstring): one generator per sample
    (``row_seeds``: each row draws only while it is live) or, without them, one generator for the
    call (``call_seed``: one ``torch.multinomial`` over every row, ended ones too)."""

    def __init__(self, device: torch.device, call_seed: int, row_seeds: Optional[Sequence[int]] = None) -> None:
        if row_seeds is None:
            self.call: Optional[torch.Generator] = torch.Generator(device=device).manual_seed(call_seed)
            self.rows: list[torch.Generator] = []
        else:
            self.call, self.rows = None, [torch.Generator(device=device).manual_seed(s) for s in row_seeds]

    def tokens(self, probs_BV: torch.Tensor, live: Sequence[bool], pad_id: int) -> torch.Tensor:
        """One token per row of ``probs_BV``; rows not ``live`` (ended: their tokens are dropped)
        get ``pad_id`` when rows draw on their own."""
        if self.call is not None:
            return torch.multinomial(probs_BV, 1, generator=self.call).squeeze(-1)
        # multinomial's one-sample rule, argmax(p / q) with q ~ Exp(1) from the row's generator:
        # the same draws as multinomial on that row alone, then one division and argmax for all.
        noise_BV = torch.ones_like(probs_BV)
        for b, gen in enumerate(self.rows):
            if live[b]:
                noise_BV[b].exponential_(1.0, generator=gen)
        tokens_B = (probs_BV / noise_BV).argmax(dim=-1)
        return torch.where(torch.tensor(list(live), device=tokens_B.device), tokens_B, pad_id)


class HFRolloutEngine:
    """A :class:`~megatron_r1v.rollout.engine.RolloutEngine` on a transformers InternVL model.

    ``tokenizer``: anything with ``decode(ids, skip_special_tokens=False)``; without one,
    ``RolloutSample.text`` is ``""``. ``ban_image_token``: never sample the image token
    (see the module docstring).
    """

    def __init__(
        self,
        model: "InternVLForConditionalGeneration",
        tokenizer: Any = None,
        device: Union[str, torch.device, None] = None,
        *,
        ban_image_token: bool = True,
    ) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.ban_image_token = ban_image_token
        self.image_token_id = int(model.config.image_token_id)
        self.tokens_per_tile = int(model.config.image_seq_length)
        # Left padding needs some id that is not the image token (the model counts those).
        self.pad_id = 1 if self.image_token_id == 0 else 0
        self._params: dict[str, torch.nn.Parameter] = dict(model.named_parameters())
        self.released = False
        # transformers renamed the KV-cache argument and output field from past_key_values to
        # cache (5.x; the old name warns on every call): use what this version's forward takes.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_arch(
        cls,
        arch: "R1VArch",
        *,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        seed: int = 0,
        tokenizer: Any = None,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "eager",
    ) -> "HFRolloutEngine":
        """An engine for ``arch``: random weights from ``seed`` (the global RNG is saved and
        restored), or ``state_dict`` under the in-memory transformers names, which must
        cover every weight."""
        import transformers

        from megatron_r1v.models.r1v.hf_config import transformers_internvl_config

        config = transformers.InternVLConfig(**transformers_internvl_config(arch))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.InternVLForConditionalGeneration._from_config(
                config, attn_implementation=attn_implementation
            )
        engine = cls(model.to(dtype), tokenizer, device)
        if state_dict is not None:
            missing = sorted(set(engine._params) - set(state_dict))
            if missing:
                raise KeyError(f"state_dict lacks {len(missing)} engine weights, e.g. {missing[:3]}")
            engine.update_weights(state_dict.items())
        return engine

    # --- weights ---------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies tensors into the parameters of the same name (cast to the engine's dtype
        and device). The whole batch is checked before anything is copied."""
        items = list(named_tensors)
        for name, tensor in items:
            param = self._params.get(name)
            if param is None:
                raise KeyError(f"engine has no weight {name!r} (expected transformers' in-memory InternVL names)")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"weight {name!r}: got shape {tuple(tensor.shape)}, the engine holds {tuple(param.shape)}"
                )
        with torch.no_grad():
            for name, tensor in items:
                self._params[name].copy_(tensor, non_blocking=False)

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        return ((name, p.detach()) for name, p in self._params.items())

    # --- memory ----------------------------------------------------------------------

    def release_memory(self) -> None:
        """On CUDA: weights and buffers move to pinned host memory and the allocator cache
        is emptied (the KV cache only lives inside ``generate``). On CPU: nothing to free;
        the state is tracked so that ``generate`` refuses to run while released.
        ``update_weights`` works in both states."""
        if self.released:
            return
        if self.device.type == "cuda":
            for t in self._tensors():
                t.data = t.data.to("cpu").pin_memory()
            torch.cuda.empty_cache()
        self.released = True

    def resume_memory(self) -> None:
        if not self.released:
            return
        if self.device.type == "cuda":
            for t in self._tensors():
                t.data = t.data.to(self.device, non_blocking=True)
            torch.cuda.synchronize(self.device)
        self.released = False

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]

    # --- generation ------------------------------------------------------------------

    def _sample(
        self, logits_BV: torch.Tensor, params: SamplingParams, draws: Optional[RowDraws],
        live: Sequence[bool] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws one token per row from ``draws`` (None: greedy), only for the ``live`` rows where
        rows draw on their own; returns (tokens [B], policy log-probs [B])."""
        # Greedy decoding reports the untempered policy: temperature 0 has no distribution.
        scaled_BV = logits_BV.float() / (1.0 if params.greedy else params.temperature)
        logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
        masked_BV = scaled_BV.clone()
        if self.ban_image_token and self.image_token_id < masked_BV.shape[-1]:
            masked_BV[:, self.image_token_id] = float("-inf")
        if params.greedy:
            # argmax takes the first of tied maxima, so the choice never depends on the seed.
            tokens_B = masked_BV.argmax(dim=-1)
            return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
        if params.top_p < 1.0:
            # Nucleus: the most likely tokens until their mass reaches top_p; a token is
            # kept when the mass strictly before it is below top_p (the top one always).
            probs_BV = torch.softmax(masked_BV, dim=-1)
            sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
            before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
            drop_BV = torch.zeros_like(masked_BV, dtype=torch.bool).scatter(-1, order_BV, before_BV >= params.top_p)
            masked_BV = masked_BV.masked_fill(drop_BV, float("-inf"))
        tokens_B = draws.tokens(torch.softmax(masked_BV, dim=-1), live, self.pad_id)
        return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)

    @torch.no_grad()
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[list[RolloutSample]]:
        if self.released:
            raise RuntimeError("generate() after release_memory(): call resume_memory() first")
        if not requests:
            return []
        for req in requests:
            validate_request(req, self.image_token_id, self.tokens_per_tile)
        logits_NV, cache, mask_NL, next_pos_N = self._prefill(requests, params.n)
        budget_N = torch.tensor([token_budget(r, params) for r in requests], device=self.device)
        # Row r of the sampling batch is sample r % n of request r // n (_prefill).
        seeds_N = None
        if any(req.stream is not None for req in requests):
            seeds_N = [sample_seed(params.seed, sampling_stream(req, i), k) for i, req in enumerate(requests)
                       for k in range(params.n)]
        tokens_NR, logprobs_NR, length_N, done_N = self._decode(logits_NV, cache, mask_NL, next_pos_N, params,
                                                                budget_N.repeat_interleave(params.n), seeds_N)
        results: list[list[RolloutSample]] = []
        for i, req in enumerate(requests):
            group = []
            for r in range(i * params.n, (i + 1) * params.n):
                length = int(length_N[r])
                ids = tokens_NR[r, :length].clone()
                text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=False) if self.tokenizer else ""
                group.append(RolloutSample(req.prompt_id, ids, logprobs_NR[r, :length].clone(), bool(done_N[r]), text))
            results.append(group)
        return results

    def _prefill(self, requests: Sequence[RolloutRequest], n: int):
        """The prompts, left-padded into one batch, through the model once; returns the next-token
        logits, the KV cache, the attention mask and the next positions, each repeated for the n
        samples (row r of the sampling batch is sample r % n of request r // n)."""
        dev = self.device
        lengths = [int(r.prompt_ids.numel()) for r in requests]
        width = max(lengths)
        ids_BL = torch.full((len(requests), width), self.pad_id, dtype=torch.long, device=dev)
        mask_BL = torch.zeros((len(requests), width), dtype=torch.long, device=dev)
        for i, (req, length) in enumerate(zip(requests, lengths)):
            ids_BL[i, width - length:] = req.prompt_ids.to(dev, torch.long)
            mask_BL[i, width - length:] = 1
        # Tiles in the order their tokens appear, request by request (the model scatters batch-major).
        tiles = [r.pixel_values for r in requests if r.pixel_values is not None and r.pixel_values.shape[0]]
        pixel_values = torch.cat(tiles).to(dev, self.model.dtype) if tiles else None
        out = self.model(
            input_ids=ids_BL, pixel_values=pixel_values, attention_mask=mask_BL,
            position_ids=(mask_BL.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1,
        )
        cache = getattr(out, self._cache_arg)
        cache.batch_repeat_interleave(n)
        return (out.logits[:, -1].repeat_interleave(n, dim=0), cache, mask_BL.repeat_interleave(n, dim=0),
                torch.tensor(lengths, device=dev).repeat_interleave(n))

    def _decode(self, logits_NV, cache, mask_NL, next_pos_N, params: SamplingParams, budget_N: torch.Tensor,
                seeds_N: Optional[Sequence[int]]):
        """Samples up to ``budget_N[r]`` tokens for row r, drawing from a generator seeded
        ``seeds_N[r]`` (None: one for the call, :class:`RowDraws`); a row ends after a stop token
        or at its budget. Returns (tokens [N, R], their log-probs [N, R], each row's length [N],
        whether a stop token ended it [N]), on the CPU, R being the largest budget or less."""
        dev, rows = self.device, logits_NV.shape[0]
        draws = None if params.greedy else RowDraws(dev, params.seed, seeds_N)
        stops = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=dev)
        tokens, logprobs = [], []
        length_N = budget_N.clone()  # rows that never stop are cut at their budget
        done_N = torch.zeros(rows, dtype=torch.bool, device=dev)
        # Penalty 1.0 (training): no mask, not a single extra operation per step. Otherwise the
        # mask starts empty: only generated ids are penalized, never the prompt's.
        seen_NV = None if params.repetition_penalty == 1.0 else torch.zeros_like(logits_NV, dtype=torch.bool)
        row_N = torch.arange(rows, device=dev)
        for step in range(int(budget_N.max())):
            if seen_NV is not None:
                # fp32 first, as _sample and transformers' generate do, so the penalized floats match theirs.
                logits_NV = apply_repetition_penalty(logits_NV.float(), seen_NV, params.repetition_penalty)
            # A row with its own stream draws only until it ends: its draws follow its own tokens alone.
            live = (~done_N & (step < budget_N)).tolist() if draws is not None and draws.rows else ()
            tok_N, lp_N = self._sample(logits_NV, params, draws, live)
            if seen_NV is not None:
                seen_NV[row_N, tok_N] = True  # rows that ended too: their tokens are dropped anyway
            tokens.append(tok_N)
            logprobs.append(lp_N)
            # A stop token counts only within the row's budget (past it the row was cut).
            ends_N = torch.isin(tok_N, stops) & ~done_N & (step < budget_N)
            length_N[ends_N] = step + 1
            done_N |= ends_N
            if not bool((~done_N & (step + 1 < budget_N)).any()):
                break
            mask_NL = torch.cat([mask_NL, mask_NL.new_ones((rows, 1))], dim=1)
            out = self.model(
                input_ids=tok_N[:, None], attention_mask=mask_NL, position_ids=next_pos_N[:, None],
                use_cache=True, **{self._cache_arg: cache},
            )
            cache = getattr(out, self._cache_arg)
            logits_NV = out.logits[:, -1]
            next_pos_N = next_pos_N + 1
        del cache
        return torch.stack(tokens, 1).cpu(), torch.stack(logprobs, 1).cpu(), length_N.cpu(), done_N.cpu()


def _skywork_image_token_id(model_dir: Union[str, "os.PathLike"], config: dict, tokenizer: Any,
                            tokenizer_dir: Union[str, "os.PathLike"]) -> int:
    """The <IMG_CONTEXT> id of a skywork checkpoint: the tokenizer's (InternVL-chat reads it
    from there at run time), which must agree with config.json's when that names one."""
    from megatron_r1v.data.tokenizer import IMG_CONTEXT

    token_id = tokenizer.get_vocab().get(IMG_CONTEXT)
    if token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no {IMG_CONTEXT} token; a skywork-layout checkpoint "
                         "takes its image token id from the tokenizer")
    in_config = config.get("img_context_token_id")
    if in_config is not None and int(in_config) != token_id:
        raise ValueError(f"{os.path.join(model_dir, 'config.json')}: img_context_token_id={in_config} but tokenizer "
                         f"{tokenizer_dir} has {IMG_CONTEXT} at id {token_id}")
    return int(token_id)


def load_hf_engine(model_dir: Union[str, "os.PathLike"], tokenizer_dir: Union[str, "os.PathLike", None] = None,
                   device: Union[str, torch.device] = "cpu") -> tuple[HFRolloutEngine, "R1VArch", Any]:
    """(engine, architecture, tokenizer) from an InternVL checkpoint folder, fp32.

    Layouts (told apart by ``layouts.detect_layout``): transformers (``save_pretrained``
    output), loaded by transformers itself; or the released skywork / InternVL-chat one,
    whose tensors are read lazily one tensor map at a time and converted in memory to
    transformers' names (``layouts.convert_layout``) after validating every name and
    shape. The tokenizer comes from ``tokenizer_dir``, else ``model_dir``; for skywork
    checkpoints it also gives the <IMG_CONTEXT> id. Raises FileNotFoundError for a
    missing folder or config.json, ValueError (CheckpointError) for anything that does
    not fit.
    """
    import json

    import transformers

    from megatron_r1v.checkpoint.hf_io import HFCheckpointReader
    from megatron_r1v.checkpoint.hf_layouts import convert_layout, detect_layout, validate_hf
    from megatron_r1v.data.tokenizer import check_tokenizer_fits, load_tokenizer
    from megatron_r1v.models.r1v.hf_config import arch_from_skywork_config, arch_from_transformers_config
    from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: --model must be an InternVL checkpoint folder in the "
                                "transformers or the skywork (released R1V2) layout")
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    tokenizer_from = tokenizer_dir or model_dir
    with HFCheckpointReader(model_dir) as reader:
        layout = detect_layout(config, reader.names())
        if layout == "qwen2":
            raise ValueError(f"{config_path}: a decoder-only Qwen2 checkpoint has no vision tower; the rollout "
                             "engine needs an InternVL (R1V) checkpoint")
        tokenizer = load_tokenizer(tokenizer_from)
        if layout == "skywork":
            image_token_id = _skywork_image_token_id(model_dir, config, tokenizer, tokenizer_from)
            try:
                arch = arch_from_skywork_config(config, image_token_id)
            except ValueError as err:
                raise ValueError(f"{config_path}: {err}") from None
            if arch.adapter is not None and arch.adapter.ps_version != "v2":
                raise ValueError(f"{config_path}: ps_version={arch.adapter.ps_version!r}; transformers' InternVL, "
                                 "which the rollout engine runs, only has the v2 pixel-shuffle order")
            validate_hf(reader, arch, SKYWORK_LAYOUT)
            state = dict(convert_layout(reader.read, arch, SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT))
            engine = HFRolloutEngine.from_arch(arch, state_dict=state, tokenizer=tokenizer, device=device)
            del state
        else:
            model = transformers.InternVLForConditionalGeneration.from_pretrained(str(model_dir),
                                                                                  attn_implementation="eager")
            arch = arch_from_transformers_config(model.config.to_dict())
            engine = HFRolloutEngine(model.float().eval(), tokenizer, device)
    check_tokenizer_fits(tokenizer, arch.decoder.vocab_size, arch.image_token_id, f"tokenizer {tokenizer_from}",
                         f"the model at {model_dir}", require_image_token=False)
    return engine, arch, tokenizer
