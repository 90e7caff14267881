"""Row schema validation, input reading with named errors, atomic parquet writes, Reasoning360 naming."""

import json
import os

import pyarrow.parquet as pq
import pytest

from flash_rc import errors
from flash_rc.data import rows as rows_module
from flash_rc.data.rows import RowError, check_scorer, dataset_name, make_row, read_records, reasoning360_filename, \
    reasoning360_stem, size_suffix, validate_row, write_parquet_atomic


def good_row(**changes) -> dict:
    row = make_row("openai/gsm8k", "What is 1+1?", "math", "2", "train", 0, "#### 2", "What is 1+1?")
    row.update(changes)
    return row


def test_make_row_builds_verls_schema():
    assert good_row() == {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": "What is 1+1?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"split": "train", "index": 0, "answer": "#### 2", "question": "What is 1+1?"},
    }
    validate_row(good_row(), "row 0")


@pytest.mark.parametrize("changes, message", [
    ({"prompt": []}, "field 'prompt' must be a non-empty list"),
    ({"prompt": [{"role": "user"}]}, "prompt\\[0\\] must be"),
    ({"prompt": [{"role": "robot", "content": "x"}]}, "prompt\\[0\\].role must be one of"),
    ({"prompt": [{"role": "user", "content": "  "}]}, "prompt\\[0\\].content must be a non-empty string"),
    ({"data_source": ""}, "field 'data_source'"),
    ({"reward_model": {"style": "rule", "ground_truth": 2}}, "reward_model.ground_truth' must be a non-empty string"),
    ({"reward_model": {"ground_truth": "2"}}, "must hold a string 'style'"),
    ({"extra_info": {"split": "train", "index": "0"}}, "extra_info.index' must be an int"),
    ({"extra_info": {"index": 0}}, "extra_info.split' must be a string"),
])
def test_validate_row_names_row_and_field(changes, message):
    with pytest.raises(RowError, match=f"^train.jsonl:7: .*{message}"):
        validate_row(good_row(**changes), "train.jsonl:7")


def test_validate_row_lists_missing_fields():
    row = good_row()
    del row["ability"], row["extra_info"]
    with pytest.raises(RowError, match="missing fields \\['ability', 'extra_info'\\]"):
        validate_row(row, "row 3")


def test_read_records_from_every_format(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": 1}\n\n{"q": 2}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"q": 3}]))
    write_parquet_atomic([good_row()], tmp_path / "c.parquet")
    assert list(read_records(tmp_path / "a.jsonl")) == [(f"{tmp_path}/a.jsonl:1", {"q": 1}),
                                                        (f"{tmp_path}/a.jsonl:3", {"q": 2})]
    assert list(read_records(tmp_path / "b.json")) == [(f"{tmp_path}/b.json item 0", {"q": 3})]
    assert list(read_records(tmp_path / "c.parquet")) == [(f"{tmp_path}/c.parquet row 0", good_row())]


@pytest.mark.parametrize("content, message", [
    (b'{"q": 1}\n{"q": 2\n', ":2: invalid JSON"),
    (b'{"q": 1}\n{"q": "\xff\xfe"}\n', ":2: not valid UTF-8"),
    (b'{"q": 1}\n[1, 2]\n', ":2: expected a JSON object, got list"),
])
def test_read_records_names_the_bad_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(RowError, match=message):
        list(read_records(path))


@pytest.mark.parametrize("name, content, error, message", [
    ("missing.jsonl", None, errors.InputNotFoundError, "missing.jsonl: input file not found"),
    ("missing.parquet", None, errors.InputNotFoundError, "missing.parquet: input file not found"),
    ("garbage.parquet", b"not parquet at all", RowError, "garbage.parquet: not a readable parquet file"),
    ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000, RowError, "deep.jsonl:1: JSON nested too deeply"),
    ("bad.json", b'[\n{"a": 1},\n{oops}]', RowError, "bad.json: invalid JSON .* at line 3, column 2"),
])
def test_unreadable_inputs_raise_named_errors(tmp_path, name, content, error, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message):
        list(read_records(tmp_path / name))


def test_a_directory_is_not_a_readable_input(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(RowError, match="dir.jsonl: cannot read \\(it is a directory\\)"):
        list(read_records(tmp_path / "dir.jsonl"))


def test_row_error_is_the_shared_one():
    assert RowError is errors.RowError and RowError.exit_code == 1


def test_check_scorer_names_the_row():
    check_scorer(good_row(), "in.jsonl:1")
    with pytest.raises(RowError, match="in.jsonl:4: no scorer for data_source 'nowhere'"):
        check_scorer(good_row(data_source="nowhere"), "in.jsonl:4")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "a\0b"])
def test_dataset_name_must_be_a_plain_file_name(name):
    with pytest.raises(errors.ConfigError, match="plain file name"):
        dataset_name(name)
    assert dataset_name("dapo-17k..v2") == "dapo-17k..v2"


def test_unsupported_input_type(tmp_path):
    with pytest.raises(RowError, match="unsupported input type '.csv'"):
        list(read_records(tmp_path / "x.csv"))


def test_parquet_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "train.parquet"
    write_parquet_atomic([good_row()], target)
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"

    def crash(table, where):  # the disk fills up halfway through the next write
        where.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(rows_module.pq, "write_table", crash)
    with pytest.raises(OSError, match="No space"):
        write_parquet_atomic([good_row(), good_row()], target)
    monkeypatch.undo()
    assert pq.read_table(target).num_rows == 1  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]  # and no temporary file is left


def test_invalid_rows_are_never_written(tmp_path):
    with pytest.raises(RowError, match="output row 1 for out.parquet: .*ground_truth"):
        write_parquet_atomic([good_row(), good_row(reward_model={"style": "rule", "ground_truth": ""})],
                             tmp_path / "out.parquet")
    with pytest.raises(RowError, match="empty dataset"):
        write_parquet_atomic([], tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("count, suffix", [(0, "0"), (840, "840"), (999, "999"), (1000, "1k"), (1319, "1.3k"),
                                           (2000, "2k"), (17398, "17.4k"), (54400, "54.4k")])
def test_reasoning360_size_suffix(count, suffix):
    assert size_suffix(count) == suffix


def test_reasoning360_names():
    assert reasoning360_filename("math", "dapo", 17398) == "math__dapo_17.4k.parquet"
    assert reasoning360_stem("codegen", "leetcode2k") == "codegen__leetcode2k"
    with pytest.raises(ValueError, match="domain must be one of"):
        reasoning360_stem("maths", "x")
    with pytest.raises(ValueError, match="without '__'"):
        reasoning360_stem("math", "a__b")
