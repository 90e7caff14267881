"""Rewards: verl-compatible scorers, a data_source router with hard time limits, sandboxed code tests and pass@k
(RC per-turn scoring is ``flash_rc.rc.grading``). Start at ``router.compute_score`` (verl's
``custom_reward_function``)."""

from flash_rc.errors import UnknownDataSourceError
from flash_rc.rewards.pass_at_k import mean_pass_at_k, pass_at_k
from flash_rc.rewards.pool import RewardPool, RewardPoolError
from flash_rc.rewards.router import compute_score, compute_score_async, register_scorer, resolve_route, score_batch
from flash_rc.rewards.types import RewardResult, ScoreRequest, ScorerRoute

__all__ = [
    "RewardPool", "RewardPoolError", "RewardResult", "ScoreRequest", "ScorerRoute",
    "UnknownDataSourceError", "compute_score", "compute_score_async", "mean_pass_at_k", "pass_at_k",
    "register_scorer", "resolve_route", "score_batch",
]
