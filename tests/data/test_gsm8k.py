"""GSM8K conversion on the real dataset: verl's row schema, and ground truths the scorer agrees with."""

import json

import pyarrow.parquet as pq
import pytest

from flash_rc.data.gsm8k import INSTRUCTION, convert_gsm8k, ground_truth_from_answer, prepare_gsm8k
from flash_rc.data.rows import RowError
from flash_rc.rewards.gsm8k import compute_score


@pytest.fixture(scope="module")
def written(tmp_path_factory, gsm8k_dir):
    output_dir = tmp_path_factory.mktemp("gsm8k")
    paths = prepare_gsm8k(gsm8k_dir / "train.jsonl", gsm8k_dir / "test.jsonl", output_dir)
    return {split: pq.read_table(path).to_pylist() for split, path in paths.items()}


def test_row_counts_match_verl(written):
    assert (len(written["train"]), len(written["test"])) == (7473, 1319)


def test_first_train_row_is_exactly_verls(written, gsm8k_dir):
    first = json.loads((gsm8k_dir / "train.jsonl").read_text().splitlines()[0])
    assert written["train"][0] == {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": first["question"] + " " +
                    'Let\'s think step by step and output the final answer after "####".'}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "72"},
        "extra_info": {"split": "train", "index": 0, "answer": first["answer"], "question": first["question"]},
    }


def test_every_gold_answer_scores_one_against_its_ground_truth(written):
    """End-to-end consistency: the dataset's own answer, scored by the GSM8K scorer, is correct on every row."""
    for split in ("train", "test"):
        for index, row in enumerate(written[split]):
            assert row["extra_info"]["index"] == index and row["extra_info"]["split"] == split
            assert row["prompt"][0]["content"].endswith(" " + INSTRUCTION)
            assert compute_score(row["extra_info"]["answer"], row["reward_model"]["ground_truth"])["score"] == 1.0


def test_ground_truth_removes_commas_and_keeps_signs():
    assert ground_truth_from_answer("so 1,200 total\n#### 1,200", "x") == "1200"
    assert ground_truth_from_answer("#### -5", "x") == "-5"
    with pytest.raises(RowError, match="test.jsonl:3: field 'answer' has no '#### <number>'"):
        ground_truth_from_answer("The answer is 5", "test.jsonl:3")


def test_bad_rows_are_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "", "answer": "#### 2"}\n')
    with pytest.raises(RowError, match=f"{path}:2: field 'question' must be a non-empty string"):
        convert_gsm8k(path, "train")
    path.write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "q2", "answer": "two"}\n')
    with pytest.raises(RowError, match=f"{path}:2: field 'answer' has no"):
        convert_gsm8k(path, "train")


def test_a_bad_test_split_writes_nothing(tmp_path, gsm8k_dir):
    bad_test = tmp_path / "test.jsonl"
    bad_test.write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(RowError):
        prepare_gsm8k(gsm8k_dir / "train.jsonl", bad_test, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # train.parquet was not written either
