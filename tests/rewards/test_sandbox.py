"""The code sandbox against hostile programs: limits hold, nothing escapes, nothing is left behind.

Every test runs in both modes where the machine allows: "namespaces" (the normal case) and the forced "fallback"
(what a Docker container with the default seccomp profile gets). Guarantees that only namespaces give (no network,
read-only filesystem for a non-root caller) are skipped in fallback mode, as documented in sandbox.py.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flash_rc.rewards.sandbox import SandboxLimits, SandboxUnavailableError, run_sandboxed, sandbox_isolation, \
    sandbox_python

NAMESPACES_AVAILABLE = sandbox_isolation() == "namespaces"
SLACK_S = 1.0  # process start-up and tear-down on a loaded 2-core CI machine; typically 20-60 ms
MODES = [pytest.param(True, id="namespaces", marks=pytest.mark.skipif(not NAMESPACES_AVAILABLE,
                                                                     reason="no namespaces here")),
         pytest.param(False, id="fallback")]


def run_python(code: str, use_namespaces: bool = True, stdin: str = "", **limits):
    limits.setdefault("timeout_s", 10.0)  # ample unless the test is about the limit: a loaded CI box starts slowly
    limits = SandboxLimits(use_namespaces=use_namespaces, **limits)
    return run_sandboxed([sandbox_python(), "-I", "{dir}/main.py"], {"main.py": textwrap.dedent(code)}, stdin=stdin,
                         limits=limits)


@pytest.mark.parametrize("namespaces", MODES)
def test_runs_a_program_with_stdin(sandbox_scratch, namespaces):
    result = run_python("import os, sys\nprint(sys.stdin.read().upper(), os.listdir('.'))", namespaces, stdin="hi")
    assert result.exit_code == 0 and not result.timed_out
    assert result.stdout == "HI []\n"  # the working directory starts empty
    assert result.isolation == ("namespaces" if namespaces else "fallback (disabled by caller)")


@pytest.mark.parametrize("namespaces", MODES)
def test_exit_status_and_stderr_are_reported(sandbox_scratch, namespaces):
    result = run_python("import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)", namespaces)
    assert (result.exit_code, result.stderr) == (3, "bad\n")


@pytest.mark.parametrize("namespaces", MODES)
@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(60)"], ids=["busy", "sleeping"])
def test_timeout_costs_its_limit(sandbox_scratch, namespaces, code):
    start = time.monotonic()
    result = run_python(code, namespaces, timeout_s=0.5)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.exit_code == 124
    assert 0.5 <= elapsed < 0.5 + SLACK_S  # the limit plus process start-up and tear-down


@pytest.mark.parametrize("namespaces", MODES)
def test_cpu_limit_is_reported_as_timeout(sandbox_scratch, namespaces):
    # CPU seconds, not wall time: on a busy machine one CPU second can take several wall seconds
    result = run_python("while True: pass", namespaces, timeout_s=60.0, cpu_s=1)
    assert result.timed_out and result.exit_code == 128 + signal.SIGXCPU


@pytest.mark.parametrize("namespaces", MODES)
def test_memory_bomb_fails_inside_its_limit(sandbox_scratch, namespaces):
    result = run_python("x = bytearray(8 << 30)", namespaces, memory_mb=256)
    assert result.exit_code == 1 and "MemoryError" in result.stderr


@pytest.mark.parametrize("namespaces", MODES)
def test_fork_bomb_is_capped_and_cleaned_up(sandbox_scratch, namespaces, marker, become_sleeper, wait_until_gone):
    code = f"""
    import os, subprocess, sys
    forked = 0
    while True:
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            {become_sleeper}
        forked += 1
    print(forked)
    """
    result = run_python(code, namespaces, max_processes=16, timeout_s=5.0)
    assert result.exit_code == 0
    assert int(result.stdout) < 16  # RLIMIT_NPROC stopped it (the program itself is one of the 16)
    assert wait_until_gone(marker) == []  # every sleeper died with the run


@pytest.mark.parametrize("namespaces", MODES)
def test_escaped_daemons_are_killed(sandbox_scratch, namespaces, marker, become_sleeper, wait_until_gone):
    # new session + double fork: the classic way out of a process group, reparented away from the program
    code = f"""
    import os, sys
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            {become_sleeper}
        os._exit(0)
    print("parent done")
    """
    result = run_python(code, namespaces)
    assert result.stdout == "parent done\n"
    assert wait_until_gone(marker) == []


@pytest.mark.parametrize("namespaces", MODES)
def test_killing_the_supervisor_ends_the_run(sandbox_scratch, namespaces, marker, become_sleeper,
                                             wait_until_gone):
    # The program's parent is the namespace's init (immune to signals from inside) or, in fallback mode, the
    # supervisor (another uid when we are root). Whether or not the kill lands, the run ends by its limit at the
    # latest and leaves no process behind.
    code = f"""
    import os, signal, sys
    for pid in (os.getppid(), 1):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    {become_sleeper}
    """
    result = run_python(code, namespaces, timeout_s=1.0)
    assert result.duration_s < 1.0 + SLACK_S and result.exit_code != 0
    assert wait_until_gone(marker) == []


@pytest.mark.parametrize("namespaces", MODES)
def test_writes_outside_the_workdir_fail(sandbox_scratch, namespaces, tmp_path):
    if not namespaces and os.geteuid() != 0:
        pytest.skip("fallback mode as a normal user cannot protect the caller's own files (documented)")
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')\nprint('wrote')", namespaces)
    assert result.exit_code == 1 and ("Read-only file system" in result.stderr or "Permission denied" in result.stderr)
    assert not target.exists()


@pytest.mark.parametrize("namespaces", MODES)
def test_workdir_is_writable_and_size_capped(sandbox_scratch, namespaces):
    result = run_python("open('a.txt', 'w').write('hello')\nprint(open('a.txt').read())\n"
                        "open('big', 'wb').write(b'x' * (8 << 20))", namespaces, disk_mb=4)
    assert result.stdout == "hello\n"
    assert result.exit_code == 1 and ("File too large" in result.stderr or "No space left" in result.stderr)


@pytest.mark.parametrize("namespaces", MODES)
def test_network_is_unreachable(sandbox_scratch, namespaces):
    if not namespaces:
        pytest.skip("fallback mode has no network isolation (documented)")
    code = """
    import socket
    s = socket.socket()
    s.settimeout(2)
    print(s.connect_ex(("1.1.1.1", 80)), s.connect_ex(("127.0.0.1", 22)))
    """
    result = run_python(code, namespaces)
    unreachable, refused = map(int, result.stdout.split())
    assert unreachable != 0 and refused != 0  # no route out; not even the host's own services


@pytest.mark.parametrize("namespaces", MODES)
def test_output_flood_is_capped(sandbox_scratch, namespaces):
    result = run_python("import sys\nsys.stdout.write('y' * (3 << 20))", namespaces, max_output_bytes=1000, disk_mb=64)
    assert result.exit_code == 0 and result.stdout == "y" * 1000


@pytest.mark.parametrize("namespaces", MODES)
def test_hostile_directory_trees_are_removed(sandbox_scratch, namespaces):
    code = """
    import os
    os.makedirs("locked/inner")
    open("locked/inner/f", "w").write("x")
    os.chmod("locked/inner", 0)
    os.chmod("locked", 0)
    path = "deep"
    for _ in range(300):
        os.mkdir(path)
        path = os.path.join(path, "d")
    """
    assert run_python(code, namespaces).exit_code == 0  # sandbox_scratch then asserts nothing is left


def test_non_utf8_output_is_replaced(sandbox_scratch):
    result = run_python("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe')")
    assert result.stdout == "ok \ufffd\ufffd"


def test_caller_death_kills_the_run(sandbox_scratch, marker, become_sleeper, processes_mentioning, wait_until_gone):
    """A reward worker SIGKILLed mid-run (the pool's hard timeout) must not leave the program running."""
    caller = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from flash_rc.rewards.sandbox import SandboxLimits, run_sandboxed, sandbox_python
        code = {"import os, sys" + chr(10) + become_sleeper!r}
        limits = SandboxLimits(timeout_s=60)
        run_sandboxed([sandbox_python(), "-I", "{{dir}}/main.py"], {{"main.py": code}}, limits=limits)
    """)])
    deadline = time.monotonic() + 10
    while not processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(marker), "the sandboxed program never started"
    caller.kill()
    caller.wait()
    assert wait_until_gone(marker) == []
    for leftover in sandbox_scratch.iterdir():  # the dead caller could not clean up; the pool deletes this dir
        subprocess.run(["rm", "-rf", str(leftover)], check=True)


def test_require_isolation(sandbox_scratch):
    with pytest.raises(SandboxUnavailableError, match="require_isolation"):
        run_python("print(1)", use_namespaces=False, require_isolation=True)
    if NAMESPACES_AVAILABLE:
        assert run_python("print(1)", require_isolation=True).stdout == "1\n"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="positive"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        SandboxLimits(max_processes=0)
