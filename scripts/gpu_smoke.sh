#!/usr/bin/env bash
# GPU smoke test of the verl backend: two training steps of the GSM8K recipe (recipe/verl/gsm8k_qwen2.5_0.5b_*.yaml,
# PPO + token TIS) per rollout precision on ONE GPU with a small model, then one line per precision with the step
# time, the rollout throughput and the rollout/learner mismatch KL, read from verl's own metrics:
#   timing_s/step               wall time of a training step (s)
#   timing_per_token_ms/gen     generation time per response token over the batch -> rollout tokens/s = 1000 / it
#   rollout_corr/kl             mean(rollout log-prob - learner log-prob) over response tokens (verl's mismatch KL)
# Not run in CI (no GPU there). Needs verl 0.9.1 + vLLM on CUDA (the docker image) and a machine where the model can
# be read (a local folder, or a Hub id with network / a filled HF cache).
#
#   bash scripts/gpu_smoke.sh                                  # Qwen/Qwen2.5-0.5B-Instruct, bf16 int8 fp8
#   MODEL=/models/qwen2.5-0.5b PRECISIONS="bf16 int8" bash scripts/gpu_smoke.sh
#
# Settings (environment): MODEL, PRECISIONS, STEPS (2), BATCH (prompts per step, 16), VERL_PYTHON (python3),
# TRAIN_FILES / VAL_FILES (default: data/gsm8k/*.parquet, built from GSM8K=<dir with train.jsonl, test.jsonl>),
# OUT (outputs/gpu_smoke: per precision the metrics JSONL and the log). A precision the GPU lacks (FP8 below compute
# capability 8.9) is refused by the launcher's checks and reported as such; the others still run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
PRECISIONS="${PRECISIONS:-bf16 int8 fp8}"
STEPS="${STEPS:-2}"
BATCH="${BATCH:-16}"
PY="${VERL_PYTHON:-python3}"
OUT="${OUT:-outputs/gpu_smoke}"
GSM8K="${GSM8K:-../shared/data/gsm8k}"
TRAIN_FILES="${TRAIN_FILES:-data/gsm8k/train.parquet}"
VAL_FILES="${VAL_FILES:-data/gsm8k/test.parquet}"

if [ "$TRAIN_FILES" = data/gsm8k/train.parquet ] && [ ! -f data/gsm8k/train.parquet ]; then
    "$PY" -m flash_rc.cli data gsm8k --input-dir "$GSM8K" --output-dir data/gsm8k
fi

declare -A STATUS
for precision in $PRECISIONS; do
    run_dir="$OUT/$precision"
    rm -rf "$run_dir" && mkdir -p "$run_dir"
    echo "=== $precision: $STEPS steps of gsm8k_qwen2.5_0.5b_$precision on one GPU ($MODEL) ==="
    set +e
    VERL_FILE_LOGGER_PATH="$run_dir/metrics.jsonl" "$PY" -m flash_rc.backends.verl.main \
        --config-name "gsm8k_qwen2.5_0.5b_$precision" \
        actor_rollout_ref.model.path="$MODEL" \
        data.train_files="$TRAIN_FILES" data.val_files="$VAL_FILES" \
        trainer.nnodes=1 trainer.n_gpus_per_node=1 \
        data.train_batch_size="$BATCH" actor_rollout_ref.actor.ppo_mini_batch_size="$BATCH" \
        actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
        trainer.total_training_steps="$STEPS" trainer.val_before_train=false trainer.test_freq=-1 \
        trainer.save_freq=-1 trainer.resume_mode=disable 'trainer.logger=[console,file]' \
        trainer.default_local_dir="$run_dir/checkpoints" 2>&1 | tee "$run_dir/log.txt"
    STATUS[$precision]=${PIPESTATUS[0]}
    set -e
done

echo
echo "precision  status  step_s  rollout_tok_per_s  mismatch_kl   (means over steps 2..$STEPS; step 1 warms up)"
for precision in $PRECISIONS; do
    "$PY" - "$precision" "${STATUS[$precision]}" "$OUT/$precision/metrics.jsonl" <<'EOF'
import json, sys
from pathlib import Path

precision, status, path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
rows = [json.loads(line)["data"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
rows = [row for row in rows if "timing_s/step" in row]
if status != 0 or not rows:
    reason = "refused by the checks (see log.txt)" if status == 2 else f"failed (exit {status}, see log.txt)"
    print(f"{precision:<10} {reason}")
    sys.exit(0)
measured = rows[1:] or rows  # the first step includes compilation and the first weight sync

def mean(key, transform=lambda value: value):
    values = [transform(row[key]) for row in measured if row.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")

print(f"{precision:<10} {'ok':<7} {mean('timing_s/step'):>6.1f}  {mean('timing_per_token_ms/gen', lambda ms: 1000 / ms):>17.0f}"
      f"  {mean('rollout_corr/kl'):>11.2e}")
EOF
done
