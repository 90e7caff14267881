"""Problems to solve, read from any of the row shapes flash_rc meets: the raw problem text, never a prompt.

Why apart from the prompt: RC builds a new prompt every turn (the problem plus the current summary), evals wrap the
problem in their own template, and verl rows already hold a prompt with instructions baked in. Decoding, eval sweeps
and RC training all need the same three things from a row — an id, the problem text, the ground truth and its
``data_source`` — so this is the one reader of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flash_rc.data.gsm8k import ground_truth_from_answer
from flash_rc.data.rows import read_records
from flash_rc.errors import InputNotFoundError, RowError


@dataclass
class Problem:
    problem_id: str
    problem: str
    ground_truth: str | None
    data_source: str


def problem_from_row(row: dict[str, Any], index: int, where: str) -> Problem:
    """One problem from a verl, GSM8K or ``{problem, answer}`` row (``where`` names the file and line in errors)."""
    if not isinstance(row, dict):
        raise RowError(f"{where}: a row must be an object, got {type(row).__name__}")
    extra = row.get("extra_info") or {}
    data_source = row.get("data_source", "openai/gsm8k")
    if "reward_model" in row or "prompt" in row:  # verl row: the raw question lives in extra_info when present
        text = extra.get("question") or _last_user_message(row.get("prompt"))
        truth = (row.get("reward_model") or {}).get("ground_truth")
    else:
        text = row.get("problem", row.get("question"))
        truth = row.get("answer", row.get("ground_truth"))
        if isinstance(truth, str) and "####" in truth:  # a GSM8K solution: its final number, verl's rule
            truth = ground_truth_from_answer(truth, where)
    if text is None:
        raise RowError(f"{where}: no problem text (expected 'question', 'problem' or 'prompt')")
    problem_id = str(extra.get("index", row.get("id", index)))
    return Problem(problem_id, str(text), None if truth is None else str(truth), str(data_source))


def _last_user_message(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else None


def load_problems(files: str | list[str], offset: int = 0, limit: int = -1) -> list[Problem]:
    """Problems of every file in order (ids prefixed with the file stem when there are several), then
    ``[offset:]`` and at most ``limit`` (-1: all)."""
    files = [files] if isinstance(files, str) else list(files)
    problems: list[Problem] = []
    for file in files:
        path = Path(file).expanduser()
        if not path.is_file():
            raise InputNotFoundError(f"problem file not found: {path}")
        from_file = [problem_from_row(row, i, where) for i, (where, row) in enumerate(read_records(path))]
        if len(files) > 1:  # ids (row numbers, extra_info.index) are per file: keep them unique across files
            for problem in from_file:
                problem.problem_id = f"{path.stem}/{problem.problem_id}"
        problems += from_file
    problems = problems[offset:]
    return problems if limit < 0 else problems[:limit]
