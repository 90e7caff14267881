"""DAPO math scorer with verl's semantics (``verl.utils.reward_score.math_dapo``), returning the reward contract.

Why exact: DAPO-Math-17k prompts ask for a final ``Answer: ...`` line and DAPO runs are compared by this reward, so
flash_rc reproduces it rather than "improving" it:

* only the last 300 characters of the response count;
* the last ``Answer: <text>`` line (case-insensitive) is normalised with the Minerva rules (Lewkowycz et al. 2022,
  "Solving Quantitative Reasoning Problems with Language Models", answer normalisation) and compared for string
  equality with the equally normalised ground truth;
* without such a line, the last ``\\boxed{...}`` in the final 100 characters is compared *verbatim* with the
  ground truth;
* reward is +1 when correct, -1 otherwise (including no answer at all).

Deliberate differences: a response with no answer is never correct (verl counts it correct when the ground truth
is literally its placeholder ``[INVALID]``), and a missing ground truth (None, NaN, blank) scores 0 as
``no_ground_truth`` instead of being compared as text.

``strict_box_verify=True`` skips the ``Answer:`` line and uses only the boxed answer; ``pause_tokens_index`` (four
character offsets) moves that 100-character window to end at the last pause token, as in verl.
"""

from __future__ import annotations

import functools
import re

from flash_rc.rewards.boxed import last_boxed
from flash_rc.rewards.types import RewardResult, compares_ground_truth, reward_result

RESPONSE_TAIL_CHARS = 300
BOXED_TAIL_CHARS = 100
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_NO_ANSWER = "[INVALID]"  # verl's placeholder; a normalised answer equal to it counts as no answer, as in verl

# Minerva normalisation, applied in this order.
_REPLACEMENTS = [  # (old, new) plain substring replacements
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]
_UNIT_WORDS = [  # removed wherever they occur
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue", "points",
    "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
    "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
]
_REGEX_REWRITES = [  # (pattern, replacement), after the line rewrites below
    (re.compile(r"frac([^{])(.)"), r"frac{\1}{\2}"),  # \fracab -> \frac{a}{b}
    (re.compile(r"sqrt([^{])"), r"sqrt{\1}"),  # \sqrta -> \sqrt{a}
]
GROUND_TRUTH_CACHE_SIZE = 1024  # a batch scores many responses per problem: each ground truth is normalised once


def _first_math_span(line: str) -> str:
    """``re.sub(r".*?\\$(.*?)\\$.*", r"$\\1$", line)``: a line with two ``$`` is cut to its first ``$...$`` span."""
    first = line.find("$")
    second = line.find("$", first + 1) if first >= 0 else -1
    return line if second < 0 else line[first:second + 1]


def _unwrap_to_first_close(line: str, opener: str) -> str:
    """``re.sub(re.escape(opener) + r"(.*?)\\}", r"\\1", line)``: each ``opener...}`` (up to its first ``}``) becomes
    its content."""
    parts, position = [], 0
    while (start := line.find(opener, position)) >= 0:
        close = line.find("}", start + len(opener))
        if close < 0:  # no "}" after it, so none after any later opener either
            break
        parts += [line[position:start], line[start + len(opener):close]]
        position = close + 1
    return "".join(parts) + line[position:]


def _unwrap_to_last_close(line: str, opener: str) -> str:
    """``re.sub(re.escape(opener) + r"(.*)\\}", r"\\1", line)``: the first ``opener`` up to the line's last ``}``
    becomes its content."""
    start, close = line.find(opener), line.rfind("}")
    if start < 0 or close < start + len(opener):
        return line
    return line[:start] + line[start + len(opener):close] + line[close + 1:]


# verl's regexes for these, whose "." stops at a newline, retry from every position of a line that cannot match:
# quadratic, 2.3 s for one 30,000-character ground truth. Each function is the same rewrite in one pass over a line.
_LINE_REWRITES = [
    _first_math_span,  # keep only the first inline-math span of each line
    functools.partial(_unwrap_to_first_close, opener="\\text{"),
    functools.partial(_unwrap_to_first_close, opener="\\textbf{"),
    functools.partial(_unwrap_to_first_close, opener="\\overline{"),
    functools.partial(_unwrap_to_last_close, opener="\\boxed{"),
]


def _rewrite_lines(text: str) -> str:
    lines = text.split("\n")  # none of the rewrites adds or removes a newline
    for rewrite in _LINE_REWRITES:
        lines = [rewrite(line) for line in lines]
    return "\n".join(lines)


def normalize_final_answer(answer: str) -> str:
    """Minerva normalisation of a final answer: drop units and LaTeX decoration, keep the right-hand side."""
    answer = answer.split("=")[-1]
    for old, new in _REPLACEMENTS:
        answer = answer.replace(old, new)
    for word in _UNIT_WORDS:
        answer = answer.replace(word, "")
    answer = _rewrite_lines(answer)
    for pattern, replacement in _REGEX_REWRITES:
        answer = pattern.sub(replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


@functools.lru_cache(maxsize=GROUND_TRUTH_CACHE_SIZE)
def _normalized_ground_truth(ground_truth: str) -> str:
    return normalize_final_answer(ground_truth)


def _boxed_verdict(response_tail: str, ground_truth: str,
                   pause_tokens_index: list[int] | None) -> tuple[bool, str | None]:
    if pause_tokens_index is not None:
        if len(pause_tokens_index) != 4:
            raise ValueError(f"pause_tokens_index must hold 4 offsets, got {pause_tokens_index!r}")
        window = response_tail[pause_tokens_index[-1] - BOXED_TAIL_CHARS:]
    else:
        window = response_tail[-BOXED_TAIL_CHARS:]
    boxed = last_boxed(window, commands=("\\boxed",))
    return boxed == ground_truth, boxed


@compares_ground_truth
def compute_score(solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  strict_box_verify: bool = False, pause_tokens_index: list[int] | None = None) -> RewardResult:
    """Score one response: +1 if its final answer matches ``ground_truth``, else -1."""
    ground_truth = str(ground_truth)
    tail = solution_str[-RESPONSE_TAIL_CHARS:]
    if strict_box_verify:
        correct, pred = _boxed_verdict(tail, ground_truth, pause_tokens_index)
    else:
        answer_lines = _ANSWER_LINE.findall(tail)
        pred = normalize_final_answer(answer_lines[-1]) if answer_lines else _NO_ANSWER
        correct = pred == _normalized_ground_truth(ground_truth)
        if pred == _NO_ANSWER:
            correct, pred = _boxed_verdict(tail, ground_truth, pause_tokens_index)
    if pred is None:
        return reward_result(-1.0, False, None, "no_answer")
    return reward_result(1.0 if correct else -1.0, correct, pred, "correct" if correct else "wrong_answer")
