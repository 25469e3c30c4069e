"""The trainer's loss functions (the ones the GRPO, MPO and SFT steps hand to Megatron's
schedule) run the fused loss in place: backward writes d/dlogits over the model's logits
buffer, so no second [L, V/tp] tensor is allocated; the gradient is bit-identical to the
out-of-place one."""

import types
from functools import partial

import torch

from megatron_r1v.data.packing import PackedMicroBatch
from megatron_r1v.losses.grpo import GRPOLossConfig
from megatron_r1v.losses.mpo import MPOLossConfig
from megatron_r1v.trainer import grpo_step, mpo_step, sft_step

LENGTHS, VOCAB = (5, 7, 4), 53  # three samples packed in one row of 16 tokens (odd sizes)
CTX = types.SimpleNamespace(tp_group=None)  # the loss functions read only the TP group


def packed_row() -> PackedMicroBatch:
    gen = torch.Generator().manual_seed(0)
    length = sum(LENGTHS)
    labels = torch.randint(0, VOCAB, (1, length), generator=gen)
    labels[0, [0, 5, 12]] = -100  # the prompts' positions
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return PackedMicroBatch(torch.randint(0, VOCAB, (1, length), generator=gen), labels, (labels != -100).float(),
                            torch.cat([torch.arange(n) for n in LENGTHS])[None], cu, None,
                            [f"s{i}" for i in range(3)], [0, 1, 2])


def grad_and_buffer(loss_func, batch):
    """(the gradient reaching the output layer, the logits buffer after backward)."""
    weight = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    hidden = torch.randn(1, sum(LENGTHS), 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    logits = (hidden @ weight.t()).contiguous()  # the output layer's [1, L, V] buffer
    before = logits.detach().clone()
    loss, _ = loss_func(batch, logits)
    loss.backward()
    return hidden.grad, logits.detach(), before


def test_grpo_step_loss_is_in_place_and_exact():
    gen = torch.Generator().manual_seed(3)
    length = sum(LENGTHS)
    batch = grpo_step.make_grpo_microbatch(packed_row(), -torch.rand(length, generator=gen) * 3,
                                           -torch.rand(length, generator=gen) * 3,
                                           torch.randn(length, generator=gen), torch.rand(length, generator=gen))
    cfg = GRPOLossConfig(kl_beta=0.05, temperature=0.7)
    grad, buffer, before = grad_and_buffer(partial(grpo_step._grpo_loss_func, cfg, CTX, 2.0, []), batch)

    # The reference: the same loss out of place on a separate copy of the logits.
    from megatron_r1v.losses.grpo import grpo_policy_loss
    from megatron_r1v.trainer.schedule import label_targets

    leaf = before.clone()[0].requires_grad_()
    labels, mask = label_targets(batch)
    out = grpo_policy_loss(leaf, labels, batch["old_logprobs"][0], batch["ref_logprobs"][0], batch["advantages"][0],
                           mask, batch["weights"][0], cfg)
    (out.loss * 2.0).backward()
    assert torch.equal(buffer[0], leaf.grad)  # the buffer now holds d/dlogits: the write was in place
    assert not torch.equal(buffer, before)
    assert grad is not None and torch.isfinite(grad).all()


def test_mpo_step_loss_is_in_place_and_exact():
    batch = mpo_step.make_mpo_microbatch(packed_row(), [(0, 1)], [-9.0], [-11.0])
    cfg = MPOLossConfig()
    grad, buffer, before = grad_and_buffer(partial(mpo_step._mpo_loss_func, cfg, 0.0, 1.0, CTX, 1.0, []), batch)

    from megatron_r1v.kernels import vocab_parallel_logprobs

    from megatron_r1v.losses.mpo import mpo_pair_losses
    from megatron_r1v.trainer.schedule import label_targets

    leaf = before.clone()[0].requires_grad_()
    labels, mask = label_targets(batch)
    logp, _ = vocab_parallel_logprobs(leaf, labels)
    seq = mpo_step.sequence_sums(logp * mask, batch["cu_seqlens"])
    terms = mpo_pair_losses(seq[batch["pair_chosen"]], seq[batch["pair_rejected"]], batch["ref_chosen"],
                            batch["ref_rejected"], batch["chosen_lengths"], cfg, 0.0)
    terms.loss.sum().backward()
    assert torch.equal(buffer[0], leaf.grad)
    assert not torch.equal(buffer, before) and grad is not None


def test_sft_step_loss_is_in_place_and_exact():
    batch = sft_step.make_sft_microbatch(packed_row())
    tokens = int(batch["loss_mask"].sum())
    grad, buffer, before = grad_and_buffer(partial(sft_step._sft_loss_func, tokens, CTX, 3.0, []), batch)

    # The reference: plain torch cross-entropy over the labelled tokens, mean over them, out of place.
    leaf = before.clone()[0].requires_grad_()
    (torch.nn.functional.cross_entropy(leaf, batch["labels"][0], ignore_index=-100) * 3.0).backward()
    assert torch.allclose(buffer[0], leaf.grad, rtol=1e-6, atol=1e-9)  # the fused kernel vs torch: fp32 rounding
    assert not torch.equal(buffer, before) and grad is not None
