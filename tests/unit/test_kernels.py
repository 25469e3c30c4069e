"""megatron_r1v.kernels against a plain fp32 torch reference written here.

Each case names the backend it runs (``kernel_backend`` marks, tests/conftest.py): ``torch``
everywhere; ``interpret``, the Triton kernels in Triton's interpreter, where this process
interprets (machines without CUDA), so shapes stay small (T * V <= ~50k); ``triton``, the
compiled kernels, on a CUDA host.

Tolerances: every backend accumulates in fp32 like the reference, but in a different
order (tiles, online rescaling) and the interpreter's exp differs from torch's in the
last ulp, so fp32 results agree to ~1e-6 relative; 2e-5 absolute on log-probs of order
10 leaves margin. bf16 inputs are upcast exactly, so forward values match the fp32
reference of the same (rounded) logits just as tightly; bf16 *gradients* are rounded to
bf16 (8 mantissa bits: relative error 2^-9), hence 1e-2 relative to the largest gradient
(fp16's 11 bits are tighter; the same bound covers them).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_r1v.kernels import GRPOStats, grpo_loss, vocab_parallel_logprobs
from megatron_r1v.kernels import torch_impl
from megatron_r1v.kernels.dispatch import resolve_backend, triton_interpreting
from megatron_r1v.kernels.stats import LOG_RATIO_BOUND

from kernel_marks import kernel_backends  # tests/ is on sys.path (pytest.ini: pythonpath)

BACKENDS = kernel_backends("torch", "interpret")
ALL_BACKENDS = kernel_backends("torch", "interpret", "triton")  # "triton" cases run on a CUDA host


def on_backend_device(backend: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on the device ``backend`` computes on (CUDA for the compiled kernels)."""
    return [t.to("cuda" if backend == "triton" else "cpu") for t in tensors]


FP32_TOL = 2e-5


def reference_logprobs(logits_TV: torch.Tensor, labels_T: torch.Tensor, temperature: float):
    logsm_TV = torch.log_softmax(logits_TV.float() / temperature, dim=-1)
    logp_T = logsm_TV.gather(1, labels_T[:, None])[:, 0]
    entropy_T = -(logsm_TV.exp() * torch.where(logsm_TV.isinf(), 0.0, logsm_TV)).sum(-1)
    return logp_T, entropy_T


def reference_grpo(logits_TV, labels_T, old_T, ref_T, adv_T, mask_T, clip_low, clip_high, kl_beta, temperature):
    """Eq. 8 of the R1V2 report + k3 KL, written with torch.maximum/clamp as in TRL/verl:
    both log-ratios clamped to +-20 (verl's bound) before exp, autograd for the gradient."""
    logp_T, _ = reference_logprobs(logits_TV, labels_T, temperature)
    active_T = mask_T != 0
    ratio_T = torch.exp(torch.where(active_T, logp_T - old_T, 0.0).clamp(-20.0, 20.0))
    surrogate_T = torch.maximum(-adv_T * ratio_T, -adv_T * ratio_T.clamp(1 - clip_low, 1 + clip_high))
    kl_T = None
    if ref_T is not None:
        diff_T = torch.where(active_T, ref_T - logp_T, 0.0).clamp(-20.0, 20.0)
        kl_T = diff_T.exp() - diff_T - 1
        if kl_beta:
            surrogate_T = surrogate_T + kl_beta * kl_T
    return surrogate_T * mask_T.float(), logp_T, ratio_T, kl_T


