"""The ``flash-rc`` command: one entry point, one subcommand per job, one place that turns errors into exit statuses.

Subcommand modules are imported only when used, so ``flash-rc models`` does not pay for importing vLLM.

Why errors end here: a failure the user can act on should say what to fix in one line, not in a traceback that
hides it, and scripts should be able to tell bad data from bad usage from a full disk by the exit status alone.
:func:`run_command` reports every such failure as ``flash-rc <command>: error: <message>`` on stderr and returns the
status of the table in :mod:`flash_rc.errors`:

* a :class:`~flash_rc.errors.FlashRCError` -> its ``exit_code`` (bad data 1, bad usage 2, unwritable output 3);
* a ``FileNotFoundError`` -> 2 (an input the user named does not exist);
* any other ``OSError`` -> 3: inputs are read through readers that raise ``RowError``, so what is left is an output;
* Ctrl-C -> 130; SIGTERM -> 143. :func:`main` turns SIGTERM into :class:`Terminated` (a ``SystemExit``), so
  ``finally`` blocks, context managers and ``atexit`` handlers run as they do for Ctrl-C: temporary files are removed
  and reward workers and their scratch directories are shut down before the process exits.

A message that lists several problems (an invalid recipe names every bad key) keeps its detail lines, indented under
the first line, which is the summary. Anything else is a bug and keeps its traceback. Parsers built from
:class:`ArgumentParser` report usage mistakes the same way (one line, status 2) instead of argparse's two lines.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from flash_rc.errors import EXIT_OUTPUT, EXIT_USAGE, ConfigError, FlashRCError
from flash_rc.outputs import describe_os_error

SUBCOMMANDS = {
    "train": ("flash_rc.backends.local.trainer", "RL training on one node: quantized rollouts, TIS, FSDP2 learner"),
    "decode": ("flash_rc.rc.decode", "RC decoding over a problem file, accuracy per cycle"),
    "data": ("flash_rc.data.cli", "GSM8K / math / built-in arithmetic data as verl parquet rows, validate files"),
    "models": ("flash_rc.models", "build / list the offline built-in models"),
    "quantize": ("flash_rc.rollout.checkpoint", "export an INT8/FP8 compressed-tensors W8A8 checkpoint from bf16"),
    "eval": ("flash_rc.eval.cli", "checkpoint sweeps on GSM8K: one engine, resumable CSV, generations, plot, report"),
}


class Terminated(SystemExit):
    """Raised in the CLI's process on SIGTERM, so clean-up runs as it does for Ctrl-C; its code is 128 + SIGTERM."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage mistakes raised as ConfigError so they are reported like every other error."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def recipe_arguments(prog: str, description: str, example: str, argv: list[str]) -> argparse.Namespace:
    """The arguments every recipe command takes: ``--config RECIPE``, ``key=value`` overrides (flags may come after
    them), ``--no-progress``."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="recipe YAML (verl key names + flash_rc section)")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_intermixed_args(argv)


def _report(command: str, message: str, status: int) -> int:
    summary, *details = message.strip().splitlines()
    lines = [f"flash-rc {command}: error: {summary}"] + [f"  {line.lstrip()}" for line in details if line.strip()]
    print("\n".join(lines), file=sys.stderr)
    return status


def _os_message(error: OSError) -> str:
    return f"{error.filename}: {describe_os_error(error)}" if error.filename else describe_os_error(error)


def run_command(command: str, entry: Callable[[list[str]], int], argv: list[str]) -> int:
    """``entry(argv)``'s exit status, or, when it fails in one of the ways above, the one-line report's status."""
    try:
        return entry(argv)
    except FlashRCError as error:
        return _report(command, str(error).strip() or type(error).__name__, error.exit_code)
    except FileNotFoundError as error:
        return _report(command, _os_message(error), EXIT_USAGE)
    except OSError as error:
        return _report(command, _os_message(error), EXIT_OUTPUT)
    except KeyboardInterrupt:
        return _report(command, "interrupted (SIGINT)", 128 + signal.SIGINT)
    except Terminated as stop:
        return _report(command, "terminated (SIGTERM)", stop.code)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated in this process (a child forked meanwhile still dies of it)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    owner = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "usage: flash-rc <command> [args]\n\ncommands:\n" + "\n".join(lines)


def _subcommand_main(command: str) -> Callable[[list[str]], int]:
    return lambda argv: importlib.import_module(SUBCOMMANDS[command][0]).main(argv)


ENGINE_COMMANDS = frozenset({"decode", "eval", "train"})
"""Subcommands that run a rollout engine: as a process's entry point they re-execute once with the libraries of
``flash_rc.launch`` preloaded."""


def main(argv: list[str] | None = None) -> int:
    entry_point, argv = argv is None, list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, *args = argv
    if command not in SUBCOMMANDS:
        print(f"flash-rc: error: unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    if entry_point and command in ENGINE_COMMANDS:  # never from a caller's process (e.g. a test calling main)
        from flash_rc.launch import reexec_with_preload

        reexec_with_preload("flash_rc.cli", argv)
    with _sigterm_raises():
        return run_command(command, _subcommand_main(command), args)


if __name__ == "__main__":
    sys.exit(main())
