"""Optional format reward for ``<reasoning>...</reasoning><answer>...</answer>`` style responses.

Why optional and additive: the Q-language recipe found no need for a format reward, but small models trained from
scratch on a tag format often do need the nudge. The router adds ``format_weight * format_score`` to any scorer's
reward when asked (``compute_score(..., format_weight=0.1)``) and leaves ``acc`` alone, so accuracy metrics and DAPO's
dynamic sampling still see correctness only.

Checked with ``str.find`` rather than a regex: a lazy regex over a 1 MB response full of tags can go quadratic.
"""

from __future__ import annotations

from flash_rc.rewards.types import RewardResult, reward_result


def format_score(solution_str: str, reasoning_tag: str = "reasoning", answer_tag: str = "answer") -> RewardResult:
    """1.0 if the response is exactly ``<reasoning>X</reasoning> <answer>Y</answer>`` (X, Y non-empty), else 0.0."""
    text = solution_str.strip()
    open_reasoning, close_reasoning = f"<{reasoning_tag}>", f"</{reasoning_tag}>"
    open_answer, close_answer = f"<{answer_tag}>", f"</{answer_tag}>"
    if not text.startswith(open_reasoning) or not text.endswith(close_answer):
        return reward_result(0.0, False, None, "format_bad: must start with "
                             f"{open_reasoning} and end with {close_answer}")
    reasoning_end = text.find(close_reasoning)
    if reasoning_end < 0:
        return reward_result(0.0, False, None, f"format_bad: no {close_reasoning}")
    reasoning = text[len(open_reasoning):reasoning_end]
    rest = text[reasoning_end + len(close_reasoning):].lstrip()
    if not rest.startswith(open_answer):
        return reward_result(0.0, False, None, f"format_bad: {open_answer} must follow {close_reasoning}")
    answer = rest[len(open_answer):-len(close_answer)]
    if not reasoning.strip() or not answer.strip() or close_answer in answer or open_answer in answer:
        return reward_result(0.0, False, None, "format_bad: empty or repeated sections")
    return reward_result(1.0, True, answer.strip(), "format_ok")


def add_format_reward(result: RewardResult, solution_str: str, weight: float) -> RewardResult:
    """``result`` with ``weight * format_score`` added to its score (``acc`` and ``pred`` unchanged)."""
    fmt = format_score(solution_str)
    return reward_result(result["score"] + weight * fmt["score"], result["acc"], result["pred"],
                         f"{result['reason']}; {fmt['reason']}")
