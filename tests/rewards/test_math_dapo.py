"""DAPO scorer: verl's math_dapo semantics -- Minerva-normalised "Answer:" line, verbatim \\boxed fallback, +-1."""

import random
import re
import time

import pytest

from flash_rc.rewards import math_dapo
from flash_rc.rewards.math_dapo import compute_score, normalize_final_answer


@pytest.mark.parametrize("raw, normalized", [
    ("34", "34"),
    ("x = 5", "5"),  # only the right-hand side of "="
    ("1,000", "1000"),  # thousands separators go when the rest is digits
    ("(1, 2)", "(1,2)"),  # ... but a tuple keeps its comma (spaces are removed)
    ("10 dollars", "10"),  # unit words are removed
    ("90^\\circ", "90"),
    ("\\text{Monday}", "Monday"),
    ("\\boxed{7}", "7"),
    ("\\frac12", "\\frac{1}{2}"),  # shorthand TeX is expanded
    ("\\sqrt2", "\\sqrt{2}"),
    ("$\\frac{3}{4}$ of it", "\\frac{3}{4}"),  # only the first $...$ span survives
    ("an apple", "apple"),  # "an " / "a " are dropped
])
def test_minerva_normalization(raw, normalized):
    assert normalize_final_answer(raw) == normalized


def test_answer_line_is_normalised_on_both_sides():
    result = compute_score("Work...\nAnswer: $1,000$ dollars", "1000")
    assert result == {"score": 1.0, "acc": True, "pred": "1000", "reason": "correct"}
    assert compute_score("answer : x = \\frac12", "\\frac{1}{2}")["acc"]  # case-insensitive, "=" handled


def test_wrong_and_missing_answers_score_minus_one():
    assert compute_score("Answer: 33", "34") == {"score": -1.0, "acc": False, "pred": "33", "reason": "wrong_answer"}
    assert compute_score("I give up", "34") == {"score": -1.0, "acc": False, "pred": None, "reason": "no_answer"}
    assert compute_score("", "34")["score"] == -1.0


def test_last_answer_line_wins():
    assert compute_score("Answer: 1\nmore work\nAnswer: 34", "34")["acc"]


def test_boxed_fallback_compares_verbatim():
    # Without an "Answer:" line the last \boxed{} in the final 100 characters is compared as-is, not normalised.
    assert compute_score("so the result is \\boxed{34}", "34")["acc"]
    assert not compute_score("so the result is \\boxed{34.}", "34")["acc"]
    assert not compute_score("so the result is \\boxed{x=34}", "34")["acc"]  # normalisation would have accepted it
    far_box = "\\boxed{34}" + " " * 100  # the box starts 110 characters from the end: outside the 100 window
    assert compute_score(far_box, "34")["reason"] == "no_answer"


def test_only_last_300_characters_count():
    assert compute_score("Answer: 34\n" + "." * 289, "34")["acc"]  # 300 characters: the line is inside
    assert compute_score("Answer: 34\n" + "." * 290, "34")["reason"] == "no_answer"  # 301: window starts at "nswer"


def test_strict_box_verify_ignores_answer_lines():
    assert not compute_score("Answer: 34", "34", strict_box_verify=True)["acc"]
    assert compute_score("Answer: 1\n\\boxed{34}", "34", strict_box_verify=True)["acc"]


def test_pause_tokens_move_the_box_window():
    text = "y" * 30 + "\\boxed{34}" + "x" * 150  # the box occupies characters 30-39 of 190
    assert not compute_score(text, "34", strict_box_verify=True)["acc"]  # outside the last 100 characters
    # With pause tokens the window starts 100 characters before the last pause offset: 130 - 100 = 30.
    assert compute_score(text, "34", strict_box_verify=True, pause_tokens_index=[0, 0, 0, 130])["acc"]
    assert not compute_score(text, "34", strict_box_verify=True, pause_tokens_index=[0, 0, 0, 131])["acc"]
    with pytest.raises(ValueError, match="4 offsets"):
        compute_score(text, "34", strict_box_verify=True, pause_tokens_index=[5])


@pytest.mark.parametrize("text", [
    "Answer: " + "9" * 100_000,  # a huge number: only the 300-character tail is read
    "x" * 1_000_000 + "\nAnswer: 34",  # 1 MB
    "\\boxed{" * 50_000,  # unbalanced LaTeX
    "Answer: \\frac{" * 1000,
    "\ufffd\ud800 Answer: 34",  # replacement characters and a lone surrogate
])
def test_adversarial_inputs_return_a_verdict(text):
    result = compute_score(text, "34")
    assert result["score"] in (1.0, -1.0) and isinstance(result["reason"], str)


VERL_LINE_REGEXES = [  # verl's Minerva rewrites whose "." stops at a newline; quadratic on long lines
    (r".*?\$(.*?)\$.*", r"$\1$"), (r"\\text\{(.*?)\}", r"\1"), (r"\\textbf\{(.*?)\}", r"\1"),
    (r"\\overline\{(.*?)\}", r"\1"), (r"\\boxed\{(.*)\}", r"\1"),
]


def test_line_rewrites_match_verls_regexes():
    rng = random.Random(0)
    pieces = ["$", "{", "}", "\n", "\\text{", "\\textbf{", "\\overline{", "\\boxed{", "\\text", "a", "1", " ", "\r"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 24)))
        expected = text
        for pattern, replacement in VERL_LINE_REGEXES:
            expected = re.sub(pattern, replacement, expected)
        assert math_dapo._rewrite_lines(text) == expected, text


@pytest.mark.parametrize("ground_truth", [
    "x" * 30_000, "x" * 100_000,  # one long line without "$": each start position once scanned to the line's end
    "$" + "x" * 100_000, "\\text{" * 16_000, "\\textbf{" * 12_000, "\\overline{" * 10_000, "\\boxed{" * 14_000,
    ("12 \\text{apples}, " * 6_000) + "=$\\frac{1}{2}$ " * 1_000,
], ids=["30k", "100k", "one $", "\\text{", "\\textbf{", "\\overline{", "\\boxed{", "mixed"])
def test_a_long_ground_truth_line_is_normalised_in_linear_time(ground_truth):
    start = time.perf_counter()
    assert compute_score("Answer: 34", ground_truth)["reason"] == "wrong_answer"
    assert time.perf_counter() - start < 0.5  # verl's regexes: 2.3 s at 30k characters, 25 s at 100k
