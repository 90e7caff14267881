"""The fused Triton TIS loss against the torch reference (kernels/tis_loss.py).

On this CPU machine the Triton path runs under TRITON_INTERPRET=1 (tests/kernels/conftest.py); with a GPU the same
tests run the compiled kernels. Grids stay small because the interpreter executes kernels in numpy.
"""

import itertools
import math

import pytest
import torch

from flash_rc.algo.losses import LOSS_AGG_MODES, GlobalBatchInfo, PolicyLossConfig, PolicyLossInputs, tis_policy_loss
from flash_rc.algo.rollout_correction import RolloutCorrectionConfig
from flash_rc.kernels.tis_loss import METRIC_KEYS, fused_tis_loss

CORRECTIONS = {
    "none": RolloutCorrectionConfig(level=None),
    "token-tis": RolloutCorrectionConfig(level="token", threshold=2.0),
    "token-icepop": RolloutCorrectionConfig(level="token", mode="mask", threshold=2.0, threshold_lower=0.5),
    "seq-tis": RolloutCorrectionConfig(level="sequence", threshold=3.0),
    "seq-mis": RolloutCorrectionConfig(level="sequence", mode="mask", threshold=2.0, threshold_lower=0.5),
    "geo-tis": RolloutCorrectionConfig(level="geometric", threshold=1.1),
}


# Dual clip at c = 1.5 so random ratios hit every branch: unclipped, clipped high/low and dual-clipped.
CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.5)
METRIC_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def random_batch(batch, length, device, dtype=torch.float32, seed=0):
    """Ragged right-padded batch: row lengths vary, row 1 is fully masked, the last row has a single token, padding
    holds garbage."""
    generator = torch.Generator().manual_seed(seed)
    old = torch.randn(batch, length, generator=generator) * 0.5 - 1.5
    rollout = old + 0.4 * torch.randn(batch, length, generator=generator)
    log_prob = old + 0.4 * torch.randn(batch, length, generator=generator)
    advantages = torch.randn(batch, length, generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    if batch > 2:
        lengths[-1] = 1
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if batch > 1:
        mask[1] = False
    for tensor in (old, rollout, log_prob):  # padding garbage must never leak
        tensor[~mask] = float("nan")
    to = dict(device=device, dtype=dtype)
    return log_prob.to(**to).requires_grad_(), old.to(**to), rollout.to(**to), advantages.to(**to), mask.to(device)


def run_both(inputs, loss_config, correction, batch_info=GlobalBatchInfo(), grad_scale=1.0):
    """(loss, grad, metrics) from the Triton path and from the reference."""
    results = []
    for backend in ("triton", "torch"):
        out = fused_tis_loss(PolicyLossInputs(*inputs), loss_config, correction, batch_info, backend=backend)
        (grad,) = torch.autograd.grad(out.loss * grad_scale, inputs[0])
        results.append((out.loss, grad, out.metrics))
    return results


def assert_matches_reference(inputs, loss_config, correction, batch_info=GlobalBatchInfo(), grad_tol=None):
    (loss, grad, metrics), (ref_loss, ref_grad, ref_metrics) = run_both(inputs, loss_config, correction, batch_info)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, **(grad_tol or dict(rtol=1e-4, atol=1e-6)))
    assert set(metrics) == set(ref_metrics) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        torch.testing.assert_close(metrics[key], ref_metrics[key], **METRIC_TOLERANCE, msg=key)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("correction", CORRECTIONS.values(), ids=CORRECTIONS.keys())
def test_matches_reference_fp32(device, correction, mode):
    inputs = random_batch(5, 70, device)
    assert_matches_reference(inputs, PolicyLossConfig(**CLIP, loss_agg_mode=mode), correction)


