"""The GRPO stage of R1V2 (report section 3.3): one optimizer step per :meth:`GRPOTrainer.step`.

    prompts (data.loader) -> rollout on each replica's engine -> hybrid reward (Eq. 7)
    -> advantages (Eq. 6) -> SSB top-up -> pack -> old log-probs (+ entropy) and, with
    kl_beta, reference log-probs -> Eq. 8 forward/backward through Megatron's schedules
    -> optimizer step -> weight sync into the engine -> fresh groups into the SSB

Each data-parallel replica rolls out its own share of the prompts on the engine held by
its first TP rank of the first pipeline stage (``WeightSync(every_dp_replica=True)``);
the responses and rewards are broadcast to the rest of the replica. The reference
policy is the initial value of the trainable parameters, swapped in for its pass: with
the report's adapter-only training that is the initial adapter, never a second model.
Old log-probs of fresh groups come from the trainer's model before the update; reused
SSB groups keep theirs. The engine's own log-probs of the sampled tokens measure how far
its numerics are from the trainer's (``rollout/logprob_abs_diff``, every step) and, with
``rollout.tis_cap``, weight each fresh token's term by the truncated importance ratio
(``losses.grpo.truncated_is_weights``).

Colocated engines: the engine's memory is released after each rollout (the optimizer
step needs it) and resumed before the next; weight sync streams into it in between, in
the layout it loads (``engine.hf_layout``: transformers names for the HF engine, the
released InternVL-chat names for SGLang).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_r1v.config import RunConfig
from megatron_r1v.data.loader import PromptLoader
from megatron_r1v.data.packing import PackedMicroBatch, pack_samples
from megatron_r1v.data.template import IGNORE_INDEX, EncodedSample
from megatron_r1v.losses.grpo import GRPOLossConfig, group_advantages, token_weights, truncated_is_weights
from megatron_r1v.platform import ParallelContext
from megatron_r1v.rewards.hybrid import HybridReward
from megatron_r1v.rollout.engine import RolloutEngine, RolloutRequest, SamplingParams
from megatron_r1v.rollout.weight_sync import WeightSync
from megatron_r1v.ssb import SelectiveSampleBuffer, SSBGroup, plan_batch
from megatron_r1v.ssb import load as load_ssb
from megatron_r1v.ssb import save as save_ssb
from megatron_r1v.trainer.grpo_step import compute_logprobs, grpo_forward_backward, make_grpo_microbatch
from megatron_r1v.trainer.setup import ModelStage

TAGS = (
    "train/reward_mean", "train/accuracy", "train/format_reward", "train/rm_reward", "train/grpo_loss", "train/kl",
    "train/clip_fraction", "train/entropy", "train/response_length", "ssb/effective_ratio_fresh",
    "ssb/effective_ratio_batch", "ssb/size", "ssb/reused_samples", "perf/step_time_s", "perf/rollout_time_s",
    "perf/train_time_s", "perf/weight_sync_time_s", "rollout/logprob_abs_diff",
)
# Logged only with rollout.tis_cap: mean TIS weight and share of weights cut at the cap.
TIS_TAGS = ("rollout/tis_weight_mean", "rollout/tis_truncated_fraction")


def broadcast_to_replica(obj, ctx: ParallelContext):
    """``obj`` from the replica's first TP rank of the first stage to all of its ranks."""
    holder = [obj]
    if ctx.pp > 1:  # first along the pipeline (the tp_rank-0 chain carries the object) ...
        dist.broadcast_object_list(holder, src=dist.get_global_rank(ctx.pp_group, 0), group=ctx.pp_group)
    if ctx.tp > 1:  # ... then to each stage's TP peers
        dist.broadcast_object_list(holder, src=dist.get_global_rank(ctx.tp_group, 0), group=ctx.tp_group)
    return holder[0]


