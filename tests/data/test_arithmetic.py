"""The built-in arithmetic task: deterministic, disjoint splits, correct answers, impossible settings refused, and
the CLI end to end (files ``flash-rc data validate`` and ``load_problems`` accept)."""

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from flash_rc.data.arithmetic import INSTRUCTION, ArithmeticConfig, arithmetic_rows, canonical, evaluate, \
    prepare_arithmetic
from flash_rc.data.problems import load_problems
from flash_rc.errors import ConfigError

MIXED = dict(operations=("add", "sub", "mul"), min_digits=1, max_digits=2, min_operands=2, max_operands=3,
             train_size=300, test_size=50)


def expressions(rows):
    return [row["extra_info"]["expression"] for row in rows]


def test_same_seed_same_rows_and_files_other_seed_other_rows(tmp_path):
    config = ArithmeticConfig(**MIXED, seed=7)
    assert arithmetic_rows(config) == arithmetic_rows(ArithmeticConfig(**MIXED, seed=7))
    first, second = prepare_arithmetic(config, tmp_path / "a"), prepare_arithmetic(config, tmp_path / "b")
    for split in ("train", "test"):
        assert pq.read_table(first[split]).to_pylist() == pq.read_table(second[split]).to_pylist()
    other = arithmetic_rows(ArithmeticConfig(**MIXED, seed=8))
    assert expressions(other["train"]) != expressions(arithmetic_rows(config)["train"])


@pytest.mark.parametrize("settings", [
    MIXED,
    dict(train_size=90, test_size=10, max_digits=1),  # every one of the 100 expressions: the dense path
    dict(operations=("sub",), min_digits=2, max_digits=2, train_size=4000, test_size=1000),
])
def test_splits_have_their_sizes_and_never_overlap(settings):
    rows = arithmetic_rows(ArithmeticConfig(**settings))
    train, test = expressions(rows["train"]), expressions(rows["test"])
    assert (len(train), len(test)) == (settings["train_size"], settings["test_size"])
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert [row["extra_info"]["index"] for row in rows["train"]] == list(range(len(train)))
    assert {row["extra_info"]["split"] for row in rows["train"]} == {"train"}
    assert {row["extra_info"]["split"] for row in rows["test"]} == {"test"}


def test_rows_hold_the_right_answer_and_the_question():
    config = ArithmeticConfig(**MIXED)
    rows = arithmetic_rows(config)["train"] + arithmetic_rows(config)["test"]
    symbols = set()
    for row in rows:
        extra, expression = row["extra_info"], row["extra_info"]["expression"]
        assert row["data_source"] == "arithmetic"
        assert row["reward_model"] == {"style": "rule", "ground_truth": str(eval(expression))}  # our own digits
        assert extra["answer"] == row["reward_model"]["ground_truth"]
        assert expression in extra["question"]
        assert row["prompt"] == [{"role": "user", "content": f"{extra['question']} {INSTRUCTION}"}]
        operands = [int(part) for part in expression.split()[::2]]
        assert 2 <= len(operands) <= 3 and all(0 <= value <= 99 for value in operands)
        symbols |= set(expression.split()[1::2])
    assert symbols == {"+", "-", "*"}
    assert len({row["extra_info"]["question"].replace(row["extra_info"]["expression"], "") for row in rows}) > 1


def test_precedence_and_canonical_form():
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([2, 3, 4, 5], ["*", "-", "*"]) == -14
    assert evaluate([9, 5, 7], ["-", "-"]) == -3
    assert canonical([2, 3, 4], ["+", "*"]) == "2 + 3 * 4"


def test_count_of_distinct_expressions():
    assert ArithmeticConfig(max_digits=1, train_size=1, test_size=1).num_expressions == 100
    assert ArithmeticConfig(min_digits=2, max_digits=2, train_size=1, test_size=1).num_expressions == 90 ** 2
    three = ArithmeticConfig(operations=("add", "mul"), max_digits=1, min_operands=2, max_operands=3,
                             train_size=1, test_size=1)
    assert three.num_expressions == 10 ** 2 * 2 + 10 ** 3 * 2 ** 2


@pytest.mark.parametrize("settings, message", [
    (dict(max_digits=1, train_size=100, test_size=1),
     "train_size + test_size = 101 asks for more problems than the 100 distinct expressions of 1-digit 2-operand add "
     "problems"),
    (dict(operations=("add", "sub"), max_digits=1, train_size=150, test_size=100),
     "train_size + test_size = 250 asks for more problems than the 200 distinct expressions of 1-digit 2-operand "
     "add/sub problems"),
    (dict(min_digits=0), "min_digits must be between 1 and 18, got 0"),
    (dict(min_digits=3, max_digits=2), "max_digits must be between min_digits (3) and 18, got 2"),
    (dict(min_operands=1), "min_operands must be between 2 and 10, got 1"),
    (dict(min_operands=3, max_operands=2), "max_operands must be between min_operands (3) and 10, got 2"),
    (dict(operations=("add", "div")),
     "operations must be a non-empty list of ['add', 'mul', 'sub'], got ['add', 'div']"),
    (dict(operations=()), "operations must be a non-empty list"),
    (dict(train_size=0), "train_size must be between 1 and"),
    (dict(test_size=0), "test_size must be between 1 and"),
    (dict(seed=1.5), "seed must be a whole number, got 1.5"),
])
def test_impossible_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ConfigError) as error:
        ArithmeticConfig(**settings)
    assert message in str(error.value)


def test_cli_end_to_end_validates_and_loads(tmp_path):
    flash_rc = [sys.executable, "-c", "import sys; from flash_rc.cli import main; sys.exit(main())"]
    out = tmp_path / "arith"
    made = subprocess.run([*flash_rc, "data", "arithmetic", "--output-dir", str(out), "--operations", "add,sub",
                           "--min-digits", "1", "--max-digits", "2", "--operands", "2-3", "--train-size", "200",
                           "--test-size", "20", "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert f"wrote {out / 'train.parquet'} (train)" in made.stdout
    checked = subprocess.run([*flash_rc, "data", "validate", str(out / "train.parquet"), str(out / "test.parquet")],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert f"{out / 'train.parquet'}: 200 rows OK" in checked.stdout
    assert f"{out / 'test.parquet'}: 20 rows OK" in checked.stdout
    problems = load_problems(str(out / "test.parquet"))
    rows = pq.read_table(out / "test.parquet").to_pylist()
    assert [(p.problem_id, p.problem, p.ground_truth, p.data_source) for p in problems] == [
        (str(i), row["extra_info"]["question"], row["reward_model"]["ground_truth"], "arithmetic")
        for i, row in enumerate(rows)]
    refused = subprocess.run([*flash_rc, "data", "arithmetic", "--output-dir", str(tmp_path / "none"),
                              "--max-digits", "1", "--train-size", "100"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "flash-rc data: error: train_size + test_size = 200 asks for more problems than the 100 distinct expressions "
        "of 1-digit 2-operand add problems; lower the sizes or widen the settings")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("operands", ["1", "x", "2-"])
def test_cli_bad_operand_counts_are_usage_errors(tmp_path, capsys, operands):
    from flash_rc.data.cli import main

    assert main(["arithmetic", "--output-dir", str(tmp_path), "--operands", operands]) == 2
    assert "operand" in capsys.readouterr().err
