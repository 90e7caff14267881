"""MATH/AIME scorer: last \\boxed{} after </think>, judged by math-verify."""

import threading
import time

import pytest

from flash_rc.rewards.math import compute_score, is_equivalent


@pytest.mark.parametrize("ground_truth, answer", [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "\\dfrac12"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("1000", "1,000"),
    ("3", "3.0"),
    ("\\{1,2\\}", "\\{2,1\\}"),  # sets are unordered
    ("x=5", "5"),  # an equation's value
])
def test_equivalent_answers(ground_truth, answer):
    assert is_equivalent(ground_truth, answer)


@pytest.mark.parametrize("ground_truth, answer", [
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("\\pi/2", "1.5708"),  # numerically close is not equal at math-verify's precision
    ("a", "b"),
])
def test_different_answers(ground_truth, answer):
    assert not is_equivalent(ground_truth, answer)


def test_scores_and_reasons():
    assert compute_score("so \\boxed{\\frac{1}{2}}", "0.5") == {
        "score": 1.0, "acc": True, "pred": "\\frac{1}{2}", "reason": "correct"}
    assert compute_score("so \\boxed{3}", "4") == {"score": 0.0, "acc": False, "pred": "3", "reason": "wrong_answer"}
    assert compute_score("the answer is 4", "4") == {"score": 0.0, "acc": False, "pred": None, "reason": "no_answer"}
    assert compute_score("\\boxed{204}", 204)["acc"]  # AIME ground truths may be ints


def test_only_the_text_after_the_last_think_counts():
    assert compute_score("<think>maybe \\boxed{4}</think> The answer is \\boxed{5}.", "5")["acc"]
    # a box inside the reasoning is not the final answer
    assert compute_score("<think>maybe \\boxed{5}</think> I am not sure.", "5")["reason"] == "no_answer"


def test_huge_box_is_rejected_before_parsing():
    result = compute_score("\\boxed{" + "1+" * 10_000 + "1}", "10001")
    assert result["reason"] == "answer_too_long" and result["score"] == 0.0
    assert len(result["pred"]) == 1000


def test_runs_off_the_main_thread():
    # math-verify's SIGALRM timeouts cannot be armed off the main thread; the scorer must still work there.
    results = []
    worker = threading.Thread(target=lambda: results.append(compute_score("\\boxed{0.5}", "\\frac12")))
    worker.start()
    worker.join()
    assert results[0]["acc"]


@pytest.mark.parametrize("text", [
    "\\boxed{" + "\\frac{" * 400 + "1" + "}{2}" * 400 + "}",  # 400 nested fractions
    "\\boxed{" + "{" * 900 + "}" * 900 + "}",  # deep, empty braces
    "\\boxed{\\frac{1}{2",  # never closed
    "\\boxed{" + "9" * 900 + "}",  # a 900-digit number
    "x" * 1_000_000 + "\\boxed{4}",  # 1 MB of text before the answer
    "\ufffd\ud800 \\boxed{4}",  # undecodable-byte replacements and a lone surrogate
    "",
])
def test_adversarial_inputs_return_a_verdict(text):
    start = time.perf_counter()
    result = compute_score(text, "4")
    assert result["score"] in (0.0, 1.0) and result["reason"]
    assert time.perf_counter() - start < 12  # math-verify's own 5 s parse + 5 s verify limits, on the main thread


def test_gsm8k_fallback_for_unboxed_answers():
    # RC decoding grades with the box when there is one, else GSM8K's "#### n"
    text = "3 + 4 = 7, so the answer is\n#### 7"
    assert compute_score(text, "7")["reason"] == "no_answer"
    assert compute_score(text, "7", gsm8k_fallback=True) == {"score": 1.0, "acc": True, "pred": "7", "reason": "correct"}
    # the box wins over a later "####"
    assert compute_score("\\boxed{8}\n#### 7", "7", gsm8k_fallback=True)["pred"] == "8"