def test_every_metric_is_stored_under_its_own_name(device):
    # The finalize kernel stores each metric at its key's index in METRIC_KEYS. On this batch no two of the reference
    # metrics lie within the comparison tolerance of each other (checked first), so a metric stored under another
    # one's name cannot pass the by-name comparison. Token IcePop (out-of-bounds rows) and a NaN at a masked-in
    # token make every fraction non-zero.
    inputs = random_batch(6, 100, device)
    inputs[1][0, 0] = float("nan")  # old_log_prob of row 0's first token, which is always masked in
    loss_config, correction = PolicyLossConfig(**CLIP), CORRECTIONS["token-icepop"]
    reference = fused_tis_loss(PolicyLossInputs(*inputs), loss_config, correction, backend="torch").metrics
    assert set(reference) == set(METRIC_KEYS)
    for (key, value), (other_key, other_value) in itertools.combinations(reference.items(), 2):
        assert not torch.isclose(value, other_value, **METRIC_TOLERANCE), (key, other_key)
    assert_matches_reference(inputs, loss_config, correction)


def test_random_batches_exercise_every_clip_branch(device):
    # Guards the test data above: a comparison that never leaves the unclipped branch would not test the gradient.
    out = fused_tis_loss(PolicyLossInputs(*random_batch(5, 70, device)), PolicyLossConfig(**CLIP), backend="triton")
    for branch in ("high", "low", "dual"):
        assert out.metrics[f"actor/pg_clipfrac_{branch}"].item() > 0.02, branch


def test_hand_worked_clip_branches(device):
    # Five tokens, no IS correction, token-mean over 5 tokens (clip 0.2 / 0.28, c = 3):
    #   A = (+1, +1, −1, −1, −2), r = (1.5, 1.1, 0.5, 5, 1)
    #   ℓ = (−1.28 clipped high, −1.1, 0.8 clipped low, 3 dual-clipped, 2) → loss = (−1.28 − 1.1 + 0.8 + 3 + 2)/5
    #   ∂L/∂log π = −A r / 5 on unclipped tokens only = (0, −0.22, 0, 0, 0.4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, -2.0]], device=device)
    old = torch.full((1, 5), -1.0, device=device)
    log_prob = (old + torch.tensor([[1.5, 1.1, 0.5, 5.0, 1.0]], device=device).log()).requires_grad_()
    mask = torch.ones(1, 5, dtype=torch.bool, device=device)
    clip = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    out = fused_tis_loss(PolicyLossInputs(log_prob, old, old, advantages, mask), clip,
                         RolloutCorrectionConfig(level=None), backend="triton")  # fmt: skip
    assert out.loss.item() == pytest.approx((-1.28 - 1.1 + 0.8 + 3.0 + 2.0) / 5)
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    torch.testing.assert_close(grad.cpu(), torch.tensor([[0.0, -0.22, 0.0, 0.0, 0.4]]))
    for branch, fraction in (("high", 0.2), ("low", 0.2), ("dual", 0.2), ("", 0.4)):
        key = f"actor/pg_clipfrac_{branch}" if branch else "actor/pg_clipfrac"
        assert out.metrics[key].item() == pytest.approx(fraction), key


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("correction", ["token-tis", "seq-mis"])
def test_matches_reference_bf16(device, correction, mode):
    # The kernel upcasts bf16 loads to float32 like the reference; only the returned gradient is rounded to bf16.
    inputs = random_batch(4, 50, device, dtype=torch.bfloat16, seed=3)
    assert_matches_reference(inputs, PolicyLossConfig(**CLIP, loss_agg_mode=mode), CORRECTIONS[correction],
                             grad_tol=dict(rtol=1e-2, atol=1e-5))  # fmt: skip


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_global_batch_info_matches_reference(device, mode):
    info = GlobalBatchInfo(dp_size=4, batch_num_tokens=500, global_batch_size=16, loss_scale_factor=128.0)
    assert_matches_reference(random_batch(4, 33, device, seed=5), PolicyLossConfig(**CLIP, loss_agg_mode=mode),
                             CORRECTIONS["token-tis"], info)  # fmt: skip


