"""Balanced-brace extraction of the last \\boxed{}: nesting, unbalanced input, size."""

import time

import pytest

from flash_rc.rewards.boxed import last_boxed


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces are kept whole
    ("\\fbox{7}", "7"),
    ("\\boxed{1} and later \\fbox{3}", "3"),  # whichever command comes last
    ("\\boxed{}", ""),
    ("\\boxed{\\frac{1}{2}", None),  # never closed
    ("\\boxed 5", None),  # no brace: not a box
    ("no box at all", None),
    ("", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_commands_can_be_restricted():
    assert last_boxed("\\boxed{1} \\fbox{2}", commands=("\\boxed",)) == "1"


def test_deeply_nested_and_huge_inputs_are_linear():
    depth = 100_000
    nested = "\\boxed{" + "{" * depth + "x" + "}" * depth + "}"
    unbalanced = "\\boxed{" + "{" * 1_000_000  # 1 MB that never closes
    start = time.perf_counter()
    assert last_boxed(nested) == "{" * depth + "x" + "}" * depth
    assert last_boxed(unbalanced) is None
    assert last_boxed("x" * 1_000_000 + "\\boxed{9}") == "9"
    assert time.perf_counter() - start < 2.0  # three linear scans of ~1 MB; a backtracking regex would not finish
