"""Fixtures shared by the local backend's tests: the test scorers, the spy on scoring, and ``flash-rc train`` with
stand-ins for everything heavy.

The random tiny model never solves a task, so the scorers here judge what it does produce: ``parity`` gives 1 to a
response whose text has an even number of characters (so the samples of a prompt disagree), ``constant`` gives every
response score 0.5 and acc true (every group all-equal), ``hang_or_parity`` sleeps far past any time limit when the
ground truth is ``hang``. They live in a file the reward pool's worker processes import by path.

``flash-rc train`` runs through ``run_command`` with the process group (``init_world``, and
``torch.distributed.init_process_group`` under it) and the rollout engine (``RolloutEngine``) replaced by stand-ins
that raise ``AssertionError("started")``, which ``run_command`` does not turn into a message: a refusal with a clear
error is proven to come before either starts, and a good recipe proves the stand-ins are the ones the trainer calls.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

from flash_rc.backends.local import rollout as rollout_module
from flash_rc.backends.local import trainer
from flash_rc.cli import run_command
from flash_rc.data.arithmetic import ArithmeticConfig, prepare_arithmetic
from flash_rc.learner import distributed
from flash_rc.rewards import router
from flash_rc.rewards.router import ScorerRoute, register_scorer
from flash_rc.rollout.engine import RolloutEngine

TEST_SCORERS = textwrap.dedent('''
    import time


    def parity(solution_str, ground_truth, extra_info=None):
        even = len(solution_str) % 2 == 0
        return {"score": float(even), "acc": even, "pred": str(len(solution_str)), "reason": "even" if even else "odd"}


    def constant(solution_str, ground_truth, extra_info=None):
        return {"score": 0.5, "acc": True, "pred": None, "reason": "constant"}


    def hang_or_parity(solution_str, ground_truth, extra_info=None):
        if ground_truth == "hang":
            time.sleep(600)  # killed by the pool at the route's timeout
        return parity(solution_str, ground_truth, extra_info)
''')


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def route_to_test_scorer(tmp_path, monkeypatch):
    """``route_to_test_scorer(data_source, scorer, timeout_s)``: scores ``data_source`` by the test scorer named
    ``scorer`` (one of ``TEST_SCORERS``), killed past ``timeout_s``; the router starts with nothing registered."""
    monkeypatch.setattr(router, "_registered_exact", {})
    monkeypatch.setattr(router, "_registered_prefixes", {})
    path = tmp_path / "local_test_scorers.py"
    path.write_text(TEST_SCORERS)

    def route(data_source: str, scorer: str, timeout_s: float) -> None:
        register_scorer(data_source, ScorerRoute(f"{path}:{scorer}", timeout_s=timeout_s))

    return route


@pytest.fixture
def scored(monkeypatch):
    """Every group the rollout scored through ``score_completions``, in order: ``(prompt, completions, reward
    results)``."""
    groups = []
    real = rollout_module.score_completions

    def spy(prompts, completions):
        results = real(prompts, completions)
        groups.extend(zip(prompts, completions, results))
        return results

    monkeypatch.setattr(rollout_module, "score_completions", spy)
    return groups


@pytest.fixture
def arithmetic_data(tmp_path) -> dict[str, Path]:
    """A small arithmetic dataset under ``tmp_path / "data"``: ``{"train": 8 rows, "test": 4 rows}`` (parquet paths)."""
    return prepare_arithmetic(ArithmeticConfig(train_size=8, test_size=4), tmp_path / "data")


def started(*args, **kwargs):
    raise AssertionError("started")


@pytest.fixture
def run_train(tmp_path, monkeypatch, capsys):
    """``run_train(args)`` -> (exit status, stderr) of ``flash-rc train args``, in ``tmp_path`` on one process,
    with the process group and the engine replaced by stand-ins that raise ``AssertionError("started")``."""
    monkeypatch.chdir(tmp_path)  # nothing may land in the repo (the default run dir is relative)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # trainer imported init_world by name: the module attribute it calls is trainer.init_world
    monkeypatch.setattr(distributed, "init_world", started)
    monkeypatch.setattr(trainer, "init_world", started)
    monkeypatch.setattr(dist, "init_process_group", started)
    monkeypatch.setattr(RolloutEngine, "__init__", started)

    def run(args: list[str]) -> tuple[int, str]:
        status = run_command("train", trainer.main, args)
        return status, capsys.readouterr().err

    return run


def _assert_refused(status: int, err: str, exit_code: int, expected: list[str]) -> None:
    assert status == exit_code, err
    assert err.startswith("flash-rc train: error: "), err
    assert "started" not in err and "Traceback" not in err, err
    for fragment in expected:
        # each problem is on one line of its own (a recipe with several lists each under the summary)
        assert any(fragment in line for line in err.splitlines()), f"{fragment!r} not in {err!r}"


@pytest.fixture
def assert_refused():
    """``assert_refused(status, err, exit_code, expected)``: ``flash-rc train`` exited with ``exit_code`` and one
    clear error (no traceback, nothing started) with each ``expected`` fragment on some line of it."""
    return _assert_refused
