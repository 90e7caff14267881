"""Run untrusted generated code: resource limits, no network, a throwaway filesystem, a hard wall-clock limit.

Why: a code reward executes whatever the policy wrote -- infinite loops, fork bombs, memory bombs, ``rm -rf ~``,
socket calls. One bad sample must cost at most its time limit and leave nothing behind, on a laptop and on a
128-GPU job alike. Each run gets a fresh directory (under ``scratch_dir``, else ``$FLASH_RC_SANDBOX_DIR``, else the
system temp dir) and a supervisor process (``sandbox_init.py``) that builds the sandbox and enforces the deadline; see
that module for the exact layers. Running as root, the program runs as a random throwaway uid, so the interpreter it
uses must be readable by other users (``sandbox_python`` finds one).

Guarantees (namespace mode: Linux with unprivileged user namespaces, or root with CAP_SYS_ADMIN):
* the program sees no network (empty network namespace) and cannot write outside its tmpfs working dir;
* RLIMIT_CPU / RLIMIT_AS / RLIMIT_FSIZE / RLIMIT_NPROC bound CPU seconds, memory, file size and processes
  (the process cap counts only this run's processes), and the program runs at nice +10;
* when the run ends -- normally, by timeout, or because the caller died -- every process it started is killed;
* the run's directory is removed afterwards, whatever the program did (if the caller itself is SIGKILLed, the reward
  pool deletes that worker's whole scratch dir).

Fallback mode (namespaces refused, e.g. Docker's default seccomp): rlimits, own session, a throwaway uid when the
caller is root, every descendant killed at the end -- but no network isolation and, for a non-root caller, no
protection of the caller's files. ``SandboxLimits.require_isolation=True`` refuses to run code in that mode.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SANDBOX_INIT = Path(__file__).with_name("sandbox_init.py")
THROWAWAY_UID_BASE = 1_500_000_000  # root drops to a random uid in [base, base + 2**20): never a real account
SUPERVISOR_GRACE_S = 2.0  # extra time the caller waits for the supervisor before killing it too
EXIT_DEADLINE = 124  # sandbox_init.py's exit status when the wall-clock limit hit


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot run code with the requested guarantees on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run."""

    timeout_s: float = 1.0
    """Wall-clock limit for the whole run (the Q-language recipe's per-test value)."""
    cpu_s: int = 2
    """RLIMIT_CPU in seconds; the wall-clock limit usually triggers first."""
    memory_mb: int = 1024
    """RLIMIT_AS (virtual address space) in MiB."""
    disk_mb: int = 64
    """RLIMIT_FSIZE and the size of the tmpfs working directory, in MiB."""
    max_processes: int = 64
    """RLIMIT_NPROC: processes (and threads) the run may have at once."""
    max_output_bytes: int = 1 << 20
    """Bytes of stdout and of stderr kept; output beyond this is dropped (and beyond ``disk_mb`` it kills the run)."""
    require_isolation: bool = False
    """Refuse to run (SandboxUnavailableError) unless network/pid/filesystem namespaces are available."""
    use_namespaces: bool = True
    """False forces fallback mode (for tests, or kernels whose namespaces misbehave)."""

    def __post_init__(self):
        if self.timeout_s <= 0 or self.cpu_s <= 0 or self.memory_mb <= 0 or self.disk_mb <= 0:
            raise ValueError(f"sandbox limits must be positive, got {self}")
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be >= 1, got {self.max_processes}")


@dataclass(frozen=True)
class SandboxResult:
    """What one run did."""

    exit_code: int
    """Program exit status; 128+N if killed by signal N; 124 on timeout; 125 if the sandbox failed to start."""
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    isolation: str
    """"namespaces" or "fallback (<why>)": which guarantees applied (see module docstring)."""


@functools.cache
def sandbox_python() -> str:
    """Interpreter for generated Python code: ours if the sandboxed (possibly throwaway) uid can run it.

    Running as root the sandbox drops to an unprivileged uid, which cannot use an interpreter under e.g. /root; a
    system python3 is then used. Found by trying each candidate in the sandbox itself.
    """
    candidates = [sys.executable, "/usr/local/bin/python3", "/usr/bin/python3"]
    for candidate in dict.fromkeys(candidates):
        if os.path.exists(candidate):
            probe = run_sandboxed([candidate, "-I", "-c", "print('ok')"], {}, limits=SandboxLimits(timeout_s=10.0))
            if probe.exit_code == 0 and probe.stdout.strip() == "ok":
                return candidate
    raise SandboxUnavailableError(
        f"no Python interpreter runs inside the sandbox (tried {candidates}); when running as root the sandbox "
        "drops to an unprivileged uid, so install python3 system-wide or run the trainer as a normal user")


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _remove_tree(path: Path) -> None:
    """Delete a run directory even if the program made it hostile (chmod 000 dirs, very deep nesting)."""
    def make_writable_and_retry(func, target, _exc):
        parent = os.path.dirname(target)
        for p in (parent, target):
            try:
                os.chmod(p, 0o700)
            except OSError:
                pass
        try:
            func(target)
        except OSError:
            pass

    try:
        shutil.rmtree(path, onerror=make_writable_and_retry)
    except RecursionError:
        pass
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Block until ``proc`` exits or ``timeout_s`` passes; True if it exited.

    A pidfd wakes us the moment the process ends, where ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms --
    most of the cost of a short run.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # kernel < 5.3
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(pidfd)


@functools.cache
def sandbox_isolation(use_namespaces: bool = True) -> str:
    """Which isolation this machine gives ("namespaces" or "fallback (<why>)"), probed once with a no-op run."""
    return _run_once(["/bin/sh", "-c", "exit 0"], {}, "", SandboxLimits(timeout_s=10.0, use_namespaces=use_namespaces),
                     None, {}).isolation