def test_hand_worked_case(device):
    # One row, π_θ = π_old (r = 1), old − rollout = (log 3, log 0.25), A = (+1, −2), token TIS with C = 2:
    # w = (2, 0.25), ℓ = −A = (−1, 2) → token-mean loss (2·(−1) + 0.25·2)/2 = −0.75,
    # ∂L/∂log π = w (−A r)/2 = (−1, 0.25); mean w = 1.125, chi2_token = (9 + 1/16)/2 − 1 = 3.53125.
    old = torch.tensor([[-1.0, -2.0]], device=device)
    rollout = old - torch.tensor([[3.0, 0.25]], device=device).log()
    log_prob = old.clone().requires_grad_()
    advantages = torch.tensor([[1.0, -2.0]], device=device)
    batch = PolicyLossInputs(log_prob, old, rollout, advantages, torch.ones_like(old, dtype=torch.bool))
    out = fused_tis_loss(batch, backend="triton")
    assert out.loss.item() == pytest.approx(-0.75)
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    torch.testing.assert_close(grad.cpu(), torch.tensor([[-1.0, 0.25]]))
    assert out.metrics["rollout_corr/rollout_is_mean"].item() == pytest.approx(1.125)
    assert out.metrics["rollout_corr/chi2_token"].item() == pytest.approx(3.53125)
    assert out.metrics["rollout_corr/kl"].item() == pytest.approx(-math.log(0.75) / 2)


def test_layouts_masks_and_strides(device):
    # Row stride != T (a column slice of a wider buffer), a transposed (non-contiguous last dim) advantage tensor,
    # and float / int64 masks all give the same answer as the contiguous bool layout.
    log_prob, old, rollout, advantages, mask = random_batch(3, 40, device, seed=7)
    wide = torch.zeros(3, 57, device=device)
    wide[:, 5:45] = old
    transposed_adv = advantages.t().contiguous().t()
    config, correction = PolicyLossConfig(loss_agg_mode="seq-mean-token-sum"), CORRECTIONS["geo-tis"]
    base = fused_tis_loss(PolicyLossInputs(log_prob, old, rollout, advantages, mask), config, correction,
                          backend="triton")  # fmt: skip
    (base_grad,) = torch.autograd.grad(base.loss, log_prob)
    for variant_old, variant_adv, variant_mask in [
        (wide[:, 5:45], advantages, mask),
        (old, transposed_adv, mask.float()),
        (old, advantages, mask.long()),
    ]:
        variant = PolicyLossInputs(log_prob, variant_old, rollout, variant_adv, variant_mask)
        out = fused_tis_loss(variant, config, correction, backend="triton")
        (grad,) = torch.autograd.grad(out.loss, log_prob)
        torch.testing.assert_close(out.loss, base.loss)
        torch.testing.assert_close(grad, base_grad)


def test_nonfinite_and_extreme_log_ratios_stay_finite(device):
    # ±1e4 log-ratios are clamped to ±20; NaN / ±inf inputs drop the token (zero loss, zero gradient).
    log_prob, old, rollout, advantages, mask = random_batch(2, 12, device, seed=11)
    mask = torch.ones_like(mask)
    with torch.no_grad():
        for tensor in (log_prob, old, rollout):
            tensor.nan_to_num_(-1.0)  # un-mask random_batch's padding garbage
        old[0, 0], rollout[0, 0] = 0.0, -1e4  # old − rollout = +1e4
        old[0, 1], rollout[0, 1] = -1e4, 0.0  # old − rollout = −1e4
        log_prob[0, 2], old[0, 2] = 1e4, 0.0  # PPO log-ratio +1e4
        log_prob[0, 3], old[0, 3] = -1e4, 0.0  # PPO log-ratio −1e4
        old[1, 0] = float("nan")
        rollout[1, 1] = -float("inf")
        advantages[1, 2] = float("inf")
        log_prob[1, 3] = float("nan")
    for name in ("none", "token-tis", "seq-tis", "geo-tis"):
        (loss, grad, metrics), (ref_loss, ref_grad, _) = run_both(
            (log_prob, old, rollout, advantages, mask), PolicyLossConfig(), CORRECTIONS[name]
        )
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        assert all(torch.isfinite(value) for value in metrics.values()), name
        assert (grad[1, :4] == 0).all(), name
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
        assert metrics["rollout_corr/nonfinite_token_fraction"].item() == pytest.approx(4 / 24)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_fully_masked_rows_contribute_exactly_zero(device, mode):
    log_prob, old, rollout, advantages, mask = random_batch(3, 20, device, seed=13)
    garbage = torch.tensor([[float("nan"), float("inf"), 1e30, -1e4] * 5], device=device)
    padded = [torch.cat([t.detach(), garbage]) for t in (log_prob, old, rollout, advantages)]
    padded_mask = torch.cat([mask, torch.zeros(1, 20, dtype=torch.bool, device=device)])
    padded[0].requires_grad_()
    config, correction = PolicyLossConfig(loss_agg_mode=mode), CORRECTIONS["seq-tis"]
    base = fused_tis_loss(PolicyLossInputs(log_prob, old, rollout, advantages, mask), config, correction,
                          backend="triton")  # fmt: skip
    out = fused_tis_loss(PolicyLossInputs(*padded, padded_mask), config, correction, backend="triton")
    (base_grad,) = torch.autograd.grad(base.loss, log_prob)
    (grad,) = torch.autograd.grad(out.loss, padded[0])
    assert out.loss.item() == base.loss.item()
    assert torch.equal(grad[:3], base_grad) and (grad[3] == 0).all()
    for key in METRIC_KEYS:
        assert out.metrics[key].item() == base.metrics[key].item(), key


