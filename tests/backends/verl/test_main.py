"""The verl launcher: `DRY_RUN=1 make train-dapo PRECISION=int8` prints a valid config on this CPU machine; bad input
(a wrong key, a missing file, an impossible layout, a bad precision, a contradiction) fails with its one-line
message and status 2 before Ray starts; a good config goes to verl's own ``run_ppo`` with verl's task runner.

"Before Ray" is checked by making ``ray.init`` (and verl's ``run_ppo``) fail loudly in the launcher's process and
running it *without* --dry-run: a bad config must still exit 2 with our message. (``import verl`` itself loads the
``ray`` module — verl/__init__ imports verl.protocol — so what is guaranteed is that Ray never starts.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("verl", reason="verl 0.9.1 is not importable here: build its env with `make verl-env`")

from flash_rc.backends.verl import config, main  # noqa: E402
from flash_rc.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.verl
REPO = Path(__file__).resolve().parents[3]
DAPO = "dapo_qwen2.5_32b_int8"  # remote data and a Hub model id by default: checkable here with no extra file


@pytest.fixture
def no_ray(monkeypatch):
    """Ray may not start in this process: ray.init and verl's run_ppo raise."""
    import ray
    import verl.trainer.main_ppo

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(verl.trainer.main_ppo, "run_ppo", refuse)
    monkeypatch.delenv("DRY_RUN", raising=False)


def refused(overrides: list[str], capsys, name: str = DAPO) -> list[str]:
    """Run the launcher for real (no dry run) and return its stderr lines; it must exit 2 before Ray."""
    status = main.main(["--config-name", name, *overrides])
    out, err = capsys.readouterr()
    assert status == 2, err
    assert out == ""
    return [line for line in err.splitlines() if not line.startswith(("note:", "WARNING", "["))]


