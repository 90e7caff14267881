"""Run checkpoints: ``<run dir>/global_step_N/``, written atomically, and the latest complete one for resume.

Why this layout: ``global_step_N`` is verl's name, so eval sweeps find flash_rc and verl checkpoints the same way. Each
folder is a complete HF model (``config.json``, float32 safetensors of the master weights, tokenizer: plain vLLM and
transformers load it), plus what resuming needs: ``optimizer/`` (sharded, ``torch.distributed.checkpoint``),
``learner_state.pt`` (schedule), ``rng_rank<r>.pt`` (every rank's torch / Python / NumPy RNG states),
``trainer_state.json`` (step, the rollout source's state: the data position) and ``recipe.yaml``.

Atomic: everything is written into ``.global_step_N.tmp``, and the folder is renamed into place only after every
rank has finished writing (then the run directory is fsync'ed). A run killed mid-save leaves a temporary folder,
which is never picked for resume and is removed by the next save; a complete checkpoint is one whose name is
``global_step_N`` and which holds ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from flash_rc.learner.distributed import World
from flash_rc.outputs import atomic_write

STEP_DIR = re.compile(r"global_step_(\d+)")
STATE_FILE = "trainer_state.json"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"global_step_{step}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``run_dir``, oldest first."""
    found = []
    if Path(run_dir).is_dir():
        for path in Path(run_dir).iterdir():
            match = STEP_DIR.fullmatch(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, learner, trainer_state: dict, recipe_yaml: str, world: World,
                    keep: int | None = None) -> Path:  # fmt: skip
    """Write ``global_step_<step>`` (collective: every rank calls it) and prune to the newest ``keep``."""
    run_dir = Path(run_dir)
    final = step_dir(run_dir, step)
    temporary = run_dir / f".{final.name}.tmp"
    if world.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    world.barrier()
    learner.save(temporary, learner.model_path)
    torch.save(_rng_state(), temporary / f"rng_rank{world.rank}.pt")
    world.barrier()
    if world.is_main:
        with atomic_write(temporary / "recipe.yaml", "w") as handle:
            handle.write(recipe_yaml)
        with atomic_write(temporary / STATE_FILE, "w") as handle:  # last: its presence marks a complete checkpoint
            json.dump({"step": step, **trainer_state}, handle, indent=1)
        if final.exists():  # a checkpoint of this step from an earlier, abandoned attempt
            shutil.rmtree(final)
        os.replace(temporary, final)
        descriptor = os.open(run_dir, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        for path in run_dir.glob(".global_step_*.tmp"):  # left by runs killed while saving
            shutil.rmtree(path, ignore_errors=True)
        if keep is not None:
            for _, old in complete_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def load_checkpoint(path: Path, learner, world: World) -> dict:
    """Restore the learner and this rank's RNG states from ``path``; returns the trainer state (step, source)."""
    path = Path(path)
    learner.load(path)
    rng = path / f"rng_rank{world.rank}.pt"
    if not rng.is_file():
        from flash_rc.errors import ConfigError

        raise ConfigError(f"{path} was saved by fewer ranks than the {world.size} running now (no {rng.name})")
    _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
