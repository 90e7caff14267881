"""Rollout throughput by precision: bf16 vs INT8 W8A8 vs FP8 W8A8, same prompts, logprobs on, measured in one run.

Each precision gets a fresh engine (one vLLM engine per process at a time) and decodes the same chat prompts to
exactly ``--max-tokens`` tokens (EOS ignored), after a warm-up batch. Throughput = generated tokens / wall time of
the timed batch; the ratios are against the first precision listed (bf16 by default).

    python bench/rollout_precision.py                                     # SmolLM2-135M on this CPU
    python bench/rollout_precision.py --model /models/Qwen2.5-7B-Instruct --fp8-granularity tensor \\
        --prompts 256 --max-tokens 512                                    # a user's GPU (7B-shaped: target fp8 >= 1.5x)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flash_rc.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def prompts(count: int, data: Path) -> list:
    if data.exists():
        questions = [json.loads(line)["question"] for line in data.read_text().splitlines()[:count]]
    else:
        questions = [f"What is {i} times {i + 3}? Explain step by step." for i in range(count)]
    return [[{"role": "user", "content": q}] for q in questions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8", "fp8"])
    parser.add_argument("--fp8-granularity", default="channel", choices=["channel", "tensor", "block"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--data", type=Path, default=GSM8K, help="GSM8K-style JSONL for the prompts")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU only")
    args = parser.parse_args()

    batch = prompts(args.prompts, args.data)
    sampling = SamplingConfig(max_tokens=args.max_tokens, temperature=1.0, seed=0, ignore_eos=True)
    results = {}
    for precision in args.precisions:
        config = EngineConfig(model=args.model, dtype=args.dtype, precision=precision, max_model_len=2048,
                              fp8_granularity=args.fp8_granularity, kv_cache_gib=args.kv_cache_gib,
                              max_num_seqs=max(args.prompts, 1))
        with RolloutEngine(config) as engine:
            engine.generate(batch[:4], SamplingConfig(max_tokens=8, ignore_eos=True))  # warm-up
            start = time.perf_counter()
            completions = engine.generate(batch, sampling)
            seconds = time.perf_counter() - start
        tokens = sum(len(c[0].token_ids) for c in completions)
        assert all(len(c[0].logprobs) == len(c[0].token_ids) for c in completions)
        results[precision] = tokens / seconds
        print(f"{precision:>5}: {tokens} tokens in {seconds:.2f}s = {results[precision]:.0f} tok/s", flush=True)

    base = args.precisions[0]
    print(f"\nmodel {args.model}, {args.prompts} prompts x {args.max_tokens} tokens, logprobs on")
    print(f"{'precision':>9}  {'tok/s':>8}  {'vs ' + base:>8}")
    for precision, rate in results.items():
        print(f"{precision:>9}  {rate:>8.0f}  {rate / results[base]:>7.2f}x")


if __name__ == "__main__":
    main()
