"""Rollout correction: importance weights that undo the quantized-sampler / bf16-learner mismatch.

Why this exists. flash_rc samples with an INT8/FP8 vLLM engine but trains a bf16 FSDP learner, so every rollout token
comes from π_rollout while the PPO objective assumes it came from π_old (the learner's own no-grad recompute). Truncated
importance sampling (TIS, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training")
reweights each token's already clipped PPO loss by

    ρ_t = π_old(y_t) / π_rollout(y_t) = exp(old_log_prob_t − rollout_log_prob_t)
    w_t = stopgrad( min( exp(clamp(log ρ_t, −20, 20)), C ) )                      (token TIS)

The PPO ratio stays learner-over-learner (π_θ / π_old), so the trust region is untouched; w_t only changes the measure.
w_t must be detached: differentiating it would add a biased log π · ∇w term. There is no lower bound on w_t: ratios
below 1 are what stop the over-penalising of negative-advantage tokens that leads to entropy collapse.

Levels (`RolloutCorrectionConfig.level`), each applied to every valid token of a row:

    token:      log ρ_t                                   (Flash-RL / verl `rollout_is=token`)
    sequence:   log ρ_seq = Σ_t log ρ_t                   (verl `rollout_is=sequence`; unbiased, high variance)
    geometric:  log ρ_geo = (1/|y|) Σ_t log ρ_t           (length-invariant; verl's seq_mean_k1 / Geo-RS statistic)

Modes (`RolloutCorrectionConfig.mode`):

    truncate:   w = min(ρ, C)                             (TIS; C = `threshold`: 2 in verl / FP8 runs, 8 in Flash-RL
                                                           DAPO-32B)
    mask:       w = ρ · 1[lo ≤ ρ ≤ hi]                    (IcePop at token level, sequence MIS at sequence level; the
                                                           token stays in the loss denominator with weight 0, exactly
                                                           like verl's `rollout_is_threshold="lo_hi"`)

Every exponential clamps its exponent to ±20 (verl's SAFETY_BOUND: e^20 ≈ 4.9e8), so ±inf or ±1e4 log-ratios give
finite weights. This module is the plain-torch reference that `flash_rc.kernels.tis_loss` reproduces in one pass.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, ValidationError, model_validator

from flash_rc.schema import FrozenSection, Section

SAFETY_BOUND = 20.0
"""|exponent| cap for every exp() of a log-ratio (verl `rollout_corr_helper.SAFETY_BOUND`)."""

ISLevel = Literal["token", "sequence", "geometric"]
ISMode = Literal["truncate", "mask"]


class RolloutCorrectionConfig(FrozenSection):
    """How rollout importance weights are formed. The default is Flash-RL / verl token TIS with C = 2."""

    level: ISLevel | None = "token"
    """Granularity of the ratio: "token", "sequence" (product over the row) or "geometric" (geometric mean over the
    row). None applies no weights (w = 1) but the mismatch diagnostics are still computed (verl's metrics-only mode);
    the ratio fractions then describe the token-level ratio."""

    mode: ISMode = "truncate"
    """"truncate": w = min(ρ, threshold) (TIS). "mask": w = ρ inside [threshold_lower, threshold], else 0
    (IcePop / MIS)."""

    threshold: float = Field(2.0, gt=0)
    """C: the truncation cap in "truncate" mode, the upper bound hi in "mask" mode. Must be > 0."""

    threshold_lower: float | None = Field(None, gt=0)
    """lo: the lower bound in "mask" mode. In "truncate" mode it only sets the `rollout_is_ratio_fraction_low`
    diagnostic. None means 1 / threshold (verl's default)."""

    @model_validator(mode="after")
    def _lower_below_upper(self) -> "RolloutCorrectionConfig":
        if self.threshold_lower is not None and not self.threshold_lower <= self.threshold:
            raise ValueError(f"threshold_lower must be in (0, threshold={self.threshold}], got {self.threshold_lower}")
        return self

    @property
    def lower_bound(self) -> float:
        """lo: `threshold_lower`, or 1 / `threshold` when unset."""
        return self.threshold_lower if self.threshold_lower is not None else 1.0 / self.threshold

    @classmethod
    def from_verl(cls, rollout_is: str | None, rollout_is_threshold: float | str = 2.0) -> "RolloutCorrectionConfig":
        """Translate verl's `algorithm.rollout_correction.{rollout_is, rollout_is_threshold}`.

        A number (or numeric string) is a TIS cap; a "lo_hi" string such as "0.5_5.0" selects IcePop / MIS masking.
        """
        if isinstance(rollout_is_threshold, str) and "_" in rollout_is_threshold:
            lower, _, upper = rollout_is_threshold.partition("_")
            return cls(level=rollout_is, mode="mask", threshold=float(upper), threshold_lower=float(lower))
        return cls(level=rollout_is, mode="truncate", threshold=float(rollout_is_threshold))


class RolloutCorrectionSection(Section):
    """verl's ``algorithm.rollout_correction`` keys that choose the importance weights (see
    :class:`RolloutCorrectionConfig` for what each resolves to)."""

    rollout_is: ISLevel | None = None
    """Importance-weight level: ``token`` (TIS), ``sequence``, ``geometric``, or null (weights off, diagnostics on)."""
    rollout_is_threshold: float | str = 2.0
    """A number is the TIS cap C; a ``"lo_hi"`` string such as ``"0.5_5.0"`` masks weights outside [lo, hi]
    (IcePop / MIS)."""

    @model_validator(mode="after")
    def _resolves(self) -> "RolloutCorrectionSection":
        try:
            self.config()
        except ValidationError as error:  # e.g. lo > hi, or a cap <= 0
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ValueError(f"rollout_is_threshold={self.rollout_is_threshold!r} resolves to {reasons}") from None
        except ValueError as error:  # "lo_hi" parts that are not numbers
            raise ValueError(f"rollout_is_threshold={self.rollout_is_threshold!r}: {error}") from None
        return self

    def config(self) -> RolloutCorrectionConfig:
        return RolloutCorrectionConfig.from_verl(self.rollout_is, self.rollout_is_threshold)


@dataclass(eq=False)
class RolloutISWeights:
    """Importance weights for a padded [batch, response_length] batch (all tensors [B, T], zero on invalid tokens)."""

    weights: torch.Tensor
    """w after truncation / masking, detached; multiply it onto the per-token PPO loss."""

    ratio: torch.Tensor
    """ρ at the configured level before truncation / masking: exp(clamp(level log-ratio, ±20)) (token level if
    `level` is None)."""

    out_of_bounds: torch.Tensor
    """bool: tokens whose weight "mask" mode zeroed (always False in "truncate" mode)."""


def level_log_ratio(log_ratio: torch.Tensor, response_mask: torch.Tensor, level: ISLevel | None) -> torch.Tensor:
    """Per-token log ρ at the requested level, broadcast over each row ([B, T] → [B, T]).

    `log_ratio` must already be zero on invalid tokens. Fully masked rows give 0 (ρ = 1, and their weight is zeroed).
    """
    if level is None or level == "token":
        return log_ratio
    row_sum = log_ratio.sum(dim=-1, keepdim=True)
    if level == "sequence":
        return row_sum.expand_as(log_ratio)
    tokens = response_mask.sum(dim=-1, keepdim=True).clamp_min(1)
    return (row_sum / tokens).expand_as(log_ratio)


def rollout_is_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    config: RolloutCorrectionConfig,
) -> RolloutISWeights:
    """Compute w (see the module docstring) for [B, T] log-probs; `response_mask` is bool and marks valid tokens.

    Inputs must be finite on valid tokens (`flash_rc.algo.losses.tis_policy_loss` drops non-finite tokens first).
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_log_prob.detach() - rollout_log_prob.detach(), 0.0)
    level_lr = level_log_ratio(log_ratio, mask, config.level)
    ratio = torch.exp(level_lr.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    zero = torch.zeros_like(ratio)
    if config.level is None:
        weights = torch.ones_like(ratio)
        out_of_bounds = torch.zeros_like(mask)
    elif config.mode == "truncate":
        weights = ratio.clamp(max=config.threshold)
        out_of_bounds = torch.zeros_like(mask)
    else:
        inside = (ratio >= config.lower_bound) & (ratio <= config.threshold)
        weights = torch.where(inside, ratio, zero)
        out_of_bounds = ~inside & mask
    return RolloutISWeights(
        weights=torch.where(mask, weights, zero).detach(),
        ratio=torch.where(mask, ratio, zero),
        out_of_bounds=out_of_bounds,
    )
