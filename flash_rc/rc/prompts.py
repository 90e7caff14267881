"""Prompt templates of the Reasoning Cache (RC) cycle and of the summary-free baselines.

RC alternates two prompts (Wu et al. 2026):

- I_R, the *reasoning* prompt: the problem plus the summary of the previous attempt (empty in the first cycle). The
  model reasons from scratch or improves on the summarized attempt and ends with a ``\\boxed{}`` answer.
- I_S, the *summarization* prompt: the problem, the existing summary and the latest reasoning. The model writes a
  short first-person summary (at most two paragraphs, no new reasoning) that *replaces* the existing one.

The reasoning trace is dropped after it is summarized, so every turn's context stays bounded by
|I_R| + |problem| + H_S + H_R however many cycles run. The baselines (self-refine / self-verify) condition the next
turn on the previous *full* reasoning instead of a summary.

Templates are ``str.format`` strings: fields in braces, literal braces doubled (``\\boxed{{}}``). A user template is
checked for its fields when it is loaded, so a typo fails at start-up instead of on the first chain.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from flash_rc.errors import TemplateError

REASONING_FIELDS = frozenset({"problem", "curr_summary"})
SUMMARIZATION_FIELDS = frozenset({"problem", "existing_summary", "reasoning"})
BASELINE_FIELDS = frozenset({"problem", "curr_reasoning"})

REASONING_PROMPT = """\
You are given a maths problem. You may also be given a summary of a previous attempt to solve it. The previous \
attempt may or may not be correct.

### PROBLEM
{problem}

### SUMMARY OF PREVIOUS ATTEMPT
{curr_summary}

### INSTRUCTIONS
If no summary of a previous attempt is provided, solve the problem from scratch. If a summary is provided, build on \
that attempt: rely on the summary for what was already done, and then verify the previous answer, try a different \
way to solve the problem, or continue from where the previous attempt stopped. Reason step by step and give your \
final answer in \\boxed{{}}."""

SUMMARIZATION_PROMPT = """\
You are given a maths problem and a candidate solution to it. You may also be given a summary of an earlier \
candidate solution. Your task is to write a summary of the current candidate solution.

The summary must give a detailed overview of what the candidate solution did: its strategy, the facts or theorems it \
used, the calculations and deductions it made, any verification it attempted, and the answer it reached (or how far \
it got, if it is incomplete). Write it in light of the existing summary and keep the important information from it. \
Write at most two paragraphs of plain prose, no headers, in the first person ("I computed ..."). IMPORTANT: do not \
solve the problem yourself and do not add any reasoning that is not in the latest candidate solution.

### PROBLEM
{problem}

### EXISTING SUMMARY
{existing_summary}

### LATEST CANDIDATE SOLUTION
{reasoning}"""

SELF_REFINE_PROMPT = """\
You are given a maths problem and a previous attempt to solve it, which may or may not be correct.

### PROBLEM
{problem}

### PREVIOUS ATTEMPT
{curr_reasoning}

### INSTRUCTIONS
If no previous attempt is provided, solve the problem from scratch. Otherwise, find and fix any mistakes in the \
previous attempt and improve it. Reason step by step and give your final answer in \\boxed{{}}."""

SELF_VERIFY_PROMPT = """\
You are given a maths problem and a previous attempt to solve it, which may or may not be correct.

### PROBLEM
{problem}

### PREVIOUS ATTEMPT
{curr_reasoning}

### INSTRUCTIONS
If no previous attempt is provided, solve the problem from scratch. Otherwise, check every step of the previous \
attempt. If it is correct, confirm its answer; if not, solve the problem correctly. Reason step by step and give \
your final answer in \\boxed{{}}."""


def template_fields(text: str) -> set[str]:
    """The ``{field}`` names a format string uses (literal ``{{`` / ``}}`` excluded)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as error:  # e.g. a single unmatched brace
        raise TemplateError(f"template is not a valid format string: {error} (write literal braces as {{{{ }}}})")


@dataclass(frozen=True)
class PromptTemplate:
    """A validated format string for one turn type."""

    text: str
    fields: frozenset[str]

    def __post_init__(self) -> None:
        used = template_fields(self.text)
        unknown = used - self.fields
        if unknown:
            raise TemplateError(
                f"template uses unknown field(s) {sorted(unknown)}; allowed: {sorted(self.fields)}. "
                "Write literal braces as {{ and }} (e.g. \\boxed{{}})."
            )
        if "problem" not in used:
            raise TemplateError("template must contain the {problem} field")

    def fill(self, **values: str) -> str:
        return self.text.format(**{name: values[name] for name in self.fields})


def load_template(source: str | None, default: str, fields: frozenset[str]) -> PromptTemplate:
    """A template from a file path, a literal template string (anything containing a brace), or the default."""
    if source is None:
        return PromptTemplate(default, fields)
    if "{" in source:
        return PromptTemplate(source, fields)
    path = Path(source).expanduser()
    if not path.is_file():
        raise TemplateError(f"prompt template file not found: {path}")
    return PromptTemplate(path.read_text(), fields)
