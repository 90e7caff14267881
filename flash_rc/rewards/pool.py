"""A process pool that scores jobs fast and kills any job that overruns its wall-clock limit.

Why not ``concurrent.futures`` or SIGALRM: a timed-out future keeps its worker busy forever, SIGALRM only works on
the main thread (verl scores from Ray actors, threads and asyncio loops), and a C-level hang ignores Python signals.
The only limit that always holds is killing the process. So:

* each worker is a plain subprocess (``python -m flash_rc.rewards.pool_worker``) in its own session, talking over
  a socketpair -- no fork of the (threaded) caller, no ``__main__`` re-import;
* each job is pickled when it is submitted, in the caller's thread, so one that cannot cross to a worker (a lock in
  its ``extra_info``) scores ``bad_request`` alone instead of failing the dispatcher's send of a whole chunk; the
  worker unpickles it when it starts it, so one that cannot be rebuilt there fails alone too;
* a dispatcher thread hands each idle worker a chunk of jobs and gets results back in batches, so thousands of cheap
  GSM8K jobs cost a few round trips; which job is running, and since when, the worker writes into a small shared
  file (``JobProgress``) that the dispatcher reads when a deadline is due;
* when the running job passes its deadline the dispatcher SIGKILLs the worker's process group, records ``timeout``
  for that job, puts every other unfinished job of the chunk back at the head of the queue and starts a replacement
  worker; a worker that dies on its own gives ``worker_crashed`` the same way -- to the job it was running, and to
  no job if it had not started one (killed from outside). A timeout therefore costs its limit plus a kill
  (milliseconds) and other workers keep going meanwhile;
* each worker gets its own sandbox scratch directory, deleted whenever the worker goes -- by the dispatcher when it
  kills the worker, by the worker itself when its parent dies (SIGTERM runs no ``atexit``) -- so a killed code run
  leaves no files behind.

Use it through ``flash_rc.rewards.router`` (``compute_score``/``score_batch``); ``submit``/``submit_many`` return
``concurrent.futures.Future`` objects (``asyncio.wrap_future`` makes them awaitable). A caller may cancel a future
whose job has not started (an awaiting task that gives up does): the pool skips that job and serves the rest.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import mmap
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from flash_rc.rewards.types import RewardResult, ScoringJob, error_result, failed_result

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # a worker must report ready within this
IMPORT_TIMEOUT_S = 120.0  # a chunk's scorers must import within this (math-verify pulls in sympy)
MAX_CHUNK = 64  # jobs per round trip; smaller chunks spread a short batch over all workers
MAX_STARTUP_FAILURES = 3  # consecutive workers dying before "ready" -> the pool is broken
MAX_REQUEUES = 3
"""How often a job may go back to the queue because its worker died before reporting it without being charged; one
more and it scores ``worker_crashed`` (a job whose scorer import kills every worker must not loop forever)."""


class RewardPoolError(RuntimeError):
    """The pool is closed or cannot start workers."""


class JobProgress:
    """Two int64 in a shared file: jobs started so far, and ``time.monotonic_ns()`` when the latest one started.

    CLOCK_MONOTONIC is system-wide, so the parent can compare it with its own clock. The start time is written
    before the count, and the reader re-reads the count to discard a torn read.
    """

    LAYOUT = struct.Struct("<qq")

    @staticmethod
    def path_in(scratch_dir: str) -> str:
        return os.path.join(scratch_dir, "progress")

    def __init__(self, path: str):
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self.LAYOUT.size)

    @classmethod
    def create(cls, path: str) -> JobProgress:
        with open(path, "wb") as f:
            f.write(bytes(cls.LAYOUT.size))
        return cls(path)

    def job_started(self, started: int) -> None:
        self._map[8:16] = struct.pack("<q", time.monotonic_ns())
        self._map[0:8] = struct.pack("<q", started)

    def read(self) -> tuple[int, float]:
        """(jobs started so far, monotonic start time of the latest in seconds)."""
        while True:
            started, start_ns = self.LAYOUT.unpack(self._map[:16])
            if struct.unpack("<q", self._map[0:8])[0] == started:
                return started, start_ns / 1e9

    def close(self) -> None:
        self._map.close()


@dataclass
class _Pending:
    job: ScoringJob
    payload: bytes
    """``job`` pickled at submission: what the worker receives."""
    future: Future
    requeues: int = 0
    """Times it was in a chunk whose worker died before reporting it. Once requeued it is sent alone, so that several
    hung jobs from one chunk run on different workers in parallel instead of one after another."""


def _claim(future: Future) -> bool:
    """Whether the pool may resolve ``future``: True once it is running, False if its caller cancelled it.

    Callers cancel futures that are still queued (``asyncio.wait_for`` giving up on ``compute_score_async`` does).
    ``set_running_or_notify_cancel`` moves a pending future to running atomically with ``cancel()``, after which
    ``cancel()`` fails, so resolving a claimed future can never raise ``InvalidStateError`` -- a ``done()`` check
    would race with the caller. Only the dispatcher thread claims and resolves futures, each exactly once (and
    ``submit_many`` a job it cannot serialise, before its caller has the future).
    """
    return future.running() or future.set_running_or_notify_cancel()


def _finish(future: Future, result: RewardResult) -> None:
    if _claim(future):
        future.set_result(result)


def _pending(job: ScoringJob, future: Future) -> _Pending | None:
    """``job`` serialised for a worker now, in the caller's thread; None, with ``future`` resolved as ``bad_request``,
    if it cannot be (an unpicklable ``extra_info``, nesting deeper than pickle's recursion limit)."""
    try:
        return _Pending(job, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL), future)
    except Exception as exc:  # noqa: BLE001 - whatever pickle raises, only this job fails
        _finish(future, error_result("bad_request", exc))
        return None


