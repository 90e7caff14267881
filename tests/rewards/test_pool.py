"""The reward pool's hard limits: hangs (even inside one C call) and crashes cost one job, never the batch."""

import asyncio
import os
import sys
import time

import pytest

from flash_rc.rewards import router
from flash_rc.rewards.pool import RewardPool, RewardPoolError
from flash_rc.rewards.router import ScoreRequest, ScoringJob, compute_score, compute_score_async, make_job, \
    score_batch

SLACK_S = 1.0  # kill, requeue and scheduling delays on a loaded 2-core CI machine; typically ~10 ms


def job(scorer: str, response: str, ground_truth: str = "ok", timeout_s: float = 0.5) -> ScoringJob:
    return ScoringJob(scorer, response, ground_truth, None, {}, 0.0, timeout_s)


def scores(pool: RewardPool, jobs: list[ScoringJob]) -> list[dict]:
    return [future.result(timeout=60) for future in pool.submit_many(jobs)]


@pytest.mark.parametrize("response", ["busy", "regex", "sleep"])
def test_a_hung_job_times_out_at_its_limit(pool, scripted_scorer, response):
    scores(pool, [job(scripted_scorer, "warm-up")])  # import the scorer file outside the measured call
    start = time.monotonic()
    [result] = scores(pool, [job(scripted_scorer, response, timeout_s=0.5)])
    elapsed = time.monotonic() - start
    assert result == {"score": 0.0, "acc": False, "pred": None, "reason": "timeout"}
    assert 0.5 <= elapsed < 0.5 + SLACK_S  # the limit plus a SIGKILL


@pytest.mark.parametrize("response", ["exit", "segfault"])
def test_a_crashing_job_is_reported_and_the_worker_replaced(pool, scripted_scorer, response):
    pids_before = set(pool.worker_pids())
    results = scores(pool, [job(scripted_scorer, "ok"), job(scripted_scorer, response), job(scripted_scorer, "ok")])
    assert [r["reason"] for r in results] == ["scripted", "worker_crashed", "scripted"]
    assert len(set(pool.worker_pids()) - pids_before) == 1  # one fresh worker


def test_one_hang_in_a_chunk_costs_only_that_job(pool, scripted_scorer):
    """Results are sent in batches, so the pool must know which job hung, not blame the first unreported one."""
    responses = ["ok"] * 60 + ["busy"] + ["ok"] * 60
    start = time.monotonic()
    results = scores(pool, [job(scripted_scorer, r, timeout_s=0.5) for r in responses])
    assert [r["reason"] for r in results] == ["scripted"] * 60 + ["timeout"] + ["scripted"] * 60
    assert time.monotonic() - start < 0.5 + SLACK_S


def test_many_hangs_run_in_parallel(pool, scripted_scorer, tmp_path):
    """Hung jobs that shared a chunk are retried on different workers at once, not one after another."""
    log, limit = tmp_path / "starts.log", 1.5
    scores(pool, [job(scripted_scorer, "warm-up")])
    pool.wait_ready()
    hangs = [job(scripted_scorer, "busy-logged", str(log), timeout_s=limit) for _ in range(4)]
    results = scores(pool, hangs + [job(scripted_scorer, "ok")])
    assert [r["reason"] for r in results] == ["timeout"] * 4 + ["scripted"]
    starts = sorted(float(line) for line in log.read_text().split())
    # two workers, two rounds: within a round both hangs run together (start less than a limit apart); in sequence
    # the second would start only after the first was killed, a full limit later
    assert starts[1] - starts[0] < limit and starts[3] - starts[2] < limit
    assert starts[2] - starts[1] >= limit


def test_scorer_exceptions_become_results(pool, scripted_scorer):
    results = scores(pool, [job(scripted_scorer, "raise"), job(scripted_scorer, "float"), job(scripted_scorer, "ok")])
    assert results == [
        {"score": 0.0, "acc": False, "pred": None, "reason": "error: ValueError: bad ground truth"},
        {"score": 0.25, "acc": True, "pred": None, "reason": "ok"},  # a float return is normalised
        {"score": 1.0, "acc": True, "pred": "ok", "reason": "scripted"},
    ]


def test_scorer_kwargs_reach_the_scorer(pool, scripted_scorer):
    scored = ScoringJob(scripted_scorer, "ok", "ok", None, {"bonus": 0.5}, 0.0, 1.0)
    assert scores(pool, [scored])[0]["score"] == 1.5


def test_large_batches_keep_order(pool):
    requests = [ScoreRequest("openai/gsm8k", f"#### {i}", str(i % 7)) for i in range(3000)]
    results = score_batch(requests, pool=pool)
    assert [r["acc"] for r in results] == [i == i % 7 for i in range(3000)]


