"""Weight-sync cost by precision: seconds per GB of bf16 weights vs a plain bf16 reload and vs the memory floor.

For each precision a fresh engine is started and the model's own weights are synced ``--syncs`` times (after one
warm-up sync) through ``flash_rc.rollout.sync.sync``. The floor is the time to read the bf16 weights once and write
the engine's copy once (2 bytes + 2 or 1 bytes per parameter) at the copy bandwidth measured in the same run on the
same device. Targets (GPU): a quantized sync <= 1.5x the plain bf16 reload and <= 2x the floor.

    python bench/quant_sync.py                                             # SmolLM2-135M on this CPU
    python bench/quant_sync.py --model /models/Qwen2.5-7B-Instruct --fp8-granularity tensor   # a user's GPU
"""

from __future__ import annotations

import argparse
import statistics

import torch

from flash_rc.rollout.checkpoint import CheckpointTensors
from flash_rc.rollout.engine import EngineConfig, RolloutEngine
from flash_rc.rollout.sync import sync
from memory_floor import copy_bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8", "fp8"])
    parser.add_argument("--fp8-granularity", default="channel", choices=["channel", "tensor", "block"])
    parser.add_argument("--scales", default="refresh", choices=["refresh", "frozen"])
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--visibility-sample", type=float, default=1 / 64)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth(device)
    results = {}
    for precision in args.precisions:
        config = EngineConfig(model=args.model, dtype="bfloat16", precision=precision, max_model_len=1024,
                              fp8_granularity=args.fp8_granularity, scales=args.scales, kv_cache_gib=0.5,
                              visibility_sample=args.visibility_sample)
        with RolloutEngine(config) as engine:
            weights = {n: t.to(device=device, dtype=torch.bfloat16) for n, t in CheckpointTensors(engine.model_path).items()}
            params = sum(t.numel() for t in weights.values())
            quantized = sum(weights[n].numel() for n in engine.weight_format.quantized_names)
            gigabytes = 2 * params / 1e9
            sync(engine, weights)  # warm-up
            seconds = statistics.median(sync(engine, weights).seconds for _ in range(args.syncs))
        written = 2 * (params - quantized) + (1 if precision != "bf16" else 2) * quantized
        floor = (2 * params + written) / bandwidth
        results[precision] = (seconds, gigabytes, floor)
        print(f"{precision:>5}: {seconds:.3f}s per sync of {gigabytes:.2f} GB", flush=True)

    base = results.get("bf16", next(iter(results.values())))[0]
    print(f"\nmodel {args.model} on {device}, copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write), "
          f"median of {args.syncs} syncs, scales={args.scales}")
    print(f"{'precision':>9}  {'s/GB':>7}  {'vs bf16 reload':>14}  {'vs floor':>8}")
    for precision, (seconds, gigabytes, floor) in results.items():
        print(f"{precision:>9}  {seconds / gigabytes:>7.3f}  {seconds / base:>13.2f}x  {seconds / floor:>7.1f}x")


if __name__ == "__main__":
    main()