def _fail(pending: Iterable[_Pending], reason: str) -> None:
    for p in pending:
        if _claim(p.future):
            p.future.set_exception(RewardPoolError(reason))


@dataclass(eq=False)  # identity semantics: workers are looked up with `in` / index()
class _Worker:
    process: subprocess.Popen
    conn: Connection
    scratch_dir: str
    progress: JobProgress
    spawned_at: float
    ready: bool = False
    chunk: collections.deque[_Pending] = field(default_factory=collections.deque)
    """Jobs sent to this worker whose results have not arrived yet, in order."""
    results_received: int = 0
    """Results received over the worker's life; ``progress`` counts jobs started over its life."""
    importing: bool = False
    waiting_since: float = 0.0
    """When the chunk was sent (or its imports finished): the clock for a job that has not started yet."""

    def running_position(self) -> int:
        """How many jobs of ``chunk`` have started (the last of them is the one running now)."""
        started, _ = self.progress.read()
        return started - self.results_received

    def deadline(self) -> float:
        if not self.ready:
            return self.spawned_at + STARTUP_TIMEOUT_S
        if not self.chunk:
            return math.inf
        if self.importing:
            return self.waiting_since + IMPORT_TIMEOUT_S
        started, started_at = self.progress.read()
        position = started - self.results_received
        if position <= 0:  # sent, not started yet: transfer time counts against the first job
            return self.waiting_since + self.chunk[0].job.timeout_s
        return started_at + self.chunk[position - 1].job.timeout_s


