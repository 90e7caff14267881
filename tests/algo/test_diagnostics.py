"""Mismatch / IS-weight / clip diagnostics (flash_rc/algo/diagnostics.py)."""

import math

import pytest
import torch

from flash_rc.algo.diagnostics import is_weight_metrics, mismatch_metrics, ppo_clip_metrics
from flash_rc.algo.rollout_correction import RolloutCorrectionConfig, rollout_is_weights

# One sequence, two tokens: old = (−1, −2), ratios π_old/π_rollout = (3, 0.25), i.e. δ = (log 3, log 0.25).
OLD = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
ROLLOUT = OLD - torch.tensor([[3.0, 0.25]], dtype=torch.float64).log()
MASK = torch.ones(1, 2, dtype=torch.bool)


def test_mismatch_metrics_hand_worked():
    m = mismatch_metrics(OLD, ROLLOUT, MASK)
    # kl = mean(rollout − old) = −(log 3 + log 0.25)/2 = −log(0.75)/2
    assert m["rollout_corr/kl"].item() == pytest.approx(-math.log(0.75) / 2)
    # k3 = mean(ρ − log ρ − 1) = ((3 − log 3 − 1) + (0.25 − log 0.25 − 1))/2
    assert m["rollout_corr/k3_kl"].item() == pytest.approx((2 - math.log(3) + (-0.75 - math.log(0.25))) / 2)
    # chi2_token = mean(ρ²) − 1 = (9 + 0.0625)/2 − 1
    assert m["rollout_corr/chi2_token"].item() == pytest.approx(3.53125)
    # chi2_seq = (Πρ)² − 1 = 0.75² − 1
    assert m["rollout_corr/chi2_seq"].item() == pytest.approx(-0.4375)
    # training log-ppl = −mean(old) = 1.5; rollout log-ppl = −mean(rollout) = 1.5 + log(0.75)/2
    assert m["rollout_corr/training_log_ppl"].item() == pytest.approx(1.5)
    assert m["rollout_corr/training_ppl"].item() == pytest.approx(math.exp(1.5))
    assert m["rollout_corr/rollout_log_ppl"].item() == pytest.approx(1.5 + math.log(0.75) / 2)
    assert m["rollout_corr/rollout_ppl"].item() == pytest.approx(math.exp(1.5 + math.log(0.75) / 2))
    # log_ppl_diff = mean rollout − mean old = −log(0.75)/2 (one sequence: also max and min); ppl_ratio = e^that
    for key in ("log_ppl_diff", "log_ppl_abs_diff", "log_ppl_diff_max", "log_ppl_diff_min"):
        assert m[f"rollout_corr/{key}"].item() == pytest.approx(-math.log(0.75) / 2)
    assert m["rollout_corr/ppl_ratio"].item() == pytest.approx(0.75**-0.5)


def test_is_weight_metrics_hand_worked():
    # Token TIS with C = 2: w = (2, 0.25). mean 1.125, E[w²] = 2.03125, std = sqrt(2.03125 − 1.125²) = 0.875,
    # ESS = (Σw)²/(N Σw²) = 2.25²/(2·4.0625) = 0.623077; ρ = 3 > C and ρ = 0.25 < 1/C → 1/2 each.
    config = RolloutCorrectionConfig(threshold=2.0)
    weights = rollout_is_weights(OLD, ROLLOUT, MASK, config)
    m = is_weight_metrics(weights, MASK, config.threshold, config.lower_bound)
    expected = {"mean": 1.125, "std": 0.875, "min": 0.25, "max": 2.0, "eff_sample_size": 5.0625 / 8.125,
                "ratio_fraction_high": 0.5, "ratio_fraction_low": 0.5, "oob_ratio": 0.0}  # fmt: skip
    for key, value in expected.items():
        assert m[f"rollout_corr/rollout_is_{key}"].item() == pytest.approx(value), key


def test_icepop_out_of_bounds_fraction_and_all_masked_ess():
    # [lo, hi] = [0.5, 2]: both ratios (3, 0.25) are outside → every weight 0 → ESS 0, oob 1.
    config = RolloutCorrectionConfig(mode="mask", threshold=2.0, threshold_lower=0.5)
    m = is_weight_metrics(rollout_is_weights(OLD, ROLLOUT, MASK, config), MASK, 2.0, 0.5)
    assert m["rollout_corr/rollout_is_oob_ratio"].item() == 1.0
    assert m["rollout_corr/rollout_is_eff_sample_size"].item() == 0.0
    assert m["rollout_corr/rollout_is_max"].item() == 0.0


def test_on_policy_batch_has_zero_mismatch():
    torch.manual_seed(0)
    old = torch.randn(4, 7) - 2.0
    mask = torch.rand(4, 7) > 0.3
    m = mismatch_metrics(old, old, mask)
    for key in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "log_ppl_abs_diff"):
        assert m[f"rollout_corr/{key}"].item() == pytest.approx(0.0, abs=1e-6), key
    assert m["rollout_corr/ppl_ratio"].item() == pytest.approx(1.0)
    config = RolloutCorrectionConfig()
    w = is_weight_metrics(rollout_is_weights(old, old, mask, config), mask, config.threshold, config.lower_bound)
    assert w["rollout_corr/rollout_is_eff_sample_size"].item() == pytest.approx(1.0)
    assert w["rollout_corr/rollout_is_std"].item() == pytest.approx(0.0, abs=1e-6)


def test_fully_masked_rows_do_not_change_metrics():
    torch.manual_seed(1)
    old, rollout = torch.randn(3, 5) - 1.0, torch.randn(3, 5) - 1.0
    mask = torch.rand(3, 5) > 0.2
    mask[:, 0] = True
    padded = mismatch_metrics(
        torch.cat([old, torch.full((1, 5), 1e6)]), torch.cat([rollout, torch.full((1, 5), -1e6)]),
        torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)]),
    )  # fmt: skip
    reference = mismatch_metrics(old, rollout, mask)
    for key, value in reference.items():
        torch.testing.assert_close(padded[key], value, msg=key)


def test_empty_batch_gives_zero_metrics():
    empty = torch.zeros(0, 4)
    mask = torch.zeros(0, 4, dtype=torch.bool)
    config = RolloutCorrectionConfig()
    metrics = {
        **mismatch_metrics(empty, empty, mask),
        **is_weight_metrics(rollout_is_weights(empty, empty, mask, config), mask, 2.0, 0.5),
        **ppo_clip_metrics(empty, mask, mask, mask, mask),
    }
    assert all(value.item() == 0.0 for value in metrics.values()), metrics


def test_ppo_clip_metrics_counts_each_branch():
    # 4 valid tokens: one clipped high, one clipped low, one dual-clipped; the masked token is clipped but ignored.
    high = torch.tensor([[True, False, False, False, True]])
    low = torch.tensor([[False, True, False, False, False]])
    dual = torch.tensor([[False, False, True, False, False]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    ppo_log_ratio = torch.tensor([[0.1, -0.3, 0.2, 0.0, 5.0]])
    m = ppo_clip_metrics(ppo_log_ratio, high, low, dual, mask)
    assert m["actor/pg_clipfrac_high"].item() == 0.25
    assert m["actor/pg_clipfrac_low"].item() == 0.25
    assert m["actor/pg_clipfrac"].item() == 0.5
    assert m["actor/pg_clipfrac_dual"].item() == 0.25
    # ppo_kl = mean(−log r) over valid tokens = −(0.1 − 0.3 + 0.2 + 0)/4 = 0
    assert m["actor/ppo_kl"].item() == pytest.approx(0.0, abs=1e-7)
