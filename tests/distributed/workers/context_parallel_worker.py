"""Context parallelism's gather and CP sums over plain gloo groups (run under torchrun, 4 ranks).

Every rank builds the same packed row (odd segment lengths), logits ``[L, V]`` and labels. For a
CP group of 2 (ranks {0, 1}, {2, 3}) and of 4 (all), each rank keeps its split of the row
(``context_parallel.split_microbatch`` / ``local_part``), computes log-probs with the project's
kernel (``megatron_r1v.kernels.vocab_parallel_logprobs``) and checks against a plain torch
reference on the whole row:

- ``gather_row``: the gathered per-token log-probs equal the reference in row order;
- ``sum_over_cp``: per-sample sums of the local rows summed over CP equal the reference's;
- gradients: a nonlinear loss of those sums (MPO-like), back-propagated on every rank with
  ``sum_over_cp``'s identity backward, gives local logit gradients that, gathered, equal the
  reference gradient (Megatron's convention: CP ranks' gradients add up);
- a token-linear sum (SFT / GRPO), all-reduced over CP, equals the reference total.

Rank 0 writes result.json with the largest differences; any failed check raises.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.kernels import vocab_parallel_logprobs
from megatron_r1v.models.r1v import context_parallel as cpx

LENGTHS = [13, 5, 22, 1, 6]
VOCAB = 37


def sequence_sums(values_L: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-segment sums (as trainer.mpo_step.sequence_sums; not imported: it pulls in Megatron, slow x 4 ranks)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment_L = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return torch.zeros(len(lengths), dtype=values_L.dtype).index_add(0, segment_L, values_L)


def make_row():
    gen = torch.Generator().manual_seed(7)
    n = sum(LENGTHS)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[torch.randperm(n, generator=gen)[: n // 4]] = IGNORE_INDEX
    logits = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64).float()
    cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    return logits, labels, cu


def pair_loss(seq_S: torch.Tensor) -> torch.Tensor:
    """Nonlinear in the per-sample sums, as MPO's pair losses are."""
    return -F.logsigmoid(0.3 * (seq_S[0] - seq_S[1])) - F.logsigmoid(0.1 * (seq_S[2] - seq_S[4])) + 0.01 * seq_S[3] ** 2


def reference(logits, labels, cu):
    whole = logits.clone().requires_grad_(True)
    mask = (labels != IGNORE_INDEX).float()
    targets = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
    logp = torch.log_softmax(whole, -1).gather(1, targets[:, None])[:, 0] * mask
    seq_S = sequence_sums(logp, cu)
    pair_loss(seq_S).backward()
    return logp.detach(), seq_S.detach(), whole.grad


def check_group(cp: int, group, rank: int, logits, labels, cu) -> dict:
    logp_ref, seq_ref, grad_ref = reference(logits, labels, cu)
    batch = {"tokens": torch.zeros(1, len(labels), dtype=torch.long), "labels": labels[None],
             "loss_mask": (labels != IGNORE_INDEX).float()[None], "position_ids": torch.zeros(1, len(labels)),
             "cu_seqlens": cu}
    local, layout = cpx.split_microbatch(batch, cp, rank)
    local_logits = cpx.local_part(logits, layout, rank).requires_grad_(True)
    labels_L, mask_L = local["labels"][0], local["loss_mask"][0]
    targets = torch.where(labels_L == IGNORE_INDEX, torch.zeros_like(labels_L), labels_L)
    logp_L, _ = vocab_parallel_logprobs(local_logits, targets, backend="torch")
    logp_L = logp_L * mask_L
    gathered = cpx.gather_row(logp_L.detach(), layout, group)
    seq_S = cpx.sum_over_cp(sequence_sums(logp_L, local["cu_seqlens"]), group)
    pair_loss(seq_S[: len(LENGTHS)]).backward()
    grad = cpx.gather_row(local_logits.grad, layout, group)
    token_sum = logp_L.detach().sum().double()
    dist.all_reduce(token_sum, group=group)
    out = {"logp": float((gathered - logp_ref).abs().max()), "seq": float((seq_S.detach() - seq_ref).abs().max()),
           "grad": float((grad - grad_ref).abs().max()), "token_sum": float(abs(token_sum - logp_ref.sum().double()))}
    assert out["logp"] < 1e-5 and out["seq"] < 1e-4 and out["grad"] < 1e-5 and out["token_sum"] < 1e-4, (cp, out)
    assert float(grad_ref.abs().max()) > 1e-3  # the check is not vacuous
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, "run with 4 processes"
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    logits, labels, cu = make_row()
    results = {"cp2": check_group(2, pairs[rank // 2], rank % 2, logits, labels, cu),
               "cp4": check_group(4, dist.group.WORLD, rank, logits, labels, cu)}
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