def test_killed_code_run_leaves_nothing(pool, marker, become_sleeper, wait_until_gone):
    """The pool kills a worker in the middle of a sandboxed run: the program and the worker's files must go."""
    program = f"import os, sys\n{become_sleeper}"
    # The sandbox alone would allow the test 1 s (code_tests' default); the pool's 0.5 s limit for the call wins.
    request = ScoreRequest("codegen__hang", f"```python\n{program}\n```", '[{"expected_output": "1"}]', None,
                           {"timeout_s": 0.5})
    scratch_dirs = [w.scratch_dir for w in pool._workers]
    start = time.monotonic()
    [result] = score_batch([request], pool=pool)
    assert result["reason"] == "timeout" and time.monotonic() - start < 0.5 + SLACK_S
    assert wait_until_gone(marker) == []
    assert sum(os.path.exists(d) for d in scratch_dirs) == 1  # the killed worker's scratch dir is gone


def test_close_kills_workers_and_removes_their_files(scripted_scorer, pid_alive):
    pool = RewardPool(num_workers=2)
    scores(pool, [job(scripted_scorer, "ok")])
    pids, dirs = pool.worker_pids(), [w.scratch_dir for w in pool._workers]
    pending = pool.submit(job(scripted_scorer, "sleep", timeout_s=30))
    time.sleep(0.2)
    pool.close()
    with pytest.raises(RewardPoolError, match="closed"):
        pending.result(timeout=5)
    assert not any(pid_alive(pid) for pid in pids)
    assert not any(os.path.exists(d) for d in dirs)
    with pytest.raises(RewardPoolError, match="closed"):
        pool.submit(job(scripted_scorer, "ok"))


def test_cancelled_async_callers_leave_the_pool_serving(monkeypatch, scripted_scorer, wait_until):
    """verl's async reward loop may give up on calls (asyncio.wait_for): the calls around them still complete."""
    with RewardPool(num_workers=1) as pool:
        monkeypatch.setattr(router, "_default_pool", pool)  # compute_score_async submits here
        busy = pool.submit(job(scripted_scorer, "busy", timeout_s=1.0))
        wait_until(busy.running)  # the only worker is taken for 1 s: every call below waits in the queue

        async def main():
            calls = [compute_score_async("openai/gsm8k", f"#### {i}", str(i)) for i in range(6)]
            # odd calls give up after 0.05 s, which cancels their queued futures; even ones wait for their result
            waits = [asyncio.wait_for(call, timeout=0.05 if i % 2 else 60) for i, call in enumerate(calls)]
            return await asyncio.gather(*waits, return_exceptions=True)

        results = asyncio.run(main())
        assert all(isinstance(result, TimeoutError) for result in results[1::2])
        assert [result["reason"] for result in results[::2]] == ["correct"] * 3
        assert busy.result(timeout=0)["reason"] == "timeout"
        assert compute_score("openai/gsm8k", "#### 7", "7")["acc"]  # the dispatcher is alive and serving
        assert not pool._queue


def test_cancelled_futures_do_not_stop_close_failing_the_rest(scripted_scorer, wait_until):
    """close() fails every queued future; one a caller cancelled must be skipped, not abort the others."""
    pool = RewardPool(num_workers=1)
    running = pool.submit(job(scripted_scorer, "sleep", timeout_s=30))
    wait_until(running.running)  # the only worker is taken: the jobs below stay queued
    queued = pool.submit_many([job(scripted_scorer, "ok") for _ in range(6)])
    assert all(future.cancel() for future in queued[::2])
    pool.close()
    for future in [running, *queued[1::2]]:
        with pytest.raises(RewardPoolError, match="closed"):
            future.result(timeout=5)
    assert all(future.cancelled() for future in queued[::2])


def test_workers_that_cannot_start_fail_loudly(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # every worker exits at once
    pool = RewardPool(num_workers=1)
    try:
        future = pool.submit(make_job(ScoreRequest("openai/gsm8k", "#### 1", "1")))
        with pytest.raises(RewardPoolError, match="keep dying during startup"):
            future.result(timeout=10)
    finally:
        pool.close()


def test_wait_ready(scripted_scorer, pid_alive):
    with RewardPool(num_workers=2) as pool:
        pool.wait_ready()
        assert all(pid_alive(pid) for pid in pool.worker_pids())
        scores(pool, [job(scripted_scorer, "exit")])  # one worker dies and is replaced
        pool.wait_ready(timeout_s=30)
        assert len(pool.worker_pids()) == 2 and all(pid_alive(pid) for pid in pool.worker_pids())


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
