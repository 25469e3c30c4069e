"""The GRPO stage of R1V2 (report section 3.3): one optimizer step per :meth:`GRPOTrainer.step`.

    prompts (data.loader) -> rollout on each replica's engine -> hybrid reward (Eq. 7)
    -> advantages (Eq. 6; zero for groups under ssb.min_reward_std) -> SSB top-up -> pack
    -> old log-probs (+ entropy) and, with kl_beta, reference log-probs -> Eq. 8
    forward/backward through Megatron's schedules
    -> optimizer step -> weight sync into the engine -> fresh groups into the SSB

Two switches change the first half. ``grpo.dynamic_sampling`` (DAPO): rollout rounds of
``prompts_per_step`` prompts repeat, dropping ineffective groups, until ``prompts_per_step``
effective groups are collected over DP or ``dynamic_sampling_max_rounds`` were run
(:meth:`GRPOTrainer._dynamic_sampling`; the SSB top-up is off). ``grpo.kl_placement reward``
(verl's use_kl_in_reward): before the advantages, a forward pass of the policy and of the
reference over the fresh responses gives each one's beta sum_t KL_t (last pipeline stage,
broadcast to the replica), subtracted from its reward (:meth:`GRPOTrainer._kl_reward_pass`,
``losses/kl_reward.py``); the loss then has no KL term.

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

``rollout.mode async`` (``trainer/grpo_async.py``) overlaps the two halves: step k trains
on responses generated while step k-1 trained, by an engine in a process of its own, from
the weights one step back; the weight sync moves to between taking a rollout and starting
the next (:meth:`GRPOTrainer._hand_over`), and the TIS weight is always on (the engine's
log-probs are the behaviour policy's). ``perf/rollout_wait_s`` is how long the trainer
waited for its rollout, ``perf/overlap_s`` how much of the generation ran while it trained.

Colocated engines (sync mode): the engine's memory is released after each rollout (the optimizer
step needs it) and resumed before the next; weight sync streams into it in between, in
the layout it loads (``engine.hf_layout``: transformers names for the HF engine, the
released InternVL-chat names for SGLang).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron_r1v.config import RunConfig
from megatron_r1v.data.loader import PromptItem, PromptLoader
from megatron_r1v.losses.grpo import GRPOLossConfig, token_weights
from megatron_r1v.models.r1v.context_parallel import packing_multiple
from megatron_r1v.platform import ParallelContext
from megatron_r1v.rewards.hybrid import HybridReward
from megatron_r1v.rollout.engine import RolloutEngine, SamplingParams
from megatron_r1v.rollout.weight_sync import WeightSync
from megatron_r1v.ssb import SelectiveSampleBuffer, StoreOrigin, load_initial, plan_batch, resolve_min_reward_std
from megatron_r1v.ssb.buffer import all_gather_int64, group_is_effective
from megatron_r1v.ssb import load as load_ssb
from megatron_r1v.ssb import save as save_ssb
from megatron_r1v.trainer.failure import StepFailure, StepSnapshot, agree_on_failure, describe
from megatron_r1v.trainer.grpo_async import OneStepOffRollout, PendingRollout, rollout_requests
from megatron_r1v.trainer.grpo_batch import (
    DynamicSamplingStats,
    ScoredGroup,
    StepBatch,
    StepSums,
    attach_kl_penalties,
    dynamic_sampling_quota,
    engine_correction,
    fresh_samples,
    fresh_ssb_groups,
    pack_rows,
    per_sample,
    response_kl_sums,
    train_samples,
)
from megatron_r1v.trainer.grpo_comm import (
    PhaseTimer,
    RolloutFailed,
    broadcast_from_last_stage,
    broadcast_to_replica,
)
from megatron_r1v.trainer.grpo_metrics import step_metrics
from megatron_r1v.trainer.grpo_step import GRPOStepResult, grpo_forward_backward, make_grpo_microbatch
from megatron_r1v.trainer.schedule import compute_logprobs, optimizer_step
from megatron_r1v.trainer.setup import ModelStage


def loss_config(cfg: RunConfig) -> GRPOLossConfig:
    """The Eq. 8 loss settings of a run (``grpo.*`` and the rollout temperature); with
    ``grpo.kl_placement`` reward the KL is in the rewards, not the loss (beta 0 here)."""
    g = cfg.grpo
    return GRPOLossConfig(clip_low=g.clip_low, clip_high=g.clip_high,
                          kl_beta=g.kl_beta if g.kl_placement == "loss" else 0.0,
                          temperature=cfg.rollout.temperature, normalization=g.normalization,
                          kl_estimator=g.kl_estimator, clip_ratio_c=g.clip_ratio_c,
                          importance_level=g.importance_level)


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
        self.loss_cfg = loss_config(self.cfg)
        # Context parallelism pads every sample to a multiple of 2*cp (models/r1v/context_parallel.py).
        self.seq_multiple = packing_multiple(self.ctx.cp, self.ctx.tp, self.cfg.parallel.sequence_parallel)
        # Dr. GRPO's constant length normalizer (grpo.normalization constant): default the generation limit.
        self.length_constant = g.normalization_constant or self.cfg.rollout.max_new_tokens
        # The effective-group criterion, resolved once (ssb.policy.resolve_min_reward_std): the
        # threshold every step's Eq. 6 applies, so the SSB and its metrics see one criterion.
        self.min_reward_std = resolve_min_reward_std(self.cfg.ssb, self.cfg.reward, self.cfg.rollout.n_samples)
        if self.ctx.rank == 0:
            print(f"SSB effective groups: reward std >= {self.min_reward_std:.6g} "
                  f"(ssb.min_reward_std={self.cfg.ssb.min_reward_std})", flush=True)
        self._load_initial_store()
        # Async mode (trainer/grpo_async.py): the rollout in flight. In sync mode it only carries
        # the prompts of one a resumed async checkpoint held.
        self.one_step_off = OneStepOffRollout(self.ctx, self.loader, self.engine if self.is_async else None,
                                              g.prompts_per_step, self._sampling_params)
        self.engine_version = 0  # optimizer steps in the engine's weights (the build synced W_0)
        self.rollout_timing = (0.0, 0.0)  # this step's (perf/rollout_wait_s, perf/overlap_s), owner's
        if g.kl_beta and not self.initial_trainable:
            # The reference policy: the trainable parameters as they start (module docstring).
            self.initial_trainable = {n: p.detach().clone() for n, p in self.stage.model.named_parameters()
                                      if p.requires_grad}

    @property
    def is_async(self) -> bool:
        return self.cfg.rollout.mode == "async"

    def _load_initial_store(self) -> None:
        """Fills the buffer from ``ssb.initial_store`` (``SSBConfig.initial_store``): this DP rank's
        share of the store's groups (``ssb.persist.load_initial`` refuses a store that does not
        fit the run), admitted by the checks every buffered group passes: ``insert`` (effective,
        no duplicate, capacity), then this run's ``ssb.min_reward_std``. The groups are of step 0,
        so ``plan_batch``'s age-out treats them as the initial policy's rollouts. A resume
        replaces the whole buffer with the checkpoint's (:meth:`load_files`)."""
        path = self.cfg.ssb.initial_store
        if path is None:
            return
        r = self.cfg.rollout
        origin = StoreOrigin.of(self.loader.template, self.cfg.data.max_tiles, r.n_samples, r.temperature)
        groups = load_initial(path, self.ctx.dp_rank, self.ctx.dp, self.buffer.config, origin, self.ctx.dp_group)
        for grp in groups:  # a drawn group is prepared again from its record (grpo_batch.train_samples)
            try:
                self.loader.record(grp.prompt_id)
            except KeyError as err:
                raise ValueError(f"ssb.initial_store {path}: field prompt_id: {err.args[0]} "
                                 "(data.train_path)") from None
        inserted = self.buffer.insert(groups, self.ctx.dp_group)
        below = self.buffer.drop_ineffective(self.min_reward_std)
        counts = torch.tensor([len(self.buffer), len(groups) - len(self.buffer)], dtype=torch.int64,
                              device=self.ctx.device)
        if self.ctx.dp > 1:  # each DP rank holds its own share
            dist.all_reduce(counts, group=self.ctx.dp_group)
        if self.ctx.rank == 0:
            print(f"SSB: loaded {int(counts[0])} groups from ssb.initial_store {path} over {self.ctx.dp} DP rank(s) "
                  f"({int(counts[1])} not admitted; DP rank 0: {inserted.zero_advantage} ineffective, {below} below "
                  f"ssb.min_reward_std={self.min_reward_std:.6g}, {inserted.duplicates} duplicates, "
                  f"{inserted.evicted} over capacity); they count as step 0's", flush=True)

    # -- the step --------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        timer, sums = PhaseTimer(), StepSums()
        self.loader.take_data_seconds()  # from here on: this step's data (its prompts, reused SSB prompts)
        self.rollout_timing = (0.0, 0.0)
        with timer.phase("step"):
            with timer.phase("rollout"):
                items, positions, groups, sampling = self._rollout_phase(step)
            if self.is_async:  # the engine is idle: W_step into it, then step + 1's generation starts
                self._hand_over(step, timer)
            with timer.phase("train"):
                if self.cfg.grpo.kl_placement == "reward":
                    self._kl_reward_pass(items, groups)
                batch = self._assemble(items, positions, groups, step)
                microbatches, sample_logprobs = self._old_policy_pass(batch, sums)
                result, grad_norm = self._update(microbatches, step)
            if not self.is_async:
                with timer.phase("weight_sync"):
                    self.sync.sync(self.engine)
            self.buffer.insert(fresh_ssb_groups(items, groups, batch.advantages, batch.samples, sample_logprobs,
                                                step), self.ctx.dp_group)
        timer.seconds["data"] = self.loader.take_data_seconds()
        timer.seconds["rollout_wait"], timer.seconds["overlap"] = self.rollout_timing
        return step_metrics(self.cfg, self.ctx, groups, result, batch, sums, grad_norm, timer.seconds, sampling)

    def _rollout_phase(self, step: int) -> tuple[list[PromptItem], list[int], list[ScoredGroup],
                                                 Optional[DynamicSamplingStats]]:
        """This rank's prompts, their positions in the step's global order (the random stream of
        each prompt's samples, and the SSB's order of drops) and their scored groups: one rollout
        round, or with ``grpo.dynamic_sampling`` the effective groups of several (then with stats)."""
        if self.cfg.grpo.dynamic_sampling:
            return self._dynamic_sampling(step)
        if self.is_async:
            return *self._take_async(step), None
        return *self._rollout_round(step), None

    def _take_async(self, step: int) -> tuple[list[PromptItem], list[int], list[ScoredGroup]]:
        """Async mode: this step's rollout (generated during the previous step; the first step's,
        or one a checkpoint lacks, is drawn and generated now), scored on the owner."""
        rollout = self.one_step_off
        if rollout.pending is None or rollout.pending.step != step:
            agree_on_failure(rollout.draw(step, version=self.engine_version), self.ctx.device, self.ctx.rank)
        pending = rollout.take(step, version=step)
        outcome: Union[list[ScoredGroup], RolloutFailed, None] = None
        if self.engine is not None:
            outcome = self._score_pending(pending)
            self.rollout_timing = (pending.wait_seconds, pending.overlap_seconds)
        outcome = broadcast_to_replica(outcome, self.ctx)
        agree_on_failure(outcome.message if isinstance(outcome, RolloutFailed) else None, self.ctx.device,
                         self.ctx.rank)
        return pending.items, pending.positions, outcome

    def _score_pending(self, pending: PendingRollout) -> Union[list[ScoredGroup], RolloutFailed]:
        if pending.error is not None:
            return RolloutFailed(pending.error)
        try:
            return [self._score(item, group) for item, group in zip(pending.items, pending.samples, strict=True)]
        except Exception as err:  # any: the reward server down, ...; still before the update
            return RolloutFailed(describe(err))

    def _hand_over(self, step: int, timer: PhaseTimer) -> None:
        """Async mode, between taking step ``step``'s rollout and training on it: the weights W_step
        into the idle engine, then step + 1's prompts drawn and their generation started."""
        with timer.phase("weight_sync"):
            if self.engine_version != step:
                self.sync.sync(self.engine)
                self.engine_version = step
        if step + 1 < self.cfg.train.steps:
            with timer.phase("rollout"):
                agree_on_failure(self.one_step_off.draw(step + 1, version=step), self.ctx.device, self.ctx.rank)

    def _rollout_round(self, step: int, round_: int = 0) -> tuple[list[PromptItem], list[int], list[ScoredGroup]]:
        """This rank's share of the next ``grpo.prompts_per_step`` prompts and their scored groups.
        A failure on any rank (a data error in ``on_bad_sample=error`` mode, the reward server
        down past its budget, the engine) becomes a recoverable StepFailure on every rank
        (``trainer/failure.py``)."""
        items, positions, failure = [], [], None
        resumed = self.one_step_off.pending
        try:
            if round_ == 0 and resumed is not None and resumed.step == step:  # an async run's checkpoint
                items, positions, self.one_step_off.pending = resumed.items, resumed.positions, None
            else:
                share = self.loader.next_share(self.cfg.grpo.prompts_per_step)
                items, positions = [item for _, item in share], [p for p, _ in share]
        except Exception as err:  # any: the weights are untouched, so the state is still consistent
            failure = describe(err)
        outcome = self._rollout(items, positions, step, failure, round_)
        if isinstance(outcome, RolloutFailed):
            failure = failure or outcome.message
        agree_on_failure(failure, self.ctx.device, self.ctx.rank)
        return items, positions, outcome

    def _dynamic_sampling(self, step: int) -> tuple[list[PromptItem], list[int], list[ScoredGroup],
                                                    DynamicSamplingStats]:
        """DAPO's dynamic sampling (arXiv 2503.14476, Sec. 3.2; ``GRPOConfig.dynamic_sampling``): rounds
        of ``prompts_per_step`` prompts until that many effective groups are collected over DP, or
        ``dynamic_sampling_max_rounds``. Every decision comes from counts gathered over the DP group
        (identical on every rank of a replica, whose groups are the same), so every rank runs the
        same rounds; the surplus is cut by ``grpo_batch.dynamic_sampling_quota``."""
        g, ctx = self.cfg.grpo, self.ctx
        target, std_normalize = g.prompts_per_step, g.advantage_std_normalize
        items, positions, groups, first = [], [], [], None
        rounds = drawn = kept = 0
        while rounds < g.dynamic_sampling_max_rounds and kept < target:
            new_items, new_positions, new_groups = self._rollout_round(step, rounds)
            new_positions = [rounds * target + p for p in new_positions]  # the step's order over its rounds
            rounds += 1
            first = first or (new_items[:1], new_positions[:1], new_groups[:1])
            effective = [i for i, grp in enumerate(new_groups)
                         if group_is_effective(grp.advantages(self.min_reward_std, std_normalize))]
            counts = all_gather_int64(np.array([len(groups), len(effective), len(new_groups)]), ctx.dp_group)
            quota = dynamic_sampling_quota(counts[:, 0].tolist(), counts[:, 1].tolist(), target)
            chosen = effective[:quota[ctx.dp_rank]]
            items += [new_items[i] for i in chosen]
            positions += [new_positions[i] for i in chosen]
            groups += [new_groups[i] for i in chosen]
            drawn, kept = drawn + int(counts[:, 2].sum()), kept + sum(quota)
        if not groups and first is not None:
            # Every DP rank runs the schedule (trainer/schedule.run_schedule): a rank without an
            # effective group keeps its first one; its zero advantages add no gradient.
            items, positions, groups = first
        if kept < target and ctx.rank == 0:
            print(f"dynamic sampling: step {step + 1}: {kept} of {target} effective groups after "
                  f"grpo.dynamic_sampling_max_rounds={g.dynamic_sampling_max_rounds} rounds ({drawn} groups drawn); "
                  "training on what was collected", flush=True)
        return items, positions, groups, DynamicSamplingStats(rounds, drawn, kept, target)

    def _rollout(self, items: list[PromptItem], positions: list[int], step: int, failure: Optional[str],
                 round_: int = 0) -> Union[list[ScoredGroup], RolloutFailed]:
        """G responses per prompt from this replica's engine, scored, on every rank of the
        replica; or the owner's failure (so that no rank waits for an answer that never comes)."""
        outcome: Union[list[ScoredGroup], RolloutFailed, None] = None
        if self.ctx.device.type == "cuda":
            # Colocated engines run on the GPUs of their TP group: every rank hands its cached
            # activation memory back to the driver before the owner resumes the engine.
            torch.cuda.empty_cache()
            dist.barrier(group=self.ctx.tp_group)
        if self.engine is not None and failure is not None:
            outcome = RolloutFailed(failure)  # this rank's data already failed: the engine is not run
        elif self.engine is not None:
            try:
                outcome = self._generate_and_score(items, positions, step, round_)
            except Exception as err:  # any: still before the update
                outcome = RolloutFailed(describe(err))
        return broadcast_to_replica(outcome, self.ctx)

    def _sampling_params(self, step: int, round_: int = 0) -> SamplingParams:
        r = self.cfg.rollout
        # Round 0 keeps the seed of a run without dynamic sampling; later rounds' seeds stay
        # clear of other steps' (fewer than 1000003 steps). Async mode uses the same seeds.
        seed = self.cfg.train.seed * 100003 + step + 1000003 * round_
        return SamplingParams(n=r.n_samples, temperature=r.temperature, top_p=r.top_p,
                              max_new_tokens=r.max_new_tokens, seed=seed, stop_token_ids=self.stop_token_ids)

    def _generate_and_score(self, items: list[PromptItem], positions: list[int], step: int,
                            round_: int = 0) -> list[ScoredGroup]:
        self.engine.resume_memory()
        started = time.perf_counter()
        rollouts = self.engine.generate(rollout_requests(items, positions), self._sampling_params(step, round_))
        # Sync mode: the trainer waits for the whole generation (dynamic sampling: every round's).
        waited = self.rollout_timing[0] + time.perf_counter() - started
        self.rollout_timing = (waited, 0.0)
        self.engine.release_memory()  # colocated: the GPUs go back to training until the next rollout
        return [self._score(item, responses) for item, responses in zip(items, rollouts, strict=True)]

    def _score(self, item: PromptItem, responses: list) -> ScoredGroup:
        # |y| of DAPO's overlong punishment: the generated token ids, stop token included.
        response_ids = [np.asarray(s.response_ids.tolist(), dtype=np.int64) for s in responses]
        terms = self.reward.score_batch([item.record] * len(responses), [s.text for s in responses],
                                        lengths=[len(r) for r in response_ids],
                                        max_tokens=self.cfg.rollout.max_new_tokens)
        return ScoredGroup(
            response_ids=response_ids,
            engine_logprobs=[np.asarray(s.logprobs.float().tolist(), dtype=np.float32) for s in responses],
            rewards={"total": np.array([t.total for t in terms], dtype=np.float64),
                     "rule": np.array([t.rule for t in terms], dtype=np.float64),
                     "format": np.array([t.format for t in terms], dtype=np.float64),
                     "model": np.array([t.model for t in terms], dtype=np.float64),
                     "overlong": np.array([t.overlong for t in terms], dtype=np.float64)})

    def _kl_reward_pass(self, items: list[PromptItem], groups: list[ScoredGroup]) -> None:
        """``grpo.kl_placement`` reward (losses/kl_reward.py): sets each fresh group's ``kl_penalty``,
        beta sum_t KL_t of each response between the policy before the update and the reference,
        so that Eq. 6 (:meth:`_assemble`) sees the shaped rewards. The log-probs exist on the last
        pipeline stage; the sums are broadcast to every rank of the replica, which all compute the
        advantages (the SSB plan is collective over DP)."""
        ctx, g = self.ctx, self.cfg.grpo
        zeros = [np.zeros(len(group.response_ids)) for group in groups]
        samples = fresh_samples(items, groups, zeros, range(len(groups)))
        rows = pack_rows(samples, [0.0] * len(samples), g.micro_batch_tokens, pipeline=ctx.pp > 1,
                         seq_multiple=self.seq_multiple)
        plain = [make_grpo_microbatch(row.packed) for row in rows]
        policy = compute_logprobs(self.ddp, plain, ctx, self.loss_cfg.temperature)
        with self._reference_weights():
            reference = compute_logprobs(self.ddp, plain, ctx, self.loss_cfg.temperature)
        kl = torch.zeros(len(samples), dtype=torch.float64)
        if ctx.is_last_stage:
            kl = torch.tensor(response_kl_sums(rows, samples, [lp for lp, _ in policy], [lp for lp, _ in reference],
                                               g.kl_estimator), dtype=torch.float64)
        attach_kl_penalties(groups, samples, broadcast_from_last_stage(kl, ctx).tolist(), g.kl_beta)

    def _assemble(self, items: list[PromptItem], positions: list[int], groups: list[ScoredGroup],
                  step: int) -> StepBatch:
        """Advantages (Eq. 6), the SSB plan (collective over DP; drops by position), the samples
        and packed rows with their Eq. 8 normalization weights (which count the whole step over DP)."""
        std_normalize = self.cfg.grpo.advantage_std_normalize  # false: Dr. GRPO's r - mean(r)
        advantages = [group.advantages(self.min_reward_std, std_normalize) for group in groups]
        plan = plan_batch(self.buffer, advantages, step, self.ctx.dp_group, positions)
        samples = train_samples(items, groups, advantages, plan, self.loader)
        lengths = [s.target_count() for s in samples]
        counts = torch.tensor([len(samples), sum(lengths)], dtype=torch.float64)
        dist.all_reduce(counts, group=self.ctx.dp_group)
        weights = token_weights(torch.tensor(lengths), self.loss_cfg.normalization, int(counts[0]),
                                int(counts[1]), self.length_constant).tolist()
        rows = pack_rows(samples, weights, self.cfg.grpo.micro_batch_tokens, pipeline=self.ctx.pp > 1,
                         seq_multiple=self.seq_multiple)
        return StepBatch(items, groups, advantages, plan, samples, rows)

    def _old_policy_pass(self, batch: StepBatch, sums: StepSums) -> tuple[list[dict], list]:
        """Old log-probs (and entropy, for monitoring) from the policy before the update, the
        reference log-probs with kl_beta, the engine correction; the loss micro-batches and
        the per-sample old log-probs (last stage; None elsewhere)."""
        ctx, rows = self.ctx, batch.rows
        plain = [make_grpo_microbatch(row.packed) for row in rows]
        logprobs = compute_logprobs(self.ddp, plain, ctx, self.loss_cfg.temperature, want_entropy=True)
        refs = [None] * len(rows)
        if self.loss_cfg.kl_beta:
            with self._reference_weights():
                ref_logprobs = compute_logprobs(self.ddp, plain, ctx, self.loss_cfg.temperature)
            if ctx.is_last_stage:  # other stages get no log-probs (and need none)
                refs = [lp for lp, _ in ref_logprobs]
        microbatches = []
        for k, row in enumerate(rows):
            old, weights_L = None, row.weights
            if ctx.is_last_stage:
                lp, entropy = logprobs[k]
                old = torch.where(row.has_stored, row.stored_logprobs, lp)
                weights_L = engine_correction(row, lp, self.cfg.rollout.effective_tis_cap, sums)
                sums.entropy_sum += float(entropy.sum())
                sums.entropy_tokens += float(row.packed.loss_mask.sum())
            microbatches.append(make_grpo_microbatch(row.packed, old, refs[k], row.advantages, weights_L))
        if not ctx.is_last_stage:
            return microbatches, [None] * len(batch.samples)
        return microbatches, per_sample(rows, [lp for lp, _ in logprobs], len(batch.samples))

    def _update(self, microbatches: list[dict], step: int) -> tuple[GRPOStepResult, Optional[float]]:
        """``grpo.ppo_epochs`` optimizer steps over the batch; the metrics describe the first
        (on-policy) pass, the gradient norm the last."""
        first = None
        for epoch in range(self.cfg.grpo.ppo_epochs):
            try:
                result, grad_norm = optimizer_step(
                    self.ddp, self.optimizer, lambda: grpo_forward_backward(self.ddp, microbatches, self.ctx,
                                                                           self.loss_cfg),
                    f"step {step}, PPO epoch {epoch}")
            except FloatingPointError as err:  # on every rank: the gradient norm is global
                # The optimizer skipped this update; earlier epochs' updates stand.
                raise StepFailure(describe(err), recoverable=epoch == 0) from None
            first = result if first is None else first
        return first, grad_norm

    # -- a failed step (trainer/failure.py) --------------------------------------------------
    def snapshot(self) -> StepSnapshot:
        return StepSnapshot.take(self.loader, {"ssb": self.buffer.snapshot(),
                                               "rollout": self.one_step_off.snapshot()})

    def restore(self, snapshot: StepSnapshot) -> None:
        snapshot.restore(self.loader)
        self.buffer.restore_snapshot(snapshot.extra["ssb"])
        self.one_step_off.restore(snapshot.extra["rollout"])

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

    # -- checkpoint hooks (trainer/checkpoint.py) ------------------------------------------
    def rank_state(self) -> dict:
        """Nothing per rank: the reference weights are sharded tensors (:meth:`sharded_tensors`)."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        """See :meth:`rank_state`."""

    def sharded_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The reference policy (with ``grpo.kl_beta``), saved like the model: fragments under
        ``reference/<global name>`` that load at any TP/PP/DP, filled in place on resume."""
        return {"reference": self.initial_trainable} if self.initial_trainable else {}

    def save_files(self, directory: Path, step: int) -> None:
        # The store is replicated over a replica's TP/PP/CP ranks; the last stage's copy holds
        # the behaviour log-probs of fresh responses (other stages never compute them).
        if self.ctx.tp_rank == 0 and self.ctx.cp_rank == 0 and self.ctx.is_last_stage:
            save_ssb(self.buffer, directory / "ssb", step, self.ctx.dp_group)
        self.one_step_off.save(directory)  # async: the rollout in flight (owners)

    def load_files(self, directory: Path) -> None:
        self.buffer = load_ssb(directory / "ssb", self.ctx.dp_rank, self.ctx.dp, self.buffer.config,
                               self.ctx.dp_group)
        if self.cfg.ssb.initial_store and self.ctx.rank == 0:
            print("SSB: resumed: the checkpoint's buffer replaces the groups of ssb.initial_store", flush=True)
        # Stored groups passed the criterion of the run that saved them; a resume under a
        # larger ssb.min_reward_std drops those that no longer do (none under the same one).
        dropped = self.buffer.drop_ineffective(self.min_reward_std)
        if dropped:
            print(f"SSB: DP rank {self.ctx.dp_rank} dropped {dropped} buffered groups below "
                  f"ssb.min_reward_std={self.min_reward_std:.6g}", flush=True)
        # The engine restarts from the restored weights: a full sync, not trainable-only.
        self.sync.sync(self.engine, full=True)
        self.engine_version = int(json.loads((directory / "trainer.json").read_text())["step"])
        self.one_step_off.load(directory)
        if self.one_step_off.pending is not None and not self.is_async and self.ctx.rank == 0:
            print(f"resumed an async run's checkpoint in rollout.mode=sync: step {self.one_step_off.pending.step + 1}"
                  "'s prompts (drawn by that run) are generated again from the resumed weights", flush=True)
