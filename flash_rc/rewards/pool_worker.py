"""Entry point of one reward-pool worker: ``python -m flash_rc.rewards.pool_worker <socket fd> <progress file>``.

Why its own tiny module: the worker must start fast (it is respawned after every timeout) and must not import the
caller's ``__main__``; it imports the cheap built-in scorers up front and anything else (math-verify, user scorer
files) when a chunk first needs it -- announced with ``importing``, so import time never eats a job's time limit.

Protocol. Messages are pickled tuples over the socket: worker -> ``("ready",)`` once; parent ->
``("chunk", [ScoringJob, ...])``; worker -> optionally ``("importing",)`` ... ``("imported",)``, then
``("results", [RewardResult, ...])`` in job order, batched (one message per ``FLUSH_INTERVAL_S`` and at the end of
the chunk). Which job is running, and since when, is not a message: before each job the worker writes its start
time and its running count of started jobs into the shared ``pool.JobProgress`` file, which the parent reads when a
deadline is due -- so batching results never hides a hung job. The worker exits on EOF, and a watchdog thread exits
it if its parent dies (the parent normally kills it first).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from multiprocessing.connection import Connection

from flash_rc.rewards.format import add_format_reward
from flash_rc.rewards.pool import JobProgress
from flash_rc.rewards.router import load_scorer
from flash_rc.rewards.types import RewardResult, ScoringJob, as_text, failed_result, normalize_result

PRELOADED_SCORERS = ("flash_rc.rewards.gsm8k:compute_score", "flash_rc.rewards.math_dapo:compute_score")
FLUSH_INTERVAL_S = 0.002  # results of cheap jobs share one message per 2 ms
MAX_ERROR_CHARS = 500


def score_job(job: ScoringJob) -> RewardResult:
    """Run one job; a scorer exception becomes score 0 with the error as reason (one bad row must not stop a run)."""
    try:
        solution = as_text(job.solution_str)
        result = normalize_result(load_scorer(job.scorer)(solution, job.ground_truth, extra_info=job.extra_info,
                                                          **job.kwargs))
        if job.format_weight:
            result = add_format_reward(result, solution, job.format_weight)
        return result
    except Exception as exc:  # noqa: BLE001 - reported in the result, see docstring
        return failed_result(f"error: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _import_scorers(conn: Connection, targets: set[str], loaded: set[str]) -> None:
    conn.send(("importing",))
    for target in targets:
        try:
            load_scorer(target)
        except Exception:  # noqa: BLE001 - score_job reports the same error for each of its jobs
            pass
    loaded.update(targets)
    conn.send(("imported",))


def main(argv: list[str]) -> None:
    conn, progress = Connection(int(argv[0])), JobProgress(argv[1])
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    loaded = set(PRELOADED_SCORERS)
    for target in loaded:
        load_scorer(target)
    conn.send(("ready",))
    started = 0
    while True:
        try:
            _, jobs = conn.recv()
        except EOFError:
            return
        new_targets = {job.scorer for job in jobs} - loaded
        if new_targets:
            _import_scorers(conn, new_targets, loaded)
        results, last_flush = [], time.monotonic()
        for job in jobs:
            started += 1
            progress.job_started(started)
            results.append(score_job(job))
            if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                conn.send(("results", results))
                results, last_flush = [], time.monotonic()
        if results:
            conn.send(("results", results))


if __name__ == "__main__":
    main(sys.argv[1:])
