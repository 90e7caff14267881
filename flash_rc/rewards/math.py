"""MATH / AIME-style scorer: the last ``\\boxed{}`` answer, judged equivalent to the ground truth by ``math-verify``.

Why math-verify: deciding that ``\\frac{1}{2}``, ``0.5`` and ``\\dfrac12`` are the same answer, or that ``(1,2)`` is an
interval, is a parser's job; hand-rolled string normalisation silently rewards or punishes formatting. The rules here
follow Reasoning360's default math reward: only text after the last ``</think>`` counts, the answer is the last
``\\boxed{...}`` (or ``\\fbox{...}``) there, reward 1 if equivalent else 0.

Hostile input is bounded before it reaches the parser: the extraction is a linear scan (see ``boxed.py``) and box
contents longer than ``max_answer_chars`` are rejected as ``answer_too_long`` -- no real final answer is that long, and
sympy on megabytes of LaTeX can run for minutes. math-verify's own timeouts (``verify_timeout_s``) use SIGALRM, so
they are enabled only on the main thread (where pool workers score); the router's process pool enforces the hard limit
everywhere. (math-verify is imported at module level on purpose: pool workers import scorers before starting a job's
clock.)

A batch scores many responses per problem, so each worker process keeps the parsed ground truths of the last
``GOLD_CACHE_SIZE`` problems. Reusing them is safe: math-verify's ``verify`` only reads its inputs (sympy expressions
are immutable; the matrices it returns are never written to) and ``compute_score`` hands it a fresh list each time.
A ground truth that parsed to nothing -- possibly a timeout under load -- is not cached and is parsed again next time.
"""

from __future__ import annotations

import functools
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from flash_rc.rewards import gsm8k
from flash_rc.rewards.boxed import last_boxed
from flash_rc.rewards.types import RewardResult, compares_ground_truth, reward_result

MAX_ANSWER_CHARS = 1000
VERIFY_TIMEOUT_S = 4
"""math-verify's limit, in whole seconds (``signal.alarm``), for each of the at most three slow steps of a call:
parsing the ground truth (skipped when cached), parsing the answer, and the one symbolic comparison (each side parses to
at most one sympy expression plus a string fallback). Worst case 3 x 4 s = 12 s stays below the 15 s hard limit of the
router's MATH route, so a pathological answer ends as math-verify's ``wrong_answer`` instead of a killed worker."""
GOLD_CACHE_SIZE = 4096


def _parse_boxed(latex: str, timeout_s: int | None) -> list:
    return parse("\\boxed{" + latex + "}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=timeout_s)


class _UnparsedGold(Exception):
    """Raised instead of returning an empty parse, so that ``lru_cache`` does not keep it."""


@functools.lru_cache(maxsize=GOLD_CACHE_SIZE)
def _parsed_gold(ground_truth: str, timeout_s: int | None) -> tuple:
    parsed = _parse_boxed(ground_truth, timeout_s)
    if not parsed:
        raise _UnparsedGold
    return tuple(parsed)


def _check_verify_timeout(verify_timeout_s: int) -> None:
    if isinstance(verify_timeout_s, bool) or not isinstance(verify_timeout_s, int) or verify_timeout_s < 1:
        raise ValueError(f"verify_timeout_s must be a positive whole number of seconds (math-verify arms "
                         f"signal.alarm), got {verify_timeout_s!r}")


def is_equivalent(ground_truth: str, answer: str, verify_timeout_s: int = VERIFY_TIMEOUT_S) -> bool:
    """Whether ``answer`` equals ``ground_truth`` as mathematics (both plain LaTeX, without ``\\boxed``)."""
    _check_verify_timeout(verify_timeout_s)
    on_main_thread = threading.current_thread() is threading.main_thread()
    signal_timeout = verify_timeout_s if on_main_thread else None
    try:
        gold = list(_parsed_gold(ground_truth, signal_timeout))
    except _UnparsedGold:
        return False
    pred = _parse_boxed(answer, signal_timeout)
    return bool(pred) and verify(gold, pred, timeout_seconds=signal_timeout)


@compares_ground_truth
def compute_score(solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  max_answer_chars: int = MAX_ANSWER_CHARS, verify_timeout_s: int = VERIFY_TIMEOUT_S,
                  gsm8k_fallback: bool = False) -> RewardResult:
    """Score one response: 1 if its last boxed answer is equivalent to ``ground_truth``, else 0.

    ``verify_timeout_s``: math-verify's per-step limit (see ``VERIFY_TIMEOUT_S``; keep 3x it below the route's
    ``timeout_s``, the pool's hard limit for the whole call). ``gsm8k_fallback``: without a box, take GSM8K's
    ``#### <number>`` answer instead (RC decoding on GSM8K-trained models, which answer either way).
    """
    _check_verify_timeout(verify_timeout_s)
    final_section = solution_str.rsplit("</think>", 1)[-1]
    answer = last_boxed(final_section)
    if answer is None and gsm8k_fallback:
        answer = gsm8k.extract_answer(final_section, "strict")
    if answer is None:
        return reward_result(0.0, False, None, "no_answer")
    if len(answer) > max_answer_chars:
        return reward_result(0.0, False, answer[:max_answer_chars], "answer_too_long")
    correct = is_equivalent(str(ground_truth), answer, verify_timeout_s)
    return reward_result(1.0 if correct else 0.0, correct, answer, "correct" if correct else "wrong_answer")