def make_logits(n_tokens: int, vocab: int, dtype: torch.dtype, scale: float = 3.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_tokens, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    return logits, labels


def grad_tol(dtype: torch.dtype, grad_ref: torch.Tensor) -> float:
    return FP32_TOL if dtype == torch.float32 else 1e-2 * max(float(grad_ref.abs().max()), 1e-3)


def test_triton_mode_follows_the_host():
    # The kernels were decorated as interpreted or compiled when triton_impl was imported
    # (triton.jit reads the mode then); tests/conftest.py makes a machine without CUDA
    # interpret, else the "interpret" cases could not run the Triton kernels at all.
    from triton.runtime.interpreter import InterpretedFunction

    from megatron_r1v.kernels import triton_impl

    interpreted = isinstance(triton_impl._grpo_fwd_kernel, InterpretedFunction)
    assert interpreted == triton_interpreting()
    if not torch.cuda.is_available():
        assert interpreted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n_tokens,vocab,temperature",
    [(1, 1000, 1.0), (37, 1237, 1.0), (16, 3001, 0.7), (9, 5, 1.3)],
    ids=["T1", "oddV", "temp0.7", "V5-temp1.3"],
)
def test_logprobs_entropy_forward_backward(backend, dtype, n_tokens, vocab, temperature):
    logits, labels = make_logits(n_tokens, vocab, dtype)
    leaf = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(leaf, labels, temperature=temperature, return_entropy=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    g_logp, g_entropy = torch.randn(n_tokens, generator=gen), torch.randn(n_tokens, generator=gen)
    (logp * g_logp + entropy * g_entropy).sum().backward()

    ref_leaf = logits.float().requires_grad_()
    ref_logp, ref_entropy = reference_logprobs(ref_leaf, labels, temperature)
    (ref_logp * g_logp + ref_entropy * g_entropy).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=FP32_TOL, rtol=0)
    assert leaf.grad.dtype == dtype
    tol = grad_tol(dtype, ref_leaf.grad)
    torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_gradient_and_no_entropy(backend):
    logits, labels = make_logits(11, 777, torch.float32)
    leaf = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(leaf, labels, backend=backend)
    assert entropy is None
    logp.sum().backward()
    ref_leaf = logits.clone().requires_grad_()
    reference_logprobs(ref_leaf, labels, 1.0)[0].sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(backend, dtype):
    # +-1e4 spreads: a naive exp overflows; the online max keeps every term finite. Rows
    # have one dominant logit, a tie of two, and targets at the minimum (logp ~ -2e4).
    n_tokens, vocab = 6, 1031
    logits = torch.zeros(n_tokens, vocab)
    logits[:, ::7] = -1e4
    logits[0, 5] = 1e4
    logits[1, 3] = logits[1, 900] = 1e4
    logits[2, :] = -1e4
    logits[3, 1030] = 1e4
    logits = logits.to(dtype)
    labels = torch.tensor([5, 900, 17, 0, 14, 1030])
    leaf = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(leaf, labels, temperature=0.5, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    ref_leaf = logits.float().requires_grad_()
    ref_logp, ref_entropy = reference_logprobs(ref_leaf, labels, 0.5)
    (ref_logp.sum() + ref_entropy.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(leaf.grad).all()
    # log-probs of -2e4 carry fp32 rounding of ~2e4 * 2^-24 ~ 1e-3 relative to 1; compare relatively.
    torch.testing.assert_close(logp, ref_logp, atol=FP32_TOL, rtol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, atol=FP32_TOL, rtol=1e-6)
    torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, atol=grad_tol(dtype, ref_leaf.grad), rtol=0)


def grpo_inputs(n_tokens: int, vocab: int, dtype: torch.dtype, temperature: float, masked_frac: float = 0.3):
    logits, labels = make_logits(n_tokens, vocab, dtype, seed=3)
    ref_logp, _ = reference_logprobs(logits, labels, temperature)
    gen = torch.Generator().manual_seed(4)
    # Behaviour log-probs close to the current ones with spread enough that some tokens
    # fall outside [1 - 0.2, 1 + 0.2] on each side, so both branches and clipping occur.
    old = ref_logp + 0.4 * torch.randn(n_tokens, generator=gen)
    ref = ref_logp + 0.3 * torch.randn(n_tokens, generator=gen)
    adv = torch.randn(n_tokens, generator=gen)
    mask = (torch.rand(n_tokens, generator=gen) >= masked_frac).float()
    old[mask == 0] = float("nan")  # padding positions may hold anything: it must not leak
    return logits, labels, old, ref, adv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_tokens,vocab,temperature,kl_beta,clip_high",
    [(1, 1000, 1.0, 0.0, 0.2), (41, 1237, 1.0, 0.05, 0.28), (23, 2049, 0.6, 0.1, 0.2)],
    ids=["T1-noKL", "oddV-kl-asym", "temp0.6-kl"],
)
def test_grpo_loss_forward_backward(backend, dtype, n_tokens, vocab, temperature, kl_beta, clip_high):
    logits, labels, old, ref, adv, mask = grpo_inputs(n_tokens, vocab, dtype, temperature)
    if n_tokens == 1:
        mask[:] = 1.0
        old = reference_logprobs(logits, labels, temperature)[0] + 0.5  # ratio e^-0.5: clipped for A < 0
        adv[:] = -1.0
    ref_arg = ref if kl_beta else None
    leaf = logits.clone().requires_grad_()
    loss, stats = grpo_loss(leaf, labels, old, ref_arg, adv, mask, clip_high=clip_high, kl_beta=kl_beta,
                            temperature=temperature, backend=backend)
    gen = torch.Generator().manual_seed(5)
    upstream = torch.rand(n_tokens, generator=gen)  # as a per-sequence mean would weight tokens
    (loss * upstream).sum().backward()

    ref_leaf = logits.float().requires_grad_()
    ref_loss, ref_logp, ref_ratio, ref_kl = reference_grpo(
        ref_leaf, labels, old, ref_arg, adv, mask, 0.2, clip_high, kl_beta, temperature)
    (ref_loss * upstream).sum().backward()

    assert isinstance(stats, GRPOStats)
    torch.testing.assert_close(loss, ref_loss, atol=FP32_TOL, rtol=1e-5)
    torch.testing.assert_close(stats.logprobs, ref_logp.detach(), atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(stats.ratio, ref_ratio.detach(), atol=FP32_TOL, rtol=1e-5)
    expected_clipped = (mask != 0) & (-adv * ref_ratio.detach().clamp(0.8, 1 + clip_high) > -adv * ref_ratio.detach())
    assert torch.equal(stats.clipped, expected_clipped)
    assert stats.clipped.any() or n_tokens == 1
    if kl_beta:
        torch.testing.assert_close(stats.kl, ref_kl.detach(), atol=FP32_TOL, rtol=1e-5)
    else:
        assert stats.kl is None
    assert torch.isfinite(loss).all() and (loss[mask == 0] == 0).all()
    torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, atol=grad_tol(dtype, ref_leaf.grad), rtol=0)
    assert (leaf.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_all_tokens_masked(backend):
    logits, labels, old, ref, adv, mask = grpo_inputs(8, 300, torch.float32, 1.0)
    leaf = logits.clone().requires_grad_()
    loss, stats = grpo_loss(leaf, labels, old, ref, adv, torch.zeros(8), kl_beta=0.1, backend=backend)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(8))
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))
    assert not stats.clipped.any() and torch.equal(stats.kl, torch.zeros(8))


