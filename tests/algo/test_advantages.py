"""GRPO and RLOO group advantages, DAPO dynamic-sampling filter and overlong shaping (flash_rc/algo/advantages.py)."""

import math

import numpy as np
import pytest
import torch

from flash_rc.algo.advantages import (
    GRPOConfig,
    OverlongConfig,
    dapo_keep_mask,
    grpo_advantages,
    overlong_penalty,
    rloo_advantages,
)

# RC groups by (problem, summary): problem 7 has two summaries; ("p9", 0) is a singleton.
GROUP_IDS = [(7, "s0"), (7, "s0"), (7, "s0"), (7, "s0"), (7, "s1"), (7, "s1"), ("p9", 0)]
SCORES = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])


def test_grpo_hand_worked():
    # Group (7, s0): scores 1, 0, 1, 0 → mean 0.5, unbiased std sqrt(4·0.25/3) = 0.57735 → ±0.5/0.57735 = ±0.8660.
    # Group (7, s1): all equal → (1 − 1)/(0 + eps) = 0.  Singleton: no baseline → 0 by default.
    advantages = grpo_advantages(SCORES, GROUP_IDS)
    a = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(advantages, torch.tensor([a, -a, a, -a, 0.0, 0.0, 0.0]), atol=1e-5, rtol=1e-5)


def test_dr_grpo_and_verl_singleton():
    # Dr. GRPO: no std division → ±0.5. singleton="score" reproduces verl: mean 0, std 1 → the raw score.
    advantages = grpo_advantages(SCORES, GROUP_IDS, GRPOConfig(norm_by_std=False, singleton="score"))
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 1.0]))
    normed = grpo_advantages(SCORES, GROUP_IDS, GRPOConfig(singleton="score"))
    assert normed[-1].item() == pytest.approx(1.0 / (1.0 + 1e-6))


def test_grpo_group_ids_are_arbitrary_hashables_in_any_order():
    # Interleaved numpy-string uids (what verl passes) give the same result as contiguous groups.
    uids = np.array(["b", "a", "b", "a"])
    advantages = grpo_advantages(torch.tensor([3.0, 1.0, 1.0, 2.0]), uids)
    # group b: (3, 1) → mean 2, std √2 → ±0.7071; group a: (1, 2) → mean 1.5, std √0.5 → ∓0.7071
    torch.testing.assert_close(advantages, torch.tensor([1.0, -1.0, -1.0, 1.0]) / math.sqrt(2), atol=1e-5, rtol=1e-5)


def test_grpo_rejects_bad_input():
    with pytest.raises(ValueError, match="group_ids has 2 entries"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), ["a", "b"])
    with pytest.raises(ValueError, match="response 1 has nan"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), ["a", "a"])
    with pytest.raises(ValueError, match="1-D floating"):
        grpo_advantages(torch.tensor([1, 0]), ["a", "a"])


def test_rloo_hand_worked():
    # Group (7, s0): scores 1, 0, 1, 0 → a correct response's siblings average 1/3 → 1 − 1/3 = 2/3, a wrong one's
    # average 2/3 → −2/3 (= 4/3 · ±0.5). (7, s1): all equal → 0. The singleton has no siblings → 0 (verl's
    # compute_rloo_outcome_advantage would leave its raw score 1 there).
    advantages = rloo_advantages(SCORES, GROUP_IDS)
    torch.testing.assert_close(advantages, torch.tensor([2 / 3, -2 / 3, 2 / 3, -2 / 3, 0.0, 0.0, 0.0]))


def test_rloo_is_reward_minus_mean_of_the_others_in_any_order():
    # Interleaved uids; group b = (3, 1, 2): 3 − 1.5 = 1.5, 1 − 2.5 = −1.5, 2 − 2 = 0; group a = (4, 0): ±4.
    uids = np.array(["b", "a", "b", "a", "b"])
    advantages = rloo_advantages(torch.tensor([3.0, 4.0, 1.0, 0.0, 2.0], dtype=torch.float64), uids)
    torch.testing.assert_close(advantages, torch.tensor([1.5, 4.0, -1.5, -4.0, 0.0], dtype=torch.float64))
    assert advantages.dtype == torch.float64


def test_rloo_rejects_bad_input():
    with pytest.raises(ValueError, match="group_ids has 1 entries"):
        rloo_advantages(torch.tensor([1.0, 0.0]), ["a"])
    with pytest.raises(ValueError, match="response 0 has inf"):
        rloo_advantages(torch.tensor([float("inf"), 0.0]), ["a", "a"])


def test_dapo_filter_drops_all_equal_groups_and_singletons():
    keep = dapo_keep_mask(SCORES, GROUP_IDS)
    # (7, s0) has mixed accuracy → kept; (7, s1) all correct → dropped; the singleton is trivially all-equal.
    assert keep.tolist() == [True, True, True, True, False, False, False]
    assert not dapo_keep_mask(torch.zeros(3), ["u", "u", "u"]).any()


@pytest.mark.parametrize(
    "length, factor, expected",
    [
        (10, 1.0, 0.0),  # well below L_max − L_buf = 16
        (16, 1.0, 0.0),  # exactly at the start of the buffer
        (18, 1.0, -0.5),  # −(18 − 16)/4
        (20, 1.0, -1.0),  # at L_max: −penalty_factor
        (18, 2.0, -1.0),  # penalty scales linearly
    ],
)
def test_overlong_penalty_hand_worked(length, factor, expected):
    config = OverlongConfig(max_response_length=20, buffer_length=4, penalty_factor=factor)
    assert overlong_penalty(torch.tensor([length]), config).item() == pytest.approx(expected)


def test_overlong_config_validation():
    with pytest.raises(ValueError, match="buffer_length"):
        OverlongConfig(max_response_length=10, buffer_length=20)
    with pytest.raises(ValueError, match="buffer_length"):
        OverlongConfig(max_response_length=10, buffer_length=0)
    with pytest.raises(ValueError, match=">= 0"):
        overlong_penalty(torch.tensor([-1]), OverlongConfig(max_response_length=10, buffer_length=2))
