"""Per-token KL estimators between the policy and the reference model, as verl 0.9.1's `kl_penalty`.

Why this exists. A KL term keeps the policy near the reference model, either as a reward penalty (verl
`algorithm.use_kl_in_reward` with `algorithm.kl_penalty`) or as a loss term (`actor.use_kl_loss` with
`actor.kl_loss_type`). Only the sampled token's log-probabilities are at hand, so KL(π_θ‖π_ref) is estimated per token
from them (J. Schulman, "Approximating KL divergence", 2020). The names and numbers are verl's, so a recipe's
`kl_loss_type` means the same here.

Per token, with Δ = log π_θ(y_t) − log π_ref(y_t) and y_t sampled from π_θ:

    "kl"  / "k1"          k1 = Δ                                  unbiased, high variance, can be negative
    "abs"                 |Δ|
    "mse" / "k2"          k2 = ½ Δ²                               biased, low variance; its gradient is right
    "low_var_kl" / "k3"   k3 = clamp(e^r − r − 1, −10, 10)        unbiased, low variance, ≥ 0
                               with r = clamp(−Δ, −20, 20) = clamp(log π_ref − log π_θ, −20, 20)  (numerical safety)

A "+" suffix ("k1+", "k3+", ...) keeps the estimator's value but takes k2's gradient (straight-through):
`k2 − stopgrad(k2) + stopgrad(k)`. The expected value of k1 and k3 is the KL, but their expected gradient is not the
KL's gradient; k2's is. For "k2+" / "mse+" this changes nothing.
verl also names "full" (the whole-vocabulary KL), which it does not implement; it is not accepted here.
"""

from typing import Literal, get_args

import torch

KLType = Literal[
    "kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "k1+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+"
]
KL_TYPES: tuple[str, ...] = get_args(KLType)


def _estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: str) -> torch.Tensor:
    if kl_type in ("kl", "k1"):
        return log_prob - ref_log_prob
    if kl_type == "abs":
        return (log_prob - ref_log_prob).abs()
    if kl_type in ("mse", "k2"):
        return 0.5 * (log_prob - ref_log_prob).square()
    log_ratio = (ref_log_prob - log_prob).clamp(-20, 20)  # "low_var_kl" / "k3"
    return (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: KLType) -> torch.Tensor:
    """Per-token KL estimate (same shape as `log_prob`) of the policy `log_prob` against `ref_log_prob` (see the module
    docstring for the types). Differentiable in both inputs; mask and aggregate the result like a token loss."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(f"log_prob has shape {tuple(log_prob.shape)} but ref_log_prob has {tuple(ref_log_prob.shape)}")
    estimate = _estimate(log_prob, ref_log_prob, kl_type.removesuffix("+"))
    if not kl_type.endswith("+"):
        return estimate
    k2 = 0.5 * (log_prob - ref_log_prob).square()
    return k2 - k2.detach() + estimate.detach()
