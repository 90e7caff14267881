"""MATH / AIME-style scorer: the last ``\\boxed{}`` answer, judged equivalent to the ground truth by ``math-verify``.

Why math-verify: deciding that ``\\frac{1}{2}``, ``0.5`` and ``\\dfrac12`` are the same answer, or that ``(1,2)`` is an
interval, is a parser's job; hand-rolled string normalisation silently rewards or punishes formatting. The rules here
follow Reasoning360's default math reward: only text after the last ``</think>`` counts, the answer is the last
``\\boxed{...}`` (or ``\\fbox{...}``) there, reward 1 if equivalent else 0.

Hostile input is bounded before it reaches the parser: the extraction is a linear scan (see ``boxed.py``) and box
contents longer than ``max_answer_chars`` are rejected as ``answer_too_long`` -- no real final answer is that long, and
sympy on megabytes of LaTeX can run for minutes. math-verify's own timeouts use SIGALRM, so they are enabled only on
the main thread; the router's process pool enforces the hard limit everywhere. (math-verify is imported at module
level on purpose: pool workers import scorers before starting a job's clock.)
"""

from __future__ import annotations

import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from flash_rc.rewards import gsm8k
from flash_rc.rewards.boxed import last_boxed
from flash_rc.rewards.types import RewardResult, reward_result

MAX_ANSWER_CHARS = 1000


def _parse_boxed(latex: str, timeout_s: int | None):
    return parse("\\boxed{" + latex + "}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=timeout_s)


def is_equivalent(ground_truth: str, answer: str, timeout_s: int = 5) -> bool:
    """Whether ``answer`` equals ``ground_truth`` as mathematics (both plain LaTeX, without ``\\boxed``)."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    signal_timeout = timeout_s if on_main_thread else None
    gold = _parse_boxed(ground_truth, signal_timeout)
    pred = _parse_boxed(answer, signal_timeout)
    return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=signal_timeout)


def compute_score(solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  max_answer_chars: int = MAX_ANSWER_CHARS, timeout_s: int = 5,
                  gsm8k_fallback: bool = False) -> RewardResult:
    """Score one response: 1 if its last boxed answer is equivalent to ``ground_truth``, else 0.

    ``gsm8k_fallback``: without a box, take GSM8K's ``#### <number>`` answer instead (RC decoding on GSM8K-trained
    models, which answer either way).
    """
    final_section = solution_str.rsplit("</think>", 1)[-1]
    answer = last_boxed(final_section)
    if answer is None and gsm8k_fallback:
        answer = gsm8k.extract_answer(final_section, "strict")
    if answer is None:
        return reward_result(0.0, False, None, "no_answer")
    if len(answer) > max_answer_chars:
        return reward_result(0.0, False, answer[:max_answer_chars], "answer_too_long")
    correct = is_equivalent(str(ground_truth), answer, timeout_s)
    return reward_result(1.0 if correct else 0.0, correct, answer, "correct" if correct else "wrong_answer")
