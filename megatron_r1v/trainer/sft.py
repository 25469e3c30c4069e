"""The SFT stage (cold start / iterative SFT of R1V and R1V3): one optimizer step per
:meth:`SFTTrainer.step`.

    conversations (data.schema "sft" records) -> tiles + chat template, labels on every
    assistant reply (data.loader.SFTLoader) -> pack whole conversations (first-fit
    decreasing, data.packing.pack_conversations) -> token-mean NLL forward/backward through
    Megatron's schedules (trainer.sft_step) -> optimizer step

The step's loss is the mean over every assistant token of the step (all micro-batches,
all data-parallel ranks; ``losses.sft``), so each step first counts its assistant tokens
over the data-parallel group. Checkpoints (``trainer/checkpoint.py``) keep the model,
optimizer, RNG and the loader's data cursor, so ``--resume`` continues exactly; a
checkpoint's ``model/`` folder exports to HF and starts the next stage, as after MPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_r1v.config import RunConfig
from megatron_r1v.data.loader import SFTItem, SFTLoader
from megatron_r1v.data.packing import pack_conversations
from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.models.r1v.context_parallel import packing_multiple
from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.failure import StepFailure, StepSnapshot, agree_on_failure, describe
from megatron_r1v.trainer.schedule import optimizer_step
from megatron_r1v.trainer.setup import ModelStage
from megatron_r1v.trainer.sft_step import make_sft_microbatch, sft_forward_backward


def step_counts(items: list[SFTItem], ctx: ParallelContext) -> tuple[int, int]:
    """(assistant tokens, all tokens) of the step's conversations over the data-parallel group."""
    local = [sum(int((it.sample.labels != IGNORE_INDEX).sum()) for it in items), sum(len(it.sample) for it in items)]
    counts = torch.tensor(local, dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(counts, group=ctx.dp_group)
    return int(counts[0].item()), int(counts[1].item())


@dataclass
class SFTTrainer:
    cfg: RunConfig
    ctx: ParallelContext
    stage: ModelStage
    ddp: torch.nn.Module
    optimizer: object
    loader: SFTLoader

    def _next_items(self) -> list[SFTItem]:
        """This rank's conversations of the step. A data error on any rank, or a rank left with
        none (every one skipped), stops every rank, safely (``trainer/failure.py``)."""
        items, failure = [], None
        try:
            items = self.loader.next_batch(self.cfg.sft.samples_per_step)
            if not items:
                raise ValueError(f"data-parallel rank {self.ctx.dp_rank} has no conversation left in this step "
                                 "(every one was skipped as a bad sample)")
        except Exception as err:
            failure = describe(err)
        agree_on_failure(failure, self.ctx.device, self.ctx.rank)
        return items

    def step(self, step: int) -> dict[str, float]:
        ctx, t_start = self.ctx, time.perf_counter()
        self.loader.take_data_seconds()  # from here on: this step's conversations
        lr = float(self.optimizer.param_groups[0]["lr"])
        items = self._next_items()
        targets, tokens = step_counts(items, ctx)
        seq_multiple = packing_multiple(ctx.cp, ctx.tp, self.cfg.parallel.sequence_parallel)
        microbatches = [make_sft_microbatch(mb) for mb in
                        pack_conversations(items, self.cfg.sft.micro_batch_tokens, pipeline=ctx.pp > 1,
                                           seq_multiple=seq_multiple)]
        try:
            result, grad_norm = optimizer_step(
                self.ddp, self.optimizer, lambda: sft_forward_backward(self.ddp, microbatches, ctx, targets),
                f"step {step}")
        except FloatingPointError as err:  # on every rank; the optimizer skipped the update
            raise StepFailure(describe(err), recoverable=True) from None
        seconds = time.perf_counter() - t_start
        return {
            "sft/loss": result.loss, "sft/tokens_per_s": tokens / seconds, "sft/assistant_tokens": float(targets),
            "sft/lr": lr, "train/grad_norm": float(grad_norm or 0.0),
            "perf/step_time_s": seconds, "perf/data_time_s": self.loader.take_data_seconds(),
        }

    # -- a failed step (trainer/failure.py) --------------------------------------------------
    def snapshot(self) -> StepSnapshot:
        return StepSnapshot.take(self.loader)

    def restore(self, snapshot: StepSnapshot) -> None:
        snapshot.restore(self.loader)

    # -- checkpoint hooks (trainer/checkpoint.py) ------------------------------------------
    def rank_state(self) -> dict:
        """Nothing beyond the model, optimizer, RNG and data cursor."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        """See :meth:`rank_state`."""

    def save_files(self, directory: Path, step: int) -> None:
        """See :meth:`rank_state`."""

    def load_files(self, directory: Path) -> None:
        """See :meth:`rank_state`."""
