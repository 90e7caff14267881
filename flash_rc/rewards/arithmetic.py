"""Scorer of the built-in arithmetic task (``flash_rc.data.arithmetic``): an exact integer match.

The answer is the last ``\\boxed{...}`` of the response when there is one (its content must be an integer: an optional
sign, digits, optionally grouped in thousands as ``1,234``; ``$``, spaces and a trailing period around it are
ignored); without a box it is the last number in the text (``-7``, ``1,234``; a sentence's final period is not
part of it; a decimal like ``3.5`` is a number, and never an integer answer). Reward 1 if its value equals the ground
truth, else 0; reasons ``correct``, ``wrong_answer`` (a box that holds no integer included), ``no_answer``,
``answer_too_long`` (a box or number over ``max_answer_chars``), ``no_ground_truth``.

Why no ``int()``: Python refuses to convert more than 4,300 digits, and a hostile response can hold a 100k-digit
number; the values are compared as normalised digit strings instead. The regexes have no nested quantifiers and the
box is found by one linear scan (``boxed.py``), so a 100k-character response scores in milliseconds.
"""

from __future__ import annotations

import re

from flash_rc.rewards.boxed import last_boxed
from flash_rc.rewards.types import RewardResult, compares_ground_truth, reward_result

MAX_ANSWER_CHARS = 1000
_MINUS = "\\-\u2212"  # a regex class body: ASCII hyphen-minus and the Unicode minus sign
_INTEGER = re.compile(rf"([+{_MINUS}]?)(\d{{1,3}}(?:,\d{{3}})+|\d+)", re.ASCII)
"""A whole box's content (or a ground truth): sign, then digits or thousands-grouped digits."""
_NUMBER = re.compile(rf"(?:(?<![\w)])[{_MINUS}])?\d[\d,]*(?:\.\d+)?", re.ASCII)
"""A number in free text; a minus right after a word or ``)`` is an operator (``5-3``), not a sign."""
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+", re.ASCII)


def _normalized(sign: str, digits: str) -> str:
    digits = digits.replace(",", "").lstrip("0") or "0"
    return "-" + digits if sign in ("-", "\u2212") and digits != "0" else digits


def parse_integer(text: str) -> str | None:
    """``text`` as a normalised integer (``"-1,234."`` -> ``"-1234"``), or None if it is not exactly one integer."""
    text = text.replace("$", "").replace("\\,", "").strip().removesuffix(".").strip()
    match = _INTEGER.fullmatch(text.replace(" ", ""))
    return None if match is None else _normalized(*match.groups())


def last_number(text: str) -> str | None:
    """The last number in ``text``: a normalised integer, or the decimal as written (``"3.5"``); None if none."""
    token = None
    for token in _NUMBER.finditer(text):
        pass
    if token is None:
        return None
    token = token.group().rstrip(",")
    sign, body = (token[0], token[1:]) if not token[0].isdigit() else ("", token)
    if "," in body and _THOUSANDS.fullmatch(body.split(".")[0]) is None:
        body = body.rsplit(",", 1)[1]  # "1,2,3" is a list of numbers, not one: keep its last
    if "." in body:
        return sign.replace("\u2212", "-") + body.replace(",", "")
    return _normalized(sign, body)


@compares_ground_truth
def compute_score(solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  max_answer_chars: int = MAX_ANSWER_CHARS) -> RewardResult:
    """Score one response: 1 if its answer (see the module docstring) equals the integer ``ground_truth``, else 0.
    ``extra_info`` is accepted for the router's calling convention and unused."""
    truth = str(ground_truth).strip()
    truth = parse_integer(truth) or truth
    boxed = last_boxed(solution_str)
    answer = last_number(solution_str) if boxed is None else boxed
    if answer is None:
        return reward_result(0.0, False, None, "no_answer")
    if len(answer) > max_answer_chars:
        return reward_result(0.0, False, answer[:max_answer_chars], "answer_too_long")
    if boxed is not None:
        answer = parse_integer(boxed)
        if answer is None:
            return reward_result(0.0, False, boxed.strip(), "wrong_answer")
    if answer == truth:
        return reward_result(1.0, True, answer, "correct")
    return reward_result(0.0, False, answer, "wrong_answer")
