"""Learning parity: do INT8/FP8 rollouts with TIS learn like bf16 rollouts? And how much of each update do they see?

Flash RL's claim (``../shared/docs/flash-rl-and-tis.md``) is that 8-bit rollouts corrected by token TIS learn as bf16
rollouts do, and that without TIS they learn visibly worse; it is shown in plots only. This script tests it on the
one task SmolLM2-135M-Instruct learns on a CPU within minutes (single-digit additions, ``make train``'s recipe):
every *arm* is the same ``flash-rc train`` run — same recipe, data, seed, learning rate, steps — except for the rollout
precision, TIS and the quantization scales. Those are the only keys an arm may set; any other difference is refused
before anything starts (the arms' full recipes are compared key by key).

Arms (``--arms``; each run ``--seeds`` times, seed-major order so that every arm has a first seed before any has a
second):

==================  ==========================================================================================
``bf16``            bf16 rollouts + token TIS (C = 2): the reference (the same loss as the quantized TIS arms)
``int8_no_tis``     INT8 (W8A8) rollouts, no importance weights (``rollout_is: null``; diagnostics still logged)
``int8_tis``        INT8 rollouts + token TIS (C = 2), scales recomputed at every sync (``refresh``)
``fp8_tis``         FP8 E4M3 rollouts (per-channel scales: what vLLM's CPU backend runs) + token TIS (C = 2)
``int8_tis_frozen`` INT8 + TIS with scales frozen at the first sync (Flash RL's INT8 semantics)
==================  ==========================================================================================

Recorded per step (from each run's ``metrics.jsonl``): the training reward ``critic/score/mean``, the mismatch between
the rollout engine and the learner (``rollout_corr/kl``, ``chi2_token``, ``rollout_is_eff_sample_size``) and the
update visibility (``sync/update_lost_fraction``: the fraction of the learner's weight update that rounds away in
the engine's INT8/FP8 codes, on a sample of rows). After training, every arm's final checkpoint is evaluated greedily
on the held-out problems **in bf16**, all through one engine (``flash-rc eval``), so the accuracy measures what was
learned, not the rollout precision. Outputs under ``--output`` (default ``outputs/parity``): one run directory per
(arm, seed), ``eval/`` (the sweep), ``parity.json`` (every number), ``parity.md`` (the table) and the figures
``parity.png`` (reward and mismatch per step) and ``visibility.png`` (update visibility per step), also copied to
``bench/`` with ``--publish``.

A rerun resumes: finished runs are skipped, an interrupted one resumes from its last checkpoint, evaluated
checkpoints are not evaluated again; ``--report`` only re-reads what is there. ``--quick`` is a 3-step, one-seed
version with a tiny batch (the slow test runs it end to end).

    python bench/parity.py                      # the full study (~90 min on a 2-core CPU)
    python bench/parity.py --quick --arms bf16,int8_tis --output /tmp/parity
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipe/local/arithmetic_smollm2_int8.yaml"
TIS = {"algorithm.rollout_correction.rollout_is": "token", "algorithm.rollout_correction.rollout_is_threshold": 2.0}
NO_TIS = {"algorithm.rollout_correction.rollout_is": None}
ARMS: dict[str, dict[str, Any]] = {
    "bf16": {"flash_rc.engine.precision": "bf16", **TIS},
    "int8_no_tis": {"flash_rc.engine.precision": "int8", "flash_rc.engine.scales": "refresh", **NO_TIS},
    "int8_tis": {"flash_rc.engine.precision": "int8", "flash_rc.engine.scales": "refresh", **TIS},
    "fp8_tis": {"flash_rc.engine.precision": "fp8", "flash_rc.engine.fp8_granularity": "channel",
                "flash_rc.engine.scales": "refresh", **TIS},
    "int8_tis_frozen": {"flash_rc.engine.precision": "int8", "flash_rc.engine.scales": "frozen", **TIS},
}
"""Each arm's overrides: the only keys in which arms may differ."""
ARM_KEYS = frozenset({"flash_rc.engine.precision", "flash_rc.engine.scales", "flash_rc.engine.fp8_granularity",
                      "algorithm.rollout_correction.rollout_is", "algorithm.rollout_correction.rollout_is_threshold"})
