"""Outcome advantages: GRPO and RLOO group baselines, DAPO dynamic-sampling filter and DAPO overlong reward shaping.

Why this exists. flash_rc trains with outcome rewards (one scalar per response), so advantages come from comparing a
response with its siblings. In plain GRPO a group is "all samples of one prompt"; with Reasoning Cache a fair comparison
is between continuations of the *same summary* of the same problem, so group ids are arbitrary hashables (for RC a
(problem_id, summary_id) tuple, for verl a uid string).

    GRPO:   A_i = (R_i − mean_{g(i)} R) / (std_{g(i)} R + eps)     (norm_by_std; std is unbiased, as in verl)
            A_i =  R_i − mean_{g(i)} R                             (Dr. GRPO: norm_by_std=False)
    RLOO:   A_i = n/(n−1) · (R_i − mean_{g(i)} R) = R_i − mean_{g(i)∖{i}} R    (n = |g(i)| > 1: leave-one-out baseline)
            A_i = 0 for a singleton group (no baseline). verl 0.9.1's compute_rloo_outcome_advantage leaves the raw
            score there instead; its compute_rloo_vectorized_outcome_advantage gives 0, as here.
    DAPO dynamic sampling: drop every group whose metric (accuracy) is identical for all members — its advantages are
            all zero, so it only dilutes the batch. Singleton groups are all-equal by definition and are dropped.
    DAPO overlong shaping:  r_overlong(L) = min(−(L − (L_max − L_buf)) / L_buf · penalty_factor, 0)
            i.e. 0 up to L_max − L_buf tokens, then a linear ramp to −penalty_factor at L = L_max.

The returned advantages are per response; broadcast them onto response tokens with `A[:, None] * response_mask`.
"""

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class GRPOConfig:
    """Knobs of the GRPO group baseline."""

    norm_by_std: bool = True
    """Divide by the group std (GRPO); False gives Dr. GRPO (verl `algorithm.norm_adv_by_std_in_grpo`)."""

    eps: float = 1e-6
    """Added to the std so all-equal groups give 0 instead of 0/0."""

    singleton: Literal["zero", "score"] = "zero"
    """Advantage of a one-member group, which has no baseline: "zero" (no learning signal; the default) or "score"
    (mean 0, std 1, i.e. the raw reward, which is what verl's compute_grpo_outcome_advantage does)."""

    def __post_init__(self) -> None:
        if not self.eps >= 0:
            raise ValueError(f"GRPOConfig.eps must be >= 0, got {self.eps}")
        if self.singleton not in ("zero", "score"):
            raise ValueError(f"GRPOConfig.singleton must be 'zero' or 'score', got {self.singleton!r}")


@dataclass(frozen=True)
class OverlongConfig:
    """DAPO overlong reward shaping (verl `reward_kwargs.overlong_buffer_cfg` + `max_resp_len`)."""

    max_response_length: int
    """L_max: the generation cap (data.max_response_length)."""

    buffer_length: int
    """L_buf: length of the penalty ramp before L_max (DAPO: 4096 of 20480). 0 < L_buf <= L_max."""

    penalty_factor: float = 1.0
    """Penalty at L = L_max (the ramp's depth)."""

    def __post_init__(self) -> None:
        if not 0 < self.buffer_length <= self.max_response_length:
            raise ValueError(
                f"OverlongConfig needs 0 < buffer_length <= max_response_length, got buffer_length="
                f"{self.buffer_length}, max_response_length={self.max_response_length}"
            )
        if not self.penalty_factor >= 0:
            raise ValueError(f"OverlongConfig.penalty_factor must be >= 0, got {self.penalty_factor}")


