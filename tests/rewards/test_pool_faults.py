"""Fault injection against a real reward pool (real worker processes): the contract a long training run leans on.

* one bad request -- unpicklable, hostile, or a scorer that raises, hangs, exits or segfaults -- fails alone, with a
  stable reason, while the rest of its batch scores correctly;
* the pool heals: the next call after any fault is served;
* workers killed from outside cost at most the job they were running; a deleted scratch dir is recreated;
* nothing is left behind: no worker process and no scratch dir, after close() and after the caller is killed.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from flash_rc.rewards import router
from flash_rc.rewards.pool import RewardPool
from flash_rc.rewards.router import ScoreRequest, ScorerRoute, make_job, register_scorer, score_batch
from flash_rc.rewards.types import ScoringJob

ROUTE = "faults__scripted"  # the scripted scorer (conftest.TEST_SCORERS): the response text picks the misbehaviour
OK = {"score": 1.0, "acc": True, "pred": "ok", "reason": "scripted"}
CODE_TESTS = json.dumps([{"stdin": "2", "expected_output": "4"}])
DOUBLING_PROGRAM = "```python\nprint(int(input()) * 2)\n```"


@pytest.fixture(autouse=True)
def scripted_route(monkeypatch, scripted_scorer):
    monkeypatch.setattr(router, "_registered_exact", {})
    monkeypatch.setattr(router, "_registered_prefixes", {})
    register_scorer(ROUTE, ScorerRoute(scripted_scorer, timeout_s=0.5))


def scripted(response: str, ground_truth: str = "ok", extra_info=None) -> ScoreRequest:
    return ScoreRequest(ROUTE, response, ground_truth, extra_info)


def assert_serving(pool) -> None:
    assert score_batch([scripted("ok"), ScoreRequest("openai/gsm8k", "#### 7", "7")], pool=pool) == [
        OK, {"score": 1.0, "acc": True, "pred": "7", "reason": "correct"}]


class FailsToUnpickle:
    """Pickles fine in the caller; unpickling it in the worker raises (like a class the worker cannot import)."""

    def __reduce__(self):
        return int, ("not a number",)


def nested(depth: int) -> dict:
    info: dict = {}
    for _ in range(depth):
        info = {"a": info}
    return info


BAD_EXTRA_INFO = {
    "a lock": {"lock": threading.Lock()},
    "a generator": {"rows": (i for i in range(3))},
    "fails to unpickle in the worker": {"value": FailsToUnpickle()},
    "nested 100,000 deep": nested(100_000),
}


@pytest.mark.parametrize("extra_info", BAD_EXTRA_INFO.values(), ids=BAD_EXTRA_INFO.keys())
def test_a_request_that_cannot_reach_a_worker_fails_alone(pool, extra_info):
    results = score_batch([scripted("ok"), scripted("ok", extra_info=extra_info), scripted("ok")], pool=pool)
    assert results[0] == results[2] == OK
    assert results[1]["score"] == 0.0 and results[1]["reason"].startswith("bad_request: ")
    assert_serving(pool)


SCORER_FAULTS = {  # response -> reason
    "raise": "error: ValueError: bad ground truth",
    "busy": "timeout",  # a pure-Python loop
    "regex": "timeout",  # catastrophic backtracking: one C call holding the GIL
    "sleep": "timeout",
    "exit": "worker_crashed",  # os._exit
    "segfault": "worker_crashed",  # SIGSEGV
    "ctypes-segfault": "worker_crashed",  # a real invalid read in C
}


@pytest.mark.parametrize("response, reason", SCORER_FAULTS.items(), ids=SCORER_FAULTS.keys())
def test_a_misbehaving_scorer_costs_only_its_own_job(pool, response, reason):
    requests = [scripted("ok")] * 5 + [scripted(response)] + [scripted("ok")] * 5
    results = score_batch(requests, pool=pool)
    assert results[:5] == results[6:] == [OK] * 5
    assert results[5] == {"score": 0.0, "acc": False, "pred": None, "reason": reason}
    assert_serving(pool)


HOSTILE_RESPONSES = {  # responses the real GSM8K scorer must still grade: each ends with the right answer
    "20 MB": "x" * 20_000_000 + " #### 5",
    "NUL bytes": "\0" * 10_000 + " #### 5",
    "invalid UTF-8 bytes": b"\xff\xfe\xc3\x28 #### 5",
    "lone surrogates": "\ud800\udfff #### 5",
}


@pytest.mark.parametrize("response", HOSTILE_RESPONSES.values(), ids=HOSTILE_RESPONSES.keys())
def test_hostile_responses_are_graded(pool, response):
    results = score_batch([scripted("ok"), ScoreRequest("openai/gsm8k", response, "5"), scripted("ok")], pool=pool)
    assert results == [OK, {"score": 1.0, "acc": True, "pred": "5", "reason": "correct"}, OK]


@pytest.mark.parametrize("timeout_s", [math.nan, math.inf, -1.0, 0, "1", True, None, 1e9])
def test_unenforceable_time_limits_are_refused_when_submitted(pool, scripted_scorer, timeout_s):
    with pytest.raises(ValueError, match="timeout_s must be positive and finite"):
        make_job(ScoreRequest(ROUTE, "ok", "ok", None, {"timeout_s": timeout_s}))
    with pytest.raises(ValueError, match="timeout_s must be positive and finite"):
        ScoringJob(scripted_scorer, "ok", "ok", None, {}, 0.0, timeout_s)
    with pytest.raises(ValueError, match="timeout_s must be positive and finite"):
        ScorerRoute(scripted_scorer, timeout_s=timeout_s)
    assert_serving(pool)


def test_missing_ground_truths_score_zero_on_every_route(pool):
    routes = [("openai/gsm8k", "#### None"), ("math_dapo", "Answer: None"), ("math_dapo", "\\boxed{None}"),
              ("lighteval/MATH", "\\boxed{None}"), ("codegen__toy", DOUBLING_PROGRAM)]
    requests = [ScoreRequest(data_source, response, ground_truth)
                for data_source, response in routes for ground_truth in (None, "", "  ", math.nan)]
    assert score_batch(requests, pool=pool) == [
        {"score": 0.0, "acc": False, "pred": None, "reason": "no_ground_truth"}] * len(requests)


def dispatcher_cpu_s(pool) -> float:
    """CPU seconds the dispatcher thread has used (utime + stime of its /proc task)."""
    with open(f"/proc/self/task/{pool._thread.native_id}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("response", ["sleep", "busy"])
def test_the_dispatcher_sleeps_while_a_job_runs(pool, scripted_scorer, response):
    """It blocks until a message, a new job or the next deadline; it once spun on a zero wait (4 s CPU in 4.2 s)."""
    job = ScoringJob(scripted_scorer, response, "ok", None, {}, 0.0, 1.5)
    assert_serving(pool)
    before, start = dispatcher_cpu_s(pool), time.monotonic()
    assert pool.submit(job).result(timeout=30)["reason"] == "timeout"
    waited, used = time.monotonic() - start, dispatcher_cpu_s(pool) - before
    assert waited >= 1.5 and used < 0.1 * waited


def freeze(pool) -> list[int]:
    """SIGSTOP every worker: chunks sent to them now wait in their sockets, never started."""
    pids = pool.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def test_workers_killed_before_starting_their_jobs_charge_nobody(pool):
    assert_serving(pool)
    pids = freeze(pool)
    futures = pool.submit_many([make_job(scripted("ok")) for _ in range(8)])
    time.sleep(0.2)  # the dispatcher sends both workers a chunk
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert [future.result(timeout=60) for future in futures] == [OK] * 8
    assert not set(pids) & set(pool.worker_pids())


def test_a_worker_killed_mid_job_charges_only_that_job(pool, wait_until):
    assert_serving(pool)
    sleeper = make_job(ScoreRequest(ROUTE, "sleep", "ok", None, {"timeout_s": 30.0}))
    futures = pool.submit_many([sleeper] + [make_job(scripted("ok")) for _ in range(6)])

    def sleeping_worker():
        return next((w for w in pool._workers if w.chunk and w.chunk[0].future is futures[0]
                     and w.running_position() == 1), None)

    wait_until(sleeping_worker)
    os.kill(sleeping_worker().process.pid, signal.SIGKILL)
    results = [future.result(timeout=60) for future in futures]
    assert results[0]["reason"] == "worker_crashed" and results[1:] == [OK] * 6


def test_deleted_scratch_dirs_are_recreated(pool):
    """A tmp cleaner on a long run may delete a worker's scratch dir; its code runs must keep working."""
    code = ScoreRequest("codegen__toy", DOUBLING_PROGRAM, CODE_TESTS)
    passed = {"score": 2.0, "acc": True, "pred": "print(int(input()) * 2)",
              "reason": "all_passed passed=1 total=1 timeouts=0 failures=0"}
    assert score_batch([code, code], pool=pool) == [passed] * 2
    for worker in pool._workers:
        shutil.rmtree(worker.scratch_dir)
    assert score_batch([code] * 4, pool=pool) == [passed] * 4
    assert_serving(pool)


