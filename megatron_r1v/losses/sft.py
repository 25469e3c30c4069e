"""Supervised fine-tuning (SFT): the token-mean negative log-likelihood of the assistant
replies, the cold-start / iterative SFT stage of R1V and R1V3 (on rejection-sampled data).

For the conversations (x, y) of one optimizer step, with A_s the positions of sample s
whose next token belongs to an assistant reply (``data.template``: every reply of a
multi-turn conversation and the token closing it, ``<|im_end|>`` for QwQ):

    L = -(1 / N) sum_s sum_{t in A_s} log pi(y_{t+1} | y_<=t, images),   N = sum_s |A_s|

a mean over every assistant token of the step, not over samples: a long reply weighs in
proportion to its length (as in InternVL's and LLaMA-Factory's SFT). N counts the whole
step, every micro-batch of every data-parallel rank, and is known before the forward pass,
so the step's loss is a sum of per-token terms: each micro-batch contributes its summed
NLL divided by N (:func:`sft_loss`), and the micro-batches' and ranks' parts add up to L
whatever the packing and the parallel layout.
"""

from __future__ import annotations

import torch


def sft_loss(logprobs_T: torch.Tensor, mask_T: torch.Tensor, step_tokens: int) -> torch.Tensor:
    """A micro-batch's part of the step's loss: ``-sum(logprobs_T * mask_T) / step_tokens``.

    ``logprobs_T``: log-probs of the next tokens ``[T]``; ``mask_T``: 1 where the next token
    is an assistant reply token, else 0 ``[T]``; ``step_tokens``: N, the assistant tokens of
    the whole step (all micro-batches and data-parallel ranks).
    """
    if step_tokens < 1:
        raise ValueError(f"step_tokens must be >= 1 (the step's assistant tokens), got {step_tokens}")
    return -(logprobs_T * mask_T).sum() / step_tokens
