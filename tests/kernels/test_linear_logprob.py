"""The fused lm_head → log-prob / entropy kernels against the torch reference (kernels/linear_logprob.py).

Shapes are deliberately ragged against the interpreter tiles (BLOCK_T 16, BLOCK_V 32, BLOCK_H 16): T = 37, H = 40,
V = 301 exercise every boundary mask; small chunk_tokens and vocab_splits exercise the backward chunking and the
forward's split-vocabulary merge.
"""

import math

import pytest
import torch

from flash_rc.kernels.linear_logprob import fused_linear_logprob, linear_logprob_reference

TOKENS, HIDDEN, VOCAB = 37, 40, 301


def random_problem(device, dtype, tokens=TOKENS, hidden=HIDDEN, vocab=VOCAB, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator)
    w = torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden) * 3.0
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    return (h.to(device, dtype).requires_grad_(), w.to(device, dtype).requires_grad_(), targets.to(device))


def forward_backward(hidden, weight, targets, backend, use_log_prob=True, use_entropy=True, **kwargs):
    """Outputs and (d hidden, d weight) of Σ g_lp·log π + Σ g_H·H for fixed random upstream grads."""
    out = fused_linear_logprob(hidden, weight, targets, temperature=0.7, with_entropy=True, backend=backend, **kwargs)
    generator = torch.Generator().manual_seed(1)
    grad_lp, grad_ent = (torch.randn(targets.shape[0], generator=generator).to(hidden.device) for _ in range(2))
    objective = 0.0
    if use_log_prob:
        objective = objective + (out.log_prob * grad_lp).sum()
    if use_entropy:
        objective = objective + (out.entropy * grad_ent).sum()
    return out, torch.autograd.grad(objective, (hidden, weight))


@pytest.mark.parametrize(
    "dtype, grad_tol",
    [
        (torch.float32, dict(rtol=1e-4, atol=1e-5)),
        # dz is stored in bf16 before the two GEMMs (as the naive bf16 path would), hence ~1e-2 relative error.
        (torch.bfloat16, dict(rtol=2e-2, atol=2e-2)),
    ],
)
def test_matches_reference(device, dtype, grad_tol):
    hidden, weight, targets = random_problem(device, dtype)
    out, grads = forward_backward(hidden, weight, targets, "triton", chunk_tokens=16, vocab_splits=3)
    ref, ref_grads = forward_backward(hidden, weight, targets, "torch")
    # Forward is float32 accumulation over the same bf16 values in both paths: tight tolerance for both dtypes.
    torch.testing.assert_close(out.log_prob, ref.log_prob, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-4, atol=1e-4)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tol)


@pytest.mark.parametrize("use_log_prob, use_entropy", [(True, False), (False, True)])
def test_gradient_of_each_output_alone(device, use_log_prob, use_entropy):
    hidden, weight, targets = random_problem(device, torch.float32, tokens=20, seed=2)
    _, grads = forward_backward(hidden, weight, targets, "triton", use_log_prob, use_entropy, vocab_splits=1)
    _, ref_grads = forward_backward(hidden, weight, targets, "torch", use_log_prob, use_entropy)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_hand_worked_distribution(device):
    # h = (1, 0, …) picks column 0 of W, set to (0, ln 2, ln 3, ln 4): logits z = ln(1, 2, 3, 4), softmax p = (.1, .2,
    # .3, .4). Target 3: log π = ln 0.4; entropy = −Σ p ln p = 1.27985. At temperature 2, e^{z/2} = (1, √2, √3, 2):
    # π(3) = 2 / (1 + √2 + √3 + 2) = 0.325402.
    hidden = torch.zeros(2, 16, device=device)
    hidden[:, 0] = 1.0
    weight = torch.zeros(4, 16, device=device)
    weight[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0]).log()
    targets = torch.tensor([3, 0], device=device)
    out = fused_linear_logprob(hidden, weight, targets, with_entropy=True, backend="triton")
    torch.testing.assert_close(out.log_prob.cpu(), torch.tensor([0.4, 0.1]).log())
    entropy = -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4))
    torch.testing.assert_close(out.entropy.cpu(), torch.tensor([entropy, entropy]))
    hot = fused_linear_logprob(hidden, weight, targets, temperature=2.0, backend="triton")
    assert hot.entropy is None
    assert hot.log_prob[0].item() == pytest.approx(math.log(2 / (1 + math.sqrt(2) + math.sqrt(3) + 2)), abs=1e-6)