def extreme_grpo_inputs(dtype: torch.dtype):
    """+-1e4 logits over an odd vocabulary: log-probs from 0 down to ~-2e4, so the
    log-ratios to moderate behaviour / reference log-probs reach ~+-2e4, far past fp32
    exp's overflow at 88.7 (before the bound, exp gave inf, then 0 * inf = nan). Rows 5
    and 6 have one log-ratio inside the bound and the other outside, each way round."""
    n_tokens, vocab = 7, 1031
    logits = torch.zeros(n_tokens, vocab)
    logits[:, ::7] = -1e4
    logits[0, 5] = 1e4    # label 5: logp 0; ratio log +30, k3 log -40: both outside
    logits[1, 3] = 1e4    # label 14 at -1e4: logp ~ -2e4; both outside
    logits[2, 100] = 1e4  # label 100: logp 0; ratio log +0.1, k3 log -0.2: both inside
    logits[3, 11] = 1e4   # label 21 at -1e4: logp ~ -2e4; both outside
    logits[4:, :] = 3.0   # uniform: logp = -ln 1031 = -6.94
    labels = torch.tensor([5, 14, 100, 21, 0, 1, 2])
    uniform = -math.log(vocab)
    # Row 4: ratio log -5, k3 log +1 (inside); row 5: ratio log +2 (inside), k3 log -30
    # (outside); row 6: ratio log -25 (outside), k3 log +3 (inside).
    old = torch.tensor([-30.0, -1.0, -0.1, -2.0, uniform + 5.0, uniform - 2.0, uniform + 25.0])
    ref = torch.tensor([-40.0, -0.5, -0.2, -25.0, uniform + 1.0, uniform - 30.0, uniform + 3.0])
    adv = torch.tensor([-1.5, 0.7, -0.4, -2.0, 1.2, -0.8, 0.9])
    return logits.to(dtype), labels, old, ref, adv, torch.ones(n_tokens)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl_beta", [0.0, 0.05], ids=["ref-given-beta0", "beta0.05"])
