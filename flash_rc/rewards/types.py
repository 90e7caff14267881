"""The reward contract every scorer returns, and its normalisation.

Why a fixed four-key dict: verl's reward loop copies every key of a returned dict into ``reward_extra_info`` and
collates them across the batch, so all samples of a batch -- whatever their data source -- must return the same
keys. ``score`` is the reward; ``acc`` is what DAPO's dynamic sampling filters on (``filter_groups.metric=acc``);
``pred`` is the extracted answer for logging; ``reason`` says why, in a short stable word first (``correct``,
``wrong_answer``, ``no_answer``, ``timeout``, ...) so runs can be aggregated by it.
"""

from __future__ import annotations

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
