"""``make demo``: the whole card on one machine — RC training with INT8 rollouts + TIS, then a bf16 eval sweep.

Three acts, each the command a user would type, so the demo shows nothing the tools cannot do on their own:

1. ``flash-rc train --config recipe/local/demo_rc_smollm2_int8.yaml``: SmolLM2-135M-Instruct learns single-digit
   additions through RC cycles (online reason → summarize chains, summary-conditioned reasoning turns, a replay
   buffer), sampled by an INT8 (W8A8) vLLM engine, corrected by token TIS, trained by the FSDP2 bf16 learner, with one
   weight sync into the engine per step and a checkpoint per step;
2. ``flash-rc eval``: the base model and every checkpoint on the held-out additions, greedy, in **bf16** (what the
   policy learned, not what the INT8 engine samples), all through one engine, with the HTML report and plot;
3. a summary: reward per step (with the rollout/learner mismatch and the sync), accuracy per checkpoint, where the
   report is.

A rerun resumes (training from its last checkpoint; the sweep skips checkpoints already evaluated). Any recipe key can
be overridden: ``make demo DEMO_ARGS='trainer.total_training_steps=2'``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipe/local/demo_rc_smollm2_int8.yaml"
BIN = Path(sys.executable).parent


def run(*command: str) -> None:
    print(f"\n$ {' '.join(command)}", flush=True)
    status = subprocess.run(command, cwd=ROOT).returncode
    if status:
        raise SystemExit(status)


def main(overrides: list[str]) -> int:
    from flash_rc.backends.local.config import TrainRecipe
    from flash_rc.config import load_recipe
    from flash_rc.errors import ConfigError
    from flash_rc.models import resolve_model

    try:
        recipe = load_recipe(TrainRecipe, RECIPE, overrides)
    except ConfigError as error:
        print(f"make demo: {error}", file=sys.stderr)
        return 2
    run_dir = (ROOT / recipe.trainer.run_dir).resolve()
    sweep_dir = run_dir / "eval"

    # 1. RC training: INT8 rollouts + TIS, FSDP2 learner, a sync and a checkpoint per step.
    run(str(BIN / "flash-rc"), "train", "--config", str(RECIPE), *overrides)

    # 2. The base model and every checkpoint in bf16 on the held-out problems, through one engine.
    base_model = resolve_model(recipe.actor_rollout_ref.model.path)
    run(str(BIN / "flash-rc"), "eval", str(base_model), str(run_dir), "--data", str(recipe.data.val_files),
        "--precision", "bf16", "--max-tokens", str(recipe.data.max_response_length), "--output", str(sweep_dir),
        "--no-progress")

    # 3. What happened.
    print("\n=== training (RC states, INT8 rollouts + token TIS) ===")
    print(f"{'step':>4} {'reward':>7} {'online acc':>10} {'mismatch KL':>11} {'update lost':>11} {'sync s':>6}")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "critic/score/mean" in row:
            print(f"{row['step']:>4} {row['critic/score/mean']:>7.3f} {row.get('rc/online/acc_last_cycle', 0):>10.3f} "
                  f"{row.get('rollout_corr/kl', float('nan')):>11.2e} "
                  f"{row.get('sync/update_lost_fraction', float('nan')):>11.4f} {row.get('sync/seconds', 0):>6.2f}")
    print("\n=== held-out accuracy, greedy, bf16 ===")
    with (sweep_dir / "gsm8k.csv").open() as table:
        rows = [row for row in csv.DictReader(table) if not row["error"]]
    for row in sorted(rows, key=lambda row: int(row["step"] or 0)):
        name = f"step {row['step']}" if row["step"] else f"base model ({row['run']})"
        print(f"{name:<40} {float(row['strict']):.2f}  ({row['problems']} problems)")
    print(f"\nreport: {sweep_dir / 'report.html'}")
    print(f"plot:   {sweep_dir / 'gsm8k.png'}")
    print(f"checkpoints: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
