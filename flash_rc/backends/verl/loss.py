"""The ``flash_rc_tis`` policy loss for verl 0.9.1: PPO-clip × truncated importance sampling through flash_rc's kernel.

Why this exists. verl's ``vanilla`` loss multiplies the clipped PPO token loss by ``rollout_is_weights`` in a dozen
eager kernels; flash_rc's :func:`~flash_rc.kernels.fused_tis_loss` does the clip, the dual clip, the weighting, the
aggregation and the clip statistics in one Triton pass (its torch reference, :func:`flash_rc.algo.losses.
tis_policy_loss`, on CPU). Registered under :data:`~flash_rc.backends.verl.plugin.POLICY_LOSS`, it is selected by
``actor_rollout_ref.actor.policy_loss.loss_mode=flash_rc_tis`` and returns the numbers ``vanilla`` returns on the same
inputs (loss, gradient, ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``).

Where the rollout log-probs are. verl calls the loss inside ``verl/workers/utils/losses.py::ppo_loss`` on the FSDP
workers, and forwards only ``old_log_prob``, ``log_prob``, ``advantages``, ``response_mask`` and — when
``algorithm.rollout_correction.rollout_is`` is set — ``rollout_is_weights``: never the rollout log-probs themselves.
Those weights were already formed by verl on the driver from the same ``old_log_probs``
(``rollout_corr_helper.compute_rollout_correction_weights``: w = min(exp(clamp(old − rollout, ±20)), C) for TIS,
zero outside [lo, hi] for IcePop, optionally batch-normalised), and verl logged its ``rollout_corr/*`` mismatch
metrics from the real rollout log-probs there. So this loss applies verl's weights exactly once and never recomputes
a ratio (no double weighting, no second threshold to keep in sync): each valid token's weight reaches the kernel as
the rollout log-prob that reproduces it,

    rollout_eff_t = old_t − log w_t     ⇒  the kernel's ρ_t = exp(old_t − rollout_eff_t) = w_t,

with the kernel's own truncation off (token level, cap +inf). In float32 that round trip is exact up to one rounding
of ``old − log w`` (relative error ≤ |old|·6e-8 on w: ≤ 1.2e-6 at |old| = 20). Tokens whose weight is exactly 0
(IcePop) would need log 0: they get ρ = 1 and a zero advantage instead, which gives them verl's contribution — zero
loss, zero gradient, still counted in every denominator — but keeps them out of the clip fractions (verl counts their
clipping). Without ``rollout_is_weights`` every weight is 1 (plain PPO-clip, what ``vanilla`` does then).

Consequences for users: set ``algorithm.rollout_correction.rollout_is: token`` and ``rollout_is_threshold: C`` (verl's
keys; flash_rc's TIS is verl's token TIS), ``actor_rollout_ref.rollout.calculate_log_probs: true`` (verl needs the
rollout log-probs for the weights) and ``actor_rollout_ref.actor.policy_loss.loss_mode: flash_rc_tis``. The
``rollout_corr/*`` metrics are verl's driver-side ones; this loss adds only what verl lacks. Differences from
``vanilla``: tokens with a NaN/inf input are dropped instead of poisoning the loss (counted in
``rollout_corr/nonfinite_token_fraction``), and an all-masked micro-batch gives 0 instead of 0/0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import ValidationError

from flash_rc.algo.losses import GlobalBatchInfo, PolicyLossConfig, PolicyLossInputs
from flash_rc.algo.rollout_correction import RolloutCorrectionConfig
from flash_rc.kernels import fused_tis_loss

APPLY_GIVEN_WEIGHTS = RolloutCorrectionConfig(level="token", mode="truncate", threshold=math.inf)
"""The kernel's correction when verl's weights arrive encoded as rollout log-probs: ρ itself, never truncated again."""
NO_WEIGHTS = RolloutCorrectionConfig(level=None)
"""The kernel's correction without ``rollout_is_weights``: w = 1."""

