"""eval/discovery.py on hand-built checkpoint layouts (flash_rc, verl, plain HF, run directories): what is found, in
which order, with which run name and kind, and how non-checkpoints and bad patterns are reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flash_rc.errors import ConfigError
from flash_rc.eval import discovery
from flash_rc.eval.discovery import Checkpoint, common_parent, discover, step_of


def hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")
    return path


def flash_rc_checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    path = hf_folder(run / f"global_step_{step}")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


@pytest.fixture()
def no_verl(monkeypatch):
    monkeypatch.setattr(discovery, "verl_merger_available", lambda: False)


def test_step_of_reads_only_complete_names():
    assert step_of("global_step_12") == 12
    assert step_of(".global_step_12.tmp") is None  # a save in progress
    assert step_of("global_step_x") is None and step_of("actor") is None


def test_a_run_directory_gives_its_checkpoints_by_step_and_skips_saves_in_progress(tmp_path):
    run = tmp_path / "arith_int8"
    for step in (10, 2, 1):
        flash_rc_checkpoint(run, step)
    hf_folder(run / ".global_step_11.tmp")  # killed mid-save: never a checkpoint
    (run / "metrics.jsonl").write_text("")
    found = discover([str(run)])
    assert [(c.run, c.step, c.kind, c.problem) for c in found] == [
        ("arith_int8", 1, "flash_rc", None), ("arith_int8", 2, "flash_rc", None), ("arith_int8", 10, "flash_rc", None)]
    assert found[0].path == (run / "global_step_1").resolve() and found[0].run_dir == run.resolve()
    # a glob finds the same, and skips the plain file it also matches
    assert discover([str(run / "*")]) == found
    assert discover([str(run / "global_step_*")]) == found


def test_an_incomplete_flash_rc_checkpoint_is_kept_with_its_problem(tmp_path):
    run = tmp_path / "run"
    flash_rc_checkpoint(run, 1)
    flash_rc_checkpoint(run, 2, complete=False)
    (run / "global_step_3").mkdir()  # no weights at all
    found = {c.step: c for c in discover([str(run / "global_step_*")])}
    assert found[1].problem is None
    assert "incomplete checkpoint (no trainer_state.json" in found[2].problem
    assert found[3].problem.endswith("has no config.json and no *.safetensors weights")


def test_verl_actor_with_hf_weights_streams_its_huggingface_folder(tmp_path, no_verl):
    run = tmp_path / "verl_run"
    hf_folder(run / "global_step_5" / "actor" / "huggingface")
    (run / "global_step_9" / "actor" / "huggingface").mkdir(parents=True)  # config/tokenizer only: shards to merge
    (run / "global_step_9" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"")
    found = discover([str(run / "global_step_*")])
    assert [(c.run, c.step, c.kind) for c in found] == [("verl_run", 5, "verl_hf"), ("verl_run", 9, "verl_actor")]
    assert found[0].path == (run / "global_step_5" / "actor" / "huggingface").resolve()
    assert found[0].run_dir == found[1].run_dir == run.resolve()
    assert "needs verl's model merger, which is not installed" in found[1].problem
    assert "python -m verl.model_merger merge" in found[1].problem
    # the actor folder itself names the same checkpoint
    assert discover([str(run / "global_step_5" / "actor")]) == found[:1]


def test_verl_actor_is_merged_when_verl_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "verl_merger_available", lambda: True)
    actor = tmp_path / "run" / "global_step_3" / "actor"
    actor.mkdir(parents=True)
    (actor / "other").mkdir()
    (checkpoint,) = discover([str(tmp_path / "run")])
    assert (checkpoint.kind, checkpoint.problem, checkpoint.path) == ("verl_actor", None, actor.resolve())


def test_a_plain_hf_folder_is_its_own_run_without_step(tmp_path):
    model = hf_folder(tmp_path / "models" / "Qwen2.5-0.5B")
    (checkpoint,) = discover([str(model)])
    assert checkpoint == Checkpoint("Qwen2.5-0.5B", None, model.resolve(), "hf")
    assert common_parent([checkpoint]) == (tmp_path / "models").resolve()


def test_several_runs_sorted_by_step_then_run_with_their_common_parent(tmp_path):
    for run in ("bf16", "int8"):
        for step in (3, 6):
            flash_rc_checkpoint(tmp_path / "ckpts" / run, step)
    found = discover([str(tmp_path / "ckpts" / "int8"), str(tmp_path / "ckpts" / "bf16" / "global_step_*")])
    assert [(c.step, c.run) for c in found] == [(3, "bf16"), (3, "int8"), (6, "bf16"), (6, "int8")]
    assert common_parent(found) == (tmp_path / "ckpts").resolve()
    # overlapping patterns name each checkpoint once
    assert discover([str(tmp_path / "ckpts" / "*"), str(tmp_path / "ckpts" / "int8")]) == found


def test_a_directory_that_is_not_a_checkpoint_is_an_error_row_among_others_and_an_error_alone(tmp_path):
    run = tmp_path / "run"
    flash_rc_checkpoint(run, 1)
    (run / "notes").mkdir()
    found = discover([str(run / "*")])
    assert [c.problem is None for c in found] == [True, False]  # step 1, then the step-less folder
    assert "not a checkpoint (no config.json + *.safetensors, no global_step_N/ inside)" in found[1].problem
    with pytest.raises(ConfigError, match=r"no usable checkpoint in '.*notes'.*not a checkpoint"):
        discover([str(run / "notes")])


def test_the_output_directory_is_excluded(tmp_path):
    run = tmp_path / "run"
    flash_rc_checkpoint(run, 1)
    (run / "eval").mkdir()
    assert [c.step for c in discover([str(run / "*")], exclude=[run / "eval"])] == [1]


def test_bad_patterns_name_themselves(tmp_path):
    with pytest.raises(ConfigError, match=r"no checkpoint directories match '.*/nothing/global_step_\*'"):
        discover([str(tmp_path / "nothing" / "global_step_*")])
    with pytest.raises(ConfigError, match=r"checkpoint path '.*/missing' does not exist"):
        discover([str(tmp_path / "missing")])
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(ConfigError, match=r"'.*/file.txt' is not a directory"):
        discover([str(tmp_path / "file.txt")])
    with pytest.raises(ConfigError, match="no checkpoints given"):
        discover([])