class RewardPool:
    """``num_workers`` scoring processes with per-job hard time limits. Thread-safe; close() when done."""

    def __init__(self, num_workers: int = 2, max_chunk: int = MAX_CHUNK):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.max_chunk = max_chunk
        self.closed = False
        self._lock = threading.Lock()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._startup_failures = 0
        self._broken: str | None = None
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._thread = threading.Thread(target=self._dispatch_loop, name="flash_rc-reward-pool", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # kill workers and delete their scratch dirs even if the caller forgets

    # ---- public API -------------------------------------------------------------------------------------------
    def submit(self, job: ScoringJob) -> Future:
        return self.submit_many([job])[0]

    def submit_many(self, jobs: list[ScoringJob]) -> list[Future]:
        """Futures of the jobs' results, in order. A job that cannot be pickled resolves at once as ``bad_request``."""
        for job in jobs:
            if not isinstance(job, ScoringJob):
                raise TypeError(f"the reward pool runs ScoringJob objects (see router.make_job), got {job!r:.80}")
        futures = [Future() for _ in jobs]
        pending = [p for p in map(_pending, jobs, futures) if p is not None]
        with self._lock:
            if self.closed or self._broken:
                raise RewardPoolError(self._broken or "reward pool is closed")
            self._queue.extend(pending)
        self._wake()
        return futures

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._wake()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        atexit.unregister(self.close)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Block until every worker has started (e.g. before timing, or to pay start-up before a training step)."""
        deadline = time.monotonic() + timeout_s
        while not all(worker.ready for worker in self._workers):
            if self._broken or self.closed:
                raise RewardPoolError(self._broken or "reward pool is closed")
            if time.monotonic() > deadline:
                raise RewardPoolError(f"reward workers not ready after {timeout_s:.0f}s")
            time.sleep(0.01)

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    # ---- workers ----------------------------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        scratch_dir = tempfile.mkdtemp(prefix="flash_rc_reward_worker-")
        os.chmod(scratch_dir, 0o711)  # sandboxed code may run as a throwaway uid that must reach its files
        progress = JobProgress.create(JobProgress.path_in(scratch_dir))
        env = {**os.environ, "FLASH_RC_SANDBOX_DIR": scratch_dir,
               "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "flash_rc.rewards.pool_worker", str(child_sock.fileno()), scratch_dir],
                pass_fds=(child_sock.fileno(),), env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        return _Worker(process, Connection(parent_sock.detach()), scratch_dir, progress, spawned_at=time.monotonic())

    def _retire(self, worker: _Worker) -> None:
        """Kill a worker with everything in its session and remove its scratch files."""
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.process.wait()
        worker.conn.close()
        worker.progress.close()
        shutil.rmtree(worker.scratch_dir, ignore_errors=True)

    def _replace(self, worker: _Worker, reason: str) -> None:
        """The worker died (``worker_crashed``) or overran (``timeout``): replace it and charge only the guilty job.

        That is the job it was running, which its ``JobProgress`` names. A worker that overran before starting any
        job charges its first one, whose clock was running (the transfer or the scorers' import took the limit); one
        that died before starting any was killed from outside (or by an import), which is no job's fault. Every other
        unfinished job of the chunk -- started and finished but not yet reported, or never started -- is requeued.
        """
        unfinished = list(worker.chunk)
        started = worker.running_position() if worker.ready else 0
        charged = max(started, 1) if reason == "timeout" else started
        self._retire(worker)
        if not worker.ready:
            self._startup_failures += 1
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                self._broken = (f"reward workers keep dying during startup ({self._startup_failures} in a row, "
                                f"last exit status {worker.process.returncode}); see their stderr above")
        index = self._workers.index(worker)
        if self._broken:
            del self._workers[index]
        else:  # replaced before any caller hears of it, so nobody observes the dead worker
            self._workers[index] = self._spawn()
        if unfinished and charged:
            _finish(unfinished.pop(charged - 1).future, failed_result(reason))
        self._requeue(unfinished)

    def _requeue(self, unfinished: list[_Pending]) -> None:
        """Back to the head of the queue, in order; a job requeued more than ``MAX_REQUEUES`` times is given up."""
        again = []
        for pending in unfinished:
            pending.requeues += 1
            if pending.requeues > MAX_REQUEUES:
                _finish(pending.future, failed_result("worker_crashed"))
            else:
                again.append(pending)
        with self._lock:
            self._queue.extendleft(reversed(again))

    # ---- dispatcher thread ------------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # pipe full: a wake-up is already pending
            pass

    def _assign(self) -> None:
        idle = [w for w in self._workers if w.ready and not w.chunk]
        with self._lock:
            for worker in idle:
                if not self._queue:
                    break
                # split by all workers, not just idle ones: a worker that just restarted must not take the whole
                # queue (and with it every other hung job, one after another)
                size = max(1, min(self.max_chunk, math.ceil(len(self._queue) / len(self._workers))))
                chunk = [self._queue.popleft()]
                while len(chunk) < size and self._queue and not (chunk[0].requeues or self._queue[0].requeues):
                    chunk.append(self._queue.popleft())
                chunk = [p for p in chunk if _claim(p.future)]  # drops futures their callers cancelled
                if not chunk:
                    continue
                worker.chunk.extend(chunk)
                worker.waiting_since = time.monotonic()
                worker.importing = False
                try:
                    worker.conn.send(("chunk", [(p.job.scorer, p.payload) for p in chunk]))
                except OSError:
                    pass  # the worker died; the loop sees its EOF

    def _on_readable(self, worker: _Worker) -> None:
        try:
            while True:
                message = worker.conn.recv()
                kind = message[0]
                if kind == "ready":
                    worker.ready = True
                    self._startup_failures = 0
                elif kind == "importing":
                    worker.importing = True
                elif kind == "imported":
                    worker.importing = False
                    worker.waiting_since = time.monotonic()
                elif kind == "results":
                    for result in message[1]:
                        _finish(worker.chunk.popleft().future, result)
                    worker.results_received += len(message[1])
                if not worker.conn.poll(0):
                    return
        except (EOFError, OSError):
            logger.warning("reward worker %d died (exit status %s)", worker.process.pid, worker.process.poll())
            self._replace(worker, "worker_crashed")

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if now >= worker.deadline():
                if not worker.ready:
                    logger.warning("reward worker %d did not start in %.0fs", worker.process.pid, STARTUP_TIMEOUT_S)
                self._replace(worker, "timeout")

    def _fail_queue(self, reason: str) -> None:
        with self._lock:
            pending, self._queue = list(self._queue), collections.deque()
        _fail(pending, reason)

    def _dispatch_loop(self) -> None:
        try:
            while not self.closed:
                self._dispatch_once()
            reason = "reward pool closed"
        except BaseException as exc:  # a dead dispatcher would hang every caller: fail them all instead
            logger.exception("reward pool dispatcher crashed")
            reason = self._broken = f"reward pool dispatcher crashed: {type(exc).__name__}: {exc}"
        for worker in self._workers:
            _fail(worker.chunk, reason)
            self._retire(worker)
        self._fail_queue(reason)

    def _dispatch_once(self) -> None:
        if self._broken:
            self._fail_queue(self._broken)
        self._assign()
        next_deadline = min((w.deadline() for w in self._workers), default=math.inf)
        timeout = min(max(0.0, next_deadline - time.monotonic()), 3600.0)
        owners = {id(w.conn): w for w in self._workers}
        for ready in wait([*(w.conn for w in self._workers), self._wake_r], timeout=timeout):
            if ready == self._wake_r:
                os.read(self._wake_r, 4096)
            elif owners[id(ready)] in self._workers:  # not replaced while handling an earlier message
                self._on_readable(owners[id(ready)])
        self._enforce_deadlines()
