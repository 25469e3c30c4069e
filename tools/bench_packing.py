"""Memory of packed-row attention: the old dense-mask path against varlen attention.

    python tools/bench_packing.py [--length 8192 --segments 16] [--sweep] [--json FILE]

One Qwen2 decoder layer (Megatron-Core ``TransformerLayer``, local backend, fp32, CPU)
runs forward + backward on a packed row of ``--length`` tokens split into ``--segments``
equal samples, two ways:

* ``dense``: what the trainer ran before 2026-12-06, Megatron's ``DotProductAttention``
  with the block-diagonal causal ``[1, 1, L, L]`` mask (attention memory ~ L^2);
* ``varlen``: what it runs now, the row's ``cu_seqlens`` as ``PackedSeqParams`` (THD)
  into the layer spec the trainer builds (``models.r1v.spec.decoder_layer_spec('local')``:
  ``SegmentAttention``, one flash-attention call per sample).

Prints one JSON line per row: ``L``, ``segments``, ``dense_peak_bytes``,
``varlen_peak_bytes`` (peak bytes allocated above the inputs during forward + backward,
from torch.profiler's allocation timeline), their ratio, times, the largest difference
between the two paths' outputs (they compute the same function), and the bytes the varlen
path's attention saves for backward (Q, K, V, kernel outputs, O) next to
``planned_attention_bytes``, the memory planner's ``attention_bytes`` for the same shapes.
Goal at L=8192, 16 segments: varlen <= 0.5 x dense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
from bench_kernels import peak_extra_bytes  # tools/ (the script's own folder): one CPU peak measurement

SWEEP = [(2048, 1), (2048, 16), (4096, 4), (4096, 16), (8192, 16), (8192, 64)]


def attention_saved_bytes(fn: Callable[[], torch.Tensor], layer) -> int:
    """Bytes of the distinct storages autograd saves from the core attention's call to the
    output projection's (both included: Q, K, V, the kernel's outputs and O), weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}
    window = {"open": False}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if window["open"] and storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    attention = layer.self_attention
    hooks = [attention.core_attention.register_forward_pre_hook(lambda *_: window.update(open=True)),
             attention.linear_proj.register_forward_hook(lambda *_: window.update(open=False))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(storages.values())


def build_layers(args):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_r1v.models.r1v.model import decoder_transformer_config
    from megatron_r1v.models.r1v.presets import DecoderArch, R1VArch
    from megatron_r1v.models.r1v.spec import decoder_layer_spec

    decoder = DecoderArch(hidden_size=args.hidden, num_layers=1, num_attention_heads=args.heads,
                          num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=1024,
                          max_position_embeddings=max(L for L, _ in SWEEP + [(args.length, 0)]))
    config = decoder_transformer_config(decoder, on_cpu=True)
    varlen = TransformerLayer(config, decoder_layer_spec("local").submodules, layer_number=1)
    dense_spec = decoder_layer_spec("local")
    dense_spec.submodules.self_attention.submodules.core_attention = DotProductAttention  # the old path
    dense = TransformerLayer(config, dense_spec.submodules, layer_number=1)
    dense.load_state_dict(varlen.state_dict())
    return R1VArch(decoder=decoder), varlen, dense


def row_inputs(length: int, segments: int, args):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_r1v.trainer.schedule import packed_seq_params

    bounds = torch.linspace(0, length, segments + 1).round().to(torch.int32)
    segment = torch.repeat_interleave(torch.arange(segments), (bounds[1:] - bounds[:-1]).long())
    mask = ~((segment[:, None] == segment[None, :]) & torch.ones(length, length, dtype=torch.bool).tril())[None, None]
    rope = RotaryEmbedding(kv_channels=args.hidden // args.heads, rotary_percent=1.0, rotary_base=1_000_000)
    params = packed_seq_params(bounds, torch.device("cpu"))
    hidden = torch.randn(length, 1, args.hidden, generator=torch.Generator().manual_seed(0))
    return hidden, mask, params, rope(params.max_seqlen_q, packed_seq=True), rope(length)


def bench_row(arch, varlen, dense, length: int, segments: int, args) -> dict:
    from megatron_r1v.memory_plan import attention_bytes

    hidden, mask, params, varlen_rope, dense_rope = row_inputs(length, segments, args)
    x = hidden.clone().requires_grad_(True)
    grad = torch.randn_like(hidden)

    def run_varlen():
        out, _ = varlen(x, attention_mask=None, rotary_pos_emb=varlen_rope, packed_seq_params=params)
        return out

    def run_dense():
        # Positions run on across the row: RoPE is relative, so within a sample it equals a restart.
        out, _ = dense(x, attention_mask=mask, rotary_pos_emb=dense_rope)
        return out

    row = {"L": length, "segments": segments}
    outputs = {}
    for name, run in (("dense", run_dense), ("varlen", run_varlen)):
        outputs[name] = run().detach()
        row[f"{name}_peak_bytes"] = peak_extra_bytes(lambda: run().backward(grad), torch.device("cpu"))
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run().backward(grad)
            times.append((time.perf_counter() - started) * 1e3)
        row[f"{name}_fwd_bwd_ms"] = round(statistics.median(times), 1)
    row["varlen_to_dense_peak"] = round(row["varlen_peak_bytes"] / row["dense_peak_bytes"], 4)
    row["max_abs_output_diff"] = float((outputs["dense"] - outputs["varlen"]).abs().max())
    decoder = arch.decoder
    row["attention_saved_bytes"] = attention_saved_bytes(run_varlen, varlen)
    row["planned_attention_bytes"] = int(length * attention_bytes(
        4, decoder.hidden_size, decoder.num_query_groups * decoder.head_dim, local=True))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help=f"also run the (L, segments) sweep {SWEEP}")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per path (median)")
    parser.add_argument("--json", help="also write the rows to this file (a JSON list)")
    args = parser.parse_args(argv)
    from megatron_r1v.config import ParallelConfig
    from megatron_r1v.platform import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(), force_cpu=True)
    arch, varlen, dense = build_layers(args)
    shapes = [(args.length, args.segments)] + ([s for s in SWEEP if s != (args.length, args.segments)]
                                               if args.sweep else [])
    rows = []
    for length, segments in shapes:
        rows.append(bench_row(arch, varlen, dense, length, segments, args))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    destroy_distributed(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
