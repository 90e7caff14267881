"""Every error flash_rc raises on purpose, in one leaf module (no imports), each with the CLI exit status it maps to.

Why one module: callers catch these across layers — the CLI turns them into one-line messages, the RC scheduler
tells bad input (never retried) from transient engine errors, the learner catches a refused weight sync — and none of
them should have to import the engine, vLLM or the reward pool to name the error.

Exit statuses of every ``flash-rc`` command (the README's table):

* 0 — success;
* 1 — the input data is bad (a malformed row, an unreadable file) or the run produced nothing usable;
* 2 — bad usage: an unknown key or value, a missing input or model, a template without its fields;
* 3 — an output cannot be written (not a directory, no permission, disk full);
* 128 + N — stopped by signal N (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_DATA = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3


class FlashRCError(Exception):
    """Base of the errors a user can act on; ``exit_code`` is what a ``flash-rc`` command exits with."""

    exit_code = EXIT_BAD_DATA


class ConfigError(FlashRCError, ValueError):
    """A recipe, override or argument that cannot be run as written."""

    exit_code = EXIT_USAGE


class TemplateError(ConfigError):
    """A prompt template whose fields do not match what the cycle fills in."""


class UnsupportedPrecisionError(ConfigError):
    """The requested rollout precision cannot run on this platform (raised before the engine starts)."""


class ModelNotFoundError(FlashRCError, FileNotFoundError):
    """A model name or path that cannot be resolved to a local HF model directory."""

    exit_code = EXIT_USAGE


class InputNotFoundError(FlashRCError, FileNotFoundError):
    """An input file or directory named by the user does not exist."""

    exit_code = EXIT_USAGE


class RowError(FlashRCError, ValueError):
    """An input or output row is malformed, or a data file cannot be read; the message names the file and row."""

    exit_code = EXIT_BAD_DATA


class UnknownDataSourceError(FlashRCError, ValueError):
    """No scorer is registered for a ``data_source``."""

    exit_code = EXIT_BAD_DATA


class OutputError(FlashRCError, OSError):
    """An output path cannot be written: the message names the path and the reason (e.g. the disk is full)."""

    exit_code = EXIT_OUTPUT


class RunFailedError(FlashRCError, RuntimeError):
    """A run finished without producing anything usable (e.g. every chain failed); what it wrote is kept."""

    exit_code = EXIT_BAD_DATA


class PromptTooLongError(FlashRCError, ValueError):
    """The prompt leaves no room in the context window for even one generated token."""


class WeightUpdateError(FlashRCError, ValueError):
    """A weight update was refused (the engine keeps its previous weights) or failed midway (sync again)."""