def group_codes(group_ids: Sequence[Hashable], num_items: int) -> tuple[torch.Tensor, int]:
    """Dense int64 codes (first-seen order) for arbitrary hashable group ids, and the number of groups."""
    if len(group_ids) != num_items:
        raise ValueError(f"group_ids has {len(group_ids)} entries but there are {num_items} scores")
    code_of: dict[Hashable, int] = {}
    codes = [code_of.setdefault(group_id, len(code_of)) for group_id in group_ids]
    return torch.tensor(codes, dtype=torch.long), len(code_of)


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"{name} must be a 1-D floating tensor (one value per response), got {scores.dtype} "
                         f"of shape {tuple(scores.shape)}")
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"{name} must be finite; response {bad[0].item()} has {scores[bad[0]].item()}")


def _group_sum(values: torch.Tensor, codes: torch.Tensor, num_groups: int) -> torch.Tensor:
    return values.new_zeros(num_groups).index_add_(0, codes, values)


def _group_centered(
    scores: torch.Tensor, group_ids: Sequence[Hashable]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R_i − mean_{g(i)} R per response, each response's group code, and the member count of each group."""
    _check_scores(scores, "scores")
    codes, num_groups = group_codes(group_ids, scores.numel())
    codes = codes.to(scores.device)
    counts = _group_sum(torch.ones_like(scores), codes, num_groups)
    means = _group_sum(scores, codes, num_groups) / counts
    return scores - means[codes], codes, counts


def grpo_advantages(
    scores: torch.Tensor, group_ids: Sequence[Hashable], config: GRPOConfig = GRPOConfig()
) -> torch.Tensor:
    """Per-response GRPO advantages for 1-D `scores` grouped by `group_ids` (see the module docstring)."""
    centered, codes, counts = _group_centered(scores, group_ids)
    num_groups = counts.numel()
    # Two-pass unbiased variance; singletons get std 1 (their centered value is handled below).
    variances = _group_sum(centered.square(), codes, num_groups) / (counts - 1).clamp_min(1)
    stds = torch.where(counts > 1, variances.sqrt(), torch.ones_like(variances))
    advantages = centered / (stds[codes] + config.eps) if config.norm_by_std else centered
    singleton = counts[codes] == 1
    if config.singleton == "zero":
        return torch.where(singleton, torch.zeros_like(advantages), advantages)
    raw = scores / (1.0 + config.eps) if config.norm_by_std else scores
    return torch.where(singleton, raw, advantages)


def rloo_advantages(scores: torch.Tensor, group_ids: Sequence[Hashable]) -> torch.Tensor:
    """Per-response RLOO advantages for 1-D `scores` grouped by `group_ids`: each response's reward minus the mean of
    its siblings' rewards; 0 for a singleton group (see the module docstring)."""
    centered, codes, counts = _group_centered(scores, group_ids)
    members = counts[codes]
    return torch.where(members > 1, centered * members / (members - 1).clamp_min(1), torch.zeros_like(centered))


def dapo_keep_mask(metric: torch.Tensor, group_ids: Sequence[Hashable]) -> torch.Tensor:
    """bool [N]: True for responses whose group's metric is not all-equal (DAPO dynamic sampling keeps these)."""
    _check_scores(metric, "metric")
    codes, num_groups = group_codes(group_ids, metric.numel())
    codes = codes.to(metric.device)
    group_max = metric.new_full((num_groups,), -torch.inf).scatter_reduce_(0, codes, metric, reduce="amax")
    group_min = metric.new_full((num_groups,), torch.inf).scatter_reduce_(0, codes, metric, reduce="amin")
    return (group_max > group_min)[codes]


def overlong_penalty(response_lengths: torch.Tensor, config: OverlongConfig) -> torch.Tensor:
    """DAPO overlong reward r_overlong(L) ≤ 0 per response (float), to be added to the task reward."""
    if response_lengths.dim() != 1:
        raise ValueError(f"response_lengths must be 1-D, got shape {tuple(response_lengths.shape)}")
    if (response_lengths < 0).any():
        raise ValueError("response_lengths must be >= 0")
    expected = config.max_response_length - config.buffer_length
    excess = response_lengths.double() - expected
    return (-excess / config.buffer_length * config.penalty_factor).clamp(max=0.0).float()
