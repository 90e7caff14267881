"""Entry point of one reward-pool worker: ``python -m flash_rc.rewards.pool_worker <socket fd> <scratch dir>``.

Why its own tiny module: the worker must start fast (it is respawned after every timeout) and must not import the
caller's ``__main__``; it imports the cheap built-in scorers up front and anything else (math-verify, user scorer
files) when a chunk first needs it -- announced with ``importing``, so import time never eats a job's time limit.

Protocol. Messages are pickled tuples over the socket: worker -> ``("ready",)`` once; parent ->
``("chunk", [(scorer target, pickled ScoringJob), ...])``; worker -> optionally ``("importing",)`` ...
``("imported",)``, then ``("results", [RewardResult, ...])`` in job order, batched (one message per
``FLUSH_INTERVAL_S`` and at the end of the chunk). Which job is running, and since when, is not a message: before each
job the worker writes its start time and its running count of started jobs into the shared ``pool.JobProgress`` file
(in the scratch dir), which the parent reads when a deadline is due -- so batching results never hides a hung job.
Each job is unpickled once started, so a job that cannot be rebuilt here scores ``bad_request`` on its own.

The scratch dir is the worker's sandbox dir, and the worker deletes it when it exits: on EOF (its parent closed the
socket, i.e. died) and from a watchdog thread when its parent dies while a job runs. The parent deletes it too when it
kills the worker; only both being SIGKILLed leaves it behind.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import threading
import time
from multiprocessing.connection import Connection

from flash_rc.rewards.format import add_format_reward
from flash_rc.rewards.pool import JobProgress
from flash_rc.rewards.router import load_scorer
from flash_rc.rewards.types import RewardResult, as_text, error_result, normalize_result

PRELOADED_SCORERS = ("flash_rc.rewards.gsm8k:compute_score", "flash_rc.rewards.math_dapo:compute_score")
FLUSH_INTERVAL_S = 0.002  # results of cheap jobs share one message per 2 ms
ORPHAN_CHECK_S = 1.0


def score_job(payload: bytes) -> RewardResult:
    """Run one pickled job; any exception becomes score 0 with the error as reason (one bad row must not stop a run)."""
    try:
        job = pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - e.g. a class in extra_info that only the caller can import
        return error_result("bad_request", exc)
    try:
        solution = as_text(job.solution_str)
        result = normalize_result(load_scorer(job.scorer)(solution, job.ground_truth, extra_info=job.extra_info,
                                                          **job.kwargs))
        if job.format_weight:
            result = add_format_reward(result, solution, job.format_weight)
        return result
    except Exception as exc:  # noqa: BLE001 - reported in the result, see docstring
        return error_result("error", exc)


def _exit_when_orphaned(parent_pid: int, scratch_dir: str) -> None:
    """The main thread may be inside a job for minutes; the worker must still go (and clean up) when its parent does."""
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_CHECK_S)
    shutil.rmtree(scratch_dir, ignore_errors=True)
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


def serve(conn: Connection, progress: JobProgress) -> None:
    """Score chunks until the parent closes the socket."""
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
        new_targets = {scorer for scorer, _ in jobs} - loaded
        if new_targets:
            _import_scorers(conn, new_targets, loaded)
        results, last_flush = [], time.monotonic()
        for _, payload in jobs:
            started += 1
            progress.job_started(started)
            results.append(score_job(payload))
            if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                conn.send(("results", results))
                results, last_flush = [], time.monotonic()
        if results:
            conn.send(("results", results))


def main(argv: list[str]) -> None:
    conn, scratch_dir = Connection(int(argv[0])), argv[1]
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(), scratch_dir), daemon=True).start()
    try:
        serve(conn, JobProgress(JobProgress.path_in(scratch_dir)))
    except (BrokenPipeError, ConnectionResetError):  # the parent died while results were on their way: as EOF
        pass
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
