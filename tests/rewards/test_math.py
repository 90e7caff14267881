"""MATH/AIME scorer: last \\boxed{} after </think>, judged by math-verify."""

import threading
import time

import pytest

from flash_rc.rewards import math as math_scorer
from flash_rc.rewards.math import VERIFY_TIMEOUT_S, compute_score, is_equivalent
from flash_rc.rewards.router import MATH

HUGE_POWER = "\\boxed{9^{9^{9^{9}}}}"  # parses at once; sympy comparing it with anything never finishes


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
    # on the main thread math-verify's own limits hold: 4 s to parse the answer + 4 s to compare ("4" is parsed at once)
    assert time.perf_counter() - start < 12


def test_verify_timeout_bounds_a_slow_comparison():
    start = time.perf_counter()
    assert compute_score(HUGE_POWER, "4", verify_timeout_s=1)["reason"] == "wrong_answer"
    assert 1 <= time.perf_counter() - start < 3  # the 1 s SIGALRM ended the comparison, not the 4 s default


def test_default_verify_timeout_fits_the_routes_hard_limit():
    # worst case: parse the ground truth, parse the answer, one symbolic comparison -- each up to VERIFY_TIMEOUT_S
    assert 3 * VERIFY_TIMEOUT_S < MATH.timeout_s


@pytest.mark.parametrize("verify_timeout_s", [0, -1, 2.5, True, "4"])
def test_bad_verify_timeout_is_a_clear_error(verify_timeout_s):
    with pytest.raises(ValueError, match="verify_timeout_s must be a positive whole number"):
        compute_score("no box here", "4", verify_timeout_s=verify_timeout_s)


@pytest.fixture
def counted_parses(monkeypatch):
    """Every text math-verify parses, in order, with the gold cache emptied first."""
    parsed, parse = [], math_scorer._parse_boxed

    def counting_parse(latex, timeout_s):
        parsed.append(latex)
        return parse(latex, timeout_s)

    math_scorer._parsed_gold.cache_clear()
    monkeypatch.setattr(math_scorer, "_parse_boxed", counting_parse)
    yield parsed
    math_scorer._parsed_gold.cache_clear()


def test_each_ground_truth_is_parsed_once(counted_parses):
    matrix = "\\begin{pmatrix}1\\\\2\\end{pmatrix}"  # parses to a (mutable) sympy Matrix: reuse must not alter it
    same = "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}"
    responses = [same, "\\boxed{\\begin{pmatrix}1\\\\3\\end{pmatrix}}", same]
    assert [compute_score(r, matrix)["acc"] for r in responses] == [True, False, True]
    assert [compute_score(r, "\\frac12")["acc"] for r in ["\\boxed{0.5}", "\\boxed{1}", "\\boxed{2/4}"]] == [
        True, False, True]
    assert counted_parses.count(matrix) == 1 and counted_parses.count("\\frac12") == 1
    assert len(counted_parses) == 2 + 6  # two ground truths, six answers


def test_a_failed_ground_truth_parse_is_not_cached(counted_parses, monkeypatch):
    parse = math_scorer._parse_boxed  # the counting wrapper
    timed_out = []  # the first parse of the gold comes back empty, as math-verify's does on a timeout

    def parse_timing_out_once(latex, timeout_s):
        if latex == "7" and not timed_out:
            timed_out.append(latex)
            return []
        return parse(latex, timeout_s)

    monkeypatch.setattr(math_scorer, "_parse_boxed", parse_timing_out_once)
    assert compute_score("\\boxed{7}", "7")["reason"] == "wrong_answer"
    assert compute_score("\\boxed{7}", "7")["reason"] == "correct"  # parsed again, not the cached failure


def test_gsm8k_fallback_for_unboxed_answers():
    # RC decoding grades with the box when there is one, else GSM8K's "#### n"
    text = "3 + 4 = 7, so the answer is\n#### 7"
    assert compute_score(text, "7")["reason"] == "no_answer"
    assert compute_score(text, "7", gsm8k_fallback=True) == {"score": 1.0, "acc": True, "pred": "7", "reason": "correct"}
    # the box wins over a later "####"
    assert compute_score("\\boxed{8}\n#### 7", "7", gsm8k_fallback=True)["pred"] == "8"
