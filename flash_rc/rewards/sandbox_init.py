"""Supervisor that runs one untrusted program inside a throwaway Linux sandbox.

Why a separate script: it is executed as ``python -I -S sandbox_init.py '<json config>'`` in a fresh, single-threaded
interpreter, so it may fork, call ``unshare(2)``/``mount(2)`` through ctypes and use SIGALRM freely -- none of which is
safe inside a multi-threaded trainer, a Ray worker or an asyncio loop. It imports only the standard library and never
imports ``flash_rc``.

Process layout (namespace mode, used when ``unshare`` is permitted):

    worker ──> supervisor S (this script; new user/net/pid namespaces)
                 └─fork──> C = pid 1 of the new pid namespace
                             └─fork──> exec the program

* S holds the wall-clock deadline (SIGALRM -> SIGKILL C) and dies with its parent (PR_SET_PDEATHSIG).
* C builds a private mount namespace: the whole filesystem read-only and nosuid (``mount_setattr`` AT_RECURSIVE), a
  size-capped tmpfs as the working directory, a fresh /proc; then it drops privileges (root: to a throwaway uid;
  otherwise: a nested user namespace, which locks those mounts read-only), sets NO_NEW_PRIVS and the rlimits, and
  forks the program -- not exec'ing it as pid 1, which the kernel shields from default-action signals like SIGXCPU.
* The network namespace has only a downed loopback device: no connection leaves the sandbox, none reaches the host.
* When C (pid 1) exits or is killed, the kernel kills every process left in the namespace, so nothing outlives a run.

Fallback mode (``unshare`` refused, e.g. Docker's default seccomp profile): no namespaces. C gets its own session,
drops to the throwaway uid when S runs as root, and gets the same rlimits; S is a child subreaper and kills every
descendant when C ends. There is no network isolation and, for a non-root caller, no filesystem isolation beyond the
temp working directory. The chosen mode is reported on the status fd so callers can see (and require) it.

Exit status: the program's own status; 128+N when killed by signal N; 124 when the wall-clock deadline hit; 125 when
the sandbox itself could not be set up; 127 when the program could not be executed (reasons on the status fd).
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SYS_MOUNT_SETATTR = 442  # same number on every architecture (syscalls >= 424 share one table)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
EXIT_DEADLINE, EXIT_SETUP_FAILED, EXIT_EXEC_FAILED = 124, 125, 127
# Untrusted code runs at low CPU priority: a program that spins up dozens of busy processes must not starve the
# supervisor that has to kill it on time, nor the trainer and reward workers on the same machine.
PROGRAM_NICENESS = 10

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def report(config: dict, line: str) -> None:
    os.write(config["status_fd"], (line + "\n").encode())


def write_id_maps(inside_uid: int, outside_uid: int, outside_gid: int) -> None:
    """Map one id into the user namespace just created (the only mapping an unprivileged process may write)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{inside_uid} {outside_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{inside_uid} {outside_gid} 1")


def isolate_filesystem(config: dict) -> None:
    """Private mounts: everything read-only + nosuid, a size-capped tmpfs as the working dir, a fresh /proc."""
    check(libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
          "mount_setattr(read-only, recursive)")
    options = f"size={config['disk_bytes']},mode=0700"
    if config["uid"] is not None:
        options += f",uid={config['uid']},gid={config['gid']}"
    check(libc.mount(b"tmpfs", config["workdir"].encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()),
          "mount tmpfs workdir")
    # A fresh /proc hides host processes; refused in some containers (masked /proc paths), which is harmless.
    libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def drop_privileges(config: dict, namespaced: bool) -> None:
    if config["uid"] is not None:  # running as root: become a throwaway unprivileged uid
        os.setgroups([])
        os.setresgid(config["gid"], config["gid"], config["gid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])
    elif namespaced:
        # We are "root" of our own user namespace and could undo the read-only mounts. A nested user + mount
        # namespace locks every inherited mount flag, so the program cannot.
        euid, egid = os.geteuid(), os.getegid()
        check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(nested user namespace)")
        write_id_maps(0, euid, egid)


def count_tasks_of_uid(uid: int) -> int:
    """Processes + threads owned by ``uid`` (what RLIMIT_NPROC counts when no namespace scopes it)."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    total += os.stat(f"/proc/{entry.name}/task").st_nlink - 2
            except OSError:
                pass
    return total


def set_limits(config: dict, namespaced: bool) -> None:
    max_processes = config["max_processes"]
    if not namespaced and config["uid"] is None:
        # Same uid as the trainer and no user namespace: RLIMIT_NPROC counts all of the trainer's threads too.
        max_processes += count_tasks_of_uid(os.getuid())
    limits = {  # (soft, hard); CPU's hard limit is one second later so SIGXCPU (not SIGKILL) reports it first
        resource.RLIMIT_CPU: (config["cpu_s"], config["cpu_s"] + 1),
        resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (config["disk_bytes"],) * 2,
        resource.RLIMIT_NPROC: (max_processes,) * 2,
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NOFILE: (256, 256),
    }
    for which, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))


def exit_like(status: int) -> None:
    """Exit with a child's wait status: its exit code, or 128+N if signal N killed it."""
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def run_program(config: dict, namespaced: bool) -> None:
    """Runs in C: finish the sandbox, then become (fallback) or start (namespaces) the program. Never returns."""
    try:
        if namespaced:
            isolate_filesystem(config)
        else:
            os.setsid()
        drop_privileges(config, namespaced)
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        set_limits(config, namespaced)
        os.nice(PROGRAM_NICENESS)
        os.chdir(config["workdir"])
        # Last, because every credential change above clears it: die with the supervisor.
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    except BaseException as exc:  # noqa: BLE001 - anything here means the sandbox could not be built
        report(config, f"setup_failed {type(exc).__name__}: {exc}")
        os._exit(EXIT_SETUP_FAILED)
    # C stays pid 1, a plain init: the kernel ignores default-action signals sent to pid 1 (SIGXCPU from RLIMIT_CPU,
    # a program's own SIGTERM), so the program runs as an ordinary process under it.
    if namespaced:
        program = os.fork()
        if program != 0:
            exit_like(os.waitpid(program, 0)[1])
    try:
        os.set_inheritable(config["status_fd"], False)
        os.execve(config["argv"][0], config["argv"], config["env"])
    except OSError as exc:  # e.g. an interpreter the sandboxed uid may not read: the program's failure, not ours
        report(config, f"exec_failed {exc}")
        os._exit(EXIT_EXEC_FAILED)


def enter_namespaces(config: dict) -> str | None:
    """Try new user (when not root), network and pid namespaces for our children; return why not, or None."""
    try:
        if os.geteuid() == 0:
            check(libc.unshare(CLONE_NEWNET | CLONE_NEWPID), "unshare(net, pid)")
        else:
            uid, gid = os.geteuid(), os.getegid()
            check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID), "unshare(user, net, pid)")
            write_id_maps(0, uid, gid)
    except OSError as exc:
        return str(exc)
    return None


def children_of_self() -> list[int]:
    path = f"/proc/self/task/{os.getpid()}/children"
    try:
        with open(path) as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


def reap_descendants() -> None:
    """Fallback mode: as child subreaper we inherit every orphan; kill and reap until none are left."""
    while True:
        for pid in children_of_self():
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main() -> None:
    config = json.loads(sys.argv[1])
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != config["parent_pid"]:  # the worker died before we armed PDEATHSIG
        os._exit(EXIT_SETUP_FAILED)
    failure = enter_namespaces(config) if config["use_namespaces"] else "disabled by caller"
    namespaced = failure is None
    if namespaced:
        report(config, "isolation namespaces")
    else:
        report(config, f"isolation fallback ({failure})")
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    child = os.fork()
    if child == 0:
        run_program(config, namespaced)

    deadline_hit = False

    def on_deadline(signum, frame):
        nonlocal deadline_hit
        deadline_hit = True
        os.kill(child, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_deadline)
    signal.setitimer(signal.ITIMER_REAL, config["timeout_s"])
    _, status = os.waitpid(child, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if not namespaced:
        reap_descendants()
    if deadline_hit:
        os._exit(EXIT_DEADLINE)
    exit_like(status)


if __name__ == "__main__":
    main()
