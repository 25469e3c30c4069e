"""Offline prompt filter: keep prompts whose rollout groups carry a learning signal.

The R1V2 report pairs the Selective Sample Buffer with an offline pass over the prompt
pool: each prompt is rolled out N times with the initial policy and scored with the
hybrid reward; a prompt whose N rewards are all equal (every response right, or every
one wrong) has zero group advantage under Eq. 6 and would only dilute GRPO batches, so
it is dropped. What remains is written as JSONL (the original lines, unchanged) with a
stats file.

    python -m megatron_r1v.ssb.prompt_pool --prompts data/prompts.jsonl --model HF_DIR \\
        --tokenizer TOK_DIR --samples 8 --out data/pool [--tiler auto|dali|pil] [--tiler-threads 2]

``HF_DIR`` is a transformers-layout InternVL checkpoint (``tools/convert_checkpoint.py
export --layout transformers`` writes one). Images are tiled as the trainer tiles them
(``--tiler`` / ``--tiler-threads`` are ``data.tiler`` / ``data.tiler_threads``:
``data.tilers.build_tiler``; the log's ``tiler: ...`` line says which one ran).
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

import torch

from megatron_r1v.atomic_dir import atomic_directory
from megatron_r1v.config import RewardConfig
from megatron_r1v.data.loader import PromptItem, PromptLoader
from megatron_r1v.data.schema import PromptRecord, load_records
from megatron_r1v.losses.grpo import group_advantages
from megatron_r1v.rewards.hybrid import HybridReward, RewardBreakdown
from megatron_r1v.rollout.engine import RolloutEngine, RolloutRequest, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    prompts: int = 0
    kept: int = 0
    dropped_all_correct: int = 0
    """All responses scored the same and all were correct (rule = 1): too easy."""
    dropped_all_equal_other: int = 0
    """Every response got the same reward otherwise (e.g. all wrong)."""
    skipped_bad: int = 0
    mean_reward: float = 0.0
    mean_accuracy: float = 0.0
    seconds: float = 0.0


def classify_group(scores: Sequence[RewardBreakdown]) -> str:
    """``keep`` when the group's rewards differ (non-zero Eq. 6 advantage), else
    ``all_correct`` (every rule reward 1) or ``all_equal`` (e.g. every response wrong)."""
    totals = torch.tensor([[s.total for s in scores]], dtype=torch.float64)
    if bool(group_advantages(totals).abs().max() > 0):
        return "keep"
    return "all_correct" if all(s.rule == 1.0 for s in scores) else "all_equal"


def filter_prompts(
    items: Sequence[PromptItem], engine: RolloutEngine, reward: HybridReward, params: SamplingParams,
    batch_prompts: int = 8,
) -> tuple[list[PromptRecord], PoolStats]:
    """Rolls out every prompt ``params.n`` times; returns the records with non-zero advantage."""
    stats = PoolStats(prompts=len(items))
    kept: list[PromptRecord] = []
    rewards_sum = accuracy_sum = 0.0
    start = time.perf_counter()
    for first in range(0, len(items), batch_prompts):
        chunk = items[first: first + batch_prompts]
        requests = [RolloutRequest(i.record.id, i.prompt_ids, i.pixel_values) for i in chunk]
        groups = engine.generate(requests, params)
        for item, group in zip(chunk, groups):
            scores = reward.score_batch([item.record] * len(group), [s.text for s in group])
            rewards_sum += sum(s.total for s in scores)
            accuracy_sum += sum(s.rule for s in scores)
            verdict = classify_group(scores)
            if verdict == "keep":
                kept.append(item.record)
            elif verdict == "all_correct":
                stats.dropped_all_correct += 1
            else:
                stats.dropped_all_equal_other += 1
        logger.info("prompt pool: %d/%d prompts rolled out, %d kept", first + len(chunk), len(items), len(kept))
    n_samples = max(len(items) * params.n, 1)
    stats.kept = len(kept)
    stats.mean_reward, stats.mean_accuracy = rewards_sum / n_samples, accuracy_sum / n_samples
    stats.seconds = time.perf_counter() - start
    return kept, stats


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_r1v.config import DataConfig
    from megatron_r1v.data.chat_format import add_chat_template_arg
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tilers import add_tiler_args, build_tiler
    from megatron_r1v.data.tiling import TilingConfig
    from megatron_r1v.rollout.hf_engine import load_hf_engine

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
    parser.add_argument("--force", action="store_true")
    add_tiler_args(parser)
    add_chat_template_arg(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tiler_threads < 1:
        parser.error(f"--tiler-threads must be >= 1, got {args.tiler_threads}")

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
    params = SamplingParams(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, stop_token_ids=(template.stop_token_id,))
    reward = HybridReward.from_config(RewardConfig(), think_opened_by_prompt=template.open_think)
    kept, stats = filter_prompts(items, engine, reward, params)
    stats.skipped_bad = loader.cursor.skipped
    write_pool(args.prompts, kept, stats, args.out, args.force)
    print(json.dumps({"out": str(args.out), **asdict(stats), "tiler": description}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
