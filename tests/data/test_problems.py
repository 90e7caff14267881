"""Problem rows of every shape flash_rc reads: GSM8K, verl and {problem, answer}."""

import pytest

from flash_rc.data.problems import load_problems, problem_from_row


def test_problem_rows_of_every_supported_shape():
    gsm8k = problem_from_row({"question": "Q?", "answer": "steps\n#### 1,234"}, 0, "f:1")
    assert (gsm8k.problem, gsm8k.ground_truth, gsm8k.data_source) == ("Q?", "1234", "openai/gsm8k")
    verl = problem_from_row({"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Q? Let's think"}],
                             "reward_model": {"ground_truth": "7"}, "extra_info": {"index": 42, "question": "Q?"}}, 0, "f")
    assert (verl.problem_id, verl.problem, verl.ground_truth, verl.data_source) == ("42", "Q?", "7", "math_dapo")
    plain = problem_from_row({"problem": "P", "answer": "\\frac{1}{2}", "data_source": "lighteval/MATH"}, 3, "f")
    assert (plain.problem_id, plain.ground_truth) == ("3", "\\frac{1}{2}")
    with pytest.raises(ValueError, match="f:6: no problem text"):
        problem_from_row({"answer": "1"}, 5, "f:6")


def test_load_problems_offset_limit_and_bad_lines(gsm8k_dir, tmp_path):
    problems = load_problems(str(gsm8k_dir / "test.jsonl"), offset=2, limit=3)
    assert len(problems) == 3 and problems[0].problem_id == "2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        load_problems(str(bad))


def test_problem_ids_stay_unique_across_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    problems = load_problems([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert [p.problem_id for p in problems] == ["a/0", "b/0"]
    assert load_problems(str(tmp_path / "a.jsonl"))[0].problem_id == "0"