def _sum_over(values: list[float], group: Optional[dist.ProcessGroup]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


@dataclass
class _Sample:
    encoded: EncodedSample
    pixels: Optional[torch.Tensor]
    advantage: float
    old_logprobs: Optional[np.ndarray] = None  # [R] for reused groups; None: recompute
    engine_logprobs: Optional[np.ndarray] = None  # [R] for fresh responses: the engine's


@dataclass
class _Row:
    """One packed micro-batch with its per-position vectors ``[L]`` (aligned with the labels)."""

    packed: PackedMicroBatch
    advantages: torch.Tensor
    weights: torch.Tensor
    stored_logprobs: torch.Tensor
    has_stored: torch.Tensor
    """bool: reused SSB responses, whose old log-probs are ``stored_logprobs``."""
    engine_logprobs: torch.Tensor
    has_engine: torch.Tensor
    """bool: fresh responses' tokens, whose engine log-probs are ``engine_logprobs``."""


@dataclass
class GRPOTrainer:
    cfg: RunConfig
    ctx: ParallelContext
    stage: ModelStage
    ddp: torch.nn.Module
    optimizer: object
    loader: PromptLoader
    reward: HybridReward
    buffer: SelectiveSampleBuffer
    sync: WeightSync
    engine: Optional[RolloutEngine]
    """Set on each replica's owner rank only."""
    stop_token_ids: tuple[int, ...] = ()
    initial_trainable: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        g = self.cfg.grpo
        self.loss_cfg = GRPOLossConfig(clip_low=g.clip_low, clip_high=g.clip_high, kl_beta=g.kl_beta,
                                       temperature=self.cfg.rollout.temperature, normalization=g.normalization)
        if g.kl_beta and not self.initial_trainable:
            # The reference policy: the trainable parameters as they start (module docstring).
            self.initial_trainable = {n: p.detach().clone() for n, p in self.stage.model.named_parameters()
                                      if p.requires_grad}

    # -- rollout -------------------------------------------------------------------------
    def _rollout(self, items, step: int) -> list[dict]:
        payload = None
        if self.ctx.device.type == "cuda":
            # Colocated engines run on the GPUs of their TP group: every rank hands its cached
            # activation memory back to the driver before the owner resumes the engine.
            torch.cuda.empty_cache()
            dist.barrier(group=self.ctx.tp_group)
        if self.engine is not None:
            r = self.cfg.rollout
            params = SamplingParams(n=r.n_samples, temperature=r.temperature, top_p=r.top_p,
                                    max_new_tokens=r.max_new_tokens, seed=self.cfg.train.seed * 100003 + step,
                                    stop_token_ids=self.stop_token_ids)
            self.engine.resume_memory()
            groups = self.engine.generate([RolloutRequest(i.record.id, i.prompt_ids, i.pixel_values) for i in items],
                                          params)
            self.engine.release_memory()  # colocated: the GPUs go back to training until the next rollout
            payload = []
            for item, group in zip(items, groups):
                scores = self.reward.score_batch([item.record] * len(group), [s.text for s in group])
                payload.append({"responses": [s.response_ids.tolist() for s in group],
                                "engine_logprobs": [s.logprobs.float().tolist() for s in group],
                                "total": [s.total for s in scores], "rule": [s.rule for s in scores],
                                "format": [s.format for s in scores], "model": [s.model for s in scores]})
        return broadcast_to_replica(payload, self.ctx)

    # -- batch assembly --------------------------------------------------------------------
    @staticmethod
    def _encode(sample_id: str, token_ids: torch.Tensor, prompt_len: int, loss_mask: Optional[np.ndarray],
                tiles: tuple[int, ...]) -> EncodedSample:
        labels = torch.full_like(token_ids, IGNORE_INDEX)
        labels[prompt_len - 1:-1] = token_ids[prompt_len:]
        if loss_mask is not None:
            labels[prompt_len - 1:-1][~torch.from_numpy(loss_mask.astype(bool))] = IGNORE_INDEX
        return EncodedSample(sample_id, token_ids, labels, prompt_len, tiles, 0)

    def _samples(self, items, payload, advantages, plan) -> list[_Sample]:
        samples = []
        for i in plan.keep_fresh:
            item = items[i]
            for j, response in enumerate(payload[i]["responses"]):
                ids = torch.cat([item.prompt_ids, torch.tensor(response, dtype=torch.long)])
                enc = self._encode(f"{item.record.id}#{j}", ids, len(item.prompt_ids), None, item.tiles_per_image)
                samples.append(_Sample(enc, item.pixel_values, float(advantages[i][j]),
                                       engine_logprobs=np.asarray(payload[i]["engine_logprobs"][j], np.float32)))
        for grp in plan.reused:
            item = self.loader.prepare(self.loader.record(grp.prompt_id))
            if item is None and grp.image_paths:
                continue  # its images went bad since (on_bad_sample=skip has logged it)
            for j, tokens in enumerate(grp.token_ids):
                ids = torch.from_numpy(tokens.astype(np.int64))
                prompt_len = len(tokens) - len(grp.loss_mask[j])
                enc = self._encode(f"{grp.prompt_id}@{grp.step}#{j}", ids, prompt_len, grp.loss_mask[j],
                                   item.tiles_per_image if item else ())
                samples.append(_Sample(enc, item.pixel_values if item else None, float(grp.advantages[j]),
                                       grp.old_logprobs[j]))
        return samples

    def _microbatches(self, samples: list[_Sample], weights_per_sample: list[float]) -> list[_Row]:
        budget = self.cfg.grpo.micro_batch_tokens
        pad_to = budget if self.ctx.pp > 1 else 1  # pipelines need one shape for every micro-batch
        packed = pack_samples([s.encoded for s in samples], [s.pixels for s in samples], budget,
                              pad_id=0, pad_to_multiple=pad_to)

        def response_vector(s: _Sample, values: Optional[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
            """(values placed at the response's label positions, where they are)."""
            length, p = len(s.encoded), s.encoded.prompt_len
            out, present = torch.zeros(length), torch.zeros(length)
            if values is not None:
                out[p - 1: length - 1] = torch.from_numpy(values.astype(np.float32))
                present[p - 1: length - 1] = 1.0
            return out, present

        rows = []
        for mb in packed:
            columns: list[list[torch.Tensor]] = [[] for _ in range(6)]
            for idx in mb.sample_indices:
                s = samples[idx]
                targets = s.encoded.labels != IGNORE_INDEX
                vectors = (torch.where(targets, s.advantage, 0.0), torch.where(targets, weights_per_sample[idx], 0.0),
                           *response_vector(s, s.old_logprobs), *response_vector(s, s.engine_logprobs))
                for column, vector in zip(columns, vectors):
                    column.append(vector)
            pad = mb.input_ids.shape[1] - sum(len(samples[i].encoded) for i in mb.sample_indices)
            adv, w, stored, has_stored, engine, has_engine = (torch.cat(c + [torch.zeros(pad)]) for c in columns)
            rows.append(_Row(mb, adv, w, stored, has_stored > 0, engine, (has_engine > 0) & (w > 0)))
        return rows

    @contextmanager
    def _reference_weights(self) -> Iterator[None]:
        params = dict(self.stage.model.named_parameters())
        current = {n: params[n].detach().clone() for n in self.initial_trainable}
        with torch.no_grad():
            for n, value in self.initial_trainable.items():
                params[n].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in current.items():
                    params[n].copy_(value)

    # -- the step --------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        ctx, t_start = self.ctx, time.perf_counter()
        items = self.loader.next_batch(self.cfg.grpo.prompts_per_step)
        payload = self._rollout(items, step)
        rollout_s = time.perf_counter() - t_start

        t_train = time.perf_counter()
        advantages = [group_advantages(torch.tensor([p["total"]], dtype=torch.float64))[0].numpy() for p in payload]
        plan = plan_batch(self.buffer, advantages, step, ctx.dp_group)
        samples = self._samples(items, payload, advantages, plan)
        lengths = [max(int((s.encoded.labels != IGNORE_INDEX).sum()), 1) for s in samples]
        n_seq, n_tok = _sum_over([len(samples), sum(lengths)], ctx.dp_group)
        weights = token_weights(torch.tensor(lengths), self.loss_cfg.normalization, int(n_seq), int(n_tok)).tolist()
        rows = self._microbatches(samples, weights)

        # Old log-probs (and entropy for monitoring) from the policy before this update.
        plain = [make_grpo_microbatch(row.packed) for row in rows]
        logprobs = compute_logprobs(self.ddp, plain, ctx, self.loss_cfg.temperature, want_entropy=True)
        refs = [None] * len(rows)
        if self.loss_cfg.kl_beta:
            with self._reference_weights():
                ref_logprobs = compute_logprobs(self.ddp, plain, ctx, self.loss_cfg.temperature)
            if ctx.is_last_stage:  # other stages get no log-probs (and need none)
                refs = [lp for lp, _ in ref_logprobs]
        microbatches, monitor = [], _Monitor()
        for k, row in enumerate(rows):
            old, weights_L = None, row.weights
            if ctx.is_last_stage:
                lp, entropy = logprobs[k]
                old = torch.where(row.has_stored, row.stored_logprobs, lp)
                weights_L = self._engine_correction(row, lp, monitor)
                monitor.entropy_sum += float(entropy.sum())
                monitor.entropy_tokens += float(row.packed.loss_mask.sum())
            microbatches.append(make_grpo_microbatch(row.packed, old, refs[k], row.advantages, weights_L))
        for epoch in range(self.cfg.grpo.ppo_epochs):
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            epoch_result = grpo_forward_backward(self.ddp, microbatches, ctx, self.loss_cfg)
            result = epoch_result if epoch == 0 else result  # metrics describe the on-policy pass
            update_ok, grad_norm, _ = self.optimizer.step()
            if not update_ok:
                raise FloatingPointError(f"step {step}, PPO epoch {epoch}: optimizer step skipped "
                                         "(non-finite gradients)")
        train_s = time.perf_counter() - t_train

        t_sync = time.perf_counter()
        self.sync.sync(self.engine)
        sync_s = time.perf_counter() - t_sync

        self.buffer.insert(self._fresh_groups(items, payload, advantages, logprobs, rows, step))
        return self._metrics(payload, result, plan, monitor, grad_norm,
                             time.perf_counter() - t_start, rollout_s, train_s, sync_s)

    def _engine_correction(self, row: _Row, trainer_lp: torch.Tensor, monitor: "_Monitor") -> torch.Tensor:
        """Records |trainer - engine| log-prob gaps of the fresh tokens and returns the row's
        loss weights, times the truncated importance ratio with ``rollout.tis_cap``."""
        fresh = row.has_engine
        monitor.gap_sum += float((trainer_lp - row.engine_logprobs).abs()[fresh].sum())
        monitor.gap_tokens += float(fresh.sum())
        cap = self.cfg.rollout.tis_cap
        if cap is None:
            return row.weights
        tis = torch.where(fresh, truncated_is_weights(trainer_lp, row.engine_logprobs, cap), 1.0)
        monitor.tis_sum += float(tis[fresh].sum())
        monitor.tis_truncated += float((trainer_lp - row.engine_logprobs)[fresh].ge(math.log(cap)).sum())
        return row.weights * tis

    # -- checkpoint hooks (trainer/checkpoint.py) ------------------------------------------
    def rank_state(self) -> dict:
        return {"reference": self.initial_trainable}

    def load_rank_state(self, state: dict) -> None:
        self.initial_trainable = state["reference"]

    def save_files(self, directory: Path, step: int) -> None:
        if self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0:  # replicated over a replica's TP/PP ranks
            save_ssb(self.buffer, directory / "ssb", step, self.ctx.dp_group)

    def load_files(self, directory: Path) -> None:
        self.buffer = load_ssb(directory / "ssb", self.ctx.dp_rank, self.ctx.dp, self.buffer.config)
        # The engine restarts from the restored weights: a full sync, not trainable-only.
        self.sync.sync(self.engine, full=True)

    def _fresh_groups(self, items, payload, advantages, logprobs, rows: list[_Row], step: int) -> list[SSBGroup]:
        # Behaviour log-probs of fresh responses by sample id, read back from the packed rows.
        old_by_id: dict[str, np.ndarray] = {}
        if self.ctx.is_last_stage:
            for row, (lp, _) in zip(rows, logprobs):
                bounds = row.packed.cu_seqlens.tolist()
                for pos, sid in enumerate(row.packed.sample_ids):
                    old_by_id[sid] = lp[bounds[pos]:bounds[pos + 1]].numpy()
        groups = []
        for i, item in enumerate(items):
            responses = payload[i]["responses"]
            p = len(item.prompt_ids)
            tokens = [np.concatenate([item.prompt_ids.numpy(), np.asarray(r, dtype=np.int64)]) for r in responses]
            old = [old_by_id.get(f"{item.record.id}#{j}", np.zeros(p + len(r)))[p - 1: p + len(r) - 1]
                   .astype(np.float32) for j, r in enumerate(responses)]
            groups.append(SSBGroup(
                prompt_id=item.record.id, step=step, token_ids=tokens,
                loss_mask=[np.ones(len(r), dtype=bool) for r in responses], old_logprobs=old,
                advantages=advantages[i].astype(np.float32),
                rewards={k: np.asarray(payload[i][k], dtype=np.float64) for k in ("total", "rule", "format", "model")},
                image_paths=tuple(str(x) for x in item.record.images)))
        return groups

    def _metrics(self, payload, result, plan, monitor: "_Monitor", grad_norm, step_s, rollout_s, train_s,
                 sync_s) -> dict[str, float]:
        ctx = self.ctx
        totals = [sum(sum(p[k]) for p in payload) for k in ("total", "rule", "format", "model")]
        n = sum(len(p["total"]) for p in payload)
        length = sum(len(r) for p in payload for r in p["responses"])
        # Rewards are the same on every rank of a replica and the entropy on every TP rank
        # of the last stage: one rank of each contributes, then one sum over the world.
        owner = ctx.tp_rank == 0 and ctx.is_first_stage
        last = ctx.tp_rank == 0 and ctx.is_last_stage
        sums = _sum_over([v if owner else 0.0 for v in totals + [n, length]]
                         + [v if last else 0.0 for v in monitor.values()], dist.group.WORLD)
        ent, gap, tis = sums[6:8], sums[8:10], sums[10:12]
        count = max(sums[4], 1.0)
        metrics = {
            "train/reward_mean": sums[0] / count, "train/accuracy": sums[1] / count,
            "train/format_reward": sums[2] / count, "train/rm_reward": sums[3] / count,
            "train/grpo_loss": result.loss, "train/kl": result.kl or 0.0, "train/clip_fraction": result.clip_fraction,
            "train/entropy": ent[0] / max(ent[1], 1.0), "train/response_length": sums[5] / count,
            "train/grad_norm": float(grad_norm or 0.0),
            "perf/step_time_s": step_s, "perf/rollout_time_s": rollout_s, "perf/train_time_s": train_s,
            "perf/weight_sync_time_s": sync_s, "rollout/logprob_abs_diff": gap[0] / max(gap[1], 1.0),
        }
        if self.cfg.rollout.tis_cap is not None:
            metrics["rollout/tis_weight_mean"] = tis[0] / max(gap[1], 1.0)
            metrics["rollout/tis_truncated_fraction"] = tis[1] / max(gap[1], 1.0)
        metrics.update(plan.stats.metrics())
        return metrics


@dataclass
class _Monitor:
    """Per-rank sums behind the step's monitoring metrics (summed over ranks in ``_metrics``)."""

    entropy_sum: float = 0.0
    entropy_tokens: float = 0.0
    gap_sum: float = 0.0
    """sum over fresh response tokens of |trainer log-prob - engine log-prob|."""
    gap_tokens: float = 0.0
    tis_sum: float = 0.0
    tis_truncated: float = 0.0

    def values(self) -> list[float]:
        return [self.entropy_sum, self.entropy_tokens, self.gap_sum, self.gap_tokens, self.tis_sum,
                self.tis_truncated]