def test_close_after_faults_leaves_no_process_and_no_scratch_dir(pid_alive, wait_until_gone):
    pool = RewardPool(num_workers=2)
    seen_pids, seen_dirs = set(), set()
    for response in ("exit", "sleep", "ok"):
        seen_pids |= set(pool.worker_pids())
        seen_dirs |= {worker.scratch_dir for worker in pool._workers}
        score_batch([scripted(response), scripted("ok")], pool=pool)
    seen_pids |= set(pool.worker_pids())
    seen_dirs |= {worker.scratch_dir for worker in pool._workers}
    pool.close()
    assert not [pid for pid in seen_pids if pid_alive(pid)]
    assert not [d for d in seen_dirs if os.path.exists(d)]
    assert all(wait_until_gone(d) == [] for d in seen_dirs)


CALLER = textwrap.dedent("""
    import json, sys
    from flash_rc.rewards.pool import RewardPool
    from flash_rc.rewards.types import ScoringJob

    pool = RewardPool(num_workers=2)
    assert pool.submit(ScoringJob(sys.argv[1], "ok", "ok", None, {}, 0.0, 30.0)).result()["acc"]
    pool.submit(ScoringJob(sys.argv[1], "sleep", "ok", None, {}, 0.0, 30.0))  # one worker busy, one idle
    print(json.dumps({"pids": pool.worker_pids(), "dirs": [w.scratch_dir for w in pool._workers]}), flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_caller_leaves_no_worker_and_no_scratch_dir(scripted_scorer, pid_alive, wait_until, signum):
    """No atexit runs on SIGTERM's default action or SIGKILL: each worker cleans up itself when its parent goes."""
    caller = subprocess.Popen([sys.executable, "-c", CALLER, scripted_scorer], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(caller.stdout.readline())
        time.sleep(0.2)  # the sleep job is running
        caller.send_signal(signum)
        assert caller.wait(timeout=10) == -signum
        wait_until(lambda: not any(pid_alive(pid) for pid in started["pids"]), timeout_s=5)
        wait_until(lambda: not any(os.path.exists(d) for d in started["dirs"]), timeout_s=5)
    finally:
        caller.kill()
        caller.wait()
