"""Launch a flash_rc recipe on unforked verl 0.9.1: compose, translate, check, then verl's own ``run_ppo``.

    python -m flash_rc.backends.verl.main --config-name dapo_qwen2.5_32b_int8 [--config-path DIR] [--dry-run] \\
        trainer.nnodes=4 data.train_files=/data/dapo.parquet ...

Why our own main instead of ``python -m verl.trainer.main_ppo --config-path recipe/verl``: verl's main would ignore
the ``flash_rc:`` section (nothing turns ``flash_rc.engine.precision: int8`` into the engine kwargs, the runtime env
and the loss) and would find a missing data file or an impossible layout only after Ray, the workers and the model
are up. Here the recipe is composed with hydra over ``recipe/verl`` (each recipe has ``pkg://verl.trainer.config`` on
its search path and ``defaults: [ppo_trainer, ...]``, so every verl key and default is there; command-line
overrides are hydra's, ``+key=value`` for keys verl does not declare), then :func:`~flash_rc.backends.verl.config.
translate` writes the ``flash_rc:`` section into verl's keys and :func:`~flash_rc.backends.verl.config.check` reports
every problem at once — and only then is Ray started, by verl's ``run_ppo`` with verl's task runner, exactly as
``verl.trainer.main_ppo.main`` does after its ``auto_set_device`` and ``validate_config``.

``--dry-run`` (or ``DRY_RUN=1`` in the environment) stops after the checks and prints the final config as YAML on
stdout (interpolations resolved), exit status 0: it works on a machine without GPUs and never starts Ray. A bad
recipe exits with status 2 and one line per problem on stderr, in both modes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flash_rc.backends.verl.config import check, translate
from flash_rc.cli import ArgumentParser, run_command
from flash_rc.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[3] / "recipe" / "verl"
"""The recipes shipped with flash_rc (``--config-path`` picks another folder)."""
DRY_RUN_ENV = "DRY_RUN"
"""Environment variable: ``1`` (or ``true``/``yes``) is ``--dry-run``; ``0``, ``false``, ``no`` or empty is not."""


def compose(config_name: str, overrides: list[str], config_dir: Path = RECIPES) -> DictConfig:
    """The recipe composed by hydra with the overrides; hydra's errors become one-line ConfigErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    if not Path(config_dir).is_dir():
        raise ConfigError(f"--config-path: no such folder: {config_dir}")
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as error:
        raise ConfigError(_hydra_message(error)) from None


def _hydra_message(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        message += f": {str(cause).strip().splitlines()[0]}"
    elif "Cannot find primary config" in message:
        names = sorted(path.stem for path in RECIPES.glob("*.yaml"))
        message += f" (recipes in {RECIPES}: {', '.join(names)})"
    return message


def verl_schema() -> DictConfig:
    """verl 0.9.1's own ``ppo_trainer`` config, every key it declares (what unknown keys are found against)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return hydra_compose(config_name="ppo_trainer")


def prepare(config_name: str, overrides: list[str], config_dir: Path = RECIPES) -> DictConfig:
    """The config verl will run: composed, translated and checked (a ConfigError lists every problem)."""
    cfg = translate(compose(config_name, overrides, config_dir))
    check(cfg, verl_schema())
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # an interpolation that cannot resolve (a typo'd ${...}, a missing env var)
        raise ConfigError(f"the config does not resolve: {' '.join(str(error).split())}") from None
    return cfg


def dry_run_requested(flag: bool, environ=os.environ) -> bool:
    value = environ.get(DRY_RUN_ENV, "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"{DRY_RUN_ENV}={environ[DRY_RUN_ENV]!r}: use 1 (dry run) or 0")
    return flag or value in ("1", "true", "yes")


def launch(cfg: DictConfig) -> None:
    """Start Ray and train: verl's ``run_ppo`` with the task runner ``verl.trainer.main_ppo.main`` would pick."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

    if cfg.trainer.use_v1:
        run_ppo(cfg, task_runner_class=TaskRunnerV1)
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner

        run_ppo(cfg, task_runner_class=TaskRunner)


def run(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="python -m flash_rc.backends.verl.main",
        description="Train with a flash_rc recipe on verl 0.9.1 (recipes: recipe/verl).",
    )
    parser.add_argument("--config-name", required=True, help="recipe name, e.g. dapo_qwen2.5_32b_int8")
    parser.add_argument("--config-path", type=Path, default=RECIPES, help=f"recipe folder (default: {RECIPES})")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"compose, check and print the final config, then exit (also: {DRY_RUN_ENV}=1)",
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. trainer.nnodes=2 +key=value")
    args = parser.parse_intermixed_args(argv)
    dry_run = dry_run_requested(args.dry_run)
    cfg = prepare(args.config_name.removesuffix(".yaml"), args.overrides, args.config_path)
    if dry_run:
        sys.stdout.write(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    launch(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("verl", run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
