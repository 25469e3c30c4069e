"""Activation recomputation (``model.recompute_*``) really recomputes, in the decoder and in
the vision tower, and leaves the gradients as they were.

One process (a one-rank gloo group, as the CPU trainer runs) builds the tiny R1V model
(2-layer InternViT + adapter + 4-layer Qwen2) with ``model.freeze=all`` for each setting,
counts the calls of every transformer layer and of every layer's core attention with
forward hooks, and runs one micro-batch with two images through the trainer's schedule.
Calls made after the loss was computed are the backward's: recomputation. Without
recomputation there must be none, so a setting that is accepted but not applied fails.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from megatron_r1v.config import ModelConfig, ParallelConfig
from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import LaunchEnv, destroy_distributed, init_distributed
from megatron_r1v.trainer.schedule import causal_lm_microbatch, run_schedule
from megatron_r1v.trainer.setup import build_model_stage

PRESET = "tiny-r1v"
ARCH = get_preset(PRESET)
LAYERS = {"vision": ARCH.vision.num_layers, "decoder": ARCH.decoder.num_layers}  # 2 and 4
# (granularity, method, num_layers) -> layers recomputed per block in the backward.
SETTINGS = {
    "none": ((None, "uniform", 1), {"vision": 0, "decoder": 0}),
    "selective": (("selective", "uniform", 1), {"vision": 0, "decoder": 0}),  # core attention only
    "full-uniform-1": (("full", "uniform", 1), LAYERS),
    # 4 layers per group, capped at each block's depth: one group per block.
    "full-uniform-4": (("full", "uniform", 4), LAYERS),
    # block: only the first recompute_num_layers layers of each block.
    "full-block-1": (("full", "block", 1), {"vision": 1, "decoder": 1}),
}


@pytest.fixture(scope="module")
def ctx():
    context = init_distributed(ParallelConfig(), env=LaunchEnv.from_environ({}))  # one rank, a free port
    yield context
    destroy_distributed(context)


def build_model(ctx, granularity, method: str, num_layers: int):
    cfg = ModelConfig(preset=PRESET, backend="local", freeze="all", recompute_granularity=granularity,
                      recompute_method=method, recompute_num_layers=num_layers)
    return build_model_stage(ARCH, ctx, cfg, layout=TRANSFORMERS_LAYOUT).model


def count_calls(model) -> Counter:
    """Counter of (block, "layer" | "core_attention") calls, kept up to date by hooks."""
    counts: Counter = Counter()
    for block, encoder in (("vision", model.vision.encoder), ("decoder", model.language_model.decoder)):
        assert len(encoder.layers) == LAYERS[block]
        for layer in encoder.layers:
            layer.register_forward_hook(lambda *_, key=(block, "layer"): counts.update([key]))
            layer.self_attention.core_attention.register_forward_hook(
                lambda *_, key=(block, "core_attention"): counts.update([key]))
    return counts


def image_microbatch() -> dict:
    """One row of 32 tokens with an image of 1 tile and one of 2 tiles, random targets."""
    gen = torch.Generator().manual_seed(5)
    text_ids = torch.randint(0, ARCH.image_token_id, (32 - 3 * ARCH.tokens_per_tile,), generator=gen)
    image_ids = torch.full((ARCH.tokens_per_tile,), ARCH.image_token_id)  # one tile
    ids = torch.cat([text_ids[:3], image_ids, text_ids[3:8], image_ids, image_ids, text_ids[8:]])
    batch = causal_lm_microbatch(ids[None], torch.randint(0, ARCH.decoder.vocab_size, (1, 32), generator=gen))
    side = ARCH.vision.image_size
    batch["pixel_values"] = torch.randn(3, 3, side, side, generator=gen)  # [tiles, 3, H, W]
    return batch


def forward_backward(model, ctx, counts: Counter) -> tuple[Counter, Counter, dict]:
    """(calls in the forward, calls in the backward, every parameter's gradient)."""
    in_forward: Counter = Counter()

    def loss_func(batch, logits_BSv):
        in_forward.update(counts)  # the forward is done when the loss is computed
        loss = F.cross_entropy(logits_BSv[0].float(), batch["labels"][0])
        return loss, {"loss": loss.detach()}

    model.zero_grad(set_to_none=True)
    run_schedule(model, [image_microbatch()], ctx, loss_func, forward_only=False)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return in_forward, counts - in_forward, grads


@pytest.fixture(scope="module")
def baseline(ctx):
    """The model without recomputation: its weights (shared by every setting) and gradients."""
    model = build_model(ctx, None, "uniform", 1)
    counts = count_calls(model)
    _, _, grads = forward_backward(model, ctx, counts)
    return {"state": {n: p.detach().clone() for n, p in model.named_parameters()}, "grads": grads}


def expected_backward_calls(granularity, recomputed_layers: dict) -> Counter:
    """full: each recomputed layer runs again, its attention with it; selective: every
    layer's core attention runs again and nothing else; none: nothing runs again."""
    expected: Counter = Counter()
    for block, depth in LAYERS.items():
        expected[(block, "layer")] = recomputed_layers[block]
        expected[(block, "core_attention")] = depth if granularity == "selective" else recomputed_layers[block]
    return +expected  # drops zero counts


@pytest.mark.parametrize("setting", SETTINGS)
def test_recomputation_reruns_the_forward_in_backward_with_unchanged_grads(setting, ctx, baseline):
    (granularity, method, num_layers), recomputed_layers = SETTINGS[setting]
    model = build_model(ctx, granularity, method, num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(baseline["state"][name])
    counts = count_calls(model)
    in_forward, in_backward, grads = forward_backward(model, ctx, counts)
    assert in_forward == Counter({(block, kind): depth for block, depth in LAYERS.items()
                                  for kind in ("layer", "core_attention")})
    assert in_backward == expected_backward_calls(granularity, recomputed_layers), setting
    # The same fp32 ops on the same inputs, rerun; only the order in which autograd adds up
    # gradients may change. Measured: full bit-identical; selective max |diff| 3.6e-12, i.e.
    # 2e-7 x the largest |gradient| of that tensor (tensors' largest |gradient|: 1.8e-5 to
    # ~0.1). 1e-5 x that per-tensor scale keeps 50x margin; a recomputation that saw other
    # inputs (stale RNG, wrong layer) would change gradients at the 1e-2 level.
    assert set(grads) == set(baseline["grads"])
    for name, want in baseline["grads"].items():
        scale = want.abs().max().item()
        assert scale > 0, name  # freeze=all: every tensor, vision tower included, gets a gradient
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{setting} {name}: {m}")