@pytest.mark.parametrize("shape", [(0, 16), (3, 0), (2, 5)])
def test_empty_or_fully_masked_batch_is_zero_loss_zero_grad(device, shape):
    log_prob = torch.randn(shape, device=device, requires_grad=True)
    other = torch.randn(shape, device=device)
    batch = PolicyLossInputs(log_prob, other, other, other, torch.zeros(shape, dtype=torch.bool, device=device))
    out = fused_tis_loss(batch, PolicyLossConfig(loss_agg_mode="seq-mean-token-mean"), backend="triton")
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert log_prob.grad.shape == shape and (log_prob.grad == 0).all()
    assert all(value.item() == 0.0 for value in out.metrics.values())


def test_upstream_gradient_scale_and_no_grad_inputs(device):
    inputs = random_batch(3, 17, device, seed=17)
    config, correction = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean"), CORRECTIONS["token-tis"]
    (loss, grad, _), (_, ref_grad, _) = run_both(inputs, config, correction, grad_scale=-3.0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # Metrics-only call: log_prob without grad still gives the same loss and metrics.
    detached = fused_tis_loss(PolicyLossInputs(inputs[0].detach(), *inputs[1:]), config, correction, backend="triton")
    assert not detached.loss.requires_grad
    torch.testing.assert_close(detached.loss, loss)


def test_bad_inputs_raise_naming_the_tensor(device):
    # PolicyLossInputs validates at construction, so a bad batch never reaches either backend.
    log_prob, old, rollout, advantages, mask = random_batch(2, 8, device)
    with pytest.raises(ValueError, match="advantages has shape"):
        PolicyLossInputs(log_prob, old, rollout, advantages[:, :4], mask)
    with pytest.raises(TypeError, match="rollout_log_prob must be float"):
        PolicyLossInputs(log_prob, old, rollout.long(), advantages, mask)
    with pytest.raises(ValueError, match="old_log_prob is on meta"):
        PolicyLossInputs(log_prob, old.to("meta"), rollout, advantages, mask)
    batch = PolicyLossInputs(log_prob, old, rollout, advantages, mask)
    with pytest.raises(ValueError, match="backend"):
        fused_tis_loss(batch, backend="cuda")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fused_tis_loss(batch, batch_info=GlobalBatchInfo(dp_size=8))


@pytest.mark.gpu
@pytest.mark.parametrize("correction", ["token-tis", "seq-mis"])
def test_full_size_batch_on_gpu(correction):
    # The benchmark's shape (256 × 8192, ragged), compiled kernels vs the reference on the GPU.
    inputs = random_batch(256, 8192, "cuda", seed=23)
    clip = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0)
    assert_matches_reference(inputs, clip, CORRECTIONS[correction])


def test_reference_backend_is_default_on_cpu():
    inputs = random_batch(2, 6, "cpu")
    out = fused_tis_loss(PolicyLossInputs(*inputs))
    expected = tis_policy_loss(PolicyLossInputs(*inputs))
    assert out.loss.item() == expected.loss.item()
