"""Recipe loading: verl key names, hydra-style overrides, unknown keys refused with their path."""

import pytest

from flash_rc.config import ConfigError, load_recipe
from flash_rc.rc.decode import DecodeRecipe


def test_yaml_plus_overrides(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "defaults: [ppo_trainer, _self_]\n"  # verl's hydra composition: ignored by local readers
        "actor_rollout_ref:\n  model:\n    path: tiny-qwen2\n  rollout:\n    val_kwargs: {temperature: 0.5}\n"
        "flash_rc:\n  rc: {num_cycles: 3}\n"
    )
    recipe = load_recipe(DecodeRecipe, recipe_file, ["flash_rc.rc.num_cycles=5", "+data.val_max_samples=4",
                                                     "data.val_files=problems.jsonl"])
    assert recipe.actor_rollout_ref.model.path == "tiny-qwen2"
    assert recipe.actor_rollout_ref.rollout.val_kwargs.temperature == 0.5
    assert recipe.flash_rc.rc.num_cycles == 5 and recipe.data.val_max_samples == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor_rollout_ref.rollout.temprature=0.5"], "actor_rollout_ref.rollout.temprature: Extra inputs"),
        (["actor_rollout_ref.actor.ppo_epochs=1"], "actor_rollout_ref.actor: Extra inputs"),  # a key decode can't honour
        (["flash_rc.rc.num_cycles=0"], "flash_rc.rc.num_cycles: Input should be greater than or equal to 1"),
        (["flash_rc.rc.summary_mode=merge"], "flash_rc.rc.summary_mode"),
        (["flash_rc.rc.num_cycles"], "key.sub=value"),
    ],
)
def test_bad_recipes_fail_before_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(DecodeRecipe, None, ["data.val_files=problems.jsonl", *overrides])


def test_engine_extras_reuse_the_engine_config_fields():
    recipe = load_recipe(DecodeRecipe, None, ["data.val_files=p.jsonl", "flash_rc.engine.precision=int8",
                                              "flash_rc.engine.scales=frozen"])
    from flash_rc.config import engine_config

    config = engine_config(recipe)
    assert (config.precision, config.scales, config.model) == ("int8", "frozen", "smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="flash_rc.engine.precision"):
        load_recipe(DecodeRecipe, None, ["data.val_files=p.jsonl", "flash_rc.engine.precision=int4"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(DecodeRecipe, tmp_path / "nope.yaml")


def test_demo_recipe_is_valid():
    from pathlib import Path

    recipe = load_recipe(DecodeRecipe, Path(__file__).parents[1] / "recipe" / "rc_decode_demo.yaml")
    assert recipe.actor_rollout_ref.model.path == "smollm2-135m-instruct"
    assert recipe.data.val_max_samples == 16 and recipe.flash_rc.rc.num_cycles == 2