def run_sandboxed(argv: list[str], files: dict[str, str], stdin: str = "", limits: SandboxLimits = SandboxLimits(),
                  scratch_dir: str | None = None, extra_env: dict[str, str] | None = None) -> SandboxResult:
    """Run ``argv`` in a fresh sandbox and return its exit code and (capped) output.

    ``files`` are written read-only next to the working directory before the run; ``argv`` may refer to them through
    the placeholder ``{dir}`` (e.g. ``[python, "-I", "{dir}/main.py"]``). The working directory itself starts empty.
    The program's environment is a minimal PATH/HOME/TMPDIR/LANG plus ``extra_env``.
    """
    if limits.require_isolation and sandbox_isolation(limits.use_namespaces) != "namespaces":
        raise SandboxUnavailableError(
            f"require_isolation=True but this machine only allows {sandbox_isolation(limits.use_namespaces)}")
    return _run_once(argv, files, stdin, limits, scratch_dir, extra_env or {})


@functools.cache
def _check_traversable(directory: str) -> None:
    """Running as root, the program's throwaway uid must be able to reach its files through ``directory``."""
    if os.geteuid() != 0:
        return
    path = Path(directory).resolve()
    for part in [path, *path.parents]:
        if not os.stat(part).st_mode & 0o001:
            raise SandboxUnavailableError(
                f"sandbox scratch dir {directory}: {part} is not searchable by other users, so the sandbox's "
                "unprivileged uid cannot reach its files; use a dir such as /tmp (FLASH_RC_SANDBOX_DIR) or chmod o+x")


def _scratch_base(scratch_dir: str | None) -> str:
    """The dir that holds run dirs, recreated (searchable by the throwaway uid) if it is gone.

    Why recreate: a reward-pool worker keeps its scratch dir for a whole training run, and a tmp cleaner deleting it
    must not turn every later code test of that worker into an error.
    """
    base = scratch_dir or os.environ.get("FLASH_RC_SANDBOX_DIR") or tempfile.gettempdir()
    try:
        os.mkdir(base)
    except FileExistsError:
        return base
    os.chmod(base, 0o711)
    return base


def _run_once(argv: list[str], files: dict[str, str], stdin: str, limits: SandboxLimits, scratch_dir: str | None,
              extra_env: dict[str, str]) -> SandboxResult:
    base = _scratch_base(scratch_dir)
    _check_traversable(base)
    run_dir = Path(tempfile.mkdtemp(prefix="flash_rc_sandbox-", dir=base))
    try:
        return _run_in(run_dir, argv, files, stdin, limits, extra_env)
    finally:
        _remove_tree(run_dir)


def _run_in(run_dir: Path, argv: list[str], files: dict[str, str], stdin: str, limits: SandboxLimits,
            extra_env: dict[str, str]) -> SandboxResult:
    is_root = os.geteuid() == 0
    uid = THROWAWAY_UID_BASE + secrets.randbelow(1 << 20) if is_root else None
    workdir = run_dir / "work"
    workdir.mkdir()
    os.chmod(run_dir, 0o711)  # a throwaway uid may traverse it to read its program, not list it
    for name, text in files.items():
        (run_dir / name).write_text(text, encoding="utf-8", errors="surrogateescape")
        os.chmod(run_dir / name, 0o644)
    if uid is not None:
        os.chown(workdir, uid, uid)
    (run_dir / "stdin").write_text(stdin, encoding="utf-8", errors="surrogateescape")

    status_r, status_w = os.pipe()  # the supervisor reports the isolation it achieved (or why it failed) here
    config = {
        "argv": [arg.replace("{dir}", str(run_dir)) for arg in argv],
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **extra_env},
        "workdir": str(workdir), "uid": uid, "gid": uid, "parent_pid": os.getpid(), "status_fd": status_w,
        "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb << 20,
        "disk_bytes": limits.disk_mb << 20, "max_processes": limits.max_processes,
        "use_namespaces": limits.use_namespaces,
    }
    start = time.monotonic()
    # Output goes to files, not pipes: RLIMIT_FSIZE caps them and nothing can block on a full pipe.
    with open(run_dir / "stdin", "rb") as fin, open(run_dir / "stdout", "wb") as fout, \
            open(run_dir / "stderr", "wb") as ferr, os.fdopen(status_r, "rb") as status_file:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SANDBOX_INIT), json.dumps(config)],
                stdin=fin, stdout=fout, stderr=ferr, pass_fds=(status_w,), cwd=run_dir, env={},
                start_new_session=True)
        finally:
            os.close(status_w)
        if _wait_exit(proc, limits.timeout_s + SUPERVISOR_GRACE_S):
            returncode = proc.wait()  # negative if a signal killed the supervisor (e.g. the program killed it)
            exit_code = 128 - returncode if returncode < 0 else returncode
        else:  # the supervisor itself is stuck: kill it, PDEATHSIG takes the rest
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            exit_code = EXIT_DEADLINE
        duration = time.monotonic() - start
        status = status_file.read().decode(errors="replace").splitlines()
    isolation = next((line.removeprefix("isolation ") for line in status if line.startswith("isolation ")), "unknown")
    setup_error = next((line for line in status if line.startswith("setup_failed")), None)
    if setup_error is not None:
        raise SandboxUnavailableError(f"sandbox could not start ({isolation}): {setup_error}")
    return SandboxResult(
        exit_code=exit_code,
        stdout=_read_capped(run_dir / "stdout", limits.max_output_bytes),
        stderr=_read_capped(run_dir / "stderr", limits.max_output_bytes),
        timed_out=exit_code == EXIT_DEADLINE or exit_code == 128 + signal.SIGXCPU,
        duration_s=duration,
        isolation=isolation,
    )
