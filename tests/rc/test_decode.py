"""flash-rc decode end to end on the real engine, real tokenizer and real GSM8K problems."""

from __future__ import annotations

import json

import pytest

from flash_rc.config import load_recipe
from flash_rc.rc.decode import DecodeRecipe, main, run_decode


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


@pytest.mark.parametrize("override, status, message", [
    ("actor_rollout_ref.rollout.val_kwargs.top_k=-5", 2, "val_kwargs.top_k: Input should be greater than or equal"),
    ("actor_rollout_ref.rollout.val_kwargs.temperature=3", 2, "val_kwargs.temperature: Input should be less than"),
    ("flash_rc.engine.kv_cache_gib=-1", 2, "flash_rc.engine.kv_cache_gib: Input should be greater than 0"),
    ("data.val_max_samples=0", 2, "no problems to decode"),
    ("flash_rc.decode.offset=99", 2, "no problems to decode"),
    ("flash_rc.decode.output={tmp}", 3, "is a directory"),
    ("flash_rc.decode.output={tmp}/a_file/out.jsonl", 3, "is a file, not a directory"),
])
def test_bad_input_is_one_line_before_the_engine_starts(tmp_path, capsys, monkeypatch, override, status, message):
    from flash_rc import cli
    from flash_rc.rollout import engine as engine_module

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine must not start for bad input")

    monkeypatch.setattr(engine_module.RolloutEngine, "__init__", no_engine)
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    (tmp_path / "a_file").write_text("x")
    assert cli.main(["decode", f"data.val_files={problems}", override.format(tmp=tmp_path)]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[0] + " ".join(err[1:]) and "Traceback" not in "\n".join(err)


def test_a_run_where_every_chain_fails_exits_1_and_keeps_the_records(tiny_model, tmp_path, capsys, engine_slot):
    from flash_rc import cli

    engine_slot.close()  # decode starts its own engine
    problems = tmp_path / "p.jsonl"
    problems.write_text("\n".join(json.dumps({"question": "long " * 400, "answer": "#### 1"}) for _ in range(2)))
    output = tmp_path / "out.jsonl"
    status = cli.main(["decode", "--no-progress", f"data.val_files={problems}",
                       f"actor_rollout_ref.model.path={tiny_model}", "actor_rollout_ref.rollout.max_model_len=128",
                       "flash_rc.engine.kv_cache_gib=0.25", f"flash_rc.decode.output={output}"])
    captured = capsys.readouterr()
    assert status == 1 and "every chain failed (first: PromptTooLongError" in captured.err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] == "failed" for r in records)

