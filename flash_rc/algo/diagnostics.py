"""Mismatch diagnostics: how far the quantized sampler drifted from the learner, and what the correction did.

Why this exists. TIS only helps when it is watched: the FlashRL / verl runs show that without correction the k1 KL
turns negative, entropy collapses and the *logged* reward can look better while accuracy drops. These are the numbers
to put on the dashboard. Names follow verl's `rollout_corr/*` metrics (`verl/trainer/ppo/rollout_corr_helper.py`) where
they correspond, so runs are comparable with stock verl; PPO clip statistics use verl's `actor/*` names.

Notation: δ_t = old_log_prob_t − rollout_log_prob_t = log ρ_t on the N valid tokens, δ̄_t = clamp(δ_t, ±20),
rows b with n_b > 0 valid tokens are the G valid sequences. Token metrics average over the N valid tokens, sequence
metrics over the G valid sequences; with nothing valid every metric is 0.

    rollout_corr/kl                = mean_t(−δ_t)                 k1 estimate of KL(π_rollout ‖ π_old); can be < 0
    rollout_corr/k3_kl             = mean_t(e^δ̄ − δ̄ − 1)          k3 estimate, ≥ 0
    rollout_corr/training_log_ppl  = mean_b(−mean_t old_b)        and training_ppl = mean_b exp(that per row)
    rollout_corr/rollout_log_ppl   = mean_b(−mean_t rollout_b)    and rollout_ppl  = mean_b exp(that per row)
    rollout_corr/log_ppl_diff      = mean_b(d_b), d_b = mean_t rollout_b − mean_t old_b = log(train ppl / rollout ppl)
                                     (+ log_ppl_abs_diff, log_ppl_diff_max, log_ppl_diff_min)
    rollout_corr/ppl_ratio         = mean_b exp(d_b)
    rollout_corr/chi2_token        = mean_t(e^{2δ̄}) − 1          χ²(π_old ‖ π_rollout), variance of token IS weights
    rollout_corr/chi2_seq          = mean_b(e^{2·clamp(Σ_t δ_b)}) − 1
    rollout_corr/rollout_is_mean|std|min|max   of the applied weights w over valid tokens
    rollout_corr/rollout_is_eff_sample_size    = (Σw)² / (N Σw²) = 1 / mean((w / mean w)²); 0 if all w are 0
    rollout_corr/rollout_is_ratio_fraction_high|low   fraction of valid tokens with ρ > C (= fraction truncated in
                                     "truncate" mode) or ρ < lo, ρ at the configured level
    rollout_corr/rollout_is_oob_ratio          fraction of valid tokens zeroed by "mask" mode (= fraction masked)
    rollout_corr/nonfinite_token_fraction      fraction of masked-in tokens dropped for a NaN/inf input (flash_rc)
    actor/ppo_kl                   = mean_t(−clamp(log π_θ − log π_old, ±20))
    actor/pg_clipfrac              = high + low (verl's definition: the clipped branch is strictly larger)
    actor/pg_clipfrac_high|low     A > 0 and r > 1 + ε_high  |  A < 0 and r < 1 − ε_low
    actor/pg_clipfrac_dual         A < 0 and the dual-clip cap −A·c is active (verl calls this pg_clipfrac_lower)

Deliberate differences from verl: exponentials use the clamped log-ratio (so ±1e4 inputs stay finite: training_ppl of
a row is at most e^20), chi2_seq and the sequence means ignore fully masked rows, and fractions are token-weighted at
every level. All values are 0-dim tensors on the input device (no host sync); call .item() when logging.
"""

import torch

from flash_rc.algo.rollout_correction import SAFETY_BOUND, RolloutISWeights


def _safe_div(numerator: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """numerator / count, or 0 where count == 0."""
    return torch.where(count > 0, numerator / count.clamp_min(1), torch.zeros_like(numerator))


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp(-SAFETY_BOUND, SAFETY_BOUND))


