"""Format reward for <reasoning>/<answer> responses and its additive hook."""

import time

import pytest

from flash_rc.rewards.format import add_format_reward, format_score
from flash_rc.rewards.types import reward_result


@pytest.mark.parametrize("text, ok", [
    ("<reasoning>add them</reasoning>\n<answer>7</answer>", True),
    ("  <reasoning>a</reasoning><answer>b</answer>\n", True),  # surrounding whitespace is fine
    ("<reasoning>a</reasoning>\n<answer></answer>", False),  # empty answer
    ("<reasoning> </reasoning><answer>7</answer>", False),  # empty reasoning
    ("<answer>7</answer>", False),
    ("<reasoning>a</reasoning> text <answer>7</answer>", False),  # stray text between the sections
    ("<reasoning>a</reasoning><answer>7</answer> trailing", False),
    ("<reasoning>a</reasoning><answer>7</answer><answer>8</answer>", False),  # a repeated answer
    ("<reasoning>a", False),
    ("", False),
])
def test_format_score(text, ok):
    result = format_score(text)
    assert result["score"] == (1.0 if ok else 0.0) and result["acc"] is ok
    assert result["reason"].startswith("format_ok" if ok else "format_bad")


def test_custom_tags():
    assert format_score("<think>x</think><answer>1</answer>", reasoning_tag="think")["acc"]


def test_add_format_reward_keeps_accuracy():
    base = reward_result(0.0, False, "3", "wrong_answer")
    combined = add_format_reward(base, "<reasoning>r</reasoning><answer>3</answer>", weight=0.2)
    assert combined == {"score": 0.2, "acc": False, "pred": "3", "reason": "wrong_answer; format_ok"}


def test_tag_floods_are_linear():
    text = "<reasoning>" + "</reasoning><answer>" * 100_000 + "</answer>"
    start = time.perf_counter()
    assert not format_score(text)["acc"]
    assert time.perf_counter() - start < 1.0