RUN_KEYS = frozenset({"trainer.default_local_dir", "trainer.experiment_name"})
"""Keys that name a run rather than change it (allowed to differ between arms)."""
QUICK = ["data.train_batch_size=2", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "data.max_response_length=24"]
"""``--quick``: 3 steps of 2 prompts × 4 samples with 24-token answers."""
STEP_SERIES = {"reward": "critic/score/mean", "kl": "rollout_corr/kl", "chi2": "rollout_corr/chi2_token",
               "ess": "rollout_corr/rollout_is_eff_sample_size", "update_lost": "sync/update_lost_fraction",
               "update_norm": "sync/update_norm_sampled", "update_error": "sync/update_relative_error",
               "codes_changed": "sync/codes_changed_fraction", "step_seconds": "timing_s/step"}
"""What each run records per step, by its metrics.jsonl key."""


FLASH_RC = str(Path(sys.executable).with_name("flash-rc"))
"""The CLI each run and the sweep go through (this interpreter's environment)."""


class ParityError(ValueError):
    """The arms are not comparable, or the study cannot start."""


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_seed{seed}"


def arm_and_seed(name: str) -> tuple[str, int]:
    """The inverse of :func:`run_name`."""
    arm, seed = name.rsplit("_seed", 1)
    return arm, int(seed)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def arm_overrides(arm: str) -> list[str]:
    return [f"{key}={'null' if value is None else value}" for key, value in ARMS[arm].items()]


def run_overrides(output: Path, arm: str, seed: int, common: list[str]) -> list[str]:
    name = run_name(arm, seed)
    seeded = [f"data.seed={seed}", f"flash_rc.train.rollout_seed={seed}", "trainer.test_freq=-1",
              "trainer.val_before_train=false", "trainer.save_freq=-1", "trainer.logger=[console]",
              "flash_rc.train.progress=false"]
    return [*seeded, *common, *arm_overrides(arm),
            f"trainer.default_local_dir={output / name}", f"trainer.experiment_name=parity_{name}"]


def resolved_recipe(recipe: Path, overrides: list[str]) -> dict[str, Any]:
    """The full validated recipe a ``flash-rc train`` run with these overrides would use, flattened."""
    from flash_rc.backends.local.config import TrainRecipe, check_train_recipe
    from flash_rc.config import load_recipe

    train_recipe = load_recipe(TrainRecipe, recipe, overrides)
    check_train_recipe(train_recipe, world_size=1)  # every cross-key problem now, not after the first run started
    return flatten(train_recipe.model_dump(mode="json"))


def check_comparable(recipe: Path, runs: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Each run's resolved recipe; refuses arms that differ in anything but precision / TIS / scales (and names)."""
    for arm in {arm_and_seed(name)[0] for name in runs}:
        stray = sorted(set(ARMS[arm]) - ARM_KEYS)
        if stray:
            raise ParityError(f"arm {arm} sets {stray}: arms may only differ in {sorted(ARM_KEYS)}")
    resolved = {name: resolved_recipe(recipe, overrides) for name, overrides in runs.items()}
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for name, flat in resolved.items():
        by_seed.setdefault(arm_and_seed(name)[1], {})[name] = flat
    for group in by_seed.values():
        (first, reference), *others = group.items()
        for name, flat in others:
            differing = sorted(key for key in set(reference) | set(flat)
                               if key not in ARM_KEYS | RUN_KEYS and reference.get(key) != flat.get(key))
            if differing:
                raise ParityError(f"runs {first} and {name} differ in {differing}: arms may only differ in "
                                  f"{sorted(ARM_KEYS)}")
    return resolved


def final_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(step, folder) of the run's latest complete checkpoint, None before the first."""
    from flash_rc.backends.local.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir) if run_dir.is_dir() else None