def _masked_min_max(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of values[mask], or (0, 0) when the mask is empty."""
    if values.numel() == 0:
        zero = values.new_zeros(())
        return zero, zero
    any_valid = mask.any()
    low = torch.where(mask, values, torch.inf).min()
    high = torch.where(mask, values, -torch.inf).max()
    zero = torch.zeros_like(low)
    return torch.where(any_valid, low, zero), torch.where(any_valid, high, zero)


def mismatch_metrics(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Off-policy diagnostics between the learner recompute (old) and the sampler (rollout); [B, T] inputs, finite on
    valid tokens."""
    mask = response_mask.bool()
    old = torch.where(mask, old_log_prob.detach().float(), 0.0)
    rollout = torch.where(mask, rollout_log_prob.detach().float(), 0.0)
    delta = old - rollout
    clamped = delta.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    num_tokens = mask.sum()
    row_tokens = mask.sum(dim=-1)
    valid_rows = row_tokens > 0
    num_rows = valid_rows.sum()

    def token_mean(values: torch.Tensor) -> torch.Tensor:
        return _safe_div(torch.where(mask, values, 0.0).sum(), num_tokens)

    def row_mean(values: torch.Tensor) -> torch.Tensor:
        return _safe_div(torch.where(valid_rows, values, 0.0).sum(), num_rows)

    training_log_ppl = _safe_div(-old.sum(dim=-1), row_tokens)
    rollout_log_ppl = _safe_div(-rollout.sum(dim=-1), row_tokens)
    log_ppl_diff = _safe_div(-delta.sum(dim=-1), row_tokens)
    diff_min, diff_max = _masked_min_max(log_ppl_diff, valid_rows)
    chi2_token = token_mean(torch.exp(2.0 * clamped)) - 1.0
    chi2_seq = row_mean(_exp(delta.sum(dim=-1)).square()) - 1.0
    return {
        "rollout_corr/kl": token_mean(-delta),
        "rollout_corr/k3_kl": token_mean(torch.exp(clamped) - clamped - 1.0),
        "rollout_corr/training_log_ppl": row_mean(training_log_ppl),
        "rollout_corr/training_ppl": row_mean(_exp(training_log_ppl)),
        "rollout_corr/rollout_log_ppl": row_mean(rollout_log_ppl),
        "rollout_corr/rollout_ppl": row_mean(_exp(rollout_log_ppl)),
        "rollout_corr/log_ppl_diff": row_mean(log_ppl_diff),
        "rollout_corr/log_ppl_abs_diff": row_mean(log_ppl_diff.abs()),
        "rollout_corr/log_ppl_diff_max": diff_max,
        "rollout_corr/log_ppl_diff_min": diff_min,
        "rollout_corr/ppl_ratio": row_mean(_exp(log_ppl_diff)),
        "rollout_corr/chi2_token": torch.where(num_tokens > 0, chi2_token, 0.0),
        "rollout_corr/chi2_seq": torch.where(num_rows > 0, chi2_seq, 0.0),
    }


def is_weight_metrics(
    is_weights: RolloutISWeights, response_mask: torch.Tensor, threshold: float, lower_bound: float
) -> dict[str, torch.Tensor]:
    """Statistics of the applied weights w and of the raw ratio ρ against [lower_bound, threshold]."""
    mask = response_mask.bool()
    weights = torch.where(mask, is_weights.weights.float(), 0.0)
    num_tokens = mask.sum()
    weight_sum = weights.sum()
    weight_sq_sum = weights.square().sum()
    mean = _safe_div(weight_sum, num_tokens)
    variance = (_safe_div(weight_sq_sum, num_tokens) - mean.square()).clamp_min(0.0)
    low, high = _masked_min_max(weights, mask)
    ess = torch.where(weight_sq_sum > 0, weight_sum.square() / (num_tokens * weight_sq_sum).clamp_min(1e-30), 0.0)

    def fraction(flags: torch.Tensor) -> torch.Tensor:
        return _safe_div((flags & mask).sum().float(), num_tokens)

    return {
        "rollout_corr/rollout_is_mean": mean,
        "rollout_corr/rollout_is_std": variance.sqrt(),
        "rollout_corr/rollout_is_min": low,
        "rollout_corr/rollout_is_max": high,
        "rollout_corr/rollout_is_eff_sample_size": ess,
        "rollout_corr/rollout_is_ratio_fraction_high": fraction(is_weights.ratio > threshold),
        "rollout_corr/rollout_is_ratio_fraction_low": fraction(is_weights.ratio < lower_bound),
        "rollout_corr/rollout_is_oob_ratio": fraction(is_weights.out_of_bounds),
    }


def ppo_clip_metrics(
    ppo_log_ratio: torch.Tensor,
    clipped_high: torch.Tensor,
    clipped_low: torch.Tensor,
    dual_clipped: torch.Tensor,
    response_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Clip fractions and the PPO k1 KL over valid tokens (see the module docstring for the definitions)."""
    mask = response_mask.bool()
    num_tokens = mask.sum()

    def fraction(flags: torch.Tensor) -> torch.Tensor:
        return _safe_div((flags & mask).sum().float(), num_tokens)

    high, low = fraction(clipped_high), fraction(clipped_low)
    return {
        "actor/ppo_kl": _safe_div(torch.where(mask, -ppo_log_ratio.detach().float(), 0.0).sum(), num_tokens),
        "actor/pg_clipfrac": high + low,
        "actor/pg_clipfrac_high": high,
        "actor/pg_clipfrac_low": low,
        "actor/pg_clipfrac_dual": fraction(dual_clipped),
    }
