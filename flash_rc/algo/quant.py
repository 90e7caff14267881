"""Weight quantizers for the rollout engine, in plain torch: the contract every weight sync and Triton kernel follows.

Why this exists. A quantized vLLM engine only stays on-policy if every learner update is re-quantized exactly the way
the engine's own loader would have done it: then the codes we write into a running engine are the codes a fresh
engine would hold, and an HF model built from `dequantize_*(quantize_*(w))` is the model the engine runs. This module
is that contract. `flash_rc.kernels.quant` computes the same codes and scales bit for bit with Triton on CUDA.

Why in `flash_rc.algo`: like the loss references beside it, this is plain torch math that a Triton kernel is tested
against, so the kernels depend on `algo/` only and never on the rollout package (whose engine pulls in vLLM); the
rollout side (`flash_rc.rollout.formats`) imports it too.

Formats (all weights are 2-D [out, in] Linear weights in bf16/fp16/fp32; every scale is float32; dequant = code·scale):

INT8, symmetric per output channel (vLLM `CompressedTensorsW8A8Int8`, strategy "channel": int8 `weight` [out, in]
and float32 `weight_scale` [out, 1]; activations are quantized per token by the engine itself):

    amax_r  = max_j |w_rj|                              (exact in the input dtype, then float32)
    s_r     = amax_r / 127                              (IEEE float32 division; all-zero row → s_r = 1)
    q_rj    = clamp(round_half_even(w_rj / s_r), −127, 127)

  -128 is never produced: the range is symmetric so that negating a weight negates its code exactly. This is vLLM's
  own convention for int8 it quantizes itself (online int8 weights, dynamic per-token activations: amax/127); the
  int8 GEMMs accept any int8, so codes from llm-compressor checkpoints (amax/127.5 over [−128, 127]) load as well.
  We divide in float32 even for bf16 weights (vLLM's online int8 divides in the weight dtype, which is lossier).

FP8 E4M3 (`torch.float8_e4m3fn`, max 448), matching vLLM's online FP8 on CUDA (`layers/quantization/online/fp8.py`):

    tensor   s = amax / 448                 [1]      q = fp8(clamp(w · (1/s), ±448))    (static per-tensor kernel
             all-zero tensor → s = 1                                                    multiplies by 1/s)
    channel  s_r = max(amax_r / 448, 1/(448·512))   [out, 1]   q = fp8(clamp(w / s_r, ±448))   (PTPC: true divide)
    block    s_b = max(amax_b, 1e-4) · (1/448)      [⌈out/128⌉, ⌈in/128⌉]   q = fp8(clamp(w · (1/s_b), ±448))
             (vLLM `per_block_cast_to_fp8`; partial edge blocks take the amax of the elements they cover)

  fp8(·) is round-to-nearest-even (PyTorch's cast). Bit-exactness details we match: divisions are IEEE float32 by a
  tensor on the weight's device (vLLM's `_fp8_scale` does this on purpose; PyTorch's CUDA division by a Python float
  becomes a multiply by its reciprocal). For block scales that is exactly what vLLM does on CUDA: `amax / 448.0`
  there is `amax · float32(1/448)`, so we write the multiply (vLLM on CPU divides, which can differ by one ulp).
  The ±448 clamp is a no-op wherever vLLM leaves it out (products overshoot 448 by at most an ulp and round to 448).
  Where vLLM's formula divides by zero (all-zero tensor in per-tensor mode) we use s = 1: codes 0, exact dequant.

Frozen scales (Flash RL semantics, `scale=` given): the scale is used as is and values beyond ±127·s (±448·s)
saturate. Only the codes move between syncs, so an update smaller than half a quantization step cannot reach the
engine — the update-visibility sums below (``count_changed_codes``, ``update_sums``) measure exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch

from flash_rc.types import FP8Granularity

FP8_GRANULARITIES: tuple[str, ...] = get_args(FP8Granularity)
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Dtypes a learner may send (what the engine and the quantizers take)."""

INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0
FP8_BLOCK_SIZE = (128, 128)
# float32 constants, computed in float32 exactly as vLLM computes them (kernels pass these same values to Triton)
_F32_ONE, _F32_FP8_MAX = torch.tensor(1.0), torch.tensor(FP8_E4M3_MAX)
FP8_INV_MAX = (_F32_ONE / _F32_FP8_MAX).item()  # float32(1/448): block scales multiply by it, as vLLM on CUDA does
FP8_CHANNEL_MIN_SCALE = (_F32_ONE / (_F32_FP8_MAX * 512)).item()  # vLLM PTPC `_fp8_channel_scale` floor
FP8_BLOCK_MIN_AMAX = torch.tensor(1e-4).item()  # vLLM `per_block_cast_to_fp8` clamps the block amax to this
_NORM_CHUNK = 1 << 24  # elements per chunk in update_sums (bounds its float32 temporaries)


# ---------------------------------------------------------------------------------------------------------------
# Input checks (shared with flash_rc.kernels.quant)


def check_weight(weight: torch.Tensor, name: str) -> None:
    """Shape and dtype of a weight to quantize: a non-empty 2-D [out, in] floating tensor. Raises ValueError naming
    `name` otherwise. Finiteness is checked separately (`check_finite`) because it costs a pass over the data."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{name}: expected a bfloat16/float16/float32 weight, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} has no elements")


def check_finite(weight: torch.Tensor, name: str) -> None:
    """If any value is NaN/±inf, ValueError naming the tensor, how many such values there are and where the first one
    is (a full check; the quantizers first test the float32 sum, which is non-finite whenever an element is)."""
    bad = ~torch.isfinite(weight)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: {int(bad.sum())} non-finite values (first at row {row}, column {col}, value "
                         f"{weight[row, col].item()}); nothing was quantized")  # fmt: skip


def fp8_scale_shape(weight_shape: Sequence[int], granularity: FP8Granularity,
                    block_size: Sequence[int] = FP8_BLOCK_SIZE) -> tuple[int, ...]:  # fmt: skip
    """Shape of the float32 scale vLLM stores for an [out, in] FP8 weight."""
    out_features, in_features = weight_shape
    if granularity == "tensor":
        return (1,)
    if granularity == "channel":
        return (out_features, 1)
    if granularity == "block":
        block_rows, block_cols = block_size
        return (-(-out_features // block_rows), -(-in_features // block_cols))
    raise ValueError(f"granularity must be one of {FP8_GRANULARITIES}, got {granularity!r}")


def check_block_size(block_size: Sequence[int]) -> tuple[int, int]:
    if len(block_size) != 2 or not all(isinstance(b, int) and b > 0 for b in block_size):
        raise ValueError(f"block_size must be two positive ints (rows, cols), got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def check_scale(scale: torch.Tensor, weight: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    """A given (frozen) scale: float32, the expected shape, on the weight's device, finite and > 0 everywhere."""
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != shape:
        got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{name}: scale must be a float32 tensor of shape {shape}, got {got}")
    if scale.device != weight.device:
        raise ValueError(f"{name}: scale is on {scale.device} but the weight is on {weight.device}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: scale must be finite and > 0, got {scale[index].item()} at index {index}")


def _float32_values(weight: torch.Tensor, name: str, check: bool = True) -> torch.Tensor:
    """A private float32 copy of the weight (exact for bf16/fp16; the quantizers then work in place on it), after
    checking it is finite. A NaN or ±inf element makes the sum non-finite, so one cheap reduction clears the common
    case; only then (or on float32 overflow of the sum, which real weights never reach) does the exact element-wise
    check run and raise. ``check=False`` skips it for callers that reduce the values anyway (:func:`_absmax`)."""
    values = weight.to(torch.float32, copy=True)
    if check and not torch.isfinite(values.sum()):
        check_finite(weight, name)
    return values


def _absmax(values: torch.Tensor, weight: torch.Tensor, name: str, dim: int | None = None) -> torch.Tensor:
    """max |x| per row (``dim=1``, keepdim) or over the tensor as max(−min, max): two reductions and no |x|
    temporary (2.4x faster than ``abs().amax`` on this CPU; ``aminmax`` along a dim is 7x slower). NaN and ±inf
    propagate into it, so it doubles as the finiteness check (raising as :func:`check_finite` does)."""
    keep = {} if dim is None else {"dim": dim, "keepdim": True}
    amax = torch.maximum(-values.amin(**keep), values.amax(**keep))
    if not torch.isfinite(amax).all():
        check_finite(weight, name)
    return amax