def test_grpo_loss_finite_at_extreme_logits(backend, dtype, kl_beta):
    logits, labels, old, ref, adv, mask = extreme_grpo_inputs(dtype)
    leaf = on_backend_device(backend, logits.clone())[0].requires_grad_()
    loss, stats = grpo_loss(leaf, *on_backend_device(backend, labels, old, ref, adv, mask), kl_beta=kl_beta,
                            backend=backend)
    loss.sum().backward()
    loss, stats, grad = loss.cpu(), GRPOStats(*(t.cpu() for t in stats)), leaf.grad.cpu().float()
    ref_leaf = logits.float().requires_grad_()
    ref_loss, ref_logp, ref_ratio, ref_kl = reference_grpo(ref_leaf, labels, old, ref, adv, mask, 0.2, 0.2, kl_beta, 1.0)
    ref_loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and torch.isfinite(stats.kl).all()
    assert float(ref_logp[1].detach()) < -1.9e4  # the case the bound exists for
    # Values reach |A| e^20 ~ 7e8 (row 0): relative fp32 agreement; log-probs of -2e4 carry
    # fp32 rounding of ~1e-3 absolute but sit far outside the bound, so the ratio and k3
    # there are exactly e^-20 / e^20 - 21 in both.
    torch.testing.assert_close(loss, ref_loss.detach(), atol=FP32_TOL, rtol=1e-5)
    torch.testing.assert_close(stats.ratio, ref_ratio.detach(), atol=FP32_TOL, rtol=1e-5)
    torch.testing.assert_close(stats.kl, ref_kl.detach(), atol=FP32_TOL, rtol=1e-5)
    assert float(stats.ratio[0]) == pytest.approx(math.exp(LOG_RATIO_BOUND), rel=1e-6)
    torch.testing.assert_close(grad, ref_leaf.grad, atol=grad_tol(dtype, ref_leaf.grad), rtol=0)
    # Rows 0, 1 and 3 have both log-ratios outside the bound (ratio: +30, -2e4, -2e4; k3:
    # -40, +2e4, +2e4): each term is constant there, so those rows get no gradient.
    assert torch.equal(grad[[0, 1, 3]], torch.zeros(3, logits.shape[1]))
    assert grad[4].abs().sum() > 0 and grad[5].abs().sum() > 0  # row 5: the ratio term alone
    # Row 6: the ratio term is constant (log-ratio -25), so only the k3 term moves it.
    assert (grad[6].abs().sum() > 0) == (kl_beta != 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad_ref", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_zero_kl_beta_leaves_the_reference_out(backend, bad_ref):
    # kl_beta = 0 with reference log-probs given is exactly the run without them, whatever
    # they hold: the k3 term is left out, not multiplied by 0.
    logits, labels, old, ref, adv, mask = grpo_inputs(9, 301, torch.float32, 1.0, masked_frac=0.0)
    ref[::2] = bad_ref
    results = []
    for ref_arg in (ref, None):
        leaf = on_backend_device(backend, logits.clone())[0].requires_grad_()
        loss, _ = grpo_loss(leaf, *on_backend_device(backend, labels, old), ref_arg if ref_arg is None else
                            on_backend_device(backend, ref_arg)[0], *on_backend_device(backend, adv, mask),
                            kl_beta=0.0, backend=backend)
        loss.sum().backward()
        results.append((loss.detach().cpu(), leaf.grad.cpu()))
    assert torch.isfinite(results[0][0]).all() and torch.isfinite(results[0][1]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n_tokens", [1, 6])
def test_grpo_flat_group_with_huge_ratio_is_zero(backend, n_tokens):
    # An all-equal group (A = 0 everywhere) replayed with stale log-probs: ratios of e^+-60.
    # Eq. 8 gives 0 * ratio = 0; an unbounded exp gave 0 * inf = nan in loss and gradient.
    logits, labels = make_logits(n_tokens, 257, torch.float32, seed=7)
    logp = reference_logprobs(logits, labels, 1.0)[0]
    old = logp + torch.tensor([-60.0, 60.0, -100.0, 100.0, -3.0, 90.0])[:n_tokens]
    inputs = on_backend_device(backend, labels, old, logp + 80.0, torch.zeros(n_tokens), torch.ones(n_tokens))
    leaf = on_backend_device(backend, logits.clone())[0].requires_grad_()
    loss, stats = grpo_loss(leaf, *inputs, kl_beta=0.0, backend=backend)
    loss.sum().backward()
    loss, stats, grad = loss.cpu(), GRPOStats(*(t.cpu() for t in stats)), leaf.grad.cpu()
    assert torch.equal(loss, torch.zeros(n_tokens)) and torch.equal(grad, torch.zeros_like(logits))
    assert torch.isfinite(stats.ratio).all() and float(stats.ratio.max()) <= math.exp(LOG_RATIO_BOUND) * (1 + 1e-6)
    assert float(stats.ratio[0]) == pytest.approx(math.exp(LOG_RATIO_BOUND), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_writes_gradient_over_logits(backend, dtype):
    logits, labels, old, ref, adv, mask = grpo_inputs(13, 517, dtype, 1.0)
    expected = logits.clone().requires_grad_()
    grpo_loss(expected, labels, old, ref, adv, mask, kl_beta=0.1, backend=backend)[0].sum().backward()

    leaf = logits.clone().requires_grad_()
    produced = leaf * 1  # the output layer's logits: a non-leaf buffer the loss may overwrite
    loss, _ = grpo_loss(produced, labels, old, ref, adv, mask, kl_beta=0.1, backend=backend, inplace=True)
    loss.sum().backward()
    # Same kernel, same arithmetic: bit-identical to the out-of-place gradient.
    assert torch.equal(leaf.grad, expected.grad)
    assert torch.equal(produced.detach(), expected.grad)


def test_torch_backend_never_builds_fp32_TV(monkeypatch):
    """The torch backend's largest temporary is one tile, and backward saves only [T] vectors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n_tokens, vocab, tile = 64, 2000, 4096
    monkeypatch.setattr(torch_impl, "TILE_ELEMS", tile)
    monkeypatch.setattr(torch_impl, "VOCAB_TILE", 1024)
    logits, labels, old, ref, adv, mask = grpo_inputs(n_tokens, vocab, torch.bfloat16, 1.0)

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFloat32.largest = max(LargestFloat32.largest, t.numel())
            return out

    saved = []
    leaf = logits.clone().requires_grad_()
    produced = leaf * 1
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with LargestFloat32():
            loss, _ = grpo_loss(produced, labels, old, ref, adv, mask, kl_beta=0.1, backend="torch", inplace=True)
            loss.sum().backward()
    assert 0 < LargestFloat32.largest <= tile
    grpo_saved = [t for t in saved if t.data_ptr() != produced.data_ptr() and t.data_ptr() != leaf.data_ptr()]
    assert all(t.dim() == 1 and t.shape[0] == n_tokens for t in grpo_saved), [t.shape for t in grpo_saved]


def test_errors_name_the_argument():
    logits, labels = make_logits(4, 50, torch.float32)
    with pytest.raises(ValueError, match=r"labels\[2\] = 50 is outside the vocabulary \[0, 50\)"):
        vocab_parallel_logprobs(logits, torch.tensor([0, 1, 50, 3]), backend="torch")
    with pytest.raises(ValueError, match=r"logits must be \[T, V/tp\]"):
        vocab_parallel_logprobs(logits[None], labels, backend="torch")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(logits, labels, temperature=0.0, backend="torch")
    with pytest.raises(ValueError, match="kl_beta = 0.1 needs ref_logprobs"):
        grpo_loss(logits, labels, torch.zeros(4), None, torch.ones(4), torch.ones(4), kl_beta=0.1, backend="torch")
    with pytest.raises(ValueError, match=r"advantages must be \[T\] = \[4\], got \(2,\)"):
        grpo_loss(logits, labels, torch.zeros(4), None, torch.ones(2), torch.ones(4), backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        vocab_parallel_logprobs(logits, labels, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_empty_batch():
    logits = torch.zeros(0, 100, requires_grad=True)
    logp, entropy = vocab_parallel_logprobs(logits, torch.zeros(0, dtype=torch.long), return_entropy=True,
                                            backend="torch")
    (logp.sum() + entropy.sum()).backward()
    assert logp.shape == entropy.shape == (0,) and logits.grad.shape == (0, 100)


@pytest.mark.kernel_backend("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_reference(dtype):
    n_tokens, vocab = 257, 38016 + 17
    logits, labels, old, ref, adv, mask = grpo_inputs(n_tokens, vocab, dtype, 0.9)
    logits, labels, old, ref, adv, mask = (t.cuda() for t in (logits, labels, old, ref, adv, mask))
    leaf = logits.clone().requires_grad_()
    loss, stats = grpo_loss(leaf, labels, old, ref, adv, mask, kl_beta=0.05, temperature=0.9, backend="triton")
    loss.sum().backward()
    ref_leaf = logits.float().requires_grad_()
    ref_loss, ref_logp, _, _ = reference_grpo(ref_leaf, labels, old, ref, adv, mask, 0.2, 0.2, 0.05, 0.9)
    ref_loss.sum().backward()
    # GPU exp is the fast ex2.approx path: ~2 ulp, so 1e-4 on values of order 10.
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.logprobs, ref_logp.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, atol=max(grad_tol(dtype, ref_leaf.grad), 1e-6), rtol=0)
    logp, entropy = vocab_parallel_logprobs(logits, labels, return_entropy=True, backend="triton")
    ref_logp2, ref_entropy = reference_logprobs(logits, labels, 1.0)
    torch.testing.assert_close(logp, ref_logp2, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=0)
