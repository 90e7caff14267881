"""Arithmetic scorer: the last box, else the last number, compared as integers; hand-worked edge cases, hostile
input, and the router's ``arithmetic`` route."""

import time

import pytest

from flash_rc.rewards import compute_score as routed_score
from flash_rc.rewards.arithmetic import compute_score, last_number, parse_integer


@pytest.mark.parametrize("response, truth, expected", [
    ("23 + 45 = 68, so \\boxed{68}", "68", (1.0, True, "68", "correct")),
    ("\\boxed{68} is wrong, it is 69", "69", (0.0, False, "68", "wrong_answer")),  # a box beats a later number
    ("the answer is 68", "68", (1.0, True, "68", "correct")),  # no box: the last number
    ("23 + 45 = 68.", "68", (1.0, True, "68", "correct")),  # a sentence's period is not part of it
    ("It is -12.", "-12", (1.0, True, "-12", "correct")),
    ("9 - 21 = \u221212", "-12", (1.0, True, "-12", "correct")),  # the Unicode minus sign
    ("5-3=2", "2", (1.0, True, "2", "correct")),  # a minus after a digit is an operator, not a sign
    ("\\boxed{-12}", "-12", (1.0, True, "-12", "correct")),
    ("\\boxed{12}", "-12", (0.0, False, "12", "wrong_answer")),
    ("so 1,234 apples", "1234", (1.0, True, "1234", "correct")),
    ("\\boxed{1,234}", "1234", (1.0, True, "1234", "correct")),
    ("\\boxed{ $1\\,234.$ }", "1234", (1.0, True, "1234", "correct")),
    ("\\boxed{007}", "7", (1.0, True, "7", "correct")),
    ("the numbers 1,2,3", "3", (1.0, True, "3", "correct")),  # not thousands: a list, its last number
    ("\\boxed{1} then \\boxed{2}", "2", (1.0, True, "2", "correct")),  # several boxes: the last wins
    ("\\boxed{2} then \\boxed{1}", "2", (0.0, False, "1", "wrong_answer")),
    ("\\boxed{3.5}", "3", (0.0, False, "3.5", "wrong_answer")),  # a boxed non-integer
    ("\\boxed{x + 1}", "3", (0.0, False, "x + 1", "wrong_answer")),
    ("\\boxed{}", "3", (0.0, False, "", "wrong_answer")),
    ("it is 3.5", "3", (0.0, False, "3.5", "wrong_answer")),  # a decimal is one number, not 3 then 5
    ("I do not know", "3", (0.0, False, None, "no_answer")),
    ("", "3", (0.0, False, None, "no_answer")),
    ("\\boxed{7", "7", (1.0, True, "7", "correct")),  # an unclosed box is no box: the last number
    ("\\boxed{68}", 68, (1.0, True, "68", "correct")),  # an int ground truth
    ("\\boxed{-0}", "0", (1.0, True, "0", "correct")),
])
def test_hand_worked_cases(response, truth, expected):
    result = compute_score(response, truth)
    assert (result["score"], result["acc"], result["pred"], result["reason"]) == expected


@pytest.mark.parametrize("truth", [None, float("nan"), "", "  "])
def test_missing_ground_truth_scores_no_ground_truth(truth):
    assert compute_score("\\boxed{None}", truth) == {"score": 0.0, "acc": False, "pred": None,
                                                     "reason": "no_ground_truth"}


def test_parsers():
    assert parse_integer(" -1,234. ") == "-1234"
    assert parse_integer("12,34") is None and parse_integer("1.5") is None and parse_integer("--1") is None
    assert last_number("from 10 to -20,000 and then.") == "-20000"
    assert last_number("x-7") == "7"  # a minus right after a word is an operator
    assert last_number("no digits") is None


@pytest.mark.parametrize("response", [
    "1" * 100_000,  # one 100k-digit number: longer than any answer
    "1," * 50_000,
    "-" * 100_000,
    "a1." * 33_000,
    "\\boxed{" * 14_000,
    "\\boxed{" + "{" * 99_990 + "}",
    "x " * 50_000 + "\\boxed{5}",
])
def test_a_100k_character_response_scores_in_milliseconds(response):
    start = time.perf_counter()
    result = compute_score(response, "5")
    assert time.perf_counter() - start < 0.1
    assert result["reason"] in ("correct", "wrong_answer", "no_answer", "answer_too_long")
    assert result["pred"] is None or len(result["pred"]) <= 1000


def test_a_huge_number_is_answer_too_long_not_a_crash():
    result = compute_score("9" * 5000, "9" * 5000)  # int() would refuse 5,000 digits
    assert result["reason"] == "answer_too_long" and len(result["pred"]) == 1000
    assert compute_score("9" * 5000, "9" * 5000, max_answer_chars=10_000)["acc"] is True


def test_routed_through_the_router():
    assert routed_score("arithmetic", "23 + 45 = \\boxed{68}", "68") == {"score": 1.0, "acc": True, "pred": "68",
                                                                         "reason": "correct"}
    assert routed_score("arithmetic", "so 67", "68")["reason"] == "wrong_answer"
    assert routed_score("arithmetic", "no idea", None)["reason"] == "no_ground_truth"
