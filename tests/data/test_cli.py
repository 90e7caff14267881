"""``flash-rc data``: end-to-end runs on real files, and exit codes/messages for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from flash_rc.data.cli import main


def test_gsm8k_from_input_dir_then_validate(tmp_path, capsys, gsm8k_dir):
    assert main(["gsm8k", "--input-dir", str(gsm8k_dir), "--output-dir", str(tmp_path)]) == 0
    assert pq.read_table(tmp_path / "train.parquet").num_rows == 7473
    assert main(["validate", str(tmp_path / "train.parquet"), str(tmp_path / "test.parquet")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/train.parquet: 7473 rows OK" in out and f"{tmp_path}/test.parquet: 1319 rows OK" in out


def test_gsm8k_needs_inputs(tmp_path, capsys, gsm8k_dir):
    assert main(["gsm8k", "--train", str(gsm8k_dir / "train.jsonl"), "--output-dir", str(tmp_path)]) == 2
    assert "give --input-dir, or both --train and --test" in capsys.readouterr().err


def test_gsm8k_bad_row_exits_1_naming_it(tmp_path, capsys):
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "none"}\n')
    code = main(["gsm8k", "--train", str(bad), "--test", str(bad), "--output-dir", str(tmp_path / "out")])
    assert code == 1
    assert f"error: {bad}:2: field 'answer' has no '#### <number>' final answer" in capsys.readouterr().err


def test_math_reasoning360(tmp_path, capsys):
    source = tmp_path / "aime.jsonl"
    source.write_text("".join(json.dumps({"problem": f"p{i}", "answer": i}) + "\n" for i in range(30)))
    args = ["math", "--input", str(source), "--output-dir", str(tmp_path / "out"), "--style", "boxed",
            "--reasoning360", "--name", "aime"]
    assert main(args) == 0
    written = tmp_path / "out" / "math__aime_30.parquet"
    assert f"wrote {written}" in capsys.readouterr().out
    assert pq.read_table(written).column("data_source").to_pylist() == ["math__aime"] * 30


def test_validate_reports_unroutable_rows(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    assert main(["math", "--input", str(source), "--output-dir", str(tmp_path), "--name", "x"]) == 0
    table = pq.read_table(tmp_path / "x.parquet").to_pylist()
    table[0]["data_source"] = "somewhere_else"
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "y.parquet")
    assert main(["validate", str(tmp_path / "y.parquet")]) == 1
    assert "y.parquet row 0: no scorer for data_source 'somewhere_else'" in capsys.readouterr().err


def test_bad_reasoning360_name_is_usage_error(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    assert main(["math", "--input", str(source), "--output-dir", str(tmp_path), "--reasoning360",
                 "--name", "a__b"]) == 2
    assert "without '__'" in capsys.readouterr().err


def test_exit_statuses_follow_the_documented_table(tmp_path, capsys):
    """Called directly (not through flash-rc), `data`'s main reports like the CLI: 1 bad data, 2 usage, 3 output."""
    (tmp_path / "corrupt.parquet").write_bytes(b"garbage")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    assert main(["validate", str(tmp_path / "corrupt.parquet")]) == 1
    assert main(["math", "--input", str(source), "--output-dir", str(tmp_path / "out"), "--limit", "0"]) == 2
    assert main(["math", "--input", str(source), "--output-dir", str(source / "out")]) == 3
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[0] for line in err] == ["flash-rc data"] * 3
    assert "not a readable parquet file" in err[0] and "limit must be at least 1" in err[1]
    assert f"{source} is a file, not a directory" in err[2]
