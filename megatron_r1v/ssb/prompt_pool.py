"""Offline prompt filter: keep prompts whose rollout groups carry a learning signal.

The R1V2 report pairs the Selective Sample Buffer with an offline pass over the prompt
pool: each prompt is rolled out N times with the initial policy and scored with the
hybrid reward of the run (Eq. 7: rule, format and, with ``reward.model_weight``, the
reward model over HTTP); a prompt whose group is not effective under GRPO's criterion
(``losses.grpo.effective_groups``: rewards all equal, or their std below the resolved
``ssb.min_reward_std``) gets zero advantage under Eq. 6 and would only dilute GRPO
batches, so it is dropped. What remains is written as JSONL (the original lines,
unchanged) with a stats file; with ``--ssb-store`` the kept groups (prompt + response
tokens, the engine's log-probs, rewards, Eq. 6 advantages) also go into an SSB store that a
GRPO run starts its buffer from (``ssb.initial_store``, ``SSBConfig.initial_store``).

    python -m megatron_r1v.ssb.prompt_pool --prompts data/prompts.jsonl --model HF_DIR \\
        --tokenizer TOK_DIR --samples 8 --out data/pool [--reward-config RUN.yaml] \\
        [--set reward.KEY=VALUE ...] [--set ssb.min_reward_std=auto|X] [--ssb-store DIR] \\
        [--tiler auto|dali|pil] [--tiler-threads 2]

``HF_DIR`` is a transformers-layout InternVL checkpoint (``tools/convert_checkpoint.py
export --layout transformers`` writes one). Images are tiled as the trainer tiles them
(``--tiler`` / ``--tiler-threads`` are ``data.tiler`` / ``data.tiler_threads``:
``data.tilers.build_tiler``; the log's ``tiler: ...`` line says which one ran).
``--reward-config`` / ``--set`` work as in ``tools/generate_preferences.py``
(``rewards.run_reward``): the run config's ``reward:`` section and its
``ssb.min_reward_std`` (``auto`` resolves with ``--samples`` as G), with overrides; a
reward-model server that does not answer ``/health`` is an error before the model loads.
For the store to fit a run, roll out with the run's tokenizer, chat template,
``data.max_tiles`` (``--max-tiles``), ``rollout.n_samples`` (``--samples``) and
``rollout.temperature`` (``--temperature``): the store records them and the run checks them.
User errors print ``error: ...`` and exit with status 2 before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_r1v.atomic_dir import atomic_directory
from megatron_r1v.config import SSBConfig
from megatron_r1v.data.loader import PromptItem, PromptLoader
from megatron_r1v.data.schema import PromptRecord, load_records
from megatron_r1v.losses.grpo import effective_groups, group_advantages
from megatron_r1v.rewards.hybrid import HybridReward, RewardBreakdown
from megatron_r1v.rollout.engine import RolloutEngine, RolloutRequest, RolloutSample, SamplingParams
from megatron_r1v.trainer.grpo_batch import REWARD_TERMS, ScoredGroup

from .buffer import SelectiveSampleBuffer, SSBGroup, group_is_effective
from .persist import StoreOrigin, save

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    prompts: int = 0
    kept: int = 0
    dropped_all_correct: int = 0
    """All responses scored the same and all were correct (rule = 1): too easy."""
    dropped_all_equal_other: int = 0
    """Every response got the same reward otherwise (e.g. all wrong)."""
    dropped_below_min_std: int = 0
    """Rewards not all equal, but their std is below ``min_reward_std`` (e.g. reward-model noise)."""
    min_reward_std: float = 0.0
    """The effective-group threshold applied (``ssb.min_reward_std``, resolved)."""
    skipped_bad: int = 0
    mean_reward: float = 0.0
    mean_accuracy: float = 0.0
    seconds: float = 0.0


def classify_group(scores: Sequence[RewardBreakdown], min_reward_std: float = 0.0) -> str:
    """``keep`` when the group is effective as GRPO sees it (non-zero Eq. 6 advantage at
    ``min_reward_std``: ``losses.grpo.group_advantages``); else ``below_min_std`` (rewards
    differ, std below the threshold), ``all_correct`` (all equal, every rule reward 1) or
    ``all_equal`` (all equal otherwise, e.g. every response wrong)."""
    totals = torch.tensor([[s.total for s in scores]], dtype=torch.float64)
    if group_is_effective(group_advantages(totals, min_std=min_reward_std)[0].numpy()):
        return "keep"
    if bool(effective_groups(totals)[0]):  # not exactly flat: only the threshold rejected it
        return "below_min_std"
    return "all_correct" if all(s.rule == 1.0 for s in scores) else "all_equal"


def scored_group(samples: Sequence[RolloutSample], scores: Sequence[RewardBreakdown]) -> ScoredGroup:
    """A prompt's responses and reward terms as GRPO records them (``trainer.grpo_batch``)."""
    return ScoredGroup(
        response_ids=[np.asarray(s.response_ids.tolist(), dtype=np.int64) for s in samples],
        engine_logprobs=[np.asarray(s.logprobs.float().tolist(), dtype=np.float32) for s in samples],
        rewards={term: np.array([getattr(t, term) for t in scores], dtype=np.float64) for term in REWARD_TERMS})


