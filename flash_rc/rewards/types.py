"""The reward contract every scorer returns, the requests the router and the pool pass around.

Why a fixed four-key dict: verl's reward loop copies every key of a returned dict into ``reward_extra_info`` and
collates them across the batch, so all samples of a batch -- whatever their data source -- must return the same
keys. ``score`` is the reward; ``acc`` is what DAPO's dynamic sampling filters on (``filter_groups.metric=acc``);
``pred`` is the extracted answer for logging; ``reason`` says why, in a short stable word first (``correct``,
``wrong_answer``, ``no_answer``, ``timeout``, ...) so runs can be aggregated by it.

Why the request types live here and not in ``router.py``: the router builds ``ScoringJob`` objects and the pool
(``pool.py``, ``pool_worker.py``) ships them to workers; keeping the shared data in this leaf module (stdlib only)
lets the router depend on the pool without the pool depending back on the router.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypedDict


class RewardResult(TypedDict):
    """What every scorer returns."""

    score: float
    acc: bool
    pred: str | None
    reason: str


def reward_result(score: float, acc: bool, pred: str | None, reason: str) -> RewardResult:
    return {"score": float(score), "acc": bool(acc), "pred": pred, "reason": reason}


def failed_result(reason: str) -> RewardResult:
    """Score 0 for a call that produced no verdict (timeout, crash, scorer error)."""
    return reward_result(0.0, False, None, reason)


def normalize_result(value: Any) -> RewardResult:
    """Turn what a (possibly third-party) scorer returned -- a number or a dict with ``score`` -- into the contract."""
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"scorer returned a dict without 'score': keys {sorted(value)}")
        score = float(value["score"])
        pred = value.get("pred")
        return reward_result(score, bool(value.get("acc", score > 0)), None if pred is None else str(pred),
                             str(value.get("reason", "ok")))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return reward_result(float(value), value > 0, None, "ok")
    raise TypeError(f"scorer must return a number or a dict with 'score', got {type(value).__name__}")


def as_text(solution: str | bytes) -> str:
    """Responses arrive as text; raw bytes (possibly invalid UTF-8) are decoded with replacement characters."""
    if isinstance(solution, bytes):
        return solution.decode("utf-8", errors="replace")
    if not isinstance(solution, str):
        raise TypeError(f"solution_str must be str or bytes, got {type(solution).__name__}")
    return solution


@dataclass(frozen=True)
class ScorerRoute:
    """How one family of data sources is scored."""

    scorer: str
    """``package.module:function`` or ``/path/to/file.py:function``; called as
    ``function(solution_str, ground_truth, extra_info=..., **kwargs)``, returning the reward contract or a float."""
    timeout_s: float
    """Hard wall-clock limit per call, enforced by killing the worker process."""
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Default keyword arguments for the scorer (per-call kwargs override them)."""


@dataclass(frozen=True)
class ScoreRequest:
    """One sample to score, as verl hands it to ``compute_score``."""

    data_source: str
    solution_str: str | bytes
    ground_truth: Any
    extra_info: dict | None = None
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ScoringJob:
    """A request resolved to what a pool worker runs (plain data: it crosses a process boundary)."""

    scorer: str
    solution_str: str | bytes
    ground_truth: Any
    extra_info: dict | None
    kwargs: dict[str, Any]
    format_weight: float
    timeout_s: float