METRICS = {
    "actor/pg_clipfrac": "actor/pg_clipfrac",
    "actor/ppo_kl": "actor/ppo_kl",
    "actor/pg_clipfrac_lower": "actor/pg_clipfrac_dual",
    "actor/pg_clipfrac_high": "actor/pg_clipfrac_high",
    "actor/pg_clipfrac_low": "actor/pg_clipfrac_low",
    "rollout_corr/nonfinite_token_fraction": "rollout_corr/nonfinite_token_fraction",
}
"""The metrics returned (verl's name → the kernel's): verl's three ``vanilla`` metrics (``pg_clipfrac_lower`` is
verl's name for the dual-clip fraction), the clip fraction split by advantage sign (``_high``: A > 0 clipped at
1 + ε_high, ``_low``: A < 0 clipped at 1 − ε_low), and the fraction of tokens dropped for a non-finite input."""


def loss_settings(config: Any, loss_agg_mode: str) -> tuple[PolicyLossConfig, GlobalBatchInfo]:
    """verl's ``ActorConfig`` (clip ratios as ``vanilla`` reads them, ``global_batch_info`` set by ``ppo_loss``) as
    flash_rc's loss settings; a value flash_rc's loss cannot honour raises one ``ValueError`` naming the actor key."""
    clip_ratio = config.clip_ratio
    values = {
        "clip_ratio_low": clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low,
        "clip_ratio_high": clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high,
        "clip_ratio_c": config.get("clip_ratio_c", 3.0),
        "loss_agg_mode": loss_agg_mode,
    }
    try:
        return PolicyLossConfig(**values), GlobalBatchInfo(**config.global_batch_info)
    except ValidationError as error:
        bad = error.errors()[0]
        key = ".".join(map(str, bad["loc"]))
        raise ValueError(f"actor_rollout_ref.actor.{key}={bad.get('input')!r}: {bad['msg']} "
                         f"(policy_loss.loss_mode=flash_rc_tis)") from None  # fmt: skip


def weights_as_rollout_log_prob(
    old_log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rollout_eff, advantages) that make the kernel apply ``weights`` (module docstring): old − log w where w > 0;
    where w == 0, ρ = 1 and A = 0. A NaN weight stays NaN, so the kernel drops that token."""
    weights = weights.detach().to(old_log_prob.dtype)
    zero_weight = response_mask & (weights == 0)
    rollout = torch.where(zero_weight | ~response_mask, old_log_prob, old_log_prob - torch.log(weights))
    return rollout, torch.where(zero_weight, torch.zeros_like(advantages), advantages)


def flash_rc_tis_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's policy-loss signature (``core_algos.PolicyLossFn``): padded [B, T] tensors in, (scalar loss, metrics).

    ``config`` is verl's ``ActorConfig``; ``rollout_is_weights`` verl's driver-side IS weights or None.
    """
    if config is None:
        raise ValueError("flash_rc_tis needs verl's ActorConfig (verl's ppo_loss passes config=...)")
    loss_config, batch_info = loss_settings(config, loss_agg_mode)
    mask = response_mask.bool()
    old_log_prob = old_log_prob.detach()
    if rollout_is_weights is None:
        rollout_log_prob, correction = old_log_prob, NO_WEIGHTS
    else:
        rollout_log_prob, advantages = weights_as_rollout_log_prob(old_log_prob, advantages, mask, rollout_is_weights)
        correction = APPLY_GIVEN_WEIGHTS
    batch = PolicyLossInputs(log_prob=log_prob, old_log_prob=old_log_prob, rollout_log_prob=rollout_log_prob,
                             advantages=advantages, response_mask=mask)  # fmt: skip
    loss, metrics = fused_tis_loss(batch, loss_config, correction, batch_info)
    values = torch.stack([metrics[kernel_key] for kernel_key in METRICS.values()]).tolist()  # one host sync
    return loss, dict(zip(METRICS, values, strict=True))
