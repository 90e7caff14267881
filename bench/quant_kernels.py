"""Benchmark the weight quantizers of a weight sync: Triton kernels vs the torch reference vs the HBM floor, one run.

    python bench/quant_kernels.py               # on a CUDA GPU: 7B-shaped bf16 weights
    python bench/quant_kernels.py --cpu         # no GPU: times the torch references on CPU at a small shape

For every quantizer (INT8 per channel with computed or frozen scales; FP8 E4M3 per tensor, per channel, per 128×128
block) and 7B-like shapes (4096×4096 attention, 11008×4096 and 4096×11008 MLP projections) it prints the median time
of the Triton kernels (`flash_rc.kernels.quant`, with a caller-owned non-finite counter, i.e. no host sync: the
bucketed sync path), of the same with the default per-call check (one host sync), of the torch reference
(`flash_rc.algo.quant`, which also checks finiteness), and of vLLM's own online quantizer where one exists and
vLLM is importable — each as a multiple of the HBM floor: (bf16 read once + codes written once + scales) / the
device-to-device copy bandwidth measured in the same run. Per-tensor FP8 needs the global amax before any code, so
its kernels read the weight twice: 5/3 of the floor is its best case. Each result is also checked bit for bit against
the reference. Times are medians of triton.testing.do_bench (CUDA events).
"""

import argparse
import sys
import time
from collections.abc import Callable

import torch

from flash_rc.algo import quant as reference
from flash_rc.kernels import quant as triton_quant
from memory_floor import copy_bandwidth

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
QUANTIZERS = ("int8", "int8 frozen", "fp8 tensor", "fp8 channel", "fp8 block")


def quantize(kind: str, module, weight: torch.Tensor, frozen: torch.Tensor, **kwargs):
    """Run quantizer `kind` from `module` (the Triton wrappers or the reference)."""
    if kind == "int8":
        return module.quantize_int8_per_channel(weight, **kwargs)
    if kind == "int8 frozen":
        return module.quantize_int8_per_channel(weight, frozen, **kwargs)
    return module.quantize_fp8(weight, kind.removeprefix("fp8 "), **kwargs)


def vllm_quantizers() -> dict[str, Callable[[torch.Tensor], object]]:
    """vLLM's online FP8 weight quantization, as its loaders run it (empty if vLLM is not importable)."""
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.online.fp8 import _fp8_channel_scale, _fp8_quant_per_channel
        from vllm.model_executor.layers.quantization.utils.quant_utils import weight_amax
        from vllm.utils.deep_gemm import per_block_cast_to_fp8
    except ImportError as error:
        print(f"  (vLLM not importable, no vLLM column: {error})")
        return {}

    def per_tensor(weight):
        scale = weight_amax(weight).reshape(1).float() / torch.tensor(448.0, device=weight.device)
        return ops.scaled_fp8_quant(weight, scale=scale)

    def per_channel(weight):
        scale = _fp8_channel_scale(weight_amax(weight, dim=-1, keepdim=True))
        return _fp8_quant_per_channel(weight, scale), scale

    return {"fp8 tensor": per_tensor, "fp8 channel": per_channel,
            "fp8 block": lambda weight: per_block_cast_to_fp8(weight, [128, 128], use_ue8m0=False)}  # fmt: skip


def floor_bytes(kind: str, rows: int, cols: int) -> int:
    scales = {"fp8 tensor": 1, "fp8 block": -(-rows // 128) * -(-cols // 128)}.get(kind, rows)
    return rows * cols * (2 + 1) + 4 * scales


def median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bit_exact(kind: str, weight: torch.Tensor, frozen: torch.Tensor) -> bool:
    ours = quantize(kind, triton_quant, weight, frozen)
    theirs = quantize(kind, reference, weight, frozen)
    return all(torch.equal(a.view(torch.uint8) if a.dtype == reference.FP8_DTYPE else a,
                           b.view(torch.uint8) if b.dtype == reference.FP8_DTYPE else b)
               for a, b in zip(ours, theirs, strict=True))  # fmt: skip


def bench_gpu() -> None:
    import triton

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    bandwidth = copy_bandwidth("cuda")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; times in µs, ratios to the HBM floor (read bf16 + write codes)")
    vllm = vllm_quantizers()
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    header = f"{'quantizer':<12} {'shape':>12} {'floor µs':>9} {'triton':>14} {'triton+check':>14} " \
             f"{'torch ref':>14} {'vLLM':>14}  {'bit-exact':>9}"  # fmt: skip
    print(header)
    for rows, cols in SHAPES:
        weight = (torch.randn(rows, cols, device="cuda") * 0.02).bfloat16()
        frozen = reference.quantize_int8_per_channel(weight)[1]
        for kind in QUANTIZERS:
            floor_us = floor_bytes(kind, rows, cols) / bandwidth * 1e6
            candidates = {
                "triton": lambda kind=kind: quantize(kind, triton_quant, weight, frozen, nonfinite_count=counter),
                "triton+check": lambda kind=kind: quantize(kind, triton_quant, weight, frozen),
                "torch ref": lambda kind=kind: quantize(kind, reference, weight, frozen),
            }
            if kind in vllm:
                candidates["vLLM"] = lambda kind=kind: vllm[kind](weight)
            cells = []
            for column in ("triton", "triton+check", "torch ref", "vLLM"):
                if column not in candidates:
                    cells.append(f"{'-':>14}")
                    continue
                us = median_ms(candidates[column]) * 1e3
                cells.append(f"{us:>7.0f} {us / floor_us:>5.2f}x")
            exact = "yes" if bit_exact(kind, weight, frozen) else "NO"
            print(f"{kind:<12} {f'{rows}x{cols}':>12} {floor_us:>9.1f} {' '.join(cells)}  {exact:>9}")


def bench_cpu(rows: int, cols: int) -> None:
    """The torch references on this CPU (what a CPU engine's weight sync pays per tensor)."""
    weight = (torch.randn(rows, cols) * 0.02).bfloat16()
    frozen = reference.quantize_int8_per_channel(weight)[1]
    print(f"torch reference quantizers on CPU ({torch.get_num_threads()} threads), bf16 {rows}x{cols}:")
    for kind in QUANTIZERS:
        quantize(kind, reference, weight, frozen)  # warm-up
        start = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            quantize(kind, reference, weight, frozen)
        ms = (time.perf_counter() - start) / repeats * 1e3
        print(f"  {kind:<12} {ms:8.1f} ms  ({rows * cols * 2 / ms / 1e6:.2f} GB/s of bf16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="time the torch references on CPU instead (no GPU needed)")
    parser.add_argument("--rows", type=int, default=2048, help="--cpu: weight rows")
    parser.add_argument("--cols", type=int, default=2048, help="--cpu: weight columns")
    args = parser.parse_args()
    if args.cpu:
        bench_cpu(args.rows, args.cols)
        return
    if not torch.cuda.is_available():
        sys.exit("bench/quant_kernels.py times the Triton quantizers on a CUDA GPU and none is visible. Run "
                 "`python bench/quant_kernels.py --cpu` to time the torch references on this CPU instead.")  # fmt: skip
    bench_gpu()


if __name__ == "__main__":
    main()
