"""The reward contract every scorer returns, the requests the router and the pool pass around, and their checks.

Why a fixed four-key dict: verl's reward loop copies every key of a returned dict into ``reward_extra_info`` and
collates them across the batch, so all samples of a batch -- whatever their data source -- must return the same
keys. ``score`` is the reward; ``acc`` is what DAPO's dynamic sampling filters on (``filter_groups.metric=acc``);
``pred`` is the extracted answer for logging; ``reason`` says why, in a short stable word first (``correct``,
``wrong_answer``, ``no_answer``, ``no_ground_truth``, ``timeout``, ``bad_request``, ...) so runs can be aggregated
by it.

Why the request types live here and not in ``router.py``: the router builds ``ScoringJob`` objects and the pool
(``pool.py``, ``pool_worker.py``) ships them to workers; keeping the shared data in this leaf module (stdlib only)
lets the router depend on the pool without the pool depending back on the router.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypedDict

MAX_ERROR_CHARS = 500  # an error's reason is cut here: results are logged per sample
MAX_TIMEOUT_S = 86_400.0
"""Longest wall-clock limit a call may ask for (a day): a longer one is surely a unit mistake, and inf or NaN would
never be enforced."""


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


def error_result(kind: str, exc: BaseException) -> RewardResult:
    """``failed_result`` naming the exception, e.g. ``error: ValueError: ...`` or ``bad_request: TypeError: ...``."""
    return failed_result(f"{kind}: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])


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


def has_ground_truth(ground_truth: Any) -> bool:
    """False for what a dataset holds where the answer is missing: None (a null), NaN (pandas' null in a float
    column) or blank text."""
    if ground_truth is None:
        return False
    if isinstance(ground_truth, float):
        return not math.isnan(ground_truth)
    if isinstance(ground_truth, (str, bytes)):
        return bool(ground_truth.strip())
    return True


def compares_ground_truth(scorer: Callable[..., RewardResult]) -> Callable[..., RewardResult]:
    """Decorate a scorer that compares a response with its ground truth: a missing one scores ``no_ground_truth``.

    Why: the built-in scorers compare ``str(ground_truth)``, so a null was compared as the text "None" (and
    ``\\boxed{None}`` scored as correct) and a blank one matched an empty answer. One gate on each public scorer
    covers direct calls and the router's pool alike; custom scorers get what the row holds (they may need none).
    """
    @functools.wraps(scorer)
    def gated(solution_str: str, ground_truth: Any, *args: Any, **kwargs: Any) -> RewardResult:
        if not has_ground_truth(ground_truth):
            return failed_result("no_ground_truth")
        return scorer(solution_str, ground_truth, *args, **kwargs)

    return gated


def checked_timeout(timeout_s: Any) -> float:
    """``timeout_s`` as float seconds; ValueError unless it is a number in (0, MAX_TIMEOUT_S].

    Why strict: the pool kills a job once ``start + timeout_s`` has passed; NaN never compares as passed (and made the
    dispatcher spin on a zero wait), inf never passes, and a string or a bool is a config mistake.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) \
            or not 0 < float(timeout_s) <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be positive and finite, a number of seconds up to {MAX_TIMEOUT_S:.0f}; "
                         f"got {timeout_s!r}")
    return float(timeout_s)


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

    def __post_init__(self):
        checked_timeout(self.timeout_s)


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
    """A request resolved to what a pool worker runs (plain data: it crosses a process boundary).

    ``timeout_s`` is checked (and stored as float) here, so no job with a limit the pool cannot enforce exists.
    """

    scorer: str
    solution_str: str | bytes
    ground_truth: Any
    extra_info: dict | None
    kwargs: dict[str, Any]
    format_weight: float
    timeout_s: float

    def __post_init__(self):
        object.__setattr__(self, "timeout_s", checked_timeout(self.timeout_s))
