"""bench/parity.py: arms that differ in more than precision / TIS / scales are refused before anything starts, and
the ``--quick`` study runs end to end (slow) on the real trainer, engine and eval sweep."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path) -> list[str]:
    """The recipe's task (single-digit additions, 80 / 20) written under tmp_path: overrides pointing at it."""
    from flash_rc.data.arithmetic import ArithmeticConfig, prepare_arithmetic

    files = prepare_arithmetic(ArithmeticConfig(min_digits=1, max_digits=1, train_size=80, test_size=20, seed=0),
                               tmp_path / "data")
    return [f"data.train_files={files['train']}", f"data.val_files={files['test']}"]


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture
def parity(monkeypatch):
    spec = importlib.util.spec_from_file_location("parity", ROOT / "bench/parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the repository
    return module


def test_an_arm_that_changes_the_learning_rate_is_refused(parity, data, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(parity.ARMS, "int8_tis", {**parity.ARMS["int8_tis"], "actor_rollout_ref.actor.optim.lr": 1e-4})
    assert parity.main(["--arms", "bf16,int8_tis", "--output", str(tmp_path / "out"), *sets(data)]) == 2
    assert "arm int8_tis sets ['actor_rollout_ref.actor.optim.lr']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started


def test_runs_whose_resolved_recipes_differ_are_refused(parity, data, tmp_path):
    # the second line of defence: the runs' full recipes are compared key by key, whatever built their overrides
    runs = {name: parity.run_overrides(tmp_path, name.rsplit("_seed", 1)[0], 0, data)
            for name in ("bf16_seed0", "int8_tis_seed0")}
    runs["int8_tis_seed0"].append("data.max_response_length=32")
    with pytest.raises(parity.ParityError, match=r"differ in \['data.max_response_length'\]"):
        parity.check_comparable(parity.RECIPE, runs)


def test_the_arms_differ_only_in_precision_tis_and_scales(parity, data, tmp_path):
    runs = {f"{arm}_seed0": parity.run_overrides(tmp_path, arm, 0, data) for arm in parity.ARMS}
    resolved = parity.check_comparable(parity.RECIPE, runs)
    assert resolved["int8_no_tis_seed0"]["algorithm.rollout_correction.rollout_is"] is None
    assert resolved["fp8_tis_seed0"]["flash_rc.engine.precision"] == "fp8"
    assert resolved["int8_tis_frozen_seed0"]["flash_rc.engine.scales"] == "frozen"


def test_unknown_arms_a_broken_recipe_and_missing_data_fail_in_one_line(parity, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parity.main(["--arms", "int4", "--output", str(tmp_path)])
    assert "unknown ['int4']" in capsys.readouterr().err
    assert parity.main(["--arms", "bf16", "--set", "actor_rollout_ref.actor.ppo_mini_batch_size=3",
                        "--output", str(tmp_path), *sets(data)]) == 2
    assert "parity: invalid recipe" in capsys.readouterr().err
    assert parity.main(["--arms", "bf16", "--output", str(tmp_path), *sets(data),
                        "--set", f"data.train_files={tmp_path / 'missing.parquet'}"]) == 2
    assert "missing.parquet" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_study_end_to_end(parity, data, tmp_path):
    # every arm, 3 steps of 2 prompts x 4 samples on the tiny model: runs, bf16 sweep, table, figures; a rerun resumes
    output = tmp_path / "parity"
    args = ["--quick", "--output", str(output), *sets([*data, "actor_rollout_ref.model.path=tiny-qwen2"])]
    assert parity.main(args) == 0
    study = json.loads((output / "parity.json").read_text())
    assert [row["arm"] for row in study["table"]] == list(parity.ARMS)
    for name, run in study["runs"].items():
        assert run["status"] == "done" and len(run["series"]["reward"]) == 3, name
        assert run["heldout_bf16"] is not None, name  # every final checkpoint went through the bf16 sweep
        assert all(math.isfinite(kl) for kl in run["series"]["kl"]), name  # k1 KL: a mean log-ratio, either sign
        if run["arm"] == "bf16":
            assert run["series"]["update_lost"] == [None] * 3  # nothing quantized, nothing lost
        else:  # the lost fraction exists exactly where the learner moved the sampled rows (tiny: often not at all)
            series = run["series"]
            assert [lost is not None for lost in series["update_lost"]] == [norm > 0 for norm in series["update_norm"]]
    assert (output / "parity.png").stat().st_size > 10_000 and (output / "visibility.png").is_file()
    assert "| int8_tis |" in (output / "parity.md").read_text()
    assert parity.main(args) == 0  # resumes: every run is complete, every checkpoint already evaluated
    assert all(run["seconds"] is None for run in json.loads((output / "parity.json").read_text())["runs"].values())
