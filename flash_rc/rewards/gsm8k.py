"""GSM8K scorer with verl's exact semantics (``verl.utils.reward_score.gsm8k``), returning the reward contract.

Why exact: users compare flash_rc runs with their verl runs; a scorer that is "a bit smarter" changes the reward and
the curves. So the quirks are kept on purpose:

* only the last 300 characters are searched (verl's speed cap);
* ``strict`` takes the last ``#### <number>`` (number = optional ``-`` then digits, ``.`` and ``,``) and removes commas;
* ``flexible`` takes the last number-like token that is not ``"."`` -- commas are *not* removed there -- and, if every
  token is ``"."``, that ``"."`` is the answer;
* the comparison is exact string equality with the ground truth: ``score`` if equal, ``format_score`` if an answer was
  found but differs, 0 if none was found.

The deliberate differences: a non-string ground truth (e.g. the int 72) is compared as ``str(72)``, where verl's
equality would never match it; a missing one (None, NaN, blank) scores 0 as ``no_ground_truth`` (``types.py``).
"""

from __future__ import annotations

import re
from typing import Literal

from flash_rc.rewards.types import RewardResult, compares_ground_truth, reward_result

SEARCH_TAIL_CHARS = 300
FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")
"""verl's ``#### <number>`` final answer: the scorer takes the last in a response, ``flash_rc.data.gsm8k`` the first in
a dataset answer."""
_NUMBER_TOKEN = re.compile(r"-?[0-9.,]+")

Method = Literal["strict", "flexible"]


def extract_answer(solution_str: str, method: Method = "strict") -> str | None:
    """The answer verl would extract from ``solution_str``, or None."""
    tail = solution_str[-SEARCH_TAIL_CHARS:]
    if method == "strict":
        answers = FINAL_ANSWER.findall(tail)
        return answers[-1].replace(",", "") if answers else None
    if method == "flexible":
        tokens = _NUMBER_TOKEN.findall(tail)
        if not tokens:
            return None
        return next((token for token in reversed(tokens) if token != "."), ".")
    raise ValueError(f"gsm8k method must be 'strict' or 'flexible', got {method!r}")


@compares_ground_truth
def compute_score(solution_str: str, ground_truth: str, extra_info: dict | None = None, method: Method = "strict",
                  format_score: float = 0.0, score: float = 1.0) -> RewardResult:
    """Score one GSM8K response. ``extra_info`` is accepted for the router's calling convention and unused."""
    answer = extract_answer(solution_str, method)
    if answer is None:
        return reward_result(0.0, False, None, "no_answer")
    if answer == str(ground_truth):
        return reward_result(score, True, answer, "correct")
    return reward_result(format_score, False, answer, "wrong_answer")