def _as_f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 0-d tensor on `like`'s device: dividing by it is an IEEE division on every device."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


# ---------------------------------------------------------------------------------------------------------------
# INT8


def quantize_int8_per_channel(weight: torch.Tensor, scale: torch.Tensor | None = None, *,
                              name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Symmetric per-output-channel INT8: (codes int8 [out, in], scale float32 [out, 1]); see the module docstring.

    With `scale` given (frozen, float32 [out, 1]) it is used as is and out-of-range values saturate at ±127."""
    check_weight(weight, name)
    if scale is not None:
        check_scale(scale, weight, (weight.shape[0], 1), name)
    values = _float32_values(weight, name, check=scale is not None)
    if scale is None:
        amax = _absmax(values, weight, name, dim=1)
        scale = torch.where(amax > 0, amax / _as_f32(INT8_MAX, amax), 1.0)
    codes = values.div_(scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """codes · scale (float32), cast to `dtype`: the weight the INT8 engine computes with."""
    if codes.dtype != torch.int8 or codes.ndim != 2 or tuple(scale.shape) != (codes.shape[0], 1):
        raise ValueError(f"expected int8 codes [out, in] and a scale [out, 1], got {codes.dtype} "
                         f"{tuple(codes.shape)} and {tuple(scale.shape)}")  # fmt: skip
    return (codes.float() * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# FP8 E4M3


def _fp8_cast(scaled: torch.Tensor) -> torch.Tensor:
    """fp8(clamp(scaled, ±448)); clamps `scaled` (a temporary) in place."""
    return scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def _block_view(x: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """x zero-padded to whole blocks, viewed as [blocks_out, block_rows, blocks_in, block_cols]."""
    (rows, cols), (block_rows, block_cols) = x.shape, block_size
    pad_rows, pad_cols = -rows % block_rows, -cols % block_cols
    padded = torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))
    return padded.view(padded.shape[0] // block_rows, block_rows, padded.shape[1] // block_cols, block_cols)


def _unblock(blocked: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return blocked.reshape(blocked.shape[0] * blocked.shape[1], -1)[: shape[0], : shape[1]]


def quantize_fp8(weight: torch.Tensor, granularity: FP8Granularity, block_size: Sequence[int] = FP8_BLOCK_SIZE,
                 scale: torch.Tensor | None = None, *, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3: (codes float8_e4m3fn [out, in], scale float32 of `fp8_scale_shape`); see the module docstring.

    With `scale` given (frozen) it is used as is and out-of-range values saturate at ±448 (the E4M3 max)."""
    check_weight(weight, name)
    block_size = check_block_size(block_size)
    shape = fp8_scale_shape(weight.shape, granularity, block_size)
    if scale is not None:
        check_scale(scale, weight, shape, name)
    values = _float32_values(weight, name, check=scale is not None or granularity == "block")
    if granularity == "block":
        blocked = _block_view(values, block_size)
        if scale is None:
            amax = blocked.abs().amax(dim=(1, 3)).clamp_min(FP8_BLOCK_MIN_AMAX)
            scale = amax * _as_f32(FP8_INV_MAX, amax)
        inverse = torch.reciprocal(scale)[:, None, :, None]
        return _unblock(_fp8_cast(blocked.mul_(inverse)), weight.shape).contiguous(), scale
    if scale is None:
        if granularity == "tensor":
            amax = _absmax(values, weight, name).reshape(1)
            scale = torch.where(amax > 0, amax / _as_f32(FP8_E4M3_MAX, amax), 1.0)
        else:
            amax = _absmax(values, weight, name, dim=1)
            scale = (amax / _as_f32(FP8_E4M3_MAX, amax)).clamp_min(FP8_CHANNEL_MIN_SCALE)
    if granularity == "tensor":
        return _fp8_cast(values.mul_(torch.reciprocal(scale))), scale
    return _fp8_cast(values.div_(scale)), scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, granularity: FP8Granularity,
                   block_size: Sequence[int] = FP8_BLOCK_SIZE, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """codes · scale (float32, the scale broadcast over its tensor / row / block), cast to `dtype`."""
    block_size = check_block_size(block_size)
    if codes.dtype != FP8_DTYPE or codes.ndim != 2:
        raise ValueError(f"expected float8_e4m3fn codes [out, in], got {codes.dtype} {tuple(codes.shape)}")
    shape = fp8_scale_shape(codes.shape, granularity, block_size)
    if tuple(scale.shape) != shape:
        raise ValueError(f"{granularity} scale for codes {tuple(codes.shape)} must have shape {shape}, "
                         f"got {tuple(scale.shape)}")  # fmt: skip
    if granularity == "block":
        blocked = _block_view(codes.float(), block_size) * scale[:, None, :, None]
        return _unblock(blocked, codes.shape).to(dtype)
    return (codes.float() * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Update visibility: does a learner update survive re-quantization?


def _check_same(tensors: dict[str, torch.Tensor]) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")


def _code_bits(codes: torch.Tensor, name: str) -> torch.Tensor:
    if codes.dtype == torch.int8:
        return codes
    if codes.dtype == FP8_DTYPE:
        return codes.view(torch.uint8)
    raise ValueError(f"{name}: expected int8 or float8_e4m3fn codes, got {codes.dtype}")


def check_update(old_codes: torch.Tensor, new_codes: torch.Tensor, *values: torch.Tensor) -> None:
    """Raise ValueError unless two syncs' codes (and their float values) can be compared: one shape, one code dtype.
    Reads no data."""
    _check_same({"old_codes": old_codes, "new_codes": new_codes,
                 **{f"values[{i}]": value for i, value in enumerate(values)}})
    if _code_bits(old_codes, "old_codes").dtype != _code_bits(new_codes, "new_codes").dtype:
        raise ValueError(f"old_codes and new_codes differ in dtype: {old_codes.dtype} vs {new_codes.dtype}")


def count_changed_codes(old_codes: torch.Tensor, new_codes: torch.Tensor) -> int:
    """How many quantized codes (int8 or fp8) changed value between two syncs, compared as bytes. For FP8,
    +0 (0x00) ↔ −0 (0x80) is not a change: the engine sees 0 both times."""
    check_update(old_codes, new_codes)
    old, new = _code_bits(old_codes, "old_codes"), _code_bits(new_codes, "new_codes")
    changed = old != new
    if old.dtype == torch.uint8:
        changed &= (old | new) != 0x80  # the pair {0x00, 0x80} is ±0
    return int(changed.sum())


def update_sums(old_weight: torch.Tensor, new_weight: torch.Tensor, old_dequant: torch.Tensor,
                new_dequant: torch.Tensor) -> tuple[float, float, float]:  # fmt: skip
    """(||Δw||², ⟨Δw, Δŵ⟩, ||Δw − Δŵ||²) for Δw = new − old learner weights and Δŵ = new − old dequantized engine
    weights: the sums the update-visibility metrics are ratios of (``flash_rc.rollout.formats.UpdateVisibility``).
    float32 chunks (bounded temporaries), accumulated in float64."""
    tensors = {"old_weight": old_weight, "new_weight": new_weight, "old_dequant": old_dequant,
               "new_dequant": new_dequant}  # fmt: skip
    _check_same(tensors)
    flat = [t.reshape(-1) for t in tensors.values()]
    update_sq = received_dot = error_sq = 0.0
    for start in range(0, flat[0].numel(), _NORM_CHUNK):
        old_w, new_w, old_q, new_q = (t[start : start + _NORM_CHUNK].float() for t in flat)
        update, received = new_w - old_w, new_q - old_q
        update_sq += float(torch.sum(torch.square(update), dtype=torch.float64))
        received_dot += float(torch.sum(update * received, dtype=torch.float64))
        error_sq += float(torch.sum(torch.square(update - received), dtype=torch.float64))
    return update_sq, received_dot, error_sq
