"""SegmentAttention (the local backend's core attention) against attention written out in
plain torch, sample by sample: forward and gradients, GQA, odd segment lengths, a padding
segment, unpacked [s, b] batches (causal and unmasked), bad input, and the memory property
that no [L, L] tensor is ever built."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_r1v.models.r1v.attention import SegmentAttention

HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def attention(heads=HEADS, groups=GROUPS, mask=AttnMaskType.causal) -> SegmentAttention:
    config = TransformerConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=HEAD_DIM, attention_dropout=0.0,
                               use_cpu_initialization=True)
    return SegmentAttention(config, layer_number=1, attn_mask_type=mask, attention_type="self")


def reference(q_TND, k_TGD, v_TGD, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for one segment, key/value heads repeated for GQA."""
    rep = q_TND.shape[1] // k_TGD.shape[1]
    k, v = k_TGD.repeat_interleave(rep, dim=1), v_TGD.repeat_interleave(rep, dim=1)
    scores_NTT = torch.einsum("tnd,snd->nts", q_TND, k) / math.sqrt(q_TND.shape[-1])
    if causal:
        length = q_TND.shape[0]
        scores_NTT = scores_NTT.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("nts,snd->tnd", scores_NTT.softmax(-1), v).reshape(q_TND.shape[0], -1)


def thd(bounds: list[int]) -> PackedSeqParams:
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def random_qkv(tokens: int, heads=HEADS, groups=GROUPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, n, HEAD_DIM, generator=gen, requires_grad=True) for n in (heads, groups, groups)]


@pytest.mark.parametrize("bounds", [[0, 7], [0, 1, 6, 19, 20, 31], [0, 13, 13, 21]])
def test_packed_rows_attend_within_each_segment(bounds):
    q, k, v = random_qkv(bounds[-1])
    out = attention()(q, k, v, None, packed_seq_params=thd(bounds))
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    expected = torch.cat([reference(q[a:b], k[a:b], v[a:b], causal=True)
                          for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    # fp32: SDPA and the einsum reference sum the same ~20 products in different orders.
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_segments_are_independent_bit_for_bit():
    """Changing one segment's inputs leaves every other segment's output bit-identical."""
    bounds = [0, 5, 12, 20]
    q, k, v = (x.detach() for x in random_qkv(20))
    before = attention()(q, k, v, None, packed_seq_params=thd(bounds))
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[5:12] = torch.randn_like(x[5:12])
    after = attention()(q2, k2, v2, None, packed_seq_params=thd(bounds))
    assert torch.equal(before[:5], after[:5]) and torch.equal(before[12:], after[12:])
    assert not torch.equal(before[5:12], after[5:12])


@pytest.mark.parametrize("mask", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_unpacked_batches_attend_per_row(mask):
    seq, batch = 9, 3
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(seq, batch, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(seq, batch, GROUPS, HEAD_DIM, generator=gen) for _ in range(2))
    out_SBH = attention(mask=mask)(q, k, v, None)
    assert out_SBH.shape == (seq, batch, HEADS * HEAD_DIM)
    for row in range(batch):
        torch.testing.assert_close(out_SBH[:, row], reference(q[:, row], k[:, row], v[:, row],
                                                              causal=mask == AttnMaskType.causal),
                                   atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused():
    q, k, v = (x.detach() for x in random_qkv(10))
    with pytest.raises(ValueError, match="not a dense attention mask"):
        attention()(q, k, v, torch.zeros(1, 1, 10, 10, dtype=torch.bool), packed_seq_params=thd([0, 10]))
    with pytest.raises(ValueError, match=r"cu_seqlens \[0, 4, 9\] do not cover the row's 10 tokens"):
        attention()(q, k, v, None, packed_seq_params=thd([0, 4, 9]))
    with pytest.raises(ValueError, match="thd format"):
        attention()(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_no_tensor_grows_with_the_square_of_the_row():
    """A row of 16 segments x 64 tokens: no op output reaches L^2 = 1M elements (the dense mask
    alone would be that); a segment's own scores are at most heads x 64 x 64."""
    length, segments = 1024, 16
    q, k, v = random_qkv(length)
    with LargestTensor() as probe:
        out = attention()(q, k, v, None, packed_seq_params=thd(list(range(0, length + 1, length // segments))))
        out.sum().backward()
    assert probe.largest <= max(length * HEADS * HEAD_DIM, HEADS * 64 * 64), probe.largest
    assert probe.largest < length * length // 8
