"""Fixtures for reward tests: a private sandbox scratch dir, a check that no sandboxed process outlives a test, a
reward pool and a scorer with scripted misbehaviour."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from flash_rc.rewards.pool import RewardPool


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process whose command line contains ``text`` (read from /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry.name), cmdline))
    return found


def wait_until_gone(text: str, timeout_s: float = 3.0) -> list[tuple[int, str]]:
    """Processes still mentioning ``text`` after up to ``timeout_s`` (killed processes take a moment to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{condition} still false after {timeout_s}s"
        time.sleep(0.01)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:  # reaped between the two checks
        return False


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    return wait_until


@pytest.fixture(name="pid_alive")
def pid_alive_fixture():
    return pid_alive


@pytest.fixture
def pool():
    with RewardPool(num_workers=2) as pool:
        yield pool


@pytest.fixture(name="processes_mentioning")
def processes_mentioning_fixture():
    """The ``processes_mentioning`` helper (test modules cannot import conftest under --import-mode=importlib)."""
    return processes_mentioning


@pytest.fixture(name="wait_until_gone")
def wait_until_gone_fixture():
    return wait_until_gone


@pytest.fixture
def marker() -> str:
    """A unique string adversarial programs put in the argv of what they spawn, to find strays afterwards."""
    return f"flash-rc-test-{uuid.uuid4().hex}"


@pytest.fixture
def become_sleeper(marker) -> str:
    """A Python statement (needs ``import os, sys``) that replaces the process with a 60 s sleeper tagged ``marker``."""
    return f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])"


@pytest.fixture
def sandbox_scratch(monkeypatch) -> Path:
    """Route every sandbox run of the test into its own dir; afterwards it must be empty and nothing may run there.

    Made with mkdtemp under /tmp, not pytest's tmp_path: when tests run as root the sandbox drops to a throwaway
    uid, which cannot traverse pytest's private (0700) base directory.
    """
    scratch = Path(tempfile.mkdtemp(prefix="flash_rc_test_scratch-"))
    os.chmod(scratch, 0o711)
    monkeypatch.setenv("FLASH_RC_SANDBOX_DIR", str(scratch))
    try:
        yield scratch
        assert wait_until_gone(str(scratch)) == [], "sandboxed processes outlived the test"
        assert list(scratch.iterdir()) == [], "sandbox runs left files behind"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


TEST_SCORERS = '''
import os, re, signal, time

def compute_score(solution_str, ground_truth, extra_info=None, bonus=0.0):
    """A scorer with scripted misbehaviour, chosen by the response text."""
    if solution_str == "busy":
        while True:
            pass
    if solution_str == "busy-logged":  # note the start time (CLOCK_MONOTONIC is system-wide), then hang
        with open(ground_truth, "a") as log:
            log.write(f"{time.monotonic()}\\n")
        while True:
            pass
    if solution_str == "regex":  # catastrophic backtracking: one C call that holds the GIL and ignores signals
        re.match(r"(a+)+$", "a" * 64 + "b")
    if solution_str == "sleep":
        time.sleep(600)
    if solution_str == "exit":
        os._exit(3)
    if solution_str == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if solution_str == "ctypes-segfault":  # a real invalid read in C, not a signal sent from Python
        import ctypes
        ctypes.string_at(0)
    if solution_str == "raise":
        raise ValueError("bad ground truth")
    if solution_str == "float":
        return 0.25
    return {"score": float(solution_str == ground_truth) + bonus, "acc": solution_str == ground_truth,
            "pred": solution_str, "reason": "scripted"}
'''


@pytest.fixture
def scripted_scorer(tmp_path) -> str:
    """Target string of a scorer file whose responses script hangs, crashes and errors (see TEST_SCORERS)."""
    path = tmp_path / "scripted_scorer.py"
    path.write_text(TEST_SCORERS)
    return f"{path}:compute_score"
