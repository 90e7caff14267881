"""eval/sweep.py and ``flash-rc eval``: the pieces (problems, scoring, metrics, the results table, the settings hash)
in process, then real sweeps as a user runs them: the CLI in a subprocess (one engine per process) over two tiny-model
checkpoints on the real GSM8K test file with ``--limit 4``.

The checkpoints are the tiny model copied into ``run/global_step_N`` (each with the ``trainer_state.json`` that marks a
complete flash_rc checkpoint): step 3 with perturbed weights so that it generates differently from step 1, step 2 with
a NaN weight (its sync is refused), step 4 with a truncated safetensors file. The random tiny model never answers
GSM8K, so the accuracies are 0; what is checked is the files, the rows, the error handling and that the weights
streamed into the running engine are the checkpoint's (same generations as an engine started on it).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flash_rc.data.problems import Problem
from flash_rc.data.rows import make_row, write_parquet_atomic
from flash_rc.errors import ConfigError, RowError
from flash_rc.eval.sweep import COLUMNS, RC_REASONING_PROMPT, CycleResult, EvalProblem, ResultsTable, SampleResult, \
    SweepSettings, _CheckpointFailed, _score_sample, load_eval_problems, merge_verl_actor, metrics, settings_hash
from flash_rc.models import resolve_model

FLAGS = ["--limit", "4", "--max-tokens", "8", "--engine", "kv_cache_gib=0.25", "--no-progress"]


# ---------------------------------------------------------------------- pieces, in process


def test_problems_from_gsm8k_jsonl_get_verls_prompt(gsm8k_dir):
    problems = load_eval_problems(str(gsm8k_dir / "test.jsonl"), limit=2)
    assert len(problems) == 2 and problems[0].gsm8k
    first = problems[0].problem
    assert first.problem_id == "0" and first.ground_truth == "18" and first.data_source == "openai/gsm8k"
    (message,) = problems[0].messages
    assert message["role"] == "user"
    assert message["content"] == first.problem + ' Let\'s think step by step and output the final answer after "####".'
    assert len(load_eval_problems(str(gsm8k_dir / "test.jsonl"))) == 1319


def test_problems_from_verl_parquet_keep_the_rows_prompt(tmp_path):
    rows = [make_row("openai/gsm8k", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                     "math", "4", "test", 7, "#### 4", "What is 2+2?")]
    write_parquet_atomic(rows, tmp_path / "test.parquet")
    (problem,) = load_eval_problems(str(tmp_path / "test.parquet"))
    assert problem.messages == rows[0]["prompt"]
    assert (problem.problem.problem_id, problem.problem.problem, problem.problem.ground_truth) == ("7", "What is 2+2?",
                                                                                                  "4")


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q"}', r"bad\.jsonl:2: no ground truth"),
    ('{"answer": "#### 3"}', r"bad\.jsonl:2: no problem text"),
    ('{"question": "q", "answer": "#### 3"', r"bad\.jsonl:2: invalid JSON"),
    ('{"question": "q", "answer": "#### 3", "data_source": "nobody/knows"}',
     r"bad\.jsonl:2: no scorer for data_source"),
])
def test_a_bad_row_names_its_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "What is 1+1?", "answer": "#### 2"}\n' + line + "\n")
    with pytest.raises(RowError, match=message):
        load_eval_problems(str(path))


def _problem(truth="18", source="openai/gsm8k", gsm8k=True):
    return EvalProblem(Problem("p", "question", truth, source), [], gsm8k)


def test_samples_are_scored_strict_per_cycle_and_flexible_on_the_last(monkeypatch):
    monkeypatch.setenv("FLASH_RC_REWARD_WORKERS", "1")
    sample = SampleResult(_problem(), 0, [CycleResult("so #### 18", "I found 18."),
                                          CycleResult("The answer is 18 dollars", None)])
    asyncio.run(_score_sample(sample))
    # cycle 1 has "#### 18" (strict: right), cycle 2 only a bare 18 (strict: no answer; flexible: last number 18;
    # verl's flexible rule would read "18." before a full stop, hence "dollars")
    assert [(c.pred, c.correct) for c in sample.cycles] == [("18", True), (None, False)]
    assert sample.correct is False and sample.flexible_correct is True
    record = sample.record()
    assert record["final_pred"] is None and record["cycles"][0] == {"reasoning": "so #### 18", "summary": "I found 18.",
                                                                    "pred": "18", "correct": True}
    # another data source: its scorer's one verdict fills both (math_dapo reads "Answer: 18")
    other = SampleResult(_problem(source="math_dapo", gsm8k=False), 0, [CycleResult("Answer: 18", None)])
    asyncio.run(_score_sample(other))
    assert other.correct is True and other.flexible_correct is True


def _scored(problem_id, *correct_per_sample):
    problem = EvalProblem(Problem(problem_id, "q", "1", "openai/gsm8k"), [], True)
    return [SampleResult(problem, s, [CycleResult("r", None, None, ok) for ok in cycles], flexible_correct=cycles[-1])
            for s, cycles in enumerate(correct_per_sample)]


def test_metrics_mean_at_n_unbiased_pass_at_k_and_accuracy_per_cycle():
    settings = SweepSettings(n=2, k=2, temperature=1.0, mode="rc", cycles=2)
    # problem a: sample 0 right after cycle 2 only, sample 1 wrong throughout; problem b: both wrong
    results = [_scored("a", (False, True), (False, False)), _scored("b", (False, False), (True, False))]
    row = metrics(results, settings)
    # strict = 1 correct last turn / 4 samples; pass@1 = mean(1/2, 0); pass@2 of a = 1 - C(1,2)/C(2,2) = 1 -> mean 1/2
    assert (row["strict"], row["flexible"], row["pass_at_1"], row["pass_at_k"]) == (0.25, 0.25, 0.25, 0.5)
    # cycle 1: b's sample 1 right (1/4); cycle 2: a's sample 0 right (1/4)
    assert json.loads(row["accuracy_per_cycle"]) == [0.25, 0.25] and row["problems"] == 2
    assert metrics(results, SweepSettings(n=2, k=4, temperature=1.0, mode="rc", cycles=2))["pass_at_k"] is None


def test_rc_asks_for_gsm8ks_answer_format():
    assert 'output the final answer after "####".' in RC_REASONING_PROMPT and "boxed" not in RC_REASONING_PROMPT


def test_settings_hash_follows_the_settings_and_the_data_file(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    base = SweepSettings(data=str(data))
    assert len(settings_hash(base)) == 12 and settings_hash(base) == settings_hash(SweepSettings(data=str(data)))
    assert settings_hash(base) != settings_hash(SweepSettings(data=str(data), precision="int8"))
    assert settings_hash(base) != settings_hash(SweepSettings(data=str(data), limit=4))
    before = settings_hash(base)
    data.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "r", "answer": "#### 2"}\n')
    assert settings_hash(base) != before  # the file changed: its size (and mtime) are hashed


def test_results_table_appends_whole_rows_and_refuses_another_header(tmp_path):
    table = ResultsTable(tmp_path / "gsm8k.csv")
    table.append({"run": "r", "step": 1, "checkpoint": "/c/1", "settings_hash": "h", "strict": "0.5"})
    table.append({"run": "r", "step": 2, "checkpoint": "/c/2", "settings_hash": "h", "error": "bad weights"})
    lines = (tmp_path / "gsm8k.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 3
    reread = ResultsTable(tmp_path / "gsm8k.csv")
    assert reread.done("h") == {"/c/1"} and reread.done("other") == set()  # error rows are retried
    with (tmp_path / "gsm8k.csv").open("a") as handle:  # a torn append (power loss): dropped on the next open
        handle.write("r,3,/c/3,bf")
    assert len(ResultsTable(tmp_path / "gsm8k.csv").rows) == 2
    assert (tmp_path / "gsm8k.csv").read_text().splitlines() == lines
    other = tmp_path / "other.csv"
    other.write_text("run,step,accuracy\nr,1,0.5\n")
    with pytest.raises(ConfigError, match=r"other\.csv has another header \(run,step,accuracy"):
        ResultsTable(other)
    assert other.read_text() == "run,step,accuracy\nr,1,0.5\n"


# ---------------------------------------------------------------------- real sweeps, as a user runs them


def eval_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASH_RC_REWARD_WORKERS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "flash_rc.cli", "eval", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """run/global_step_1 (the tiny model), _2 (a NaN weight), _3 (perturbed weights), _4 (truncated safetensors),
    run/.global_step_5.tmp (a save in progress)."""
    run = tmp_path_factory.mktemp("ckpts") / "run"
    for step in (1, 2, 3, 4):
        shutil.copytree(resolve_model("tiny-qwen2"), run / f"global_step_{step}")
        (run / f"global_step_{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    weights = load_file(run / "global_step_1" / "model.safetensors")
    noise = torch.Generator().manual_seed(0)
    save_file({name: t + 0.05 * torch.randn(t.shape, generator=noise) for name, t in weights.items()},
              run / "global_step_3" / "model.safetensors", metadata={"format": "pt"})
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, run / "global_step_2" / "model.safetensors", metadata={"format": "pt"})
    truncated = run / "global_step_4" / "model.safetensors"
    os.truncate(truncated, truncated.stat().st_size // 2)
    shutil.copytree(run / "global_step_1", run / ".global_step_5.tmp")
    return run


@pytest.fixture(scope="module")
def sweep(checkpoints, gsm8k_dir):
    """One sweep over the run's checkpoints into the default output, <run>/eval."""
    done = eval_cli(str(checkpoints / "global_step_*"), "--data", str(gsm8k_dir / "test.jsonl"), *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def rows_of(directory: Path) -> list[dict[str, str]]:
    with (directory / "gsm8k.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_sweep_writes_a_row_and_generations_per_checkpoint(sweep, checkpoints):
    out = checkpoints / "eval"
    rows = rows_of(out)
    assert [(r["run"], r["step"], r["error"] == "") for r in rows] == [
        ("run", "1", True), ("run", "2", False), ("run", "3", True), ("run", "4", False)]
    good = [rows[0], rows[2]]
    for row in good:
        assert (row["precision"], row["mode"], row["n"], row["k"], row["cycles"], row["problems"]) == (
            "bf16", "single", "1", "1", "1", "4")
        assert row["checkpoint"] == str((checkpoints / f"global_step_{row['step']}").resolve())
        assert float(row["strict"]) == float(row["pass_at_1"]) == 0.0 and json.loads(row["accuracy_per_cycle"]) == [0]
        records = [json.loads(line) for line in (out / row["generations"]).read_text().splitlines()]
        assert sorted(r["problem_id"] for r in records) == ["0", "1", "2", "3"]
        assert {r["ground_truth"] for r in records if r["problem_id"] == "0"} == {"18"}
        assert all(len(r["cycles"]) == 1 and r["cycles"][0]["summary"] is None and r["correct"] is False
                   for r in records)
        assert row["generations"] == f"generations/run__step{row['step']}__bf16__single__{row['settings_hash']}.jsonl"
    assert texts(out / good[0]["generations"]) != texts(out / good[1]["generations"])  # step 3's weights streamed in
    # the NaN checkpoint: the sync refused it (engine untouched); the truncated one: unreadable. Error rows without
    # metrics or generations, and the sweep went on
    assert "weight sync refused" in rows[1]["error"] and "model.norm.weight: contains NaN or inf" in rows[1]["error"]
    assert "unreadable weights" in rows[3]["error"] and "incomplete metadata" in rows[3]["error"]
    assert rows[1]["strict"] == rows[1]["generations"] == rows[3]["generations"] == ""
    assert sorted(p.name for p in (out / "generations").iterdir()) == sorted(
        Path(r["generations"]).name for r in good)  # no temporary file left
    assert (out / "gsm8k.png").is_file() and (out / "report.html").is_file()
    # one sync (step 3; step 2's was refused) against the start-up
    assert "1 checkpoint(s) streamed in" in sweep.stdout and "s saved per checkpoint" in sweep.stdout


def texts(path: Path) -> dict[str, str]:
    return {r["problem_id"]: r["cycles"][0]["reasoning"] for r in map(json.loads, path.read_text().splitlines())}


def test_streamed_weights_generate_as_an_engine_started_on_them(sweep, checkpoints, gsm8k_dir, tmp_path):
    # step 3 was streamed in after step 2's refused sync; here an engine starts on it
    done = eval_cli(str(checkpoints / "global_step_3"), "--data", str(gsm8k_dir / "test.jsonl"), "--output",
                    str(tmp_path), *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    (fresh,) = rows_of(tmp_path)
    streamed = rows_of(checkpoints / "eval")[2]
    assert fresh["settings_hash"] == streamed["settings_hash"]
    assert texts(tmp_path / fresh["generations"]) == texts(checkpoints / "eval" / streamed["generations"])


def test_an_engine_never_starts_on_bad_weights(checkpoints, gsm8k_dir, tmp_path):
    done = eval_cli(str(checkpoints / "global_step_2"), "--data", str(gsm8k_dir / "test.jsonl"), "--output",
                    str(tmp_path), *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = rows_of(tmp_path)
    assert row["error"].startswith("weights refused: model.norm.weight: contains NaN or inf")
    assert "Loading safetensors" not in done.stderr


def test_a_rerun_skips_what_is_done_and_retries_error_rows(sweep, checkpoints, gsm8k_dir):
    before = rows_of(checkpoints / "eval")
    done = eval_cli(str(checkpoints), "--data", str(gsm8k_dir / "test.jsonl"), *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    after = rows_of(checkpoints / "eval")
    # steps 1 and 3 skipped; the broken steps 2 and 4 were tried again (and refused before any engine started)
    assert after[:4] == before and [(r["step"], r["error"] != "") for r in after[4:]] == [("2", True), ("4", True)]
    assert "2 checkpoint(s) evaluated, 2 already done" in done.stdout
    assert "Loading safetensors" not in done.stderr


def test_bad_input_is_one_line_and_a_nonzero_exit_before_the_engine_starts(sweep, checkpoints, gsm8k_dir,
                                                                           tmp_path):
    table = checkpoints / "eval" / "gsm8k.csv"
    before = table.read_text()
    data = ["--data", str(gsm8k_dir / "test.jsonl")]
    cases = [
        ([str(tmp_path / "nope" / "global_step_*"), *data], 2, "no checkpoint directories match"),
        ([str(checkpoints / "global_step_1"), "--data", str(tmp_path / "bad.jsonl")], 1, "bad.jsonl:1: invalid JSON"),
        ([str(checkpoints / "global_step_1"), *data, "--output", str(tmp_path / "other")], 2, "has another header"),
        ([str(checkpoints / "global_step_1"), *data, "--n", "4", "--temperature", "0"], 2,
         "greedy samples are all the same"),
        ([str(checkpoints / "global_step_1"), *data, "--cycles", "3"], 2, "--cycles 3 needs --mode rc"),
    ]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "gsm8k.csv").write_text("run,step\n")
    for args, status, message in cases:
        done = eval_cli(*args, *FLAGS, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == status and message in lines[-1] and lines[-1].startswith("flash-rc eval: error:"), \
            done.stderr[-2000:]
        assert "Loading safetensors" not in done.stderr  # refused before any engine started
    assert table.read_text() == before and (tmp_path / "other" / "gsm8k.csv").read_text() == "run,step\n"


def test_rc_mode_reports_accuracy_per_cycle_and_chains(checkpoints, gsm8k_dir, tmp_path):
    done = eval_cli(str(checkpoints / "global_step_1"), "--data", str(gsm8k_dir / "test.jsonl"), "--output",
                    str(tmp_path), "--mode", "rc", "--cycles", "2", "--n", "2", "--k", "2", "--temperature", "1",
                    "--max-summary-tokens", "8", *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = rows_of(tmp_path)
    assert (row["mode"], row["cycles"], row["n"], row["k"]) == ("rc", "2", "2", "2")
    assert len(json.loads(row["accuracy_per_cycle"])) == 2 and row["pass_at_k"] != ""
    records = [json.loads(line) for line in (tmp_path / row["generations"]).read_text().splitlines()]
    assert len(records) == 8 and {r["sample_id"] for r in records} == {0, 1}  # 4 problems x 2 chains
    for record in records:
        first, last = record["cycles"]
        assert first["summary"] and last["summary"] is None  # the last cycle is not summarized


def test_a_verl_actor_is_merged_once_and_a_failed_merge_is_the_checkpoints_error(tmp_path):
    actor = tmp_path / "run" / "global_step_1" / "actor"
    actor.mkdir(parents=True)
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"not a checkpoint")
    target = tmp_path / "eval" / "merged" / "run__step1"
    with pytest.raises(_CheckpointFailed, match=r"verl's model merger failed on .*actor: .*"):
        merge_verl_actor(actor, target)
    assert not target.exists() and not target.with_name(".run__step1.merging").exists()
    shutil.copytree(resolve_model("tiny-qwen2"), target)  # merged by an earlier sweep: reused as it is
    assert merge_verl_actor(actor, target) == target


@pytest.mark.slow
def test_ctrl_c_loses_only_the_checkpoint_in_flight(checkpoints, gsm8k_dir, tmp_path):
    command = [sys.executable, "-m", "flash_rc.cli", "eval", str(checkpoints / "global_step_1"),
               str(checkpoints / "global_step_3"), "--data", str(gsm8k_dir / "test.jsonl"), "--output", str(tmp_path),
               "--max-tokens", "64", "--engine", "kv_cache_gib=0.25", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASH_RC_REWARD_WORKERS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    table, generations = tmp_path / "gsm8k.csv", tmp_path / "generations"
    deadline = time.monotonic() + 600
    while not (generations.is_dir() and any(p.name.endswith(".tmp") and "step3" in p.name
                                             for p in generations.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before step 3 started"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # step 3 in flight (all 1319 problems), step 1 done
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "flash-rc eval: error: interrupted (SIGINT)"
    assert [row["step"] for row in rows_of(tmp_path)] == ["1"]
    assert [p.name for p in generations.iterdir()] == [Path(rows_of(tmp_path)[0]["generations"]).name]
    assert table.read_text().endswith("\n")