def test_dry_run_through_make_prints_a_valid_config():
    """The issue's "done when": no other argument than the precision, on this CPU-only machine."""
    env = {**os.environ, "DRY_RUN": "1"}
    env.pop("MAKEFLAGS", None)
    result = subprocess.run(["make", "--no-print-directory", "train-dapo", "PRECISION=int8"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    yaml_start = result.stdout.index("model_engine:")  # anything before it is make's own (env up to date) lines
    cfg = yaml.safe_load(result.stdout[yaml_start:])
    assert cfg["flash_rc"]["engine"]["precision"] == "int8"
    rollout = cfg["actor_rollout_ref"]["rollout"]
    assert rollout["engine_kwargs"]["vllm"]["worker_extension_cls"].startswith("flash_rc.backends.verl.worker_ext.")
    assert rollout["tensor_model_parallel_size"] == 2 and cfg["trainer"]["nnodes"] == 4
    assert cfg["data"]["train_files"].startswith("hf://datasets/BytedTsinghua-SIA/DAPO-Math-17k/")


def test_make_passes_layout_and_data_variables(tmp_path):
    train = tmp_path / "train.parquet"
    train.touch()
    result = subprocess.run(
        ["make", "--no-print-directory", "train-dapo", "PRECISION=bf16", "DRY_RUN=1", "NNODES=2", "GPUS_PER_NODE=8",
         f"TRAIN_FILES={train}", "MODEL=Qwen/Qwen2.5-7B", "ARGS=trainer.total_epochs=3"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout[result.stdout.index("model_engine:") :])
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["n_gpus_per_node"], cfg["trainer"]["total_epochs"]) == (2, 8, 3)
    assert cfg["data"]["train_files"] == str(train) and cfg["actor_rollout_ref"]["model"]["path"] == "Qwen/Qwen2.5-7B"


def test_make_refuses_a_bad_precision():
    result = subprocess.run(["make", "train-dapo", "PRECISION=fp4"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "PRECISION=fp4: choose bf16, int8 or fp8" in result.stderr


def test_cli_exit_status_and_one_line_in_a_fresh_process():
    """python -m ... with ray.init made to fail: a missing file exits 2 with one line, and Ray never started."""
    code = (
        "import sys, ray\n"
        "ray.init = lambda *a, **k: sys.exit('Ray was started')\n"
        "from flash_rc.backends.verl.main import main\n"
        f"sys.exit(main(['--config-name', '{DAPO}', 'data.train_files=/nonexistent/train.parquet']))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "DRY_RUN"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("flash-rc verl: error:")]
    assert errors == [
        "flash-rc verl: error: invalid verl recipe: data.train_files: file not found: /nonexistent/train.parquet"
    ]


def test_wrong_key_on_the_command_line(no_ray, capsys):
    assert refused(["data.train_batch_sise=64"], capsys) == [
        "flash-rc verl: error: Could not override 'data.train_batch_sise'.: Key 'train_batch_sise' is not in struct"
    ]


def test_wrong_key_in_the_flash_rc_section(no_ray, capsys):
    assert refused(["+flash_rc.engine.precison=int8"], capsys) == [
        "flash-rc verl: error: invalid flash_rc section: flash_rc.engine.precison: Extra inputs are not permitted"
    ]


def test_wrong_key_in_a_recipe_file(no_ray, capsys, tmp_path):
    """hydra lets a recipe file add keys its command line could not: checked against verl's own schema."""
    (tmp_path / "typo.yaml").write_text((REPO / "recipe" / "verl" / f"{DAPO}.yaml").read_text()
                                        .replace("  - base/", "  - verl/base/")
                                        + "data:\n  max_prompt_lenght: 4096\n")  # fmt: skip
    (tmp_path / "verl").symlink_to(REPO / "recipe" / "verl")
    assert refused(["--config-path", str(tmp_path)], capsys, name="typo") == [
        "flash-rc verl: error: invalid verl recipe: data.max_prompt_lenght: unknown key (verl 0.9.1's config has no "
        "such key)"
    ]


def test_missing_model_folder(no_ray, capsys):
    assert refused(["actor_rollout_ref.model.path=/models/none"], capsys) == [
        "flash-rc verl: error: invalid verl recipe: actor_rollout_ref.model.path: model folder not found: "
        "/models/none (a local path; Hub ids look like owner/name)"
    ]


def test_bad_precision(no_ray, capsys):
    assert refused(["flash_rc.engine.precision=fp4"], capsys) == [
        "flash-rc verl: error: invalid flash_rc section: flash_rc.engine.precision: Input should be 'bf16', 'int8' "
        "or 'fp8' (got 'fp4')"
    ]


def test_impossible_layouts_all_in_one_error(no_ray, capsys):
    """6 GPUs: Ulysses SP 8 and rollout TP 2 x... do not divide them; 500 prompts are no multiple of 32 (verl's own
    check adds its line: 500 x 16 sequences are no multiple of the 6 GPUs)."""
    lines = refused(["trainer.nnodes=1", "trainer.n_gpus_per_node=6", "data.train_batch_size=500",
                     "actor_rollout_ref.rollout.tensor_model_parallel_size=4"], capsys)  # fmt: skip
    where = "trainer.nnodes x trainer.n_gpus_per_node = 1 x 6 = 6 GPUs"
    assert lines == [
        "flash-rc verl: error: invalid verl recipe:",
        f"  actor_rollout_ref.actor.ulysses_sequence_parallel_size=8 does not divide {where}",
        "  a rollout replica (tensor_model_parallel_size x data_parallel_size x pipeline_model_parallel_size = 4 "
        f"GPUs) does not divide {where}",
        "  data.train_batch_size=500 is not a multiple of actor_rollout_ref.actor.ppo_mini_batch_size=32",
    ]


def test_mini_batch_that_does_not_split_over_data_parallel_ranks(no_ray, capsys):
    """No dynamic batch: 32 prompts x 16 = 512 sequences over 32 GPUs / SP 8 = 4 ranks is fine, over SP 1 with
    micro-batches of 5: 512 / 32 = 16 sequences per rank, no multiple of 5."""
    lines = refused(["actor_rollout_ref.actor.use_dynamic_bsz=false", "actor_rollout_ref.actor.ulysses_sequence_"
                     "parallel_size=1", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5",
                     "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4"], capsys)  # fmt: skip
    assert lines == [
        "flash-rc verl: error: invalid verl recipe: 16 sequences per data-parallel rank and mini-batch "
        "are not a multiple of actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5"
    ]


def test_verls_own_validate_config_runs(no_ray, capsys):
    """Both micro-batch spellings set: verl's validate_config refuses it (its message, one line)."""
    lines = refused(["actor_rollout_ref.actor.use_dynamic_bsz=false", "actor_rollout_ref.actor.ulysses_sequence_"
                     "parallel_size=1", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                     "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
                     "actor_rollout_ref.rollout.log_prob_micro_batch_size=4"], capsys)  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith("flash-rc verl: error: invalid verl recipe: verl's validate_config:")
    assert "You have set both 'actor_rollout_ref.rollout.log_prob_micro_batch_size' AND" in lines[0]


@pytest.mark.parametrize(("override", "message"), [
    ("actor_rollout_ref.rollout.load_format=auto", "actor_rollout_ref.rollout.load_format='auto' contradicts "
     "flash_rc.engine.precision=int8: leave it unset (flash_rc sets 'dummy')"),
    ("actor_rollout_ref.rollout.quantization=fp8", "actor_rollout_ref.rollout.quantization='fp8' contradicts "
     "flash_rc.engine.precision=int8: verl's rollout quantization must stay null, the rollout precision is "
     "flash_rc.engine.precision (bf16|int8|fp8)"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode=gspo", "actor_rollout_ref.actor.policy_loss.loss_mode='gspo' "
     "contradicts flash_rc's TIS policy loss: leave it unset (flash_rc sets 'flash_rc_tis')"),
    ("+ray_kwargs.ray_init.runtime_env.env_vars.FLASH_RC_ROLLOUT_SCALES=frozen", "ray_kwargs.ray_init.runtime_env."
     "env_vars.FLASH_RC_ROLLOUT_SCALES='frozen' contradicts flash_rc.engine.scales=refresh: leave it unset (flash_rc "
     "sets 'refresh')"),
])  # fmt: skip
def test_explicit_settings_that_contradict_the_flash_rc_section(no_ray, capsys, override, message):
    assert refused([override], capsys) == [
        f"flash-rc verl: error: the flash_rc section contradicts the recipe: {message}"
    ]


@pytest.mark.parametrize(("override", "message"), [
    ("algorithm.adv_estimator=grpo", "algorithm.adv_estimator='grpo' contradicts flash_rc.rc.enable (RC chains, "
     "advantages grouped per (problem, summary) state): leave it unset (flash_rc sets 'flash_rc_rc_grpo')"),
    ("actor_rollout_ref.rollout.n=8", "actor_rollout_ref.rollout.n=8 contradicts flash_rc.rc.enable (RC chains, "
     "advantages grouped per (problem, summary) state): leave it unset (flash_rc sets 16)"),
    ("trainer.v1.trainer_mode=colocate_async", "trainer.v1.trainer_mode='colocate_async' contradicts "
     "flash_rc.rc.enable (RC chains, advantages grouped per (problem, summary) state): leave it unset (flash_rc sets "
     "'flash_rc_rc')"),
])  # fmt: skip
def test_rc_recipe_refuses_settings_rc_training_cannot_run_with(no_ray, capsys, tmp_path, override, message):
    train = tmp_path / "train.parquet"
    train.touch()
    lines = refused([f"data.train_files={train}", f"data.val_files={train}", override], capsys,
                    name="rc_qwen3_4b_int8")  # fmt: skip
    assert lines == [f"flash-rc verl: error: the flash_rc section contradicts the recipe: {message}"]


def test_rc_recipe_refuses_dynamic_sampling_before_ray(no_ray, capsys, tmp_path):
    train = tmp_path / "train.parquet"
    train.touch()
    (line,) = refused([f"data.train_files={train}", f"data.val_files={train}", "algorithm.filter_groups.enable=true"],
                      capsys, name="rc_qwen3_4b_int8")  # fmt: skip
    assert line.startswith("flash-rc verl: error: invalid verl recipe") and "filter_groups" in line


def test_fp8_on_a_gpu_below_sm89():
    cfg = config.translate(main.compose("dapo_qwen2.5_32b_fp8", []))
    with pytest.raises(ConfigError) as error:
        config.check(cfg, main.verl_schema(), cuda_capabilities=[(8, 0), (8, 0)])  # two A100s
    assert str(error.value) == (
        "invalid verl recipe: flash_rc.engine.precision=fp8 needs GPUs of compute capability "
        ">= 8.9 (Ada/Hopper or newer); this machine's GPUs have 8.0: use int8"
    )
    config.check(cfg, main.verl_schema(), cuda_capabilities=[(9, 0)])  # H100: fine
    config.check(config.translate(main.compose(DAPO, [])), main.verl_schema(), cuda_capabilities=[(8, 0)])  # int8


def test_dry_run_environment_variable(monkeypatch):
    assert main.dry_run_requested(False, {"DRY_RUN": "1"}) and not main.dry_run_requested(False, {"DRY_RUN": "0"})
    assert main.dry_run_requested(True, {}) and not main.dry_run_requested(False, {})
    with pytest.raises(ConfigError, match="DRY_RUN='maybe': use 1"):
        main.dry_run_requested(False, {"DRY_RUN": "maybe"})


def test_a_good_config_goes_to_verls_run_ppo(monkeypatch):
    """Without --dry-run, the translated config reaches verl's run_ppo with verl's v1 task runner (recorded)."""
    import verl.trainer.main_ppo

    calls = []

    def run_ppo(cfg, task_runner_class):
        calls.append((cfg, task_runner_class))

    monkeypatch.setattr(verl.trainer.main_ppo, "run_ppo", run_ppo)
    monkeypatch.delenv("DRY_RUN", raising=False)
    assert main.main(["--config-name", DAPO]) == 0
    ((cfg, runner),) = calls
    assert runner is verl.trainer.main_ppo.TaskRunnerV1
    assert cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.load_format == "dummy"
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "flash_rc_tis"
