"""torchrun worker for the R1V model tests: parity with transformers' InternVL, freeze policies.

parity: loads transformers-layout weights, runs the given batches through this rank's
R1VModel stage (forward + backward of a token-mean CE), writes full logits and the
adapter gradients under HF names.
freeze: for each freeze policy, builds the model, runs one optimizer step and writes
which parameters got gradients and optimizer state.
"""

import argparse
import json
import os

import torch
from lm_steps import lm_forward_backward, lm_train_step  # the workers folder (the script's own)
from r1v_checks import dummy_head_max
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_r1v.checkpoint.model_fragments import load_model_checkpoint
from megatron_r1v.checkpoint.weights import gather_hf_tensors, load_hf_weights, unwrap_model
from megatron_r1v.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
from megatron_r1v.models.r1v.model import FREEZE_POLICIES
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import destroy_distributed, init_distributed
from megatron_r1v.trainer.schedule import attach_ddp_hooks, gather_vocab_logits
from megatron_r1v.trainer.setup import build_model_stage, build_optimizer, wrap_ddp


def microbatch(batch: dict) -> dict:
    ids = batch["input_ids"]
    b, s = ids.shape
    mb = {
        "tokens": ids,
        "labels": batch["labels"],
        "loss_mask": torch.ones(b, s),
        "position_ids": torch.arange(s).expand(b, s),
    }
    if batch.get("pixel_values") is not None:
        mb["pixel_values"] = batch["pixel_values"]
    return mb


def parity(args, ctx, arch) -> None:
    stage = build_model_stage(arch, ctx, ModelConfig(preset=args.preset, backend="local"), layout=TRANSFORMERS_LAYOUT)
    if args.mode == "load":  # from a dist checkpoint written at any TP/PP
        load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, args.mcore_dir)
    else:
        with safe_open(args.hf_file, framework="pt") as reader:
            load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)
    batches = torch.load(args.data_file)
    out = {}
    for i, batch in enumerate(batches):
        stage.model.zero_grad()
        result = lm_forward_backward(stage.model, [microbatch(batch)], ctx, keep_logits=True)
        if ctx.is_last_stage:
            out[f"logits_{i}"] = gather_vocab_logits(result.logits[0], ctx, arch.decoder.vocab_size)
        grads = gather_hf_tensors(stage.model, stage.stage_maps, stage.shard_spec, ctx, grads=True)
        frozen_with_grad = [n for n, p in stage.model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad, frozen_with_grad
        if ctx.rank == 0:
            out.update({f"grad_{i}.{k}": v for k, v in grads.items() if k.startswith("model.multi_modal_projector.")})
    if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        save_file({k: v.contiguous() for k, v in out.items() if k.startswith("logits")},
                  os.path.join(args.out, "logits.safetensors"))
    if ctx.rank == 0:
        save_file({k: v.contiguous() for k, v in out.items() if k.startswith("grad")},
                  os.path.join(args.out, "grads.safetensors"))


def freeze(args, ctx, arch) -> None:
    batches = torch.load(args.data_file)
    report = {}
    for policy in FREEZE_POLICIES:
        stage = build_model_stage(arch, ctx, ModelConfig(preset=args.preset, backend="local", freeze=policy),
                                  layout=TRANSFORMERS_LAYOUT)
        ddp = wrap_ddp(stage.model, stage.config)
        optimizer = build_optimizer([ddp], OptimizerConfig(lr=1e-2), "fp32")
        attach_ddp_hooks(ddp, optimizer)
        lm_train_step(ddp, optimizer, [microbatch(b) for b in batches], ctx)
        model = unwrap_model(ddp)
        names = {id(p): n for n, p in model.named_parameters()}
        in_optimizer = [names[id(p)] for g in optimizer.optimizer.param_groups for p in g["params"]]
        with_state = [names[id(p)] for p in optimizer.optimizer.state]
        with_grad = [n for n, p in model.named_parameters()
                     if getattr(p, "main_grad", None) is not None or p.grad is not None]
        dummy_max, dummy_entries = dummy_head_max(model, lambda p: p)
        report[policy] = {"trainable": stage.trainable, "in_optimizer": in_optimizer, "with_state": with_state,
                          "with_grad": with_grad, "all": list(names.values()), "dummy_max_abs": dummy_max,
                          "dummy_entries": dummy_entries}
    if ctx.rank == 0:
        json.dump(report, open(os.path.join(args.out, "freeze.json"), "w"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parity", "freeze", "load"])
    parser.add_argument("--mcore-dir", help="model checkpoint to load (mode load)")
    parser.add_argument("--hf-file")
    parser.add_argument("--data-file", required=True, help="torch file: list of batch dicts")
    parser.add_argument("--preset", default="tiny-r1v")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # Parity means fp32: keep cuDNN/cuBLAS from using TF32 when this runs on a GPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    arch = get_preset(args.preset)
    (freeze if args.mode == "freeze" else parity)(args, ctx, arch)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