def pool_ssb_group(item: PromptItem, group: ScoredGroup, min_reward_std: float) -> SSBGroup:
    """A kept group as the SSB stores a fresh one (``grpo_batch.fresh_ssb_groups``), at step 0:
    generated by the initial policy, the one a GRPO run starts from. Its old log-probs are the
    engine's (the behaviour policy's, at the sampling temperature): the trainer never saw it."""
    prompt = item.prompt_ids.numpy().astype(np.int64)
    return SSBGroup(
        prompt_id=item.record.id, step=0, token_ids=[np.concatenate([prompt, r]) for r in group.response_ids],
        loss_mask=[np.ones(r.size, dtype=bool) for r in group.response_ids], old_logprobs=group.engine_logprobs,
        advantages=group.advantages(min_reward_std), rewards=group.rewards,
        image_paths=tuple(str(x) for x in item.record.images))


def filter_prompts(
    items: Sequence[PromptItem], engine: RolloutEngine, reward: HybridReward, params: SamplingParams,
    batch_prompts: int = 8, min_reward_std: float = 0.0,
) -> tuple[list[PromptRecord], PoolStats, list[SSBGroup]]:
    """Rolls out every prompt ``params.n`` times; returns the records of the effective groups
    (:func:`classify_group` at ``min_reward_std``), the stats and those groups for the SSB."""
    stats = PoolStats(prompts=len(items), min_reward_std=float(min_reward_std))
    kept: list[PromptRecord] = []
    groups_kept: list[SSBGroup] = []
    dropped = {"all_correct": "dropped_all_correct", "all_equal": "dropped_all_equal_other",
               "below_min_std": "dropped_below_min_std"}
    rewards_sum = accuracy_sum = 0.0
    start = time.perf_counter()
    for first in range(0, len(items), batch_prompts):
        chunk = items[first: first + batch_prompts]
        requests = [RolloutRequest(i.record.id, i.prompt_ids, i.pixel_values) for i in chunk]
        groups = engine.generate(requests, params)
        for item, group in zip(chunk, groups):
            scores = reward.score_batch([item.record] * len(group), [s.text for s in group],
                                        lengths=[len(s.response_ids) for s in group], max_tokens=params.max_new_tokens)
            rewards_sum += sum(s.total for s in scores)
            accuracy_sum += sum(s.rule for s in scores)
            verdict = classify_group(scores, min_reward_std)
            if verdict == "keep":
                kept.append(item.record)
                groups_kept.append(pool_ssb_group(item, scored_group(group, scores), min_reward_std))
            else:
                setattr(stats, dropped[verdict], getattr(stats, dropped[verdict]) + 1)
        logger.info("prompt pool: %d/%d prompts rolled out, %d kept", first + len(chunk), len(items), len(kept))
    n_samples = max(len(items) * params.n, 1)
    stats.kept = len(kept)
    stats.mean_reward, stats.mean_accuracy = rewards_sum / n_samples, accuracy_sum / n_samples
    stats.seconds = time.perf_counter() - start
    return kept, stats, groups_kept


def write_ssb_store(groups: Sequence[SSBGroup], path: Path, origin: StoreOrigin, min_reward_std: float) -> int:
    """Writes the kept groups as a one-shard SSB store (``ssb.persist``, with ``origin``) at
    step 0 and returns how many; the buffer's own insert filter admits them, so the store
    holds exactly what a GRPO run would have buffered."""
    buffer = SelectiveSampleBuffer(SSBConfig(capacity=max(len(groups), 1), min_reward_std=min_reward_std))
    buffer.insert(groups)
    save(buffer, path, step=0, origin=origin)
    return len(buffer)


