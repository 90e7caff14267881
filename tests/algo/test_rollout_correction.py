"""Rollout IS weights: token / sequence / geometric levels, truncation and IcePop-MIS masking."""

import math

import pytest
import torch

from flash_rc.algo.rollout_correction import RolloutCorrectionConfig, rollout_is_weights


def weights_for(ratios: list[list[float]], mask: list[list[int]], **config) -> torch.Tensor:
    """IS weights for rows whose per-token ratios π_old/π_rollout are `ratios`."""
    ratio = torch.tensor(ratios, dtype=torch.float64)
    rollout = torch.full_like(ratio, -2.0)
    return rollout_is_weights(rollout + ratio.log(), rollout, torch.tensor(mask, dtype=torch.bool),
                              RolloutCorrectionConfig(**config))  # fmt: skip


def test_token_tis_truncates_above_c_and_keeps_small_ratios():
    # min(ρ, 2): 3 → 2, 0.25 stays 0.25 (no lower bound), 1 stays 1; the masked token gets 0.
    out = weights_for([[3.0, 0.25, 1.0, 5.0]], [[1, 1, 1, 0]], threshold=2.0)
    torch.testing.assert_close(out.weights, torch.tensor([[2.0, 0.25, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out.ratio, torch.tensor([[3.0, 0.25, 1.0, 0.0]], dtype=torch.float64))
    assert not out.out_of_bounds.any()


def test_sequence_and_geometric_levels_broadcast_one_weight_per_row():
    # Row 0: valid ratios 2 and 3 → ρ_seq = 6, ρ_geo = √6 ≈ 2.449; row 1: single token ρ = 0.5 (both levels).
    ratios, mask = [[2.0, 3.0, 7.0], [0.5, 9.0, 9.0]], [[1, 1, 0], [1, 0, 0]]
    seq = weights_for(ratios, mask, level="sequence", threshold=10.0)
    torch.testing.assert_close(seq.weights, torch.tensor([[6.0, 6.0, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64))
    truncated = weights_for(ratios, mask, level="sequence", threshold=2.0)
    torch.testing.assert_close(truncated.weights[0, :2], torch.tensor([2.0, 2.0], dtype=torch.float64))
    geo = weights_for(ratios, mask, level="geometric", threshold=10.0)
    root6 = math.sqrt(6.0)
    torch.testing.assert_close(geo.weights, torch.tensor([[root6, root6, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64))


def test_icepop_token_mask_zeroes_ratios_outside_bounds():
    # [lo, hi] = [0.5, 5]: 3 and 1 are kept with their ratio as weight, 0.25 and 6 are zeroed (out of bounds).
    out = weights_for([[3.0, 0.25, 6.0, 1.0]], [[1, 1, 1, 1]], mode="mask", threshold=5.0, threshold_lower=0.5)
    torch.testing.assert_close(out.weights, torch.tensor([[3.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    assert out.out_of_bounds.tolist() == [[False, True, True, False]]


def test_sequence_mis_drops_whole_rows():
    # ρ_seq = 2·3 = 6 ∉ [0.5, 2] → the whole row is zeroed; ρ_seq = 1.5·1 ∈ bounds → weight 1.5 on every token.
    out = weights_for([[2.0, 3.0], [1.5, 1.0]], [[1, 1], [1, 1]], level="sequence", mode="mask", threshold=2.0,
                      threshold_lower=0.5)  # fmt: skip
    torch.testing.assert_close(out.weights, torch.tensor([[0.0, 0.0], [1.5, 1.5]], dtype=torch.float64))
    assert out.out_of_bounds.tolist() == [[True, True], [False, False]]


def test_no_level_means_unit_weights_on_valid_tokens():
    out = weights_for([[3.0, 0.25]], [[1, 0]], level=None)
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out.ratio, torch.tensor([[3.0, 0.0]], dtype=torch.float64))


def test_weights_are_detached_and_extreme_log_ratios_are_clamped():
    old = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    rollout = torch.tensor([[0.0, 0.0, float("inf")]])  # the inf row would be dropped upstream; here it is masked
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    out = rollout_is_weights(old, rollout, mask, RolloutCorrectionConfig(threshold=8.0))
    assert not out.weights.requires_grad
    # log ρ = +1e4 → e^20, truncated to 8; log ρ = −1e4 → e^−20 ≈ 2.06e−9 (finite, not 0).
    torch.testing.assert_close(out.weights, torch.tensor([[8.0, math.exp(-20.0), 0.0]]))


def test_from_verl_parses_threshold_specs():
    assert RolloutCorrectionConfig.from_verl("token", 2.0) == RolloutCorrectionConfig(level="token", mode="truncate", threshold=2.0)
    icepop = RolloutCorrectionConfig.from_verl("token", "0.5_5.0")
    assert (icepop.mode, icepop.threshold, icepop.lower_bound) == ("mask", 5.0, 0.5)
    assert RolloutCorrectionConfig.from_verl(None, "2").level is None


def test_config_validation():
    with pytest.raises(ValueError, match="level"):
        RolloutCorrectionConfig(level="batch")
    with pytest.raises(ValueError, match="threshold\n  Input should be greater than 0"):
        RolloutCorrectionConfig(threshold=0.0)
    with pytest.raises(ValueError, match="threshold_lower"):
        RolloutCorrectionConfig(threshold=2.0, threshold_lower=3.0)
    assert RolloutCorrectionConfig(threshold=4.0).lower_bound == 0.25


def test_recipe_section_resolves_verl_keys_and_names_the_bad_key():
    from flash_rc.algo.rollout_correction import RolloutCorrectionSection
    from flash_rc.config import ConfigError, load_recipe
    from flash_rc.schema import Section

    class Algorithm(Section):
        rollout_correction: RolloutCorrectionSection = RolloutCorrectionSection()

    class Recipe(Section):
        algorithm: Algorithm = Algorithm()

    assert Recipe().algorithm.rollout_correction.config().level is None  # verl's default: weights off
    recipe = load_recipe(Recipe, None, ["algorithm.rollout_correction.rollout_is=token",
                                        "algorithm.rollout_correction.rollout_is_threshold=0.5_5.0"])
    config = recipe.algorithm.rollout_correction.config()
    assert (config.level, config.mode, config.threshold_lower, config.threshold) == ("token", "mask", 0.5, 5.0)
    for threshold, reason in [("5.0_0.5", "threshold_lower must be in"), ("-1", "greater than 0"),
                              ("a_b", "could not convert")]:
        with pytest.raises(ConfigError, match=f"algorithm.rollout_correction: .*{reason}"):
            load_recipe(Recipe, None, [f"algorithm.rollout_correction.rollout_is_threshold={threshold}"])
    with pytest.raises(ConfigError, match="algorithm.rollout_correction.rollout_is: Input should be"):
        load_recipe(Recipe, None, ["algorithm.rollout_correction.rollout_is=batch"])

