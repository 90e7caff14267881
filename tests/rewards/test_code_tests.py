"""Code-test reward: extraction, test formats, the recipe's reward formula, counters, hostile programs."""

import functools
import json
import shutil
import time

import pytest

from flash_rc.rewards.code_tests import CodeTest, CodeTestCounters, ExecutorUnavailableError, compute_score, \
    extract_code, fenced_blocks, outputs_match, parse_tests

# Tests that are not about time limits give programs ample time: on a loaded CI machine a Python start can take 1 s.
score = functools.partial(compute_score, test_timeout_s=10.0)
ADD_PROGRAM = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)"
ADD_TESTS = [{"stdin": "3 4", "expected_output": "7"}, {"stdin": "10 -2", "expected_output": "8"},
             {"stdin": "0 0", "expected_output": "0"}]


def fenced(code: str, language: str = "python") -> str:
    return f"```{language}\n{code}\n```"


@pytest.mark.parametrize("text, expected", [
    ("<reasoning>r</reasoning>\n<answer>\nprint(1)\n</answer>", "print(1)"),
    ("<answer>" + fenced("print(2)") + "</answer>", "print(2)"),  # a fence inside the answer wins
    ("<answer>print(1)</answer> later <answer>print(3)</answer>", "print(3)"),  # the last answer block
    ("<answer>print(4)", "print(4)"),  # an unclosed answer runs to the end
    ("Here:\n" + fenced("print(5)") + "\nand\n" + fenced("print(6)", "py"), "print(6)"),  # last fenced block
    ("print(7)", "print(7)"),  # raw fallback
    ("<answer>  </answer>", None),
    ("", None),
])
def test_extract_code(text, expected):
    assert extract_code(text) == expected


def test_fenced_blocks():
    text = "intro\n```python\na = 1\n```\nmid\n```\nb = 2```\n```q\nunclosed"
    assert fenced_blocks(text) == ["a = 1", "b = 2"]  # a glued closing fence counts; an unclosed block does not


def test_extraction_is_linear_on_backtick_floods():
    start = time.perf_counter()
    assert extract_code("`" * 1_000_000) == "`" * 1_000_000  # no block: the raw text (which will fail to run)
    assert extract_code("```\n" * 200_000) is None  # 100,000 empty blocks
    assert time.perf_counter() - start < 1.0


def test_raw_fallback_can_be_disabled():
    assert extract_code("print(7)", allow_raw_fallback=False) is None
    assert extract_code(fenced("print(7)"), allow_raw_fallback=False) == "print(7)"


def test_parse_tests_accepts_every_format():
    assert parse_tests(json.dumps(ADD_TESTS))[0] == CodeTest(stdin="3 4", harness="", expected_output="7")
    assert parse_tests({"inputs": ["1 2"], "outputs": ["3"]}) == [CodeTest(stdin="1 2", expected_output="3")]
    assert parse_tests({"functional": "assert f(1) == 2"}) == [CodeTest(harness="assert f(1) == 2")]
    assert parse_tests({"tests": [{"test_code": "print(f())", "output": "1"}]}) == [
        CodeTest(harness="print(f())", expected_output="1")]


@pytest.mark.parametrize("ground_truth, message", [
    ('[{"stdin": "1"}]', "test 0: has neither a harness nor an expected output"),
    ('[{"stdin": "1", "expected_output": 3}]', "test 0: field 'expected_output' must be a string"),
    ('[{"expected_output": "1"}, 5]', "test 1: must be an object"),
    ('{"inputs": ["1"], "outputs": []}', "same length"),
    ('"just a string"', "must describe a list of tests"),
    ("not json", "Expecting value"),
])
def test_parse_tests_names_the_bad_test(ground_truth, message):
    with pytest.raises(ValueError, match=message):
        parse_tests(ground_truth)


def test_outputs_match():
    assert outputs_match(" 7\n", "7")
    assert outputs_match("", '""') and outputs_match('""', "")  # the recipe's empty-string convention
    assert not outputs_match("7 ", "8")


def test_all_tests_pass_earns_the_bonus(sandbox_scratch):
    result = score(f"<answer>{fenced(ADD_PROGRAM)}</answer>", json.dumps(ADD_TESTS))
    # 3/3 passed: 3/3 * base_weight 1.0 + perfect_bonus 1.0 * perfect_weight 1.0 = 2.0
    assert result == {"score": 2.0, "acc": True, "pred": ADD_PROGRAM,
                      "reason": "all_passed passed=3 total=3 timeouts=0 failures=0"}


