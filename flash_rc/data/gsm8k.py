"""GSM8K JSONL -> verl parquet rows, identical to verl's ``examples/data_preprocess/gsm8k.py``.

Why identical: the prompt suffix and the ground-truth extraction decide what the model is asked and what the GSM8K
scorer compares against; matching verl keeps flash_rc runs comparable with users' verl runs. Each row::

    data_source  "openai/gsm8k"
    prompt       [{"role": "user", "content": question + " " + INSTRUCTION}]
    ability      "math"
    reward_model {"style": "rule", "ground_truth": <first "#### <number>" of the answer, commas removed>}
    extra_info   {"split", "index", "answer": raw answer, "question": raw question}
"""

from __future__ import annotations

from pathlib import Path

from flash_rc.data.rows import RowError, make_row, read_records, write_parquet_atomic
from flash_rc.rewards.gsm8k import FINAL_ANSWER

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def ground_truth_from_answer(answer: str, where: str) -> str:
    """The number after the first ``#### `` with commas removed (verl's rule); RowError if there is none."""
    match = FINAL_ANSWER.search(answer)
    if match is None:
        raise RowError(f"{where}: field 'answer' has no '#### <number>' final answer")
    return match.group(1).replace(",", "")


def gsm8k_row(record: dict, split: str, index: int, where: str) -> dict:
    for field in ("question", "answer"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise RowError(f"{where}: field {field!r} must be a non-empty string")
    question, answer = record["question"], record["answer"]
    return make_row(DATA_SOURCE, f"{question} {INSTRUCTION}", "math", ground_truth_from_answer(answer, where),
                    split, index, answer, question)


def convert_gsm8k(input_path: str | Path, split: str) -> list[dict]:
    return [gsm8k_row(record, split, index, where) for index, (where, record) in enumerate(read_records(input_path))]


def prepare_gsm8k(train_path: str | Path, test_path: str | Path, output_dir: str | Path) -> dict[str, Path]:
    """Write ``train.parquet`` and ``test.parquet``; both inputs are validated before either file is written."""
    rows = {"train": convert_gsm8k(train_path, "train"), "test": convert_gsm8k(test_path, "test")}
    return {split: write_parquet_atomic(split_rows, Path(output_dir) / f"{split}.parquet")
            for split, split_rows in rows.items()}