def test_reference_gradcheck_float64():
    hidden, weight, targets = random_problem("cpu", torch.float64, tokens=5, hidden=3, vocab=7, seed=4)

    def objective(h, w):
        out = linear_logprob_reference(h, w, targets, temperature=0.7, with_entropy=True, chunk_tokens=2)
        return out.log_prob, out.entropy

    assert torch.autograd.gradcheck(objective, (hidden, weight))


def test_empty_token_batch(device):
    hidden, weight, _ = random_problem(device, torch.float32, tokens=0)
    out = fused_linear_logprob(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), with_entropy=True,
                               backend="triton")  # fmt: skip
    assert out.log_prob.shape == (0,) and out.entropy.shape == (0,)
    out.log_prob.sum().backward()
    assert hidden.grad is None or hidden.grad.numel() == 0
    assert weight.grad is None or (weight.grad == 0).all()


def test_bad_inputs_raise_naming_the_argument(device):
    hidden, weight, targets = random_problem(device, torch.float32, tokens=4)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_logprob(hidden, weight[:, :8], targets, backend="triton")
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16"):
        fused_linear_logprob(hidden, weight.bfloat16(), targets, backend="triton")
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 301\)"):
        fused_linear_logprob(hidden, weight, targets + VOCAB, backend="triton")
    with pytest.raises(ValueError, match="targets must be"):
        fused_linear_logprob(hidden, weight, targets[:2], backend="triton")
    with pytest.raises(TypeError, match="targets must be an integer"):
        fused_linear_logprob(hidden, weight, targets.float(), backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(hidden, weight, targets, temperature=0.0, backend="triton")
    with pytest.raises(ValueError, match="weight is on meta"):
        fused_linear_logprob(hidden, weight.to("meta"), targets, backend="torch")


@pytest.mark.gpu
def test_realistic_shape_on_gpu():
    # Qwen-sized head on 1024 tokens in bf16: compiled kernels vs the chunked reference.
    hidden, weight, targets = random_problem("cuda", torch.bfloat16, tokens=1024, hidden=4096, vocab=151936, seed=5)
    out, grads = forward_backward(hidden, weight, targets, "triton")
    ref, ref_grads = forward_backward(hidden, weight, targets, "torch")
    torch.testing.assert_close(out.log_prob, ref.log_prob, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-3, atol=2e-3)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=3e-2, atol=3e-2)


def test_reference_with_input_dtype_logits_stays_close_to_exact():
    # exact_logits=False runs the head GEMM in bf16 (HF's numerics, the learner's CPU path): log-probs within bf16
    # rounding of the float32-GEMM reference, gradients too; entropy only when asked for.
    torch.manual_seed(0)
    hidden = (torch.randn(64, 48) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(300, 48) * 0.2).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (64,))
    exact = linear_logprob_reference(hidden, weight, targets, temperature=0.8, with_entropy=True)
    fast = linear_logprob_reference(hidden, weight, targets, temperature=0.8, with_entropy=True, exact_logits=False)
    torch.testing.assert_close(fast.log_prob, exact.log_prob, rtol=0, atol=3e-2)
    torch.testing.assert_close(fast.entropy, exact.entropy, rtol=0, atol=3e-2)
    assert not torch.equal(fast.log_prob, exact.log_prob)  # the bf16 GEMM really ran
    grads = [torch.autograd.grad(out.log_prob.sum(), (hidden, weight)) for out in (exact, fast)]
    for g_exact, g_fast in zip(*grads):
        torch.testing.assert_close(g_fast.float(), g_exact.float(), rtol=5e-2, atol=5e-2)
    assert linear_logprob_reference(hidden, weight, targets, exact_logits=False).entropy is None
