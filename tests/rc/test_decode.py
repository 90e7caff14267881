"""flash-rc decode end to end on the real engine, real tokenizer and real GSM8K problems."""

from __future__ import annotations

import json

import pytest

from flash_rc.config import load_recipe
from flash_rc.rc.decode import CycleAccuracy, DecodeRecipe, load_problems, main, problem_from_row, run_decode
from flash_rc.rc.state import ChainState, Turn


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


def test_accuracy_per_cycle_counts_missing_turns_as_wrong():
    def chain(*correct):
        c = ChainState(problem_id="p", sample_id=0, problem="x")
        for number, ok in enumerate(correct, 1):
            c.turns.append(Turn("reasoning", number, 2 * (number - 1), "", [], "", "", [], [], "stop", 0, 0,
                                correct=ok))
        return c

    # cycle 1: 2 of 4 right; cycle 2: 1 of 4 (the third chain failed after cycle 1, the fourth never started)
    accuracy = CycleAccuracy(2)
    for c in [chain(True, True), chain(True, False), chain(False), chain()]:
        accuracy.add(c)
    assert accuracy.per_cycle() == [0.5, 0.25]
    assert CycleAccuracy(3).per_cycle() == [0.0, 0.0, 0.0]


def test_problem_ids_stay_unique_across_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    problems = load_problems([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert [p.problem_id for p in problems] == ["a/0", "b/0"]
    assert load_problems(str(tmp_path / "a.jsonl"))[0].problem_id == "0"


def test_decode_end_to_end(tiny_model, gsm8k_dir, tmp_path, engine_slot):
    engine_slot.close()  # decode starts its own engine
    data = tmp_path / "problems.jsonl"
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:3]]
    rows.append({"question": "", "answer": "#### 0"})  # empty problem: a failed record, no engine call
    rows.append({"question": "long " * 3000, "answer": "#### 1"})  # longer than the context: fails alone
    data.write_text("\n".join(json.dumps(r) for r in rows))
    output = tmp_path / "out" / "chains.jsonl"
    recipe = load_recipe(DecodeRecipe, None, [
        f"data.val_files={data}", f"actor_rollout_ref.model.path={tiny_model}",
        "actor_rollout_ref.rollout.dtype=float32", "actor_rollout_ref.rollout.max_model_len=1024",
        "actor_rollout_ref.rollout.val_kwargs.n=2", "flash_rc.rc.num_cycles=2",
        "flash_rc.rc.max_thinking_tokens=16", "flash_rc.rc.max_summary_tokens=8", "flash_rc.engine.kv_cache_gib=0.25",
        f"flash_rc.decode.output={output}",
    ])
    summary = run_decode(recipe, progress=False)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert summary["chains"] == len(records) == 10 and summary["failed"] == 4
    by_status = {}
    for record in records:
        by_status.setdefault(record["status"], []).append(record)
    assert {r["error"] for r in by_status["failed"]} >= {"empty problem text"}
    assert any("context window" in r["error"] for r in by_status["failed"])
    for record in by_status["done"]:
        assert [t["metadata"]["turn_type"] for t in record["turns"]] == ["reasoning", "summarization"] * 2
        reasoning = [t for t in record["turns"] if t["turn_type"] == "reasoning"]
        assert all(t["correct"] is not None for t in reasoning)  # every reasoning turn was graded
    assert {(r["problem_id"], r["sample_id"]) for r in records} == {(str(i), s) for i in range(5) for s in range(2)}
    assert len(summary["accuracy_per_cycle"]) == 2


def test_cli_rejects_a_bad_key_before_starting(capsys):
    from flash_rc.config import ConfigError

    with pytest.raises(ConfigError, match="flash_rc.rc.num_cycle"):
        main(["data.val_files=x.jsonl", "flash_rc.rc.num_cycle=3"])
    with pytest.raises(ConfigError, match="data: Field required"):
        main([])