def train(recipe: Path, run_dir: Path, overrides: list[str], steps: int, log: Path) -> dict[str, Any]:
    """One arm × seed through ``flash-rc train`` in its own process (a failed run is recorded, the study goes on)."""
    final = final_checkpoint(run_dir)
    if final is not None and final[0] >= steps:
        return {"status": "done", "seconds": None}
    command = [FLASH_RC, "train", "--config", str(recipe), *overrides]
    start = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        status = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.monotonic() - start
    return {"status": "done" if status == 0 else f"failed (exit {status}, see {log})", "seconds": round(seconds, 1)}


def evaluate(output: Path, run_dirs: list[Path], val_file: str, max_tokens: int, log: Path) -> dict[str, float]:
    """Greedy held-out accuracy of each run's final checkpoint, in bf16, through one engine (``flash-rc eval``)."""
    finals = [final[1] for final in map(final_checkpoint, run_dirs) if final is not None]
    if not finals:
        return {}
    command = [FLASH_RC, "eval", *map(str, finals), "--data", val_file,
               "--precision", "bf16", "--output", str(output / "eval"), "--max-tokens", str(max_tokens),
               "--no-progress"]
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    return heldout_accuracy(output)


def heldout_accuracy(output: Path) -> dict[str, float]:
    """Run name → bf16 greedy accuracy of its final checkpoint, from the sweep's table."""
    import csv

    table = output / "eval" / "gsm8k.csv"
    if not table.is_file():
        return {}
    with table.open() as rows:
        return {row["run"]: float(row["strict"]) for row in csv.DictReader(rows)
                if not row["error"] and row["precision"] == "bf16"}


def step_series(run_dir: Path) -> dict[str, list[float | None]]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [row for row in rows if row.get("step", 0) >= 1 and STEP_SERIES["reward"] in row]
    return {name: [row.get(key) for row in rows] for name, key in STEP_SERIES.items()}


def mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def summarise(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per arm: means over seeds (per-seed values kept for the spread)."""
    table = []
    for arm in study["arms"]:
        runs = [run for run in study["runs"].values() if run["arm"] == arm and run["series"]["reward"]]
        if not runs:
            continue
        last3 = [mean(run["series"]["reward"][-3:]) for run in runs]
        accuracy = [run["heldout_bf16"] for run in runs if run["heldout_bf16"] is not None]
        table.append({
            "arm": arm, "seeds": len(runs), "steps": min(len(run["series"]["reward"]) for run in runs),
            "reward_first": mean([run["series"]["reward"][0] for run in runs]),
            "reward_last3": mean(last3), "reward_last3_per_seed": last3,
            "heldout_bf16": mean(accuracy), "heldout_bf16_per_seed": accuracy,
            **{f"{name}_mean": mean([mean(run["series"][name]) for run in runs])
               for name in ("kl", "chi2", "ess", "update_lost", "update_error", "codes_changed", "step_seconds")},
        })
        if ARMS[arm]["algorithm.rollout_correction.rollout_is"] is None:
            table[-1]["ess_mean"] = None  # no weights applied: the logged ESS of all-ones weights says nothing
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    def number(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}"

    def seeds(values):
        return " / ".join(number(v, 2) for v in values)

    lines = ["| arm | seeds | steps | reward step 1 | reward, last 3 steps (per seed) | held-out acc, bf16 (per seed) "
             "| KL(rollout‖learner) | χ² token | ESS | update lost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {row['steps']} | {number(row['reward_first'], 2)} "
            f"| {number(row['reward_last3'], 2)} ({seeds(row['reward_last3_per_seed'])}) "
            f"| {number(row['heldout_bf16'], 2)} ({seeds(row['heldout_bf16_per_seed'])}) "
            f"| {number(row['kl_mean'], 4)} | {number(row['chi2_mean'], 4)} | {number(row['ess_mean'])} "
            f"| {number(row['update_lost_mean'], 4)} |")  # s/step stays in parity.json: wall time on a shared machine
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(ARMS, ("black", "tab:red", "tab:blue", "tab:green", "tab:purple"), strict=True))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in study["runs"].items():
        series = run["series"]
        steps = range(1, len(series["reward"]) + 1)
        style = "-" if run["seed"] == study["seeds"][0] else "--"
        axes[0].plot(steps, series["reward"], style, color=colors[run["arm"]], label=name)
        axes[1].plot(steps, [v if v is not None else math.nan for v in series["kl"]], style,
                     color=colors[run["arm"]], label=name)
    axes[0].set(title="training reward (critic/score/mean)", xlabel="step", ylabel="reward")
    axes[1].set(title="mismatch KL(rollout ‖ learner), rollout_corr/kl", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    figure.suptitle("same recipe, data, seed and lr; only the rollout precision / TIS / scales differ", fontsize=9)
    figure.tight_layout()
    paths = [output / "parity.png", output / "visibility.png"]
    figure.savefig(paths[0], dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("update_lost", "update lost to rounding (sync/update_lost_fraction)"),
              ("codes_changed", "codes that changed (sync/codes_changed_fraction)"))
    for axis, (series_name, title) in zip(axes, panels, strict=True):
        for name, run in study["runs"].items():
            values = run["series"][series_name]
            if run["arm"] != "bf16" and any(v is not None for v in values):
                style = "o-" if run["seed"] == study["seeds"][0] else "s--"
                axis.plot(range(1, len(values) + 1), [v if v is not None else math.nan for v in values], style,
                          color=colors[run["arm"]], label=name, markersize=3)
        axis.set(title=title, xlabel="step")
    axes[0].legend(fontsize=7)
    figure.suptitle("what of each learner update reaches the 8-bit engine (sampled rows of every quantized weight)",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the training recipe every arm shares")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs/parity")
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override applied to every arm (repeatable)")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 seed, a tiny batch: checks the script")
    parser.add_argument("--report", action="store_true", help="only re-read the runs and write the report")
    parser.add_argument("--publish", action="store_true", help="copy the figures to bench/")
    args = parser.parse_args(argv)

    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    seeds = args.seeds[:1] if args.quick else args.seeds
    steps = 3 if args.quick else args.steps
    common = [*(QUICK if args.quick else []), f"trainer.total_training_steps={steps}", *args.common]
    output = args.output.resolve()
    runs = {run_name(arm, seed): run_overrides(output, arm, seed, common) for seed in seeds for arm in arms}
    from flash_rc.errors import FlashRCError

    try:
        resolved = next(iter(check_comparable(args.recipe, runs).values()))
    except (ParityError, FlashRCError) as error:
        print(f"parity: {error}", file=sys.stderr)
        return 2
    val_file, max_tokens = resolved["data.val_files"], resolved["data.max_response_length"]
    if not isinstance(val_file, str):
        print(f"parity: data.val_files must be one held-out file, got {val_file!r}", file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    log = output / "parity.log"
    status = {}
    if not args.report:
        for name, overrides in runs.items():
            print(f"[{time.strftime('%H:%M:%S')}] {name}: training {steps} steps", flush=True)
            status[name] = train(args.recipe, output / name, overrides, steps, log)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {status[name]['status']}", flush=True)
        print(f"[{time.strftime('%H:%M:%S')}] evaluating the final checkpoints in bf16 on {val_file}", flush=True)
    if args.report:
        accuracy = heldout_accuracy(output)
    else:
        accuracy = evaluate(output, [output / name for name in runs], val_file, max_tokens, log)

    study = {"recipe": str(args.recipe), "steps": steps, "seeds": seeds, "arms": arms, "common_overrides": common,
             "runs": {name: {"arm": arm_and_seed(name)[0], "seed": arm_and_seed(name)[1],
                             "series": step_series(output / name), "heldout_bf16": accuracy.get(name),
                             **status.get(name, {})} for name in runs}}
    study["table"] = summarise(study)
    (output / "parity.json").write_text(json.dumps(study, indent=1))
    table = markdown(study["table"])
    (output / "parity.md").write_text(table)
    figures = plot(study, output)
    if args.publish:
        for figure in figures:
            shutil.copyfile(figure, ROOT / "bench" / figure.name)
    print(table)
    print(f"parity: {output / 'parity.json'}, {output / 'parity.md'}, " + ", ".join(map(str, figures)))
    failed = [name for name, run in status.items() if run["status"] != "done"]
    return 1 if failed or not study["table"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    raise SystemExit(main())
