"""Context parallelism's split and gather of packed rows (megatron_r1v/models/r1v/context_parallel.py),
its wiring in the schedule (split_for_cp), the CP-aware packer, config validation and the planner.

The multi-rank gather and the CP sums run over gloo in tests/distributed/test_context_parallel_ranks.py;
the CP attention itself needs CUDA and Transformer Engine (same file, skipped without them).
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_r1v.config import load_config
from megatron_r1v.data.packing import pack_samples
from megatron_r1v.data.template import IGNORE_INDEX, EncodedSample
from megatron_r1v.models.r1v import context_parallel as cpx
from megatron_r1v.trainer.mpo_step import sequence_sums

CASES = [  # (segment lengths, cp): lengths not divisible by 2*cp, one segment, many, a length-1 one
    ([13], 1), ([13], 2), ([1], 4), ([5, 7, 1], 2), ([16, 3, 9, 2, 30], 4), ([8, 8], 2), ([31, 1, 6], 4),
]


def cu(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


def te_partitioned_indices(cu_padded: list[int], cp: int, rank: int) -> list[int]:
    """TE's thd_get_partitioned_indices, restated token by token (context_parallel.cu): local token
    ``i`` of a segment whose local length is ``n = padded / cp`` is the first half's chunk ``rank``
    or the second half's chunk ``2 * cp - 1 - rank``."""
    out = []
    for start, end in zip(cu_padded, cu_padded[1:]):
        n = (end - start) // cp
        for i in range(n):
            chunk = rank if i < n // 2 else 2 * cp - 1 - rank
            out.append(start + chunk * (n // 2) + i % (n // 2))
    return out


@pytest.mark.parametrize("lengths,cp", CASES)
def test_split_and_restore_round_trip(lengths, cp):
    layout = cpx.plan_layout(cu(lengths), cp)
    x = torch.randn(sum(lengths), 3)
    parts = [cpx.local_part(x, layout, r) for r in range(cp)]
    assert all(p.shape == (layout.local_length, 3) for p in parts)
    assert torch.equal(cpx.restore_row(parts, layout), x)
    # The ranks' positions partition the padded layout, in TE's order.
    indices = [cpx.rank_indices(layout.cu_seqlens_padded, cp, r).tolist() for r in range(cp)]
    assert sorted(i for ix in indices for i in ix) == list(range(layout.padded_length))
    for r in range(cp):
        assert indices[r] == te_partitioned_indices(layout.cu_seqlens_padded.tolist(), cp, r)


@pytest.mark.parametrize("lengths,cp", CASES)
def test_padded_bounds_and_load_balance(lengths, cp):
    layout = cpx.plan_layout(cu(lengths), cp)
    padded = (layout.cu_seqlens_padded[1:] - layout.cu_seqlens_padded[:-1]).tolist()
    assert all(p % (2 * cp) == 0 and p - n < 2 * cp for p, n in zip(padded, lengths))
    assert torch.equal(layout.cu_seqlens, cu(lengths)) and layout.max_seqlen_padded == max(padded)
    # Causal work (query-key pairs incl. padding) is equal on every rank.
    work = {cpx.balanced_work(layout.cu_seqlens_padded, cp, r) for r in range(cp)}
    assert len(work) == 1


def test_hand_computed_layout():
    # Segments 5, 7, 1 over cp 2: padded to 8, 8, 4; rank 0 keeps chunks 0 and 3 of each.
    layout = cpx.plan_layout(cu([5, 7, 1]), 2)
    assert layout.cu_seqlens_padded.tolist() == [0, 8, 16, 20]
    assert layout.local_cu_seqlens().tolist() == [0, 4, 8, 10]
    assert layout.row_to_padded.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 16]
    assert cpx.rank_indices(layout.cu_seqlens_padded, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15, 16, 19]
    assert cpx.rank_indices(layout.cu_seqlens_padded, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13, 17, 18]
    # Causal work: rank 0 (1+2 + 7+8) * 2 + (1 + 4) = 41; rank 1 (3+4+5+6) * 2 + (2 + 3) = 41.
    assert [cpx.balanced_work(layout.cu_seqlens_padded, 2, r) for r in range(2)] == [41, 41]
    # A pipeline target adds one padding segment; the multiple can include TP (sequence parallelism).
    longer = cpx.plan_layout(cu([5, 7, 1]), 2, min_padded_length=28)
    assert longer.cu_seqlens_padded.tolist() == [0, 8, 16, 20, 28] and longer.cu_seqlens.tolist() == [0, 5, 12, 13, 21]
    assert cpx.plan_layout(cu([5]), 2, multiple=8).cu_seqlens_padded.tolist() == [0, 8]
    assert cpx.cp_token_multiple(2) == 4 and cpx.cp_token_multiple(2, 4, True) == 16
    with pytest.raises(ValueError, match="multiple of 2 \\* cp"):
        cpx.plan_layout(cu([5]), 2, multiple=6)
    with pytest.raises(ValueError, match="min_padded_length"):
        cpx.plan_layout(cu([5]), 2, min_padded_length=10)


def packed_row(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    labels = torch.randint(0, 50, (1, n), generator=gen)
    labels[0, ::3] = IGNORE_INDEX
    return {
        "tokens": torch.randint(1, 50, (1, n), generator=gen),
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": torch.cat([torch.arange(k) for k in lengths])[None],
        "cu_seqlens": cu(lengths),
        "advantages": torch.randn(1, n, generator=gen),
        "old_logprobs": torch.randn(1, n, generator=gen),
        "pixel_values": torch.randn(2, 3, 4, 4, generator=gen),
        "pair_chosen": torch.tensor([0]),
    }


@pytest.mark.parametrize("cp", [2, 4])
def test_split_microbatch_fields(cp):
    lengths = [9, 4, 11]
    batch = packed_row(lengths)
    parts = [cpx.split_microbatch(batch, cp, r) for r in range(cp)]
    layout = parts[0][1]
    for r, (local, _) in enumerate(parts):
        assert torch.equal(local[cpx.CP_INDEX], cpx.rank_indices(layout.cu_seqlens_padded, cp, r))
        assert torch.equal(local["cu_seqlens"], layout.local_cu_seqlens())
        assert torch.equal(local[cpx.CP_CU_SEQLENS], cu(lengths))
        assert torch.equal(local[cpx.CP_CU_SEQLENS_PADDED], layout.cu_seqlens_padded)
        # Model inputs stay whole (padded layout): real tokens keep their ids and global positions.
        assert local["tokens"].shape == (1, layout.padded_length)
        assert torch.equal(local["tokens"][0, layout.row_to_padded], batch["tokens"][0])
        assert torch.equal(local["position_ids"][0, layout.row_to_padded], batch["position_ids"][0])
        for key in ("labels", "loss_mask", "advantages", "old_logprobs"):
            assert local[key].shape == (1, layout.local_length)
            assert torch.equal(local[key][0], cpx.local_part(batch[key][0], layout, r, cpx.FILL.get(key, 0)))
        # Padding has no targets; non-per-token entries pass through.
        assert int(local["loss_mask"].sum()) == int((local["labels"] != IGNORE_INDEX).sum())
        assert local["pixel_values"] is batch["pixel_values"] and local["pair_chosen"] is batch["pair_chosen"]
    for key in ("labels", "loss_mask", "advantages"):
        assert torch.equal(cpx.restore_row([p[key][0] for p, _ in parts], layout), batch[key][0])
    assert sum(int(p["loss_mask"].sum()) for p, _ in parts) == int(batch["loss_mask"].sum())


@pytest.mark.parametrize("lengths,cp", CASES)
def test_per_sample_sums_over_local_rows_add_up(lengths, cp):
    """Each rank's per-sample sums over its local row (local cu_seqlens) add up to the unsplit ones."""
    batch = packed_row(lengths, seed=cp)
    values = batch["old_logprobs"][0] * batch["loss_mask"][0]
    whole = sequence_sums(values, batch["cu_seqlens"])
    total = torch.zeros_like(whole)
    for r in range(cp):
        local, _ = cpx.split_microbatch(batch, cp, r)
        total += sequence_sums(local["old_logprobs"][0] * local["loss_mask"][0], local["cu_seqlens"])
    torch.testing.assert_close(total, whole)


def test_split_needs_a_packed_row():
    batch = packed_row([4])
    del batch["cu_seqlens"]
    with pytest.raises(ValueError, match="cu_seqlens"):
        cpx.split_microbatch(batch, 2, 0)


def test_schedule_split_for_cp_pads_pipeline_rows_alike():
    from megatron_r1v.trainer.schedule import _model_inputs, packed_seq_params, split_for_cp

    rows = [packed_row([9, 4]), packed_row([3])]
    model = SimpleNamespace(config=SimpleNamespace(sequence_parallel=False))
    ctx = SimpleNamespace(cp=2, tp=2, pp=2, cp_rank=1)
    batches, layouts = split_for_cp(model, rows, ctx)
    assert {b["tokens"].shape[1] for b in batches} == {16} and [lt.padded_length for lt in layouts] == [16, 16]
    ctx.pp = 1
    batches, layouts = split_for_cp(SimpleNamespace(config=SimpleNamespace(sequence_parallel=True)), rows, ctx)
    assert [lt.padded_length for lt in layouts] == [24, 8] and layouts[0].multiple == 8
    _, kwargs = _model_inputs(batches[0], batches[0], torch.device("cpu"))
    params = kwargs["packed_seq_params"]
    assert params.cu_seqlens_q.tolist() == [0, 9, 13] and params.cu_seqlens_q_padded.tolist() == [0, 16, 24]
    assert params.max_seqlen_q == 16 and torch.equal(kwargs["cp_index"], batches[0][cpx.CP_INDEX])
    assert packed_seq_params(cu([3, 4]), torch.device("cpu")).cu_seqlens_q_padded is None
    with pytest.raises(ValueError, match="unpacked"):
        split_for_cp(model, [{k: v for k, v in rows[0].items() if k != "cu_seqlens"}], ctx)


def test_packer_counts_cp_padding():
    samples = [EncodedSample(f"s{i}", torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long), n, (), 0)
               for i, n in enumerate([5, 6, 3, 7])]
    pixels = [None] * len(samples)
    rows = pack_samples(samples, pixels, token_budget=16, pad_id=0, seq_multiple=4)
    for row in rows:
        assert cpx.plan_layout(row.cu_seqlens, 2).padded_length <= 16
    # Pipeline rows: the padded layout is exactly the budget.
    rows = pack_samples(samples, pixels, token_budget=16, pad_id=0, pad_to_multiple=16, seq_multiple=4)
    assert all(cpx.plan_layout(row.cu_seqlens, 2).padded_length == 16 for row in rows)
    with pytest.raises(ValueError, match="seq_multiple"):
        pack_samples(samples, pixels, token_budget=16, pad_id=0, pad_to_multiple=6, seq_multiple=4)


def cp_config(*overrides):
    return load_config(None, ["model.preset=tiny-r1v", "model.backend=te", "parallel.cp=2", "train.stage=sft",
                              "train.seq_length=64", "sft.micro_batch_tokens=128", *overrides])


def test_validation_names_the_keys():
    assert cp_config().parallel.cp == 2
    with pytest.raises(ValueError, match="model.backend=te"):
        cp_config("model.backend=local")
    with pytest.raises(ValueError, match="sft.micro_batch_tokens .* multiple of 4"):
        cp_config("parallel.pp=2", "sft.micro_batch_tokens=130")
    with pytest.raises(ValueError, match="sft.micro_batch_tokens \\(64\\) must be >= 68"):
        cp_config("train.seq_length=65", "sft.micro_batch_tokens=64")
    with pytest.raises(ValueError, match="mpo.micro_batch_tokens"):
        cp_config("train.stage=mpo", "train.seq_length=63", "mpo.micro_batch_tokens=126")
    with pytest.raises(ValueError, match="parallel.cp_comm_type"):
        cp_config("parallel.cp_comm_type=ring")
    with pytest.raises(ValueError, match="grpo.importance_level=sequence"):
        cp_config("train.stage=grpo", "grpo.micro_batch_tokens=128", "grpo.importance_level=sequence")


def test_a2a_needs_heads_divisible_by_cp_and_cuda_needs_te():
    from megatron_r1v.config import ModelConfig, ParallelConfig
    from megatron_r1v.models.r1v.presets import get_preset
    from megatron_r1v.validation import check_context_parallel_arch, check_model_on_machine

    arch = get_preset("r1v2-38b")  # 40 heads, 8 query groups
    check_context_parallel_arch(arch, ParallelConfig(tp=8, cp=2, cp_comm_type="p2p"))
    with pytest.raises(ValueError, match="cp_comm_type=a2a"):
        check_context_parallel_arch(arch, ParallelConfig(tp=8, cp=2, cp_comm_type="a2a"))
    check_context_parallel_arch(arch, ParallelConfig(tp=4, cp=2, cp_comm_type="a2a"))
    with pytest.raises(ValueError, match="needs CUDA"):
        check_model_on_machine(ModelConfig(backend="local"), ParallelConfig(cp=2), "cpu")
    with pytest.raises(ValueError, match="Transformer Engine"):
        check_model_on_machine(ModelConfig(backend="local"), ParallelConfig(cp=2), "cuda")


def test_planner_divides_tokens_and_adds_kv_exchange():
    from megatron_r1v.memory_plan import _Act, cp_exchange_bytes, param_bytes, stage_activations

    base = ["model.preset=r1v2-38b", "model.params_dtype=bf16", "parallel.tp=8", "model.backend=te",
            "train.stage=grpo", "grpo.micro_batch_tokens=32768", "train.seq_length=16384", "model.freeze=all",
            "optimizer.use_distributed_optimizer=true"]
    one = load_config(None, base)
    two = load_config(None, [*base, "parallel.cp=2"])
    arch = get_arch()
    bf16_tp8 = _Act(2, 8, False, False, False)
    # p2p: 4 blocks of local K/V: 4 * (2 * 2 bytes * 8 groups * 128 / 8) * 16384 tokens = 4 * 512 * 16384.
    assert cp_exchange_bytes(arch, bf16_tp8, 16384, 2, "p2p") == 4 * 512 * 16384
    assert cp_exchange_bytes(arch, bf16_tp8, 16384, 2, "all_gather") == 2 * 512 * 2 * 16384
    acts_1, _ = stage_activations(one, 0, 0)
    acts_2, _ = stage_activations(two, 0, 0)
    assert acts_2["cp_exchange"] == 4 * 512 * 16384 and "cp_exchange" not in acts_1
    assert acts_2["decoder"] == acts_1["decoder"] / 2 and acts_2["logits"] == acts_1["logits"] / 2
    # The distributed optimizer shards over DP x CP (dp = 4 with 64 GPUs, tp 8, cp 2).
    assert param_bytes(two, 0, 0, 4 * 2).optimizer == param_bytes(one, 0, 0, 8).optimizer


def get_arch():
    from megatron_r1v.models.r1v.presets import get_preset

    return get_preset("r1v2-38b")


class _Recorder(torch.nn.Module):
    """Stands in for the GPTModel inside R1VModel: embeds ids as a fixed table, returns the decoder input."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        from megatron.core.transformer.enums import ModelType

        self.config = SimpleNamespace(sequence_parallel=False)
        self.pre_process, self.post_process, self.model_type = True, False, ModelType.encoder_or_decoder
        self.table = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0))

    def embedding(self, input_ids, position_ids):
        return self.table[input_ids].transpose(0, 1) + position_ids.transpose(0, 1)[..., None]  # [S, B, H]

    def forward(self, input_ids, position_ids, attention_mask, decoder_input, packed_seq_params):
        return decoder_input


def test_model_scatters_images_before_keeping_its_positions():
    """R1VModel with cp_index: each rank's decoder input is its part of the whole row's input
    embeddings (image features in place, global positions), for every CP rank."""
    from megatron_r1v.models.r1v.model import R1VModel
    from megatron_r1v.models.r1v.presets import get_preset

    arch = get_preset("tiny-r1v")
    img, per_tile, hidden = arch.image_token_id, arch.tokens_per_tile, arch.decoder.hidden_size
    features = torch.randn(4, per_tile, hidden)  # 4 tiles' adapter outputs
    model = R1VModel(arch, _Recorder(arch.decoder.vocab_size, hidden), vision=torch.nn.Identity(),
                     adapter=torch.nn.Identity())
    lengths = [7, 2 * per_tile + 3, per_tile + 5]
    ids = torch.randint(0, img, (sum(lengths),))
    ids[2:2 + per_tile] = img  # sample 0: one tile at 2; sample 1: two tiles at its start; sample 2: one at 1
    ids[7:7 + 2 * per_tile] = img
    ids[7 + 2 * per_tile + 3 + 1:7 + 2 * per_tile + 3 + 1 + per_tile] = img
    batch = {"tokens": ids[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
             "cu_seqlens": cu(lengths), "labels": ids[None]}
    whole = model(batch["tokens"], batch["position_ids"], pixel_values=features)[:, 0]
    for cp in (2, 4):
        parts = []
        for r in range(cp):
            local, layout = cpx.split_microbatch(batch, cp, r)
            out = model(local["tokens"], local["position_ids"], pixel_values=features, cp_index=local[cpx.CP_INDEX])
            assert out.shape == (layout.local_length, 1, hidden)
            parts.append(out[:, 0])
        torch.testing.assert_close(cpx.restore_row(parts, layout), whole)
