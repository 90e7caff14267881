"""DAPO-Math-17k and MATH/AIME-style datasets (local JSONL/JSON/parquet) -> verl parquet rows.

Why: math RL data arrives in two shapes and both must end up in the same row schema (``rows.py``) with a prompt that
matches the scorer that will grade it:

* rows already in verl's schema (DAPO-Math-17k as published: ``prompt`` messages + ``reward_model``) are validated
  and re-indexed; their other ``extra_info`` keys are kept (an original ``index`` moves to ``source_index``);
* raw records -- a question under ``problem``/``question`` and either an ``answer`` or a MATH-style ``solution``
  whose last ``\\boxed{}`` is the answer -- get a prompt in one of two styles:
  ``dapo``: the DAPO-Math-17k template asking for a final ``Answer:`` line (scored by ``math_dapo``, data_source
  ``math_dapo``); ``boxed``: Reasoning360's suffix asking for ``\\boxed{}`` (scored by math-verify, data_source
  ``lighteval/MATH`` or ``math__<name>``).

``dedup`` keeps the first row of each question: DAPO-Math-17k repeats each of its ~17.4k problems about 100 times.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from flash_rc.data.rows import RowError, check_scorer, dataset_name, make_row, read_records, reasoning360_filename, \
    reasoning360_stem, write_parquet_atomic
from flash_rc.errors import ConfigError
from flash_rc.rewards.boxed import last_boxed

PromptStyle = Literal["dapo", "boxed"]
DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response should be of the form "
                 "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{question}\n\n"
                 'Remember to put your answer on its own line after "Answer:".')
BOXED_SUFFIX = " Please output the final answer within \\boxed{}."
DEFAULT_DATA_SOURCE = {"dapo": "math_dapo", "boxed": "lighteval/MATH"}
QUESTION_FIELDS = ("problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "ground_truth")


def build_prompt(question: str, style: PromptStyle) -> str:
    if style == "dapo":
        return DAPO_TEMPLATE.format(question=question)
    if style == "boxed":
        return question + BOXED_SUFFIX
    raise ValueError(f"prompt style must be 'dapo' or 'boxed', got {style!r}")


def _first_field(record: dict, names: Sequence[str]):
    return next((record[name] for name in names if record.get(name) not in (None, "")), None)


def _answer_text(value) -> str | None:
    """A final answer as text (numbers become strings); None when there is none (missing, blank, not a scalar)."""
    if value is None or isinstance(value, (bool, dict, list)) or not str(value).strip():
        return None
    return str(value).strip()


def _raw_question_and_answer(record: dict, where: str) -> tuple[str, str]:
    question = _first_field(record, QUESTION_FIELDS)
    if not isinstance(question, str) or not question.strip():
        raise RowError(f"{where}: needs a non-empty string question in one of {QUESTION_FIELDS}")
    answer = _first_field(record, ANSWER_FIELDS)
    if answer is None and isinstance(record.get("solution"), str):
        answer = last_boxed(record["solution"])
        if answer is None:
            raise RowError(f"{where}: field 'solution' has no \\boxed{{}} final answer")
    answer = _answer_text(answer)
    if answer is None:
        raise RowError(f"{where}: needs an answer in one of {ANSWER_FIELDS} or a 'solution' with \\boxed{{}}")
    return question, answer


def _verl_question_and_answer(record: dict, where: str) -> tuple[str, str]:
    reward_model = record["reward_model"]
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise RowError(f"{where}: field 'reward_model' must hold 'ground_truth'")
    ground_truth = _answer_text(reward_model["ground_truth"])
    if ground_truth is None:
        raise RowError(f"{where}: field 'reward_model.ground_truth' must be a non-empty string or number")
    messages = record["prompt"] if isinstance(record["prompt"], list) else []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RowError(f"{where}: field 'prompt' must be a list of messages with a user turn")
    question = users[-1].get("content")
    if not isinstance(question, str) or not question.strip():
        raise RowError(f"{where}: the last user turn of 'prompt' must have non-empty string content")
    return question, ground_truth


def math_row(record: dict, split: str, index: int, where: str, style: PromptStyle, data_source: str | None) -> dict:
    """One output row from one input record (either shape, see module docstring)."""
    if "prompt" in record and "reward_model" in record:  # already a verl row
        question, ground_truth = _verl_question_and_answer(record, where)
        extra = record.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise RowError(f"{where}: field 'extra_info' must be an object")
        extra = dict(extra)
        if "index" in extra:
            extra["source_index"] = str(extra.pop("index"))
        return make_row(data_source or record.get("data_source"), record["prompt"], record.get("ability", "math"),
                        ground_truth, split, index, ground_truth, question, extra)
    question, answer = _raw_question_and_answer(record, where)
    return make_row(data_source or DEFAULT_DATA_SOURCE[style], build_prompt(question, style), "math", answer,
                    split, index, answer, question)


def convert_math(input_paths: Sequence[str | Path], split: str, style: PromptStyle = "dapo",
                 data_source: str | None = None, dedup: bool = False, limit: int | None = None) -> list[dict]:
    """Rows from every input file in order, at most ``limit`` (>= 1); every data_source must route to a scorer."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1 (or left out for every row), got {limit}")
    rows, seen_questions = [], set()
    for path in input_paths:
        for where, record in read_records(path):
            row = math_row(record, split, len(rows), where, style, data_source)
            question = row["extra_info"]["question"]
            if dedup and question in seen_questions:
                continue
            seen_questions.add(question)
            check_scorer(row, where)
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                return rows
    return rows


def prepare_math(input_paths: Sequence[str | Path], output_dir: str | Path, split: str = "train",
                 style: PromptStyle = "dapo", data_source: str | None = None, name: str | None = None,
                 reasoning360: bool = False, dedup: bool = False, limit: int | None = None) -> Path:
    """Convert and write one parquet file.

    The file is ``<name>.parquet`` (``name`` defaults to the first input's stem); with ``reasoning360`` it is
    ``math__<name>_<size>.parquet`` and, unless given, the data_source is ``math__<name>``.
    """
    name = dataset_name(name or Path(input_paths[0]).stem)
    if reasoning360:
        data_source = data_source or reasoning360_stem("math", name)
    rows = convert_math(input_paths, split, style, data_source, dedup, limit)
    filename = reasoning360_filename("math", name, len(rows)) if reasoning360 else f"{name}.parquet"
    return write_parquet_atomic(rows, Path(output_dir) / filename)
