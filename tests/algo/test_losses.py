"""PPO clip / dual clip, verl loss aggregation and the composed TIS policy loss (flash_rc/algo/losses.py)."""

import math

import pytest
import torch

from flash_rc.algo.losses import (
    LOSS_AGG_MODES,
    GlobalBatchInfo,
    PolicyLossConfig,
    PolicyLossInputs,
    agg_loss,
    ppo_clip_token_loss,
    tis_policy_loss,
)
from flash_rc.algo.rollout_correction import RolloutCorrectionConfig

DAPO_CLIP = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


def test_ppo_clip_token_loss_hand_worked():
    # token:      a      b      c      d      e
    # A:         +1     +1     -1     -1     -2
    # r:         1.5    1.1    0.5    5.0    1.0
    # a: −A r = −1.5 < −A·1.28 = −1.28 → clipped high, ℓ = −1.28, no gradient
    # b: inside [0.8, 1.28] → ℓ = −1.1, ∂ℓ/∂log π = −A r = −1.1
    # c: −A r = 0.5 < −A·0.8 = 0.8 → clipped low, ℓ = 0.8, no gradient
    # d: ℓ_clip = max(5, 1.28) = 5 > −A c = 3 → dual clip, ℓ = 3, no gradient
    # e: ℓ = 2·1 = 2 (< cap 6), ∂ℓ/∂log π = −A r = 2
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, -2.0]])
    old = torch.full((1, 5), -1.0)
    log_prob = (old + torch.tensor([[1.5, 1.1, 0.5, 5.0, 1.0]]).log()).requires_grad_()
    out = ppo_clip_token_loss(log_prob, old, advantages, DAPO_CLIP)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.28, -1.1, 0.8, 3.0, 2.0]]))
    assert out.clipped_high.tolist() == [[True, False, False, False, False]]
    assert out.clipped_low.tolist() == [[False, False, True, False, False]]
    assert out.dual_clipped.tolist() == [[False, False, False, True, False]]
    (grad,) = torch.autograd.grad(out.loss.sum(), log_prob)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.1, 0.0, 0.0, 2.0]]))


def test_ppo_ratio_clamp_at_safety_bound_stops_gradient():
    # log π − log π_old = 25 is clamped to 20: r = e^20 and the clamp passes no gradient. With A = −1 and a huge
    # dual-clip bound the unclipped branch is active, so only the clamp decides the gradient.
    config = PolicyLossConfig(clip_ratio_c=1e12)
    log_prob = torch.tensor([[25.0, 0.5]], requires_grad=True)
    out = ppo_clip_token_loss(log_prob, torch.zeros(1, 2), -torch.ones(1, 2), config)
    torch.testing.assert_close(out.loss[0, 0], torch.tensor(math.exp(20.0)))
    (grad,) = torch.autograd.grad(out.loss.sum(), log_prob)
    torch.testing.assert_close(grad, torch.tensor([[0.0, math.exp(0.5)]]))


# Rows: [1, 2, 3] (3 tokens), [4, ·, ·] (1 token), a fully masked row of NaN that must not count anywhere.
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 9.0], [float("nan")] * 3])
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "mode, local, global_",
    [
        # token-mean: (1+2+3+4)/4 = 2.5; with 8 global tokens on 2 ranks: 10/8·2 = 2.5
        ("token-mean", 2.5, 2.5),
        # token-sum: 10; ·2 ranks = 20
        ("token-sum", 10.0, 20.0),
        # seq-mean-token-sum: row sums 6 and 4 over the 2 non-empty rows = 5; 10/4 sequences·2 = 5
        ("seq-mean-token-sum", 5.0, 5.0),
        # seq-mean-token-mean: row means 2 and 4 → 3; (2+4)/4·2 = 3
        ("seq-mean-token-mean", 3.0, 3.0),
        # seq-mean-token-sum-norm: 5 / T(=3); global: 5 / loss_scale_factor 10
        ("seq-mean-token-sum-norm", 5.0 / 3.0, 0.5),
    ],
)
def test_agg_loss_modes_hand_worked(mode, local, global_):
    torch.testing.assert_close(agg_loss(LOSS_MAT, LOSS_MASK, mode), torch.tensor(local))
    info = GlobalBatchInfo(dp_size=2, batch_num_tokens=8, global_batch_size=4, loss_scale_factor=10.0)
    torch.testing.assert_close(agg_loss(LOSS_MAT, LOSS_MASK, mode, info), torch.tensor(global_))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_of_fully_masked_or_empty_batch_is_zero(mode):
    assert agg_loss(torch.full((2, 3), float("nan")), torch.zeros(2, 3, dtype=torch.bool), mode).item() == 0.0
    assert agg_loss(torch.zeros(0, 5), torch.zeros(0, 5), mode).item() == 0.0
    assert agg_loss(torch.zeros(3, 0), torch.zeros(3, 0), mode).item() == 0.0


