"""The training loop's metrics sink: one durable record per run, plus the views verl's ``trainer.logger`` names.

Why a record of our own. Dashboards (wandb, TensorBoard) are views that can fail or lag -- no network, a full
quota, a crashed service -- and none of them is the run's own account of what happened. So every step is first
appended to ``<run_dir>/metrics.jsonl`` as one line ``{"step": N, "<metric>": value, ...}``, written and fsynced before
the step's metrics go anywhere else: a run killed at any point keeps every step it finished. The record is never
allowed to lose a step silently: a failed write (disk full) raises :class:`~flash_rc.errors.OutputError`. The views
are best effort: one that raises is disabled with a one-line warning and the run goes on.

The invariants of ``metrics.jsonl``:

* it is valid JSON Lines: a value that is not finite (NaN, ±inf) is written as ``null``;
* steps strictly increase, so no step appears twice;
* on resume from the checkpoint of step K (``resume_step=K``) the file is rewritten -- atomically, through
  :func:`~flash_rc.outputs.atomic_write` -- to its lines with ``step <= K``: the steps after K that the killed run
  logged belong to a trajectory the checkpoint no longer has, and the resumed run logs them again. A torn last line
  (the killed run's unfinished write) is dropped. A fresh run (``resume_step=None``) starts an empty record.

The views, by verl's names (verl 0.9.1 ``verl.utils.tracking.Tracking``; its other backends -- mlflow, swanlab,
clearml, ... -- are refused rather than silently ignored):

* ``console``: one fixed-format line per step with the key metrics of :data:`CONSOLE_COLUMNS`;
* ``wandb``: ``wandb.init(project, name, dir=run_dir, config=recipe, id=<stable id>, resume="allow")``; the id is
  kept in ``<run_dir>/wandb_id`` so a resumed run continues the same wandb run, and ``WANDB_MODE=offline`` works
  without network (wandb reads it itself). wandb keeps the steps after K that it got before the crash and ignores
  re-logged steps up to its last one (it has no rewind offline); ``metrics.jsonl`` is the record that is exact;
* ``tensorboard``: scalars in ``<run_dir>/tensorboard``; on resume the writer's ``purge_step=K+1`` hides the stale
  steps after K from TensorBoard (a fresh run purges from step 0);
* ``file``: verl's JSON-lines file logger; here it is ``metrics.jsonl`` itself, which is always written.

wandb and TensorBoard are imported only when named.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flash_rc.errors import ConfigError, RowError
from flash_rc.outputs import atomic_write, output_error, prepare_output_dir

logger = logging.getLogger(__name__)

LOGGERS = ("console", "wandb", "tensorboard", "file")
"""The ``trainer.logger`` names accepted: verl's spelling for the backends implemented here."""

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"

CONSOLE_COLUMNS = (
    ("reward", "critic/rewards/mean", "{:.3f}"),
    ("acc", "critic/acc/mean", "{:.3f}"),
    ("len", "response_length/mean", "{:.0f}"),
    ("pg_loss", "actor/pg_loss", "{:+.4f}"),
    ("grad_norm", "actor/grad_norm", "{:.3f}"),
    ("lr", "actor/lr", "{:.2e}"),
    ("mismatch_kl", "rollout_corr/kl", "{:.2e}"),
    ("sync", "sync/seconds", "{:.2f}s"),
    ("time", "timing_s/step", "{:.1f}s"),
)
"""(label, metric key, format) of the console line, in order; a metric missing from a step is left out."""


def console_line(step: int, metrics: Mapping[str, float]) -> str:
    """The console summary of one step, e.g. ``step 12 | reward 0.512 | len 812 | sync 1.23s``."""
    parts = [f"step {step}"]
    parts += [f"{label} {spec.format(float(metrics[key]))}" for label, key, spec in CONSOLE_COLUMNS if key in metrics]
    return " | ".join(parts)