def write_pool(prompts_path: Path, kept: Sequence[PromptRecord], stats: PoolStats, out_dir: Path,
               force: bool = False) -> Path:
    """Writes ``out_dir/prompts.jsonl`` (kept lines verbatim, image paths rewritten absolute)
    and ``out_dir/stats.json`` into a temporary folder renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    keep_ids = {r.id for r in kept}
    base = prompts_path.parent
    with atomic_directory(out_dir) as tmp:
        with open(prompts_path, encoding="utf-8-sig") as src, open(tmp / "prompts.jsonl", "w", encoding="utf-8") as dst:
            for line in src:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if str(obj.get("id")) in keep_ids:
                    # Absolute image paths: the filtered file lives in another folder.
                    obj["images"] = [os.path.abspath(base / p) for p in obj.get("images", [])]
                    dst.write(json.dumps(obj, ensure_ascii=False) + "\n")
        (tmp / "stats.json").write_text(json.dumps(asdict(stats), indent=1))
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    from megatron_r1v.data.chat_format import add_chat_template_arg
    from megatron_r1v.data.tilers import add_tiler_args
    from megatron_r1v.rewards.run_reward import add_reward_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path, help="transformers-layout InternVL checkpoint")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: --model)")
    parser.add_argument("--samples", type=int, default=8, help="rollouts per prompt (the GRPO group size)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--ssb-store", type=Path, default=None, metavar="DIR",
                        help="also write the kept groups as an SSB store (a GRPO run's ssb.initial_store)")
    parser.add_argument("--force", action="store_true", help="replace --out and --ssb-store")
    add_reward_args(parser, settable="reward.KEY=VALUE|ssb.min_reward_std=X")
    add_tiler_args(parser)
    add_chat_template_arg(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> tuple:
    """Every argument, before anything slow: (the run's RewardConfig, the resolved threshold)."""
    from megatron_r1v.rewards.run_reward import run_config
    from megatron_r1v.ssb.policy import resolve_min_reward_std

    if args.tiler_threads < 1:
        raise ValueError(f"--tiler-threads must be >= 1, got {args.tiler_threads}")
    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2 (a GRPO group), got {args.samples}")
    for flag, path in (("--out", args.out), ("--ssb-store", args.ssb_store)):
        if path is not None and path.exists() and not args.force:
            raise FileExistsError(f"{flag} {path} exists; pass --force to replace it")
    config = run_config(args, ("reward.", "ssb.min_reward_std="),
                        "reward.* keys and ssb.min_reward_std can be set here (the run's reward and criterion)")
    return config.reward, resolve_min_reward_std(config.ssb, config.reward, args.samples)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_r1v.rewards.run_reward import reward_scorer
    from megatron_r1v.rollout.sampling_runs import user_error

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        reward_cfg, min_std = check_arguments(args)
        scorer = reward_scorer(reward_cfg, logger.info)  # a server that is down: before the model loads
    except FileExistsError:
        raise
    except (OSError, ValueError) as err:
        return user_error(err)
    logger.info("effective groups: reward std >= %.6g", min_std)
    items, loader, engine, template, description = _prepare(args)
    params = SamplingParams(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, stop_token_ids=(template.stop_token_id,))
    # As in GRPO (trainer/build.py): the format term knows whether the prompt opened the
    # thought, and the reward model judges the reply without the policy's closing marker.
    reward = HybridReward.from_config(reward_cfg, think_opened_by_prompt=template.open_think, scorer=scorer,
                                      reply_end=template.format.reply_end)
    kept, stats, groups = filter_prompts(items, engine, reward, params, min_reward_std=min_std)
    stats.skipped_bad = loader.cursor.skipped
    write_pool(args.prompts, kept, stats, args.out, args.force)
    extra = {"tiler": description}
    if args.ssb_store is not None:
        origin = StoreOrigin.of(template, args.max_tiles, args.samples, args.temperature)
        extra.update(ssb_store=str(args.ssb_store),
                     ssb_groups=write_ssb_store(groups, args.ssb_store, origin, min_std))
    print(json.dumps({"out": str(args.out), **asdict(stats), **extra}))
    return 0


def _prepare(args: argparse.Namespace) -> tuple:
    """(prompt items, their loader, the engine, the chat template, the tiler's description)."""
    from megatron_r1v.config import DataConfig
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tilers import build_tiler
    from megatron_r1v.data.tiling import TilingConfig
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    records = load_records(args.prompts, "prompts", args.on_bad_sample).records
    engine, arch, tokenizer = load_hf_engine(args.model, args.tokenizer or args.model)
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile,
                                                      chat_template=args.chat_template))
    tiler, description = build_tiler(
        DataConfig(max_tiles=args.max_tiles, on_bad_sample=args.on_bad_sample, tiler=args.tiler,
                   tiler_threads=args.tiler_threads),
        TilingConfig(image_size=arch.vision.image_size, max_tiles=args.max_tiles, on_bad_sample=args.on_bad_sample),
        key="--tiler")
    logger.info("tiler: %s", description)
    loader = PromptLoader(records, template, tiler, seed=args.seed, on_bad_sample=args.on_bad_sample)
    items = [item for item in loader.prepare_many(records) if item is not None]
    return items, loader, engine, template, description


if __name__ == "__main__":
    raise SystemExit(main())