def test_data_parallel_needs_global_counts():
    with pytest.raises(ValueError, match="batch_num_tokens"):
        agg_loss(LOSS_MAT, LOSS_MASK, "token-mean", GlobalBatchInfo(dp_size=2))
    with pytest.raises(ValueError, match="global_batch_size"):
        agg_loss(LOSS_MAT, LOSS_MASK, "seq-mean-token-mean", GlobalBatchInfo(dp_size=2))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        agg_loss(LOSS_MAT, LOSS_MASK, "token-median")
    # token-sum needs no count even with data parallelism.
    assert agg_loss(LOSS_MAT, LOSS_MASK, "token-sum", GlobalBatchInfo(dp_size=2)).item() == 20.0


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        PolicyLossConfig(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        PolicyLossConfig(clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="dp_size"):
        GlobalBatchInfo(dp_size=0)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        GlobalBatchInfo(batch_num_tokens=0)


def hand_worked_batch():
    """One row, two tokens, π_θ = π_old (r = 1): old − rollout = log 3 and log 0.25, A = +1 and −2."""
    old = torch.tensor([[-1.0, -2.0]])
    rollout = old - torch.tensor([[3.0, 0.25]]).log()
    log_prob = old.clone().requires_grad_()
    advantages = torch.tensor([[1.0, -2.0]])
    return log_prob, old, rollout, advantages, torch.ones(1, 2, dtype=torch.bool)


def test_tis_policy_loss_hand_worked():
    # Token TIS, C = 2: w = (min(3, 2), min(0.25, 2)) = (2, 0.25); r = 1 so ℓ = −A = (−1, 2).
    # token-mean: (2·(−1) + 0.25·2) / 2 = −0.75.  ∂L/∂log π_t = w_t (−A_t r_t) / 2 = (−1, 0.25).
    log_prob, old, rollout, advantages, mask = hand_worked_batch()
    batch = PolicyLossInputs(log_prob, old, rollout, advantages, mask)
    out = tis_policy_loss(batch, DAPO_CLIP, RolloutCorrectionConfig(threshold=2.0))
    torch.testing.assert_close(out.loss, torch.tensor(-0.75))
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.25]]))
    # Without correction (level=None) the same batch is plain PPO: (−1 + 2)/2 = 0.5.
    plain = tis_policy_loss(batch, DAPO_CLIP, RolloutCorrectionConfig(level=None))
    torch.testing.assert_close(plain.loss, torch.tensor(0.5))
    # The IS weight is a constant: gradients w.r.t. old / rollout log-probs are never formed.
    assert out.metrics["rollout_corr/rollout_is_mean"].item() == pytest.approx(1.125)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_tis_policy_loss_gradcheck(mode, level):
    torch.manual_seed(0)
    old = torch.randn(3, 6, dtype=torch.float64) - 1.0
    rollout = old + 0.3 * torch.randn_like(old)
    log_prob = (old + 0.3 * torch.randn_like(old)).requires_grad_()
    advantages = torch.randn_like(old)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [0] * 6], dtype=torch.bool)
    correction = RolloutCorrectionConfig(level=level, threshold=1.5)
    config = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode)

    def loss(lp):
        return tis_policy_loss(PolicyLossInputs(lp, old, rollout, advantages, mask), config, correction).loss

    assert torch.autograd.gradcheck(loss, (log_prob,))


def test_nonfinite_and_extreme_log_ratios_stay_finite():
    # Token 0: log π_θ − log π_old = +1e4 and old − rollout = −1e4 (clamped to ±20, finite).
    # Token 1: rollout log-prob −inf; token 2: old log-prob NaN → both dropped (zero loss and gradient).
    old = torch.tensor([[-1e4 + 1.0, -1.0, float("nan"), -0.5]], dtype=torch.float64)
    rollout = torch.tensor([[1.0, -float("inf"), -1.0, -0.7]], dtype=torch.float64)
    log_prob = torch.tensor([[1.0, -1.0, -1.0, -0.4]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[-1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for mode in LOSS_AGG_MODES:
        batch = PolicyLossInputs(log_prob, old, rollout, advantages, mask)
        out = tis_policy_loss(batch, PolicyLossConfig(loss_agg_mode=mode))
        (grad,) = torch.autograd.grad(out.loss, log_prob)
        assert torch.isfinite(out.loss)
        assert torch.isfinite(grad).all() and grad[0, 1] == 0 and grad[0, 2] == 0
        assert all(torch.isfinite(value) for value in out.metrics.values()), out.metrics
        assert out.metrics["rollout_corr/nonfinite_token_fraction"].item() == pytest.approx(0.5)


def test_policy_loss_inputs_name_the_offending_tensor():
    good = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="rollout_log_prob has shape"):
        PolicyLossInputs(good, good, torch.zeros(2, 4), good, mask)
    with pytest.raises(TypeError, match="advantages must be float"):
        PolicyLossInputs(good, good, good, torch.zeros(2, 3, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="response_mask is on meta"):
        PolicyLossInputs(good, good, good, good, torch.ones(2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"log_prob must be a padded \[batch, response_length\]"):
        PolicyLossInputs(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6))
    with pytest.raises(TypeError, match="old_log_prob must be a torch.Tensor"):
        PolicyLossInputs(good, [[0.0] * 3] * 2, good, good, mask)