def test_partial_credit_and_weights(sandbox_scratch):
    program = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b if a else 99)"  # wrong for 0 0
    result = score(fenced(program), ADD_TESTS)
    assert result["score"] == pytest.approx(2 / 3) and not result["acc"]  # 2/3 * 1.0, no bonus
    assert result["reason"] == "some_failed passed=2 total=3 timeouts=0 failures=0"  # wrong output is no failure
    only_bonus = score(fenced(ADD_PROGRAM), ADD_TESTS, base_weight=0.0, perfect_bonus=2.0)
    assert only_bonus["score"] == 2.0
    only_fraction = score(fenced(program), ADD_TESTS, base_weight=3.0, perfect_weight=0.0)
    assert only_fraction["score"] == pytest.approx(2.0)  # 2/3 * 3.0
    # max_tests keeps the first tests only: the failing third test is never run
    assert score(fenced(program), ADD_TESTS, max_tests=2)["acc"]


def test_harness_and_functional_tests(sandbox_scratch):
    solution = fenced("def add(a, b):\n    return a + b")
    harness_tests = [{"harness": "print(add(2, 5))", "expected_output": "7"}]
    assert score(solution, harness_tests)["acc"]
    assert score(solution, {"functional": "assert add(2, 2) == 4"})["acc"]
    failing = score(solution, {"functional": "assert add(2, 2) == 5"})
    assert not failing["acc"] and "failures=1" in failing["reason"]


def test_error_on_stderr_fails_even_with_exit_zero(sandbox_scratch):
    program = "import sys\nprint('7')\nprint('ERROR: something odd', file=sys.stderr)"
    assert score(fenced(program), [{"expected_output": "7"}])["reason"].startswith("some_failed")


def test_extraction_failure_and_empty_tests():
    assert compute_score("<answer></answer>", ADD_TESTS) == {
        "score": 0.0, "acc": False, "pred": None, "reason": "extraction_failed"}
    with pytest.raises(ValueError, match="no tests"):
        compute_score(fenced("print(1)"), "[]")


def test_counters_sum_results():
    counters = CodeTestCounters()
    counters.add({"score": 0.0, "acc": False, "pred": None, "reason": "extraction_failed"})
    counters.add({"score": 0.5, "acc": False, "pred": "x",
                  "reason": "some_failed passed=2 total=4 timeouts=1 failures=1"})
    counters.add({"score": 2.0, "acc": True, "pred": "x",
                  "reason": "all_passed passed=3 total=3 timeouts=0 failures=0"})
    assert counters == CodeTestCounters(responses=3, extraction_failures=1, tests_run=7, tests_passed=5, timeouts=1,
                                        execution_failures=1)


def test_unknown_language_is_an_error(sandbox_scratch):
    with pytest.raises(ExecutorUnavailableError, match="no executor for language 'rust'"):
        compute_score(fenced("fn main() {}"), ADD_TESTS, language="rust")


@pytest.mark.skipif(shutil.which("q") is not None, reason="a q binary is installed here")
def test_q_without_binary_says_so(sandbox_scratch):
    with pytest.raises(ExecutorUnavailableError, match="kdb\\+ `q` binary on PATH"):
        compute_score("<answer>f:{x+y}</answer>", [{"test_code": "show f[1;2]", "expected_output": "3"}],
                      extra_info={"language": "q"})


@pytest.mark.skipif(shutil.which("q") is None, reason="no kdb+ `q` binary on PATH: the q executor is skipped")
def test_q_executor(sandbox_scratch):
    tests = [{"test_code": "-1 string f[1;2];", "expected_output": "3"}]
    result = score("<answer>f:{x+y}\nexit 0;</answer>", tests, language="q")
    assert result["acc"]


@pytest.mark.parametrize("program, reason", [
    ("while True: pass", "timeouts=1"),
    ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "timeouts=1"),
    ("x = bytearray(16 << 30)", "failures=1"),
    ("open('/etc/flash_rc_pwned', 'w').write('x')", "failures=1"),
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=0.3)", "failures=1"),
])
def test_hostile_programs_score_zero_within_the_limit(sandbox_scratch, program, reason):
    start = time.monotonic()
    result = compute_score(fenced(program), [{"expected_output": "7"}], test_timeout_s=0.5, memory_mb=256)
    assert time.monotonic() - start < 0.5 + 1.0  # the per-test limit plus start-up/tear-down slack on a busy CI box
    assert result["score"] == 0.0 and not result["acc"] and reason in result["reason"]
