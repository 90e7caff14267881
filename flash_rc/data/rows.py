"""verl's RL row schema: build rows, validate them, read inputs, write parquet atomically, name files.

Why one module: every dataset converter produces the same row, and verl's ``RLHFDataset`` reads it positionally by
key name, so a malformed row must be caught here -- with the file and line that produced it -- not as a KeyError in
a Ray worker an hour into a run. A row is::

    {"data_source": str,                                   # picks the reward scorer (flash_rc.rewards.router)
     "prompt": [{"role": "user", "content": str}, ...],    # chat messages
     "ability": str,
     "reward_model": {"style": "rule", "ground_truth": str},
     "extra_info": {"split": str, "index": int, "answer": str, "question": str, ...}}

Parquet files are written through :func:`flash_rc.outputs.atomic_write` (a temporary name in the target directory,
renamed into place), so a crash never leaves a half-written file that a later run would read, and a full disk says so.
An input that is missing raises ``InputNotFoundError`` (exit status 2); one that cannot be read or parsed, or a bad
row, raises ``RowError`` (exit status 1). Reasoning360 names files ``<domain>__<name>_<size>.parquet``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flash_rc.errors import ConfigError, InputNotFoundError, RowError, UnknownDataSourceError
from flash_rc.outputs import atomic_write, describe_os_error
from flash_rc.rewards.router import resolve_route

ROLES = ("system", "user", "assistant")
REASONING360_DOMAINS = ("math", "codegen", "logic", "simulation", "table", "stem", "ood")


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


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    for index, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {index}", record


def _parse_json(raw: bytes, where: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RowError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        position = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno}, column {exc.colno}"
        raise RowError(f"{where}: invalid JSON ({exc.msg} at {position})") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise RowError(f"{where}: JSON nested too deeply to read") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            record = _parse_json(raw, where)
            _require(isinstance(record, dict), where, f"expected a JSON object, got {type(record).__name__}")
            yield where, record


def _json_records(path: Path) -> Iterator[tuple[str, dict]]:
    records = _parse_json(path.read_bytes(), str(path))
    _require(isinstance(records, list), str(path), "a .json input must hold a list of objects")
    for index, record in enumerate(records):
        _require(isinstance(record, dict), f"{path} item {index}", "expected a JSON object")
        yield f"{path} item {index}", record


_READERS = {".parquet": _parquet_records, ".jsonl": _jsonl_records, ".json": _json_records}


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` from a .jsonl, .json (list) or .parquet file; ``where`` is "file:line N"/"row N".

    A missing file raises InputNotFoundError; one that cannot be read (a directory, no permission, a corrupt parquet
    file) raises RowError naming it, so every reader fails the same way whatever library reads the format.
    """
    path = Path(path)
    if path.suffix not in _READERS:
        raise RowError(f"{path}: unsupported input type {path.suffix!r}; use .jsonl, .json or .parquet")
    try:
        yield from _READERS[path.suffix](path)
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: input file not found") from None
    except OSError as exc:
        raise RowError(f"{path}: cannot read ({describe_os_error(exc)})") from None
    except pa.ArrowException as exc:  # not parquet, truncated, corrupt: pyarrow's message says which
        raise RowError(f"{path}: not a readable parquet file ({' '.join(str(exc).split())})") from None


def check_scorer(row: dict, where: str) -> None:
    """Raise RowError naming ``where`` unless the reward router has a scorer for the row's data_source."""
    try:
        resolve_route(row["data_source"], row["extra_info"])
    except UnknownDataSourceError as exc:
        raise RowError(f"{where}: {exc}") from None


def write_parquet_atomic(rows: Sequence[dict], path: str | Path) -> Path:
    """Validate ``rows`` and write them to ``path`` via a temporary file + rename (never a partial file)."""
    path = Path(path)
    if not rows:
        raise RowError(f"{path}: refusing to write an empty dataset")
    for index, row in enumerate(rows):
        validate_row(row, f"output row {index} for {path.name}")
    table = pa.Table.from_pylist(list(rows))
    with atomic_write(path) as f:
        pq.write_table(table, f)
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
        raise ConfigError(f"Reasoning360 domain must be one of {REASONING360_DOMAINS}, got {domain!r}")
    if "__" in name or name != name.strip():
        raise ConfigError(f"dataset name must be without '__' or surrounding spaces, got {name!r}")
    return f"{domain}__{dataset_name(name)}"


def dataset_name(name: str) -> str:
    """``name`` if it is a plain file stem, so ``<output-dir>/<name>.parquet`` stays inside the output directory."""
    if name in ("", ".", "..") or any(separator in name for separator in ("/", "\\", "\0")):
        raise ConfigError(f"dataset name must be a plain file name (no '/', '\\' or '..'), got {name!r}")
    return name


def reasoning360_filename(domain: str, name: str, num_rows: int) -> str:
    """``<domain>__<name>_<size>.parquet``, e.g. ``math__dapo_17.4k.parquet``."""
    return f"{reasoning360_stem(domain, name)}_{size_suffix(num_rows)}.parquet"
