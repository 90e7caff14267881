"""``flash-rc train`` refuses every bad recipe with one clear error naming the key, before anything heavy starts.

"Before" is proven, not assumed: the process group (``init_world``, and ``torch.distributed.init_process_group``
under it) and the rollout engine (``RolloutEngine``) are replaced by stand-ins that raise ``AssertionError("started")``,
which ``run_command`` does not turn into a message. A bad recipe must exit with the config error; the good base recipe
gets as far as starting the world (the control that shows the stand-ins are the ones the trainer calls). The stand-ins
and the refusal check are the ``run_train`` and ``assert_refused`` fixtures of this folder's conftest.py.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from flash_rc.backends.local.config import TrainRecipe
from flash_rc.config import engine_config, load_recipe
from flash_rc.errors import EXIT_USAGE

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def train(run_train, arithmetic_data, tmp_path, tiny_model):
    """``train(*overrides)`` -> (exit status, stderr) of ``flash-rc train`` on a small valid base recipe + overrides."""
    base = [
        f"data.train_files={arithmetic_data['train']}", f"data.val_files={arithmetic_data['test']}",
        "data.train_batch_size=4", "data.max_prompt_length=128", "data.max_response_length=16",
        f"actor_rollout_ref.model.path={tiny_model}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.max_model_len=256",
        f"trainer.default_local_dir={tmp_path / 'run'}", "flash_rc.train.progress=false",
    ]
    return lambda *overrides: run_train([*base, *overrides])


def test_the_base_recipe_reaches_the_process_group(train):
    # the control: every case below differs from this run by its overrides alone
    with pytest.raises(AssertionError, match="started"):
        train()


BAD_RECIPES = {
    # name: (overrides, environment, what the message must say)
    "missing model": (["actor_rollout_ref.model.path=/nonexistent"], {}, ["'/nonexistent'"]),
    "missing train file": (["data.train_files=/nonexistent/train.parquet"], {},
                           ["data.train_files", "/nonexistent/train.parquet"]),
    # 3 prompts per step cannot be cut into mini-batches of 2
    "train batch not a multiple of the mini-batch": (
        ["data.train_batch_size=3"], {},
        ["data.train_batch_size=3", "actor_rollout_ref.actor.ppo_mini_batch_size=2"]),
    # mini-batch 2 prompts x n 2 = 4 sequences on one rank; micro-batches of 3 do not divide 4
    "micro batch not dividing the per-rank mini-batch": (
        ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"], {},
        ["4 sequences per rank", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"]),
    # 4 sequences per mini-batch over 3 ranks; and the recipe says 1 process per node
    "world size the mini-batch does not split over": (
        ["trainer.n_gpus_per_node=3"], {"WORLD_SIZE": "3"}, ["ppo_mini_batch_size", "over 3 ranks"]),
    "n_gpus_per_node is not the world size": (["trainer.n_gpus_per_node=2"], {}, ["trainer.n_gpus_per_node=2"]),
    "unknown key": (["trainer.foo=1"], {}, ["trainer.foo"]),
    "verl key the local learner pins (sequence parallelism)": (
        ["actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"], {},
        ["actor_rollout_ref.actor.ulysses_sequence_parallel_size"]),
    "verl key the local learner pins (top_p)": (["actor_rollout_ref.rollout.top_p=0.9"], {},
                                                ["actor_rollout_ref.rollout.top_p"]),
    "unknown logger": (["trainer.logger=[console,nosuchlogger]"], {}, ["trainer.logger", "nosuchlogger"]),
    # the ramp may not start before token 0: L_buf = 32 > L_max = 16
    "overlong buffer longer than the responses": (
        ["reward.reward_kwargs.overlong_buffer_cfg.enable=true", "reward.reward_kwargs.overlong_buffer_cfg.len=32"],
        {}, ["reward.reward_kwargs.overlong_buffer_cfg.len=32", "(0, 16]"]),
    # 200 + 100 = 300 tokens do not fit a 256-token context
    "prompt + response longer than the context": (
        ["data.max_prompt_length=200", "data.max_response_length=100"], {},
        ["= 300", "actor_rollout_ref.rollout.max_model_len=256"]),
}


@pytest.mark.parametrize("overrides, environment, expected", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_a_bad_recipe_is_one_error_naming_the_key_before_anything_starts(train, assert_refused, monkeypatch, overrides,
                                                                         environment, expected):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    status, err = train(*overrides)
    assert_refused(status, err, EXIT_USAGE, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="block FP8 runs on a GPU")
def test_a_precision_this_platform_lacks_is_refused_before_the_engine_starts(train, assert_refused):
    status, err = train("flash_rc.engine.precision=fp8", "flash_rc.engine.fp8_granularity=block")
    assert_refused(status, err, EXIT_USAGE, ["fp8_granularity='block'", "CUDA GPU"])


def test_a_fresh_run_over_a_checkpoint_is_refused_and_auto_resumes_it(train, assert_refused, tmp_path):
    checkpoint = tmp_path / "run" / "global_step_3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 3}')
    status, err = train("trainer.resume_mode=disable")
    assert_refused(status, err, EXIT_USAGE, ["trainer.resume_mode", "global_step_3"])
    # the same run directory with resume_mode=auto is a resume: it goes on to start the world
    with pytest.raises(AssertionError, match="started"):
        train("trainer.resume_mode=auto")


RECIPES = sorted(glob.glob(str(REPO / "recipe" / "local" / "*.yaml")))


def test_there_are_local_recipes():
    assert RECIPES  # else the parametrized check below would run nothing


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.rpartition("/")[2])
def test_every_local_recipe_validates(path):
    recipe = load_recipe(TrainRecipe, path)  # raises ConfigError naming any bad key
    engine_config(recipe)  # and its engine keys make a valid EngineConfig
