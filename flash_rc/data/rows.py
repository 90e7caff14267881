"""verl's RL row schema: build rows, validate them, read inputs, write parquet atomically, name files.

Why one module: every dataset converter produces the same row, and verl's ``RLHFDataset`` reads it positionally by
key name, so a malformed row must be caught here -- with the file and line that produced it -- not as a KeyError in
a Ray worker an hour into a run. A row is::

    {"data_source": str,                                   # picks the reward scorer (flash_rc.rewards.router)
     "prompt": [{"role": "user", "content": str}, ...],    # chat messages
     "ability": str,
     "reward_model": {"style": "rule", "ground_truth": str},
     "extra_info": {"split": str, "index": int, "answer": str, "question": str, ...}}

Parquet files are written to a temporary name in the target directory and renamed into place, so a crash never
leaves a half-written file that a later run would read. Reasoning360 names files ``<domain>__<name>_<size>.parquet``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROLES = ("system", "user", "assistant")
REASONING360_DOMAINS = ("math", "codegen", "logic", "simulation", "table", "stem", "ood")


class RowError(ValueError):
    """An input or output row is malformed; the message names the file and row."""


def make_row(data_source: str, prompt: str | list[dict], ability: str, ground_truth: str, split: str, index: int,
             answer: str, question: str, extra: dict | None = None) -> dict:
    """One verl row; a string ``prompt`` becomes a single user message. ``extra`` adds keys to ``extra_info``."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {
        "data_source": data_source,
        "prompt": messages,
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {**(extra or {}), "split": split, "index": index, "answer": answer, "question": question},
    }


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise RowError(f"{where}: {message}")


def validate_row(row: Any, where: str) -> None:
    """Raise RowError naming ``where`` and the bad field unless ``row`` follows the schema above."""
    _require(isinstance(row, dict), where, f"row must be an object, got {type(row).__name__}")
    missing = [key for key in ("data_source", "prompt", "ability", "reward_model", "extra_info") if key not in row]
    _require(not missing, where, f"missing fields {missing}")
    _require(isinstance(row["data_source"], str) and row["data_source"] != "", where,
             "field 'data_source' must be a non-empty string")
    prompt = row["prompt"]
    _require(isinstance(prompt, list) and len(prompt) > 0, where, "field 'prompt' must be a non-empty list of messages")
    for position, message in enumerate(prompt):
        _require(isinstance(message, dict) and set(message) == {"role", "content"}, where,
                 f"prompt[{position}] must be {{'role', 'content'}}, got {message!r:.80}")
        _require(message["role"] in ROLES, where, f"prompt[{position}].role must be one of {ROLES}")
        _require(isinstance(message["content"], str) and message["content"].strip() != "", where,
                 f"prompt[{position}].content must be a non-empty string")
    _require(isinstance(row["ability"], str), where, "field 'ability' must be a string")
    reward_model = row["reward_model"]
    _require(isinstance(reward_model, dict) and isinstance(reward_model.get("style"), str), where,
             "field 'reward_model' must hold a string 'style'")
    _require(isinstance(reward_model.get("ground_truth"), str) and reward_model["ground_truth"].strip() != "", where,
             "field 'reward_model.ground_truth' must be a non-empty string")
    extra_info = row["extra_info"]
    _require(isinstance(extra_info, dict), where, "field 'extra_info' must be an object")
    _require(isinstance(extra_info.get("split"), str), where, "field 'extra_info.split' must be a string")
    _require(isinstance(extra_info.get("index"), int) and not isinstance(extra_info["index"], bool), where,
             "field 'extra_info.index' must be an int")


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` from a .jsonl, .json (list) or .parquet file; ``where`` is "file:line N"/"row N"."""
    path = Path(path)
    if path.suffix == ".parquet":
        for index, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {index}", record
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise RowError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
                except json.JSONDecodeError as exc:
                    raise RowError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                _require(isinstance(record, dict), where, f"expected a JSON object, got {type(record).__name__}")
                yield where, record
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RowError(f"{path}: not a valid UTF-8 JSON document ({exc})") from None
        _require(isinstance(records, list), str(path), "a .json input must hold a list of objects")
        for index, record in enumerate(records):
            _require(isinstance(record, dict), f"{path} item {index}", "expected a JSON object")
            yield f"{path} item {index}", record
    else:
        raise RowError(f"{path}: unsupported input type {path.suffix!r}; use .jsonl, .json or .parquet")


def write_parquet_atomic(rows: Sequence[dict], path: str | Path) -> Path:
    """Validate ``rows`` and write them to ``path`` via a temporary file + rename (never a partial file)."""
    path = Path(path)
    if not rows:
        raise RowError(f"{path}: refusing to write an empty dataset")
    for index, row in enumerate(rows):
        validate_row(row, f"output row {index} for {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows))
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; datasets are shared read-only
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def size_suffix(num_rows: int) -> str:
    """Reasoning360's size tag: 840 -> "840", 1319 -> "1.3k", 2000 -> "2k", 54400 -> "54.4k"."""
    if num_rows < 1000:
        return str(num_rows)
    if num_rows % 1000:
        return f"{num_rows / 1000:.1f}k"
    return f"{num_rows // 1000}k"


def reasoning360_stem(domain: str, name: str) -> str:
    """``<domain>__<name>``: the data_source and file-name stem Reasoning360 routes on."""
    if domain not in REASONING360_DOMAINS:
        raise ValueError(f"Reasoning360 domain must be one of {REASONING360_DOMAINS}, got {domain!r}")
    if not name or "__" in name or "/" in name or name != name.strip():
        raise ValueError(f"dataset name must be non-empty without '__', '/' or surrounding spaces, got {name!r}")
    return f"{domain}__{name}"


def reasoning360_filename(domain: str, name: str, num_rows: int) -> str:
    """``<domain>__<name>_<size>.parquet``, e.g. ``math__dapo_17.4k.parquet``."""
    return f"{reasoning360_stem(domain, name)}_{size_suffix(num_rows)}.parquet"