def _json_value(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


@contextlib.contextmanager
def _needs(name: str, package: str) -> Iterator[None]:
    """Turn the ImportError of a logger's package into a ConfigError that says what to install."""
    try:
        yield
    except ImportError as error:
        raise ConfigError(f"trainer.logger {name!r} needs the {package} package (pip install {package}): "
                          f"{error}") from error


class _ConsoleView:
    name = "console"

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        print(console_line(step, metrics), flush=True)

    def close(self) -> None:
        pass


class _WandbView:
    name = "wandb"

    def __init__(self, run_dir: Path, project_name: str, experiment_name: str, config: Mapping[str, Any] | None,
                 resuming: bool):
        with _needs(self.name, "wandb"):
            import wandb

        id_path = run_dir / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if resuming and id_path.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)  # wandb's ids are [a-z0-9], at most 128 characters
            with atomic_write(id_path, "w") as handle:
                handle.write(run_id + "\n")
        self.run = wandb.init(project=project_name, name=experiment_name, dir=str(run_dir),
                              config=dict(config) if config is not None else None, id=run_id, resume="allow")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorboardView:
    name = "tensorboard"

    def __init__(self, run_dir: Path, first_step: int):
        with _needs(self.name, "tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()  # a killed run keeps its steps here too (the writer's own flush is every 120 s)

    def close(self) -> None:
        self.writer.close()


def _records_up_to(path: Path, last_step: int) -> str:
    """The lines of ``path`` with ``step <= last_step`` ("" if there is no file); a torn last line is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return ""
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            if number == len(lines) and not line.endswith("\n"):
                break  # the unfinished write of a killed run
            raise RowError(f"{path} line {number}: not a metrics record (a JSON object with a step)") from None
        if not isinstance(step, int):
            raise RowError(f"{path} line {number}: step must be an integer, got {step!r}")
        if step <= last_step:
            kept.append(line)
    return "".join(kept)


class MetricsLogger:
    """Per-step metrics to ``<run_dir>/metrics.jsonl`` (always) and the views named by ``trainer.logger``.

    ``loggers`` is verl's ``trainer.logger`` (a name or a list of :data:`LOGGERS`); ``config`` is the recipe as a
    plain dict (wandb's run config); ``resume_step`` is the checkpoint step a resumed run restarts from (None: a fresh
    run). ``last_step`` is the last step in the record; a logged step must be greater. Use as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, loggers: str | Sequence[str], *, project_name: str, experiment_name: str,
                 run_dir: str | os.PathLike, config: Mapping[str, Any] | None = None, resume_step: int | None = None):
        names = list(dict.fromkeys([loggers] if isinstance(loggers, str) else loggers))
        for name in names:
            if name not in LOGGERS:
                raise ConfigError(f"trainer.logger {name!r} is not supported; accepted: {', '.join(LOGGERS)}")
        if resume_step is not None and operator.index(resume_step) < 0:
            raise ValueError(f"resume_step must be >= 0, got {resume_step}")
        self.run_dir = prepare_output_dir(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.last_step = -1 if resume_step is None else resume_step
        self._views: list[_ConsoleView | _WandbView | _TensorboardView] = []
        self._fd: int | None = None

        with atomic_write(self.metrics_path, "w") as handle:
            handle.write("" if resume_step is None else _records_up_to(self.metrics_path, resume_step))
        try:
            self._fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise output_error(self.metrics_path, error) from error
        try:
            if "console" in names:
                self._views.append(_ConsoleView())
            if "tensorboard" in names:
                self._views.append(_TensorboardView(self.run_dir, first_step=self.last_step + 1))
            if "wandb" in names:
                self._views.append(_WandbView(self.run_dir, project_name, experiment_name, config,
                                              resuming=resume_step is not None))
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` of ``step`` (durably; OutputError if the record cannot be written), then show them."""
        if self._fd is None:
            raise ValueError("MetricsLogger.log after close")
        step = operator.index(step)
        if step <= self.last_step:
            raise ValueError(f"metrics of step {step} logged after step {self.last_step}: steps must increase")
        if "step" in metrics:
            raise ValueError("a metric named 'step' would clash with the record's step")
        record = {"step": step, **{key: _json_value(value) for key, value in metrics.items()}}
        data = memoryview((json.dumps(record, allow_nan=False) + "\n").encode("utf-8"))
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as error:
            raise output_error(self.metrics_path, error) from error
        self.last_step = step
        for view in list(self._views):
            try:
                view.log(step, metrics)
            except Exception as error:  # a view must not stop the run; the record above has the step
                logger.warning("metrics logger %r failed at step %d and is disabled for the rest of the run: %s: %s",
                               view.name, step, type(error).__name__, error)
                self._views.remove(view)
                with contextlib.suppress(Exception):
                    view.close()

    def close(self) -> None:
        """Finish every view (a failure is a warning) and close the record; idempotent."""
        views, self._views = self._views, []
        for view in views:
            try:
                view.close()
            except Exception as error:
                logger.warning("metrics logger %r failed to close: %s: %s", view.name, type(error).__name__, error)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
