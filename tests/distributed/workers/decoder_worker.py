"""torchrun worker for the decoder tests: parity (logits + grads) and short training runs.

Reads HF weights lazily from a safetensors file, builds this rank's Megatron stage,
and writes results under --out (only from the ranks that own them).
"""

import argparse
import json
import os

import torch
from lm_steps import lm_forward_backward, lm_train_step  # the workers folder (the script's own)
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_r1v.checkpoint.weights import gather_hf_tensors, load_hf_weights
from megatron_r1v.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1v.models.r1v.hf_mapping import QWEN2_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import destroy_distributed, init_distributed
from megatron_r1v.trainer.schedule import attach_ddp_hooks, causal_lm_microbatch, gather_vocab_logits
from megatron_r1v.trainer.setup import build_model_stage, build_optimizer, wrap_ddp


def write_load_errors(stage, ctx, args) -> None:
    """Loads a checkpoint with one tensor missing, then one with a wrong shape; records the errors."""
    with safe_open(args.hf_file, framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    messages = {}
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    wrong = dict(tensors)
    wrong["model.layers.2.self_attn.o_proj.weight"] = wrong["model.layers.2.self_attn.o_proj.weight"][:, :-2]
    for case, source in (("missing", missing), ("shape", wrong)):
        try:
            load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, source.__getitem__)
            messages[case] = None
        except (KeyError, ValueError) as err:
            messages[case] = f"{type(err).__name__}: {err}"
    if ctx.rank == 0:
        json.dump(messages, open(os.path.join(args.out, "errors.json"), "w"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parity", "train", "errors"])
    parser.add_argument("--hf-file", required=True)
    parser.add_argument("--data-file", required=True, help="torch file with tokens [N, S+1]")
    parser.add_argument("--preset", default="tiny-qwen2")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--recompute", choices=["selective", "full"], help="model.recompute_granularity")
    parser.add_argument("--recompute-method", default="uniform", choices=["uniform", "block"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # Parity means fp32: keep cuDNN/cuBLAS from using TF32 when this runs on a GPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    arch = get_preset(args.preset)
    model_cfg = ModelConfig(preset=args.preset, backend="local", freeze="all", params_dtype=args.dtype,
                            recompute_granularity=args.recompute, recompute_method=args.recompute_method)
    stage = build_model_stage(arch, ctx, model_cfg, layout=QWEN2_LAYOUT)
    if args.mode == "errors":
        write_load_errors(stage, ctx, args)
        destroy_distributed(ctx)
        return
    with safe_open(args.hf_file, framework="pt") as reader:
        load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)

    data = torch.load(args.data_file)
    tokens, labels = data[:, :-1], data[:, 1:]
    owner = ctx.rank == 0
    if args.mode == "parity":
        mb = causal_lm_microbatch(tokens, labels)
        result = lm_forward_backward(stage.model, [mb], ctx, keep_logits=True)
        if ctx.is_last_stage:
            logits = gather_vocab_logits(result.logits[0], ctx, arch.decoder.vocab_size)
            if ctx.tp_rank == 0 and ctx.dp_rank == 0:
                torch.save(logits, os.path.join(args.out, "logits.pt"))
        grads = gather_hf_tensors(stage.model, stage.stage_maps, stage.shard_spec, ctx, grads=True)
        if owner:
            save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(args.out, "grads.safetensors"))
            json.dump({"loss": result.loss}, open(os.path.join(args.out, "result.json"), "w"))
    else:
        ddp = wrap_ddp(stage.model, stage.config, use_distributed_optimizer=args.distributed_optimizer)
        opt_cfg = OptimizerConfig(lr=args.lr, clip_grad=1.0, use_distributed_optimizer=args.distributed_optimizer)
        optimizer = build_optimizer([ddp], opt_cfg, args.dtype)
        attach_ddp_hooks(ddp, optimizer)
        # Each DP rank takes a contiguous slice of the global batch.
        per_rank = tokens.shape[0] // ctx.dp
        rows = slice(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
        mbs = [
            causal_lm_microbatch(tokens[rows][i : i + args.micro_batch], labels[rows][i : i + args.micro_batch])
            for i in range(0, per_rank, args.micro_batch)
        ]
        losses, norms = [], []
        for _ in range(args.steps):
            loss, grad_norm = lm_train_step(ddp, optimizer, mbs, ctx)
            losses.append(loss)
            norms.append(grad_norm)
        weights = gather_hf_tensors(ddp, stage.stage_maps, stage.shard_spec, ctx)
        if owner:
            save_file({k: v.float().contiguous() for k, v in weights.items()}, os.path.join(args.out, "weights.safetensors"))
            recompute = [stage.config.recompute_granularity, stage.config.recompute_method]
            result = {"losses": losses, "grad_norms": norms, "recompute": recompute}
            json.dump(result, open(os.path.join(args.out, "result.json"), "w"))
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
