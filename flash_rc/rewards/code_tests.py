"""Code reward: run the model's program against test cases in the sandbox (the Q-language GRPO reward, generalised).

Why this shape: the Q/kdb+ full-stack recipe (Hogan et al. 2025, arXiv:2508.06813) showed that a dense reward -- the
fraction of tests passed plus a bonus for passing all of them -- trains code models well; it also showed the
pitfalls (tests keyed on prompt strings, unsandboxed subprocesses). Here tests come with each row's ground truth and
every test runs in a fresh sandboxed process (``sandbox.py``).

Semantics, as in the recipe:
* code is taken from the last ``<answer>...</answer>`` (a fenced block inside it wins), else from the last fenced
  block, else (``allow_raw_fallback``) from the whole response;
* each test runs ``code + "\\n\\n" + harness`` with the test's stdin and a wall-clock limit (``test_timeout_s``,
  default 1.0 s);
* a test passes when the exit status is 0, ``error`` does not appear in stderr (any case) and the stripped stdout
  equals the stripped expected output (``""`` and ``'""'`` count as equal; a test without expected output only needs
  a clean exit);
* reward = passed/total * ``base_weight`` + (``perfect_bonus`` if all passed) * ``perfect_weight``; at most
  ``max_tests`` tests (the first ones) are run.

Ground truth formats (JSON string or object): a list of ``{"stdin"|"input", "harness"|"test_code",
"expected_output"|"output"}``; ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO stdin-stdout style);
``{"functional": "<assert-based test code>"}`` (Reasoning360/MBPP style); or ``{"tests": [...]}``.

Executors: ``python`` (built in) and ``q`` (kdb+; needs a ``q`` binary on PATH; ``QHOME``/``QLIC`` are passed
through). The result's ``reason`` carries the counts (``some_failed passed=3 total=5 timeouts=1 failures=1``) that
``CodeTestCounters`` sums, like the recipe's extraction / timeout / execution-failure counters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field

from flash_rc.rewards.sandbox import SandboxLimits, SandboxResult, run_sandboxed, sandbox_python
from flash_rc.rewards.types import RewardResult, compares_ground_truth, reward_result

MAX_PRED_CHARS = 2000  # the extracted code is logged as ``pred``; keep log rows small
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL)
_REASON_COUNT = re.compile(r"(passed|total|timeouts|failures)=(\d+)")


class ExecutorUnavailableError(RuntimeError):
    """The language's interpreter is not installed here."""


@dataclass(frozen=True)
class CodeTest:
    """One test case."""

    stdin: str = ""
    """Text fed to the program's standard input."""
    harness: str = ""
    """Code appended after the solution (calls it and prints the result); empty for stdin/stdout problems."""
    expected_output: str | None = None
    """Expected stdout (compared stripped); None means only a clean exit is required."""


@dataclass(frozen=True)
class RunOutcome:
    """How one test case went."""

    passed: bool
    timed_out: bool
    failed_to_run: bool
    """Non-zero exit, "error" on stderr, or the sandbox killed it (not a timeout)."""
    run: SandboxResult


@dataclass(frozen=True)
class CodeTestReport:
    """Everything one scored response did; ``compute_score`` condenses it into the reward contract."""

    code: str | None
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(outcome.passed for outcome in self.outcomes)

    def summary(self) -> str:
        timeouts = sum(outcome.timed_out for outcome in self.outcomes)
        failures = sum(outcome.failed_to_run for outcome in self.outcomes)
        verdict = "all_passed" if self.passed == len(self.outcomes) else "some_failed"
        return f"{verdict} passed={self.passed} total={len(self.outcomes)} timeouts={timeouts} failures={failures}"


@dataclass
class CodeTestCounters:
    """Running totals over many scored responses (the recipe logged these every 100 calls)."""

    responses: int = 0
    extraction_failures: int = 0
    tests_run: int = 0
    tests_passed: int = 0
    timeouts: int = 0
    execution_failures: int = 0

    def add(self, result: RewardResult) -> None:
        """Count one ``code_tests`` result (from this process or from a pool worker: the counts are in ``reason``)."""
        self.responses += 1
        if result["reason"].startswith("extraction_failed"):
            self.extraction_failures += 1
            return
        counts = {name: int(value) for name, value in _REASON_COUNT.findall(result["reason"])}
        self.tests_passed += counts.get("passed", 0)
        self.tests_run += counts.get("total", 0)
        self.timeouts += counts.get("timeouts", 0)
        self.execution_failures += counts.get("failures", 0)


def fenced_blocks(text: str) -> list[str]:
    """Contents of the closed ```-fenced blocks in ``text``, in order (fences start a line, as in Markdown).

    A line scan rather than a regex: a regex for fences backtracks quadratically on a long run of backticks, and
    models do emit those.
    """
    blocks, current = [], None
    for line in text.split("\n"):
        stripped = line.strip()
        if current is None:
            if stripped.startswith("```"):  # opening fence, with or without a language tag
                current = []
        elif stripped.startswith("```"):
            blocks.append("\n".join(current))
            current = None
        elif stripped.endswith("```"):  # closing fence glued to the last code line
            current.append(line.rstrip()[:-3])
            blocks.append("\n".join(current))
            current = None
        else:
            current.append(line)
    return blocks


def extract_code(text: str, allow_raw_fallback: bool = True) -> str | None:
    """The program in a response: ``<answer>`` block (fenced code inside wins), else last fenced block, else raw."""
    answers = _ANSWER_BLOCK.findall(text)
    source = answers[-1] if answers else text
    blocks = fenced_blocks(source)
    if blocks:
        code = blocks[-1]
    elif answers or allow_raw_fallback:
        code = source
    else:
        return None
    code = code.strip()
    return code or None


