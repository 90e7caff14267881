"""Triton weight quantizers: INT8 per channel, FP8 E4M3 per tensor / per channel / per 128×128 block.

Why this exists. Every weight sync re-quantizes the whole model (14 GB of bf16 for a 7B model). In eager PyTorch
each quantizer is 6–8 kernels with float32 temporaries (upcast, finiteness check, abs, amax, divide, round, clamp,
cast): 43–51 bytes moved per bf16 element (counted per aten op). These kernels read the weight once and write the
codes (and scales) once: 3 bytes per element, the HBM floor. The math is `flash_rc.algo.quant` (read its docstring);
this file only computes it, *bit for bit*: same float32 operations in the same order, IEEE division (`tl.div_rn`; a
plain `/` may lower to an approximate divide), no FMA contraction (`enable_fp_fusion=False`), round-half-to-even done
explicitly.

Kernels:

    _quantize_rows_kernel   grid (⌈out/BLOCK_M⌉,). Rows are independent for per-channel scales, so one program owns
                            BLOCK_M whole rows: when a row fits one tile (in ≤ 16,384) it is loaded once, reduced to
                            its amax, scaled and stored (one pass); wider rows are swept twice (amax, then codes; the
                            second sweep mostly hits L2). With given (frozen) scales it is a single sweep, and the
                            per-tensor scale is the same kernel with a scale stride of 0.
    _abs_max_kernel         per-tensor only: 2-D tiles, each atomically max-es its |w| max into one float32. Max is
                            exact and order-free, so the atomics are deterministic. The rows kernel then derives the
                            scale from it (program 0 stores it): 2 launches + 2 tiny memsets.
    _quantize_blocks_kernel grid (⌈out/128⌉, ⌈in/128⌉): one 128×128 block per program, amax → scale → codes, one pass.

FP8 codes are encoded by hand (`_fp8_codes`): the interpreter's float→fp8 cast does not round to nearest even, and
writing the byte ourselves through a uint8 view makes the code that runs under TRITON_INTERPRET=1 in CI the same code
that runs on the GPU. The encoding mirrors PyTorch's c10 cast (round to nearest even, subnormals at 2^-9 steps).

Non-finite input: every kernel counts NaN/±inf values into an int32 counter. By default the wrapper checks it (one
host sync) and raises ValueError naming the tensor; pass `nonfinite_count` to accumulate instead and check a whole
bucket of tensors with one sync. The weight itself is never modified; outputs are fresh tensors.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import triton
import triton.language as tl

from flash_rc.algo import quant as reference
from flash_rc.algo.quant import (
    FP8_BLOCK_MIN_AMAX,
    FP8_BLOCK_SIZE,
    FP8_CHANNEL_MIN_SCALE,
    FP8_DTYPE,
    FP8_INV_MAX,
    check_block_size,
    check_finite,
    check_scale,
    check_weight,
    fp8_scale_shape,
)
from flash_rc.kernels.dispatch import INTERPRET, use_triton
from flash_rc.types import FP8Granularity

# _quantize_rows_kernel MODE: how a scale is derived from an amax and how codes are computed from it.
_INT8_CHANNEL, _FP8_CHANNEL, _FP8_TENSOR = 0, 1, 2
# ... and SCALE_FROM: where the scale comes from.
_GIVEN, _ROW_AMAX, _TENSOR_AMAX = 0, 1, 2
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5·2^23: x + M − M rounds a float32 |x| < 2^22 to an integer, ties to even
_FP8_SUBNORMAL_MAGIC = tl.constexpr(16384.0)  # 2^14: its float32 ulp is 2^-9, the E4M3 subnormal step
_FP8_SUBNORMAL_MAGIC_BITS = tl.constexpr(0x46800000)  # float32 bits of 16384.0
# Tile sizes: big tiles keep loads in flight on a GPU, small ones keep the interpreter (numpy) fast in CI.
_MAX_ROW_TILE = 1024 if INTERPRET else 16384  # widest row quantized in one pass
_TILE = 1024 if INTERPRET else 8192  # elements per program otherwise


@triton.jit
def _int8_codes(scaled):
    """round_half_even(clamp(scaled, ±127)) as int8. Clamping first is equivalent (127 is an integer)."""
    clamped = tl.minimum(tl.maximum(scaled, -127.0), 127.0)
    return ((clamped + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int8)


@triton.jit
def _fp8_codes(scaled):
    """E4M3 (fn) bit pattern of clamp(scaled, ±448), round to nearest even, as uint8 (sign | exponent | mantissa)."""
    clamped = tl.minimum(tl.maximum(scaled, -448.0), 448.0)
    bits = clamped.to(tl.int32, bitcast=True)
    magnitude_bits = bits & 0x7FFFFFFF
    # Normal (|x| ≥ 2^-6): keep 3 of 23 mantissa bits rounding to nearest even (add 0x7FFFF + the lowest kept bit),
    # rebias the exponent from 127 to 7; a mantissa carry rolls into the exponent as it should.
    normal = (magnitude_bits + (0x7FFFF - (120 << 23)) + ((magnitude_bits >> 20) & 1)) >> 20
    # Subnormal (|x| < 2^-6, multiples of 2^-9): adding 2^14 rounds |x| to that step; the ulps above 2^14 are the code.
    magnitude = magnitude_bits.to(tl.float32, bitcast=True)
    subnormal = (magnitude + _FP8_SUBNORMAL_MAGIC).to(tl.int32, bitcast=True) - _FP8_SUBNORMAL_MAGIC_BITS
    code = tl.where(magnitude_bits < (121 << 23), subnormal, normal)
    return (code | ((bits >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _scale_from_amax(amax, min_channel_scale, MODE: tl.constexpr):
    if MODE == 0:  # INT8: amax / 127, all-zero row → 1
        scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
    elif MODE == 1:  # FP8 channel: max(amax / 448, 1/(448·512))
        scale = tl.maximum(tl.div_rn(amax, 448.0), min_channel_scale)
    else:  # FP8 tensor: amax / 448, all-zero tensor → 1
        scale = tl.where(amax > 0, tl.div_rn(amax, 448.0), 1.0)
    return scale


@triton.jit
def _codes(weight, scale, MODE: tl.constexpr):
    if MODE == 0:
        codes = _int8_codes(tl.div_rn(weight, scale))
    elif MODE == 1:
        codes = _fp8_codes(tl.div_rn(weight, scale))
    else:  # vLLM's static per-tensor kernel multiplies by the float32 reciprocal
        codes = _fp8_codes(weight * tl.div_rn(1.0, scale))
    return codes


@triton.jit
def _load_tile(w_ptr, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """float32 tile (zeros outside the weight) and its in-bounds mask; rows are int64 so offsets cannot overflow."""
    in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(w_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32), in_bounds


@triton.jit
def _count_nonfinite(tile, nonfinite_ptr):
    count = tl.sum(tl.sum(tl.where(tl.abs(tile) < float("inf"), 0, 1), axis=1), axis=0)
    tl.atomic_add(nonfinite_ptr, count, mask=count > 0)


@triton.jit
def _quantize_rows_kernel(
    w_ptr, codes_ptr, scale_ptr, amax_ptr, nonfinite_ptr,
    n_rows, n_cols, stride_row, stride_col, stride_scale, min_channel_scale,
    MODE: tl.constexpr, SCALE_FROM: tl.constexpr, COUNT_NONFINITE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < n_rows
    lanes = tl.arange(0, BLOCK_N)
    if SCALE_FROM == 0:
        scale = tl.load(scale_ptr + rows * stride_scale, mask=row_in, other=1.0)
    elif SCALE_FROM == 2:
        tensor_scale = _scale_from_amax(tl.load(amax_ptr), min_channel_scale, MODE)
        if tl.program_id(0) == 0:
            tl.store(scale_ptr, tensor_scale)
        scale = tl.full((BLOCK_M,), 0.0, tl.float32) + tensor_scale
    if SINGLE_TILE:  # the whole row is in registers: one read, one write
        tile, in_bounds = _load_tile(w_ptr, rows, lanes, n_rows, n_cols, stride_row, stride_col)
        if COUNT_NONFINITE:
            _count_nonfinite(tile, nonfinite_ptr)
        if SCALE_FROM == 1:
            scale = _scale_from_amax(tl.max(tl.abs(tile), axis=1), min_channel_scale, MODE)
            tl.store(scale_ptr + rows * stride_scale, scale, mask=row_in)
        codes = _codes(tile, scale[:, None], MODE)
        tl.store(codes_ptr + rows[:, None] * n_cols + lanes[None, :], codes, mask=in_bounds)
    else:
        if SCALE_FROM == 1:
            amax = tl.zeros((BLOCK_M,), tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                tile, _ = _load_tile(w_ptr, rows, start + lanes, n_rows, n_cols, stride_row, stride_col)
                if COUNT_NONFINITE:
                    _count_nonfinite(tile, nonfinite_ptr)
                amax = tl.maximum(amax, tl.max(tl.abs(tile), axis=1))
            scale = _scale_from_amax(amax, min_channel_scale, MODE)
            tl.store(scale_ptr + rows * stride_scale, scale, mask=row_in)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + lanes
            tile, in_bounds = _load_tile(w_ptr, rows, cols, n_rows, n_cols, stride_row, stride_col)
            if COUNT_NONFINITE and SCALE_FROM != 1:
                _count_nonfinite(tile, nonfinite_ptr)
            tl.store(codes_ptr + rows[:, None] * n_cols + cols[None, :], _codes(tile, scale[:, None], MODE),
                     mask=in_bounds)  # fmt: skip


@triton.jit
def _abs_max_kernel(w_ptr, amax_ptr, nonfinite_ptr, n_rows, n_cols, stride_row, stride_col,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile, _ = _load_tile(w_ptr, rows, cols, n_rows, n_cols, stride_row, stride_col)
    _count_nonfinite(tile, nonfinite_ptr)
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(tile), axis=1), axis=0))


@triton.jit
def _quantize_blocks_kernel(
    w_ptr, codes_ptr, scale_ptr, nonfinite_ptr,
    n_rows, n_cols, stride_row, stride_col, stride_scale_row, stride_scale_col, min_amax, inv_max,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    block_row, block_col = tl.program_id(0), tl.program_id(1)
    rows = (block_row * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = block_col * BLOCK_N + tl.arange(0, BLOCK_N)
    tile, in_bounds = _load_tile(w_ptr, rows, cols, n_rows, n_cols, stride_row, stride_col)
    _count_nonfinite(tile, nonfinite_ptr)
    scale_offset = block_row * stride_scale_row + block_col * stride_scale_col
    if HAS_SCALE:
        scale = tl.load(scale_ptr + scale_offset)
    else:  # vLLM per_block_cast_to_fp8 on CUDA: max(amax, 1e-4) · float32(1/448)
        scale = tl.maximum(tl.max(tl.max(tl.abs(tile), axis=1), axis=0), min_amax) * inv_max
        tl.store(scale_ptr + scale_offset, scale)
    codes = _fp8_codes(tile * tl.div_rn(1.0, scale))
    tl.store(codes_ptr + rows[:, None] * n_cols + cols[None, :], codes, mask=in_bounds)


# ---------------------------------------------------------------------------------------------------------------
# Host side


def _row_tiles(n_cols: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, SINGLE_TILE, num_warps) for rows of n_cols elements."""
    row_tile = triton.next_power_of_2(n_cols)
    if row_tile <= _MAX_ROW_TILE:
        block_n, single = row_tile, True
    else:
        block_n, single = _TILE, False
    block_m = max(1, _TILE // block_n)
    return block_m, block_n, single, 1 if INTERPRET else (8 if block_m * block_n >= 8192 else 4)


def _counter(weight: torch.Tensor, nonfinite_count: torch.Tensor | None) -> torch.Tensor:
    if nonfinite_count is None:
        return torch.zeros(1, dtype=torch.int32, device=weight.device)
    count = nonfinite_count
    if count.dtype != torch.int32 or count.numel() != 1 or count.device != weight.device:
        raise ValueError(f"nonfinite_count must be a 1-element int32 tensor on {weight.device}, got {count.dtype} "
                         f"{tuple(count.shape)} on {count.device}")  # fmt: skip
    return count


def _check_counter(weight: torch.Tensor, name: str, counter: torch.Tensor, caller_checks: bool) -> None:
    if not caller_checks and counter.item() > 0:
        check_finite(weight, name)


def _launch_rows(weight, codes, scale, counter, mode: int, scale_from: int) -> None:
    n_rows, n_cols = weight.shape
    block_m, block_n, single, num_warps = _row_tiles(n_cols)
    amax = scale  # placeholder pointer: only SCALE_FROM == _TENSOR_AMAX reads it
    if scale_from == _TENSOR_AMAX:
        amax = torch.zeros(1, dtype=torch.float32, device=weight.device)
        tile_n = min(triton.next_power_of_2(n_cols), _TILE)
        tile_m = max(1, _TILE // tile_n)
        _abs_max_kernel[(triton.cdiv(n_rows, tile_m), triton.cdiv(n_cols, tile_n))](
            weight, amax, counter, n_rows, n_cols, weight.stride(0), weight.stride(1),
            BLOCK_M=tile_m, BLOCK_N=tile_n, num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    _quantize_rows_kernel[(triton.cdiv(n_rows, block_m),)](
        weight, codes, scale, amax, counter,
        n_rows, n_cols, weight.stride(0), weight.stride(1), scale.stride(0) if scale.numel() > 1 else 0,
        FP8_CHANNEL_MIN_SCALE,
        MODE=mode, SCALE_FROM=scale_from, COUNT_NONFINITE=scale_from != _TENSOR_AMAX,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_TILE=single, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip


def quantize_int8_per_channel(
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    name: str = "weight",
    backend: Literal["auto", "triton", "torch"] = "auto",
    nonfinite_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `flash_rc.algo.quant.quantize_int8_per_channel`: (codes int8 [out, in], scale float32
    [out, 1]), bit-identical. backend="auto" runs Triton on CUDA tensors and the torch reference elsewhere.

    nonfinite_count (int32 [1] on the weight's device): when given, the kernel adds the number of NaN/±inf inputs to
    it and returns without a host sync — the caller must check it before using the codes. The torch path always
    raises immediately instead."""
    if not use_triton(weight, backend, f"quantize_int8_per_channel: {name}"):
        return reference.quantize_int8_per_channel(weight, scale, name=name)
    check_weight(weight, name)
    if scale is not None:
        check_scale(scale, weight, (weight.shape[0], 1), name)
    counter = _counter(weight, nonfinite_count)
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    out_scale = scale if scale is not None else torch.empty((weight.shape[0], 1), dtype=torch.float32,
                                                            device=weight.device)  # fmt: skip
    _launch_rows(weight, codes, out_scale, counter, _INT8_CHANNEL, _GIVEN if scale is not None else _ROW_AMAX)
    _check_counter(weight, name, counter, nonfinite_count is not None)
    return codes, out_scale


def quantize_fp8(
    weight: torch.Tensor,
    granularity: FP8Granularity,
    block_size: Sequence[int] = FP8_BLOCK_SIZE,
    scale: torch.Tensor | None = None,
    *,
    name: str = "weight",
    backend: Literal["auto", "triton", "torch"] = "auto",
    nonfinite_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `flash_rc.algo.quant.quantize_fp8`: (codes float8_e4m3fn [out, in], float32 scale of
    `fp8_scale_shape`), bit-identical. Block sizes must be powers of two on the Triton path (vLLM uses 128×128).
    `backend` and `nonfinite_count` as in `quantize_int8_per_channel`."""
    if not use_triton(weight, backend, f"quantize_fp8: {name}"):
        return reference.quantize_fp8(weight, granularity, block_size, scale, name=name)
    check_weight(weight, name)
    block_rows, block_cols = check_block_size(block_size)
    shape = fp8_scale_shape(weight.shape, granularity, (block_rows, block_cols))
    if granularity == "block" and (block_rows & (block_rows - 1) or block_cols & (block_cols - 1)):
        raise ValueError(f"the Triton block quantizer needs power-of-two block sizes, got {block_size!r}")
    if scale is not None:
        check_scale(scale, weight, shape, name)
    counter = _counter(weight, nonfinite_count)
    codes = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    out_scale = scale if scale is not None else torch.empty(shape, dtype=torch.float32, device=weight.device)
    if granularity == "block":
        n_rows, n_cols = weight.shape
        _quantize_blocks_kernel[shape](
            weight, codes.view(torch.uint8), out_scale, counter,
            n_rows, n_cols, weight.stride(0), weight.stride(1), out_scale.stride(0), out_scale.stride(1),
            FP8_BLOCK_MIN_AMAX, FP8_INV_MAX,
            HAS_SCALE=scale is not None, BLOCK_M=block_rows, BLOCK_N=block_cols,
            num_warps=1 if INTERPRET else 8, enable_fp_fusion=False,
        )  # fmt: skip
    else:
        mode = _FP8_TENSOR if granularity == "tensor" else _FP8_CHANNEL
        scale_from = _GIVEN if scale is not None else (_TENSOR_AMAX if granularity == "tensor" else _ROW_AMAX)
        _launch_rows(weight, codes.view(torch.uint8), out_scale, counter, mode, scale_from)
    _check_counter(weight, name, counter, nonfinite_count is not None)
    return codes, out_scale
