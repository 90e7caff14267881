"""Find the checkpoints a sweep evaluates, from globs, checkpoint folders or run directories.

Why one finder for every trainer: the question a sweep answers ("did the INT8 run learn as well as bf16?") compares
runs that flash_rc, verl, or neither wrote, and every one of them ends up as an HF model folder the rollout engine can
stream in. What each layout holds:

* flash_rc (``flash_rc.backends.local.checkpoint``): ``<run>/global_step_N/`` is an HF folder (``config.json`` +
  ``*.safetensors``); it is complete once ``trainer_state.json`` is written last. A save in progress is
  ``.global_step_N.tmp`` and is never picked (a glob's ``*`` skips dot-names, a run directory is read by name).
* verl: ``<run>/global_step_N/actor/`` holds FSDP/Megatron shards; its ``huggingface/`` subfolder holds HF weights
  only when the run saved them (``checkpoint.save_contents`` with ``hf_model``). Otherwise the shards must be merged
  with verl's model merger first (``python -m verl.model_merger merge``; the sweep does it when verl is installed).
* any other HF model folder: ``run`` is the folder's name, ``step`` is None.

A directory holding ``global_step_N`` folders is a run directory: all its checkpoints are taken. Run names are the run
directory's name, so one sweep over several runs plots one line per run. Checkpoints are sorted by step, then run.

Bad input: a pattern that matches nothing, or a path that does not exist, is a :class:`~flash_rc.errors.ConfigError`
naming it. A directory that is not a checkpoint (or an incomplete one) is kept with its ``problem``, so the sweep
writes an error row for it and goes on with the others; only when *nothing* found is a checkpoint (e.g. a single
folder given alone) is it a ConfigError, since there would be nothing to evaluate.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flash_rc.errors import ConfigError

CheckpointKind = Literal["flash_rc", "verl_hf", "verl_actor", "hf"]
STEP_PREFIX = "global_step_"
TRAINER_STATE = "trainer_state.json"
"""Written last into a flash_rc checkpoint: its presence marks a complete one (``backends.local.checkpoint``)."""


@dataclass(frozen=True)
class Checkpoint:
    """One model to evaluate."""

    run: str
    """Name of the run directory (of the folder itself for a plain HF model)."""
    step: int | None
    """Training step (N of ``global_step_N``); None for a plain HF model."""
    path: Path
    """Absolute path of the folder: the HF folder that is streamed in (``actor/huggingface`` for ``verl_hf``), or
    the ``actor`` folder that needs merging (``verl_actor``)."""
    kind: CheckpointKind
    problem: str | None = None
    """Why this folder cannot be evaluated (the sweep's error row), or None."""

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint lives in (a plain HF model: its parent folder)."""
        up = {"flash_rc": 1, "verl_hf": 3, "verl_actor": 2, "hf": 1}[self.kind]
        return self.path.parents[up - 1]


def step_of(name: str) -> int | None:
    """N for a folder named ``global_step_N``, else None (``.global_step_N.tmp`` is not a checkpoint)."""
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def hf_weights_problem(path: Path) -> str | None:
    """Why ``path`` is not an HF model folder the engine can load (no ``config.json`` or no ``*.safetensors``)."""
    missing = [what for what, found in (("config.json", (path / "config.json").is_file()),
                                        ("*.safetensors weights", any(path.glob("*.safetensors")))) if not found]
    return f"{path} has no {' and no '.join(missing)}" if missing else None


def verl_merger_available() -> bool:
    return importlib.util.find_spec("verl") is not None and importlib.util.find_spec("verl.model_merger") is not None


def _verl_checkpoint(actor: Path, step: int) -> Checkpoint:
    run = actor.parent.parent.name
    hf = actor / "huggingface"
    if hf_weights_problem(hf) is None:
        return Checkpoint(run, step, hf, "verl_hf")
    problem = None if verl_merger_available() else (
        f"{actor}: verl checkpoint without HF weights in huggingface/; it needs verl's model merger, which is not "
        f"installed here (pip install verl, or run: python -m verl.model_merger merge --backend fsdp "
        f"--local_dir {actor} --target_dir {actor}/huggingface)")
    return Checkpoint(run, step, actor, "verl_actor", problem)


def _in_directory(path: Path) -> list[Checkpoint]:
    """The checkpoint(s) a directory is or holds; one with a ``problem`` when it is neither."""
    step = step_of(path.name)
    if step is not None:
        if (path / "actor").is_dir():
            return [_verl_checkpoint(path / "actor", step)]
        problem = hf_weights_problem(path)
        if problem is None and not (path / TRAINER_STATE).is_file():
            problem = f"{path}: incomplete checkpoint (no {TRAINER_STATE}: its save did not finish)"
        return [Checkpoint(path.parent.name, step, path, "flash_rc", problem)]
    if path.name == "actor" and step_of(path.parent.name) is not None:
        return [_verl_checkpoint(path, step_of(path.parent.name))]
    if hf_weights_problem(path) is None:
        return [Checkpoint(path.name, None, path, "hf")]
    steps = [child for child in path.iterdir() if child.is_dir() and step_of(child.name) is not None]
    if steps:  # a run directory
        return [checkpoint for child in steps for checkpoint in _in_directory(child)]
    return [Checkpoint(path.name, None, path, "hf",
                       f"{path}: not a checkpoint (no config.json + *.safetensors, no global_step_N/ inside)")]


def discover(patterns: Sequence[str], exclude: Sequence[Path] = ()) -> list[Checkpoint]:
    """Every checkpoint the patterns (globs or paths) name, deduplicated, sorted by (step, run, path).

    ``exclude``: directories never taken (the sweep's own output directory, which a ``run/*`` glob also matches).
    Glob matches that are plain files (``run/metrics.jsonl`` for ``run/*``) are skipped; a path named explicitly
    must be a directory.
    """
    if not patterns:
        raise ConfigError("no checkpoints given (a glob such as 'runs/x/global_step_*', a run directory or a folder)")
    excluded = {Path(p).resolve() for p in exclude}
    found: dict[Path, Checkpoint] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            directories = [Path(match) for match in sorted(glob.glob(expanded)) if Path(match).is_dir()]
            if not directories:
                raise ConfigError(f"no checkpoint directories match {pattern!r}")
        else:
            if not Path(expanded).is_dir():
                reason = "is not a directory" if Path(expanded).exists() else "does not exist"
                raise ConfigError(f"checkpoint path {pattern!r} {reason}")
            directories = [Path(expanded)]
        for directory in directories:
            if directory.resolve() in excluded:
                continue
            for checkpoint in _in_directory(directory.resolve()):
                found.setdefault(checkpoint.path, checkpoint)
    checkpoints = sorted(found.values(), key=lambda c: (c.step is None, c.step or 0, c.run, str(c.path)))
    if not checkpoints:
        raise ConfigError(f"no checkpoints in {', '.join(map(repr, patterns))} (only the output directory matched)")
    if all(c.problem is not None for c in checkpoints):
        raise ConfigError(f"no usable checkpoint in {', '.join(map(repr, patterns))}: {checkpoints[0].problem}")
    return checkpoints


def common_parent(checkpoints: Sequence[Checkpoint]) -> Path:
    """The deepest directory holding every checkpoint's run directory (the default sweep output goes in
    ``<common parent>/eval``)."""
    return Path(os.path.commonpath([str(c.run_dir) for c in checkpoints]))