def _test_field(test: dict, names: tuple[str, ...], index: int, required: bool) -> str | None:
    for name in names:
        if name in test:
            value = test[name]
            if not isinstance(value, str):
                raise ValueError(f"test {index}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    if required:
        raise ValueError(f"test {index}: needs one of the fields {names}, has {sorted(test)}")
    return None


def parse_tests(ground_truth: str | list | dict) -> list[CodeTest]:
    """Turn a row's ground truth into test cases (formats in the module docstring); errors name the bad test."""
    spec = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if isinstance(spec, dict) and "tests" in spec:
        spec = spec["tests"]
    if isinstance(spec, dict) and "functional" in spec:
        return [CodeTest(harness=_test_field(spec, ("functional",), 0, True))]
    if isinstance(spec, dict) and "inputs" in spec and "outputs" in spec:
        inputs, outputs = spec["inputs"], spec["outputs"]
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
            raise ValueError("ground truth 'inputs' and 'outputs' must be lists of the same length")
        spec = [{"stdin": stdin, "expected_output": expected} for stdin, expected in zip(inputs, outputs)]
    if not isinstance(spec, list):
        raise ValueError(f"ground truth must describe a list of tests, got {type(spec).__name__}")
    tests = []
    for index, test in enumerate(spec):
        if not isinstance(test, dict):
            raise ValueError(f"test {index}: must be an object, got {type(test).__name__}")
        stdin = _test_field(test, ("stdin", "input"), index, required=False) or ""
        harness = _test_field(test, ("harness", "test_code"), index, required=False) or ""
        expected = _test_field(test, ("expected_output", "output"), index, required=False)
        if not harness and expected is None:
            raise ValueError(f"test {index}: has neither a harness nor an expected output, so it tests nothing")
        tests.append(CodeTest(stdin=stdin, harness=harness, expected_output=expected))
    return tests


def _program_and_argv(language: str, code: str, harness: str) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Files, argv and extra environment for one test run of ``language``."""
    if language == "python":
        return {"main.py": f"{code}\n\n{harness}"}, [sandbox_python(), "-I", "{dir}/main.py"], {}
    if language == "q":
        q_binary = shutil.which("q")
        if q_binary is None:
            raise ExecutorUnavailableError("language 'q' needs the kdb+ `q` binary on PATH; none was found")
        solution = code.strip().removesuffix("exit 0;").strip()  # the recipe's convention: exit once, at the end
        env = {name: os.environ[name] for name in ("QHOME", "QLIC") if name in os.environ}
        return {"main.q": f"{solution}\n\n{harness}\nexit 0;"}, [q_binary, "{dir}/main.q"], env
    raise ExecutorUnavailableError(f"no executor for language {language!r}; available: python, q")


def outputs_match(stdout: str, expected: str) -> bool:
    actual, wanted = stdout.strip(), expected.strip()
    return actual == wanted or {actual, wanted} == {"", '""'}


def run_code_tests(code: str | None, tests: list[CodeTest], language: str = "python",
                   limits: SandboxLimits = SandboxLimits()) -> CodeTestReport:
    """Run every test against ``code`` (None = extraction failed, nothing runs)."""
    if code is None:
        return CodeTestReport(code=None)
    outcomes = []
    for test in tests:
        files, argv, env = _program_and_argv(language, code, test.harness)
        run = run_sandboxed(argv, files, stdin=test.stdin, limits=limits, extra_env=env)
        clean_exit = run.exit_code == 0 and "error" not in run.stderr.lower()
        passed = clean_exit and (test.expected_output is None or outputs_match(run.stdout, test.expected_output))
        outcomes.append(RunOutcome(passed=passed, timed_out=run.timed_out,
                                   failed_to_run=not clean_exit and not run.timed_out, run=run))
    return CodeTestReport(code=code, outcomes=outcomes)


@compares_ground_truth
def compute_score(solution_str: str, ground_truth: str | list | dict, extra_info: dict | None = None,
                  language: str | None = None, max_tests: int | None = 5, test_timeout_s: float = 1.0,
                  memory_mb: int = 1024, base_weight: float = 1.0, perfect_bonus: float = 1.0,
                  perfect_weight: float = 1.0, allow_raw_fallback: bool = True,
                  require_isolation: bool = False) -> RewardResult:
    """Score one response by running its code against the tests in ``ground_truth``.

    ``language`` defaults to ``extra_info["language"]``, else ``"python"``. ``acc`` is True when every test passed.
    ``test_timeout_s`` limits each test; the router's ``timeout_s`` limits the whole call.
    """
    language = language or (extra_info or {}).get("language", "python")
    tests = parse_tests(ground_truth)[:max_tests]
    if not tests:
        raise ValueError("ground truth holds no tests")
    code = extract_code(solution_str, allow_raw_fallback)
    if code is None:
        return reward_result(0.0, False, None, "extraction_failed")
    limits = SandboxLimits(timeout_s=test_timeout_s, cpu_s=max(1, int(test_timeout_s) + 1), memory_mb=memory_mb,
                           require_isolation=require_isolation)
    report = run_code_tests(code, tests, language, limits)
    all_passed = report.passed == len(tests)
    reward = report.passed / len(tests) * base_weight + (perfect_bonus if all_passed else 0.0) * perfect_weight
    return reward_result(reward, all_passed, code[:MAX_PRED_CHARS], report.summary())
