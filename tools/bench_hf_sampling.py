"""What the HF engine's per-sample random streams cost: ``HFRolloutEngine.generate`` as the GRPO
trainer calls it (requests with their ``stream``, ``n`` samples each, temperature 1, top-p 1),
the same call without streams (one generator for the call: evaluation, MPO pairs) and greedy
(no draws at all), on the same prompts, the same number of tokens (no stop tokens) and the
same weights. The differences are what the samplers cost: the softmax, then one
``exponential_`` per live row and step from that row's generator, or one ``multinomial``
over the batch. Prints one JSON object with the medians and the ratios to greedy.

    python tools/bench_hf_sampling.py [--preset tiny-r1v] [--prompts 8] [--n 8] [--tokens 32] [--repeats 7]

On the tiny model the forward is cheapest, so the ratio is an upper bound for real models,
whose forward dominates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace


def median_seconds(engine, requests, params, repeats: int) -> float:
    engine.generate(requests, params)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate(requests, params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-r1v", help="model preset (random weights)")
    parser.add_argument("--prompts", type=int, default=8, help="requests per call")
    parser.add_argument("--n", type=int, default=8, help="samples per request")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sample")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per mode (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if min(args.prompts, args.n, args.tokens, args.repeats, args.threads) < 1:
        parser.error("--prompts, --n, --tokens, --repeats and --threads must be >= 1")

    import torch

    from megatron_r1v.models.r1v.presets import get_preset
    from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine

    torch.set_num_threads(args.threads)
    arch = get_preset(args.preset)
    if arch.image_token_id is None:
        parser.error(f"--preset {args.preset}: no image token id (the 38B presets take it from a tokenizer); "
                     "this benchmark builds random tiny models: use a tiny preset such as tiny-r1v")
    gen = torch.Generator().manual_seed(0)
    # Text prompts of varied lengths (the image token is never drawn), streams as the trainer sets them.
    requests = [RolloutRequest(f"p{i}", torch.randint(0, arch.image_token_id, (20 + i,), generator=gen), stream=i)
                for i in range(args.prompts)]
    engine = HFRolloutEngine.from_arch(arch, seed=0)
    sampled = SamplingParams(n=args.n, max_new_tokens=args.tokens, seed=3)
    streams = median_seconds(engine, requests, sampled, args.repeats)
    call = median_seconds(engine, [replace(r, stream=None) for r in requests], sampled, args.repeats)
    greedy = median_seconds(engine, requests, replace(sampled, temperature=0), args.repeats)
    print(json.dumps({"preset": args.preset, "rows": args.prompts * args.n, "new_tokens": args.tokens,
                      "streams_s": round(streams, 5), "call_generator_s": round(call, 5),
                      "greedy_s": round(greedy, 5), "streams_over_greedy": round(streams / greedy, 3),
                      "call_generator_over_greedy": round(call / greedy, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
