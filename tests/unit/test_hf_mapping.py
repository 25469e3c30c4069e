"""HF Qwen2 <-> Megatron tensor mapping: layouts, round trips, padding, stage placement."""

import pytest
import torch

from megatron_r1v.models.r1v.hf_config import decoder_arch_from_hf_config, decoder_arch_to_hf_config
from megatron_r1v.models.r1v.hf_mapping import (
    INTERNVL_CHAT,
    ShardSpec,
    TensorMap,
    decoder_tensor_maps,
    hf_to_mcore_shard,
    mcore_shards_to_hf,
    stage_tensor_maps,
)
from megatron_r1v.models.r1v.presets import QWQ_32B, DecoderArch, get_preset

TINY = get_preset("tiny-qwen2").decoder
# 8 heads in 4 groups allows tp=4; vocab 1001 is odd.
WIDE = DecoderArch(hidden_size=64, num_layers=2, num_attention_heads=8, num_query_groups=4,
                   ffn_hidden_size=40, vocab_size=1001)


def random_hf_state(arch, seed=0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**decoder_arch_to_hf_config(arch)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,tp", [(TINY, 1), (TINY, 2), (WIDE, 2), (WIDE, 4)])
def test_round_trip_is_bit_exact(arch, tp):
    hf = random_hf_state(arch)
    padded = arch.padded_vocab_size(tp)
    assert padded % tp == 0 and padded > arch.vocab_size  # padding really happens
    spec = ShardSpec.for_decoder(arch, padded)
    maps = decoder_tensor_maps(arch)
    assert sorted(n for tm in maps for n in tm.hf) == sorted(hf), "maps must cover every HF tensor exactly once"
    back = {}
    for tm in maps:
        shards = [hf_to_mcore_shard(tm, hf, spec, tp, r) for r in range(tp)]
        if tm.kind == "vocab":
            assert shards[0].shape[0] == padded // tp
            assert torch.count_nonzero(torch.cat(shards)[arch.vocab_size:]) == 0
        back.update(mcore_shards_to_hf(tm, shards, spec))
    assert set(back) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_is_interleaved_per_query_group():
    arch, d = WIDE, WIDE.head_dim
    h, g, per = arch.hidden_size, arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    # Each row carries (kind, head index) so the layout can be read back.
    q = torch.stack([torch.full((h,), 1000.0 + i // d) for i in range(arch.num_attention_heads * d)])
    k = torch.stack([torch.full((h,), 2000.0 + i // d) for i in range(g * d)])
    v = torch.stack([torch.full((h,), 3000.0 + i // d) for i in range(g * d)])
    tm = decoder_tensor_maps(arch)[2]
    assert tm.mcore == "decoder.layers.0.self_attention.linear_qkv.weight"
    hf = dict(zip(tm.hf, (q, k, v)))
    spec = ShardSpec.for_decoder(arch, arch.padded_vocab_size(1))
    full = hf_to_mcore_shard(tm, hf, spec, 1, 0)[:, 0]
    expected = []
    for group in range(g):
        expected += [1000.0 + group * per + j for j in range(per) for _ in range(d)]
        expected += [2000.0 + group] * d + [3000.0 + group] * d
    assert full.tolist() == expected
    # TP=2: rank 1 holds groups 2 and 3 whole.
    rank1 = hf_to_mcore_shard(tm, hf, spec, 2, 1)[:, 0]
    assert rank1.tolist() == expected[len(expected) // 2 :]


def test_swiglu_fc1_shard_is_gate_and_up_slices():
    gate, up = torch.arange(40.0).reshape(40, 1), -torch.arange(40.0).reshape(40, 1)
    tm = TensorMap("x", ("g", "u"), "fc1", 0)
    spec = ShardSpec.for_decoder(WIDE, 1024)
    shard = hf_to_mcore_shard(tm, {"g": gate, "u": up}, spec, 4, 2)
    assert torch.equal(shard, torch.cat([gate[20:30], up[20:30]]))


def test_shape_errors_name_the_tensor():
    hf = random_hf_state(TINY)
    hf["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"][:-1]
    spec = ShardSpec.for_decoder(TINY, TINY.padded_vocab_size(1))
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight' has shape \(250, 64\); expected 251 rows"):
        hf_to_mcore_shard(decoder_tensor_maps(TINY)[0], hf, spec, 1, 0)


def test_stage_maps_partition_the_model():
    maps = decoder_tensor_maps(TINY, INTERNVL_CHAT, mcore_prefix="language_model.")
    stages = [stage_tensor_maps(maps, TINY.num_layers, r, 2, mcore_prefix="language_model.") for r in range(2)]
    assert sum(len(s) for s in stages) == len(maps)
    assert "language_model.embedding.word_embeddings.weight" in stages[0]
    assert "language_model.output_layer.weight" in stages[1]
    # Global layer 3 is local layer 1 of stage 1.
    tm = stages[1]["language_model.decoder.layers.1.mlp.linear_fc2.weight"]
    assert tm.layer == 3 and tm.hf == ("language_model.model.layers.3.mlp.down_proj.weight",)
    assert INTERNVL_CHAT.lm_head in stages[1]["language_model.output_layer.weight"].hf


def test_transformer_engine_names_for_fused_norms():
    names = {tm.mcore for tm in decoder_tensor_maps(TINY, backend="te")}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)


def test_hf_config_round_trip_and_errors():
    assert decoder_arch_from_hf_config(decoder_arch_to_hf_config(QWQ_32B)) == QWQ_32B
    cfg = decoder_arch_to_hf_config(QWQ_32B)
    del cfg["intermediate_size"]
    with pytest.raises(ValueError, match="missing key 'intermediate_size'"):
        decoder_arch_from_hf_config(cfg)


def test_qwq_32b_preset_matches_transformers_parameter_count():
    import transformers

    config = transformers.Qwen2Config(**decoder_arch_to_hf_config(QWQ_32B))
    with torch.device("meta"):  # counts without allocating 65 GB
        model = transformers.Qwen2ForCausalLM(config)
    reference = sum(p.numel() for p in model.parameters())
    assert QWQ_32B.num_parameters() == reference
    assert round(reference / 1e9, 2) == 32.76
    # TP-independent padding (checkpoints reshard); reshard_tp=1 is Megatron's own rule.
    assert [QWQ_32B.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [152576] * 4
    assert QWQ_32B.padded_vocab_size(1, reshard_tp=1) == 152064
    assert QWQ_32B.padded_vocab_size(16) == 153600


def random_internvl_state(preset="tiny-r1v"):
    import transformers

    from megatron_r1v.models.r1v.hf_config import transformers_internvl_config

    torch.manual_seed(0)
    config = transformers.InternVLConfig(**transformers_internvl_config(get_preset(preset)))
    model = transformers.InternVLForConditionalGeneration(config)
    return {k: v.detach().clone() + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tp", [1, 2])
def test_r1v_round_trip_is_bit_exact_with_dummy_heads(tp):
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT, model_tensor_maps

    arch = get_preset("tiny-r1v")
    hf = random_internvl_state()
    maps = model_tensor_maps(arch, TRANSFORMERS_LAYOUT)
    assert sorted(n for tm in maps for n in tm.hf) == sorted(hf), "maps must cover every HF tensor exactly once"
    spec = ShardSpec.for_model(arch, tp)
    assert spec.vision_heads == 3 and spec.vision_heads_padded == (3 if tp == 1 else 4)
    d = spec.vision_head_dim
    back = {}
    for tm in maps:
        shards = [hf_to_mcore_shard(tm, hf, spec, tp, r) for r in range(tp)]
        if tm.kind == "vision_qkv" and tp == 2:
            # Rank 1 holds real head 2 then dummy head 3: its [q; k; v] rows are zero.
            assert torch.count_nonzero(shards[1][3 * d :]) == 0 and torch.count_nonzero(shards[1][: 3 * d])
        if tm.kind == "head_row" and tp == 2:
            assert torch.count_nonzero(shards[1][:, d:]) == 0
        if tm.kind == "head_vec" and tp == 2:
            assert torch.count_nonzero(shards[1][d:]) == 0
        back.update(mcore_shards_to_hf(tm, shards, spec))
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_vision_qkv_is_per_head_q_k_v():
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT, vision_tensor_maps

    arch = get_preset("tiny-r1v")
    v = arch.vision
    tm = next(t for t in vision_tensor_maps(v, TRANSFORMERS_LAYOUT) if t.kind == "vision_qkv")
    d, heads = v.head_dim, v.num_attention_heads
    rows = {kind: torch.stack([torch.full((v.hidden_size,), base + i // d) for i in range(heads * d)])
            for kind, base in (("q", 100.0), ("k", 200.0), ("v", 300.0))}
    spec = ShardSpec.for_model(arch, 4)  # 3 heads padded to 4
    full = hf_to_mcore_shard(tm, dict(zip(tm.hf, rows.values())), spec, 1, 0)[:, 0].tolist()
    expected = []
    for h in range(4):
        for base in (100.0, 200.0, 300.0):
            expected += [base + h if h < heads else 0.0] * d
    assert full == expected


def _hf_in_layout(arch, layout, spec):
    """Random HF tensors of ``arch`` under the names of ``layout`` (fused qkv for skywork)."""
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT, hf_to_stored, model_tensor_maps, stored_to_hf

    source = random_internvl_state()
    hf = {}
    for ref, tm in zip(model_tensor_maps(arch, TRANSFORMERS_LAYOUT), model_tensor_maps(arch, layout)):
        hf.update(stored_to_hf(tm, hf_to_stored(ref, source, spec), spec))
    return hf


@pytest.mark.parametrize("layout_name", ["transformers", "skywork"])
@pytest.mark.parametrize("tp", [1, 2])
def test_stored_boxes_read_only_their_part_and_match_the_whole(layout_name, tp):
    from megatron_r1v.checkpoint.model_fragments import tensor_fragments
    from megatron_r1v.models.r1v import hf_mapping

    arch = get_preset("tiny-r1v")
    layout = {"transformers": hf_mapping.TRANSFORMERS_LAYOUT, "skywork": hf_mapping.SKYWORK_LAYOUT}[layout_name]
    spec = ShardSpec.for_model(arch, tp)
    hf = _hf_in_layout(arch, layout, spec)
    touched = []

    def read(name, index, out):
        touched.append(hf[name][index].numel())
        out.copy_(hf[name][index])

    for tm in hf_mapping.model_tensor_maps(arch, layout):
        whole = hf_mapping.hf_to_stored(tm, hf, spec)
        assert hf_mapping.stored_shape(tm, {n: tuple(hf[n].shape) for n in tm.hf}, spec) == tuple(whole.shape)
        meta = {n: hf[n].to("meta") for n in tm.hf}
        boxes = []
        for rank in range(tp):  # exactly the fragments a checkpoint holds
            local = hf_to_mcore_shard(tm, meta, spec, tp, rank)
            boxes += [(st.global_offset, st.local_shape)
                      for _, st, _ in tensor_fragments(tm, local, spec, tp=tp, tp_rank=rank, dp_rank=0)]
        if tm.kind in ("qkv", "vocab", "column"):  # and rows that cut across groups / the padding
            boxes.append(((3,) + (0,) * (whole.dim() - 1), (whole.shape[0] - 5,) + tuple(whole.shape[1:])))
        for offsets, sizes in boxes:
            touched.clear()
            box = hf_mapping.stored_box_from_hf(tm, read, spec, offsets, sizes, torch.bfloat16)
            expected = whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
            assert box.dtype == torch.bfloat16 and torch.equal(box, expected.to(torch.bfloat16)), (tm.mcore, offsets)
            assert box.untyped_storage().nbytes() == box.nbytes  # a writer saves it without copying
            assert sum(touched) <= box.numel(), f"{tm.mcore}: read more than the box"
        pieces = list(hf_mapping.hf_from_stored(tm, lambda index: whole[index].clone(), spec))
        expected = hf_mapping.stored_to_hf(tm, whole, spec)
        assert [n for n, _ in pieces] == list(tm.hf) == list(expected)
        assert all(torch.equal(t, expected[n]) for n, t in pieces), tm.mcore
