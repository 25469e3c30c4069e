"""torchrun worker: the vocab-parallel kernels at TP = world size against TP = 1.

Every rank builds the same full-vocabulary inputs from a fixed seed, runs each backend
on its own vocab slice with the TP group, then on the full logits with no group, and
asserts that log-probs, entropy, GRPO loss and stats agree and that its slice of the
gradient equals the same columns of the single-rank gradient. Prints one line per
checked case on rank 0; any mismatch raises (non-zero exit).
"""

import argparse

import torch
import torch.distributed as dist

from megatron_r1v.kernels import grpo_loss, vocab_parallel_logprobs

# Same arithmetic in a different order (the TP combine adds per-rank partial sums):
# fp32 agreement to ~1e-6 relative; 2e-5 absolute on values of order 10.
TOL = 2e-5


def full_inputs(n_tokens: int, vocab: int, dtype: torch.dtype, world: int):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(n_tokens, vocab, generator=gen) * 3
    shard = vocab // world
    logits[0, (world - 1) * shard:] = float("-inf")  # the last rank's slice of row 0 is all -inf
    logits[1, shard:] = torch.finfo(torch.float32).min  # Megatron's padding fill on other ranks
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    labels[0], labels[1] = 0, shard - 1  # labels must be reachable in those rows
    labels[2] = vocab - 1  # the last id, held by the last rank
    logp_ref = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0]
    old = logp_ref + 0.4 * torch.randn(n_tokens, generator=gen)
    ref = logp_ref + 0.3 * torch.randn(n_tokens, generator=gen)
    adv = torch.randn(n_tokens, generator=gen)
    mask = (torch.rand(n_tokens, generator=gen) > 0.25).float()
    return logits.to(dtype), labels, old, ref, adv, mask


def run_case(logits_TV, labels, old, ref, adv, mask, group, backend, temperature):
    leaf = logits_TV.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(
        leaf, labels, tp_group=group, temperature=temperature, return_entropy=True, backend=backend)
    gen = torch.Generator().manual_seed(5)
    (logp * torch.randn(logp.shape, generator=gen) + entropy * torch.randn(logp.shape, generator=gen)).sum().backward()
    lp_grad = leaf.grad
    leaf = logits_TV.clone().requires_grad_()
    loss, stats = grpo_loss(leaf, labels, old, ref, adv, mask, kl_beta=0.05, clip_high=0.28,
                            temperature=temperature, tp_group=group, backend=backend)
    loss.sum().backward()
    return dict(logp=logp.detach(), entropy=entropy.detach(), lp_grad=lp_grad, loss=loss.detach(),
                ratio=stats.ratio, clipped=stats.clipped, kl=stats.kl, loss_grad=leaf.grad)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="torch,interpret")
    parser.add_argument("--tokens", type=int, default=19)
    parser.add_argument("--vocab-per-rank", type=int, default=517)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    vocab = args.vocab_per_rank * world
    cols = slice(rank * args.vocab_per_rank, (rank + 1) * args.vocab_per_rank)
    for backend in args.backends.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            for temperature in (1.0, 0.8):
                logits, labels, old, ref, adv, mask = full_inputs(args.tokens, vocab, dtype, world)
                sharded = run_case(logits[:, cols].contiguous(), labels, old, ref, adv, mask, group, backend,
                                   temperature)
                single = run_case(logits, labels, old, ref, adv, mask, None, backend, temperature)
                for key in ("logp", "entropy", "loss", "ratio", "kl"):
                    torch.testing.assert_close(sharded[key], single[key], atol=TOL, rtol=1e-5, msg=key)
                assert torch.equal(sharded["clipped"], single["clipped"])
                for key in ("lp_grad", "loss_grad"):
                    # bf16 gradients round to 8 mantissa bits either way: one bf16 ulp.
                    atol = TOL if dtype == torch.float32 else 2 ** -8 * float(single[key].abs().max())
                    torch.testing.assert_close(sharded[key].float(), single[key][:, cols].float(), atol=atol,
                                               rtol=0, msg=key)
                assert torch.isfinite(sharded["loss_grad"]).all()
                if rank == 0:
                    print(f"ok backend={backend} dtype={dtype} temperature={temperature} tp={world}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
