"""DAPO-Math / MATH / AIME conversion: both input shapes, both prompt styles, dedup, naming and routing checks."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flash_rc.data.math import BOXED_SUFFIX, DAPO_TEMPLATE, build_prompt, convert_math, prepare_math
from flash_rc.data.rows import RowError, write_parquet_atomic
from flash_rc.errors import ConfigError
from flash_rc.rewards.math import compute_score as math_score
from flash_rc.rewards.math_dapo import compute_score as dapo_score
from flash_rc.rewards.router import resolve_route


def dapo_published_row(question: str, answer: str, uuid: str) -> dict:
    """A row as BytedTsinghua-SIA/DAPO-Math-17k publishes it."""
    return {"data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_TEMPLATE.format(question=question)}],
            "ability": "MATH", "reward_model": {"style": "rule-lighteval/MATH_v2", "ground_truth": answer},
            "extra_info": {"index": uuid}}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_dapo_template_is_the_published_one():
    assert build_prompt("What is 2+2?", "dapo") == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 2+2?\n\n"
        'Remember to put your answer on its own line after "Answer:".')
    assert build_prompt("What is 2+2?", "boxed") == "What is 2+2? Please output the final answer within \\boxed{}."
    with pytest.raises(ValueError, match="'dapo' or 'boxed'"):
        build_prompt("q", "chat")


def test_published_dapo_rows_pass_through_deduplicated(tmp_path):
    source = tmp_path / "dapo-math-17k.parquet"
    rows = [dapo_published_row("1+1?", "2", "a"), dapo_published_row("2+2?", "4", "b"),
            dapo_published_row("1+1?", "2", "c")]  # the published file repeats each problem
    pq.write_table(pa.Table.from_pylist(rows), source)
    out = pq.read_table(prepare_math([source], tmp_path / "out", dedup=True)).to_pylist()
    assert len(out) == 2
    assert out[1]["prompt"] == rows[1]["prompt"] and out[1]["ability"] == "MATH"
    assert out[1]["reward_model"] == {"style": "rule", "ground_truth": "4"}
    assert out[1]["extra_info"] == {"source_index": "b", "split": "train", "index": 1, "answer": "4",
                                    "question": rows[1]["prompt"][0]["content"]}


def test_raw_math_records_use_the_boxed_solution(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
        {"problem": "AIME?", "answer": 204},  # AIME ground truths are ints
    ])
    rows = convert_math([path], "test", style="boxed")
    assert rows[0]["reward_model"]["ground_truth"] == "\\frac{1}{2}"
    assert rows[0]["prompt"][0]["content"] == "Half of 1?" + BOXED_SUFFIX
    assert rows[1]["reward_model"]["ground_truth"] == "204"
    assert [r["data_source"] for r in rows] == ["lighteval/MATH"] * 2
    # the scorer the data_source routes to accepts a correct response to the prompt's requested format
    assert math_score("so \\boxed{0.5}", rows[0]["reward_model"]["ground_truth"])["acc"]


def test_dapo_style_rows_are_scored_by_math_dapo(tmp_path):
    path = write_jsonl(tmp_path / "aime.jsonl", [{"Problem": "Find n.", "Answer": "33"}])
    [row] = convert_math([path], "test", style="dapo", data_source="aime-2024")
    assert resolve_route(row["data_source"]).scorer.endswith("math_dapo:compute_score")
    assert dapo_score("work\nAnswer: 33", row["reward_model"]["ground_truth"])["acc"]


def test_reasoning360_naming(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(1200)])
    written = prepare_math([path], tmp_path / "train", style="boxed", name="toy", reasoning360=True)
    assert written.name == "math__toy_1.2k.parquet"
    table = pq.read_table(written)
    assert set(table.column("data_source").to_pylist()) == {"math__toy"}


@pytest.mark.parametrize("record, message", [
    ({"answer": "1"}, "needs a non-empty string question"),
    ({"problem": "q"}, "needs an answer"),
    ({"problem": "q", "solution": "no box here"}, "'solution' has no \\\\boxed"),
    ({"problem": "q", "answer": ["1"]}, "needs an answer"),
    ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "must be a list of messages with a user turn"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": "1"}, "must hold 'ground_truth'"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": None}}, "ground_truth' must be"),
    ({"prompt": [{"role": "user", "content": ["q"]}], "reward_model": {"ground_truth": "1"}}, "string content"),
    ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}, "non-empty string content"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "1"}, "extra_info": 5},
     "'extra_info' must be an object"),
])
def test_bad_records_are_named(tmp_path, record, message):
    path = write_jsonl(tmp_path / "in.jsonl", [{"problem": "fine", "answer": "1"}, record])
    with pytest.raises(RowError, match=f"in.jsonl:2: .*{message}"):
        convert_math([path], "train")


def test_unroutable_data_source_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"problem": "q", "answer": "1"}])
    with pytest.raises(RowError, match="in.jsonl:1: no scorer for data_source 'my_math'"):
        convert_math([path], "train", data_source="my_math")


def test_limit_and_multiple_inputs(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"problem": "a", "answer": "1"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"problem": f"b{i}", "answer": "2"} for i in range(5)])
    rows = convert_math([first, second], "train", limit=3)
    assert [r["extra_info"]["question"] for r in rows] == ["a", "b0", "b1"]
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2]
    write_parquet_atomic(rows, tmp_path / "ok.parquet")  # valid rows


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_is_refused(tmp_path, limit):
    path = write_jsonl(tmp_path / "in.jsonl", [{"problem": "q", "answer": "1"}])
    with pytest.raises(ConfigError, match=f"limit must be at least 1 .*got {limit}"):
        convert_math([path], "train", limit=limit)


@pytest.mark.parametrize("name", ["../x", "../../x", "a/b", "..", "a\\b"])
def test_a_name_cannot_leave_the_output_dir(tmp_path, name):
    path = write_jsonl(tmp_path / "in.jsonl", [{"problem": "q", "answer": "1"}])
    with pytest.raises(ConfigError, match="plain file name"):
        prepare_math([path], tmp_path / "out" / "deeper", name=name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.jsonl"]
