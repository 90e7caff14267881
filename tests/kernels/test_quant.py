"""The Triton quantizers against the torch reference, bit for bit (kernels/quant.py vs flash_rc/algo/quant.py).

On this CPU machine the Triton path runs under TRITON_INTERPRET=1 (tests/kernels/conftest.py); with a GPU the same
tests run the compiled kernels. The interpreter tiles rows at 1,024 elements, so 1,500-column weights take the
two-sweep path for wide rows; on a GPU that path starts above 16,384 columns (test_wide_rows_take_the_two_sweep_path).
"""

import pytest
import torch

from flash_rc.kernels import quant as triton_quant

QUANTIZERS = {
    "int8": lambda w, scale=None, **kw: triton_quant.quantize_int8_per_channel(w, scale, **kw),
    "fp8-tensor": lambda w, scale=None, **kw: triton_quant.quantize_fp8(w, "tensor", scale=scale, **kw),
    "fp8-channel": lambda w, scale=None, **kw: triton_quant.quantize_fp8(w, "channel", scale=scale, **kw),
    "fp8-block": lambda w, scale=None, **kw: triton_quant.quantize_fp8(w, "block", scale=scale, **kw),
    "fp8-block-16x32": lambda w, scale=None, **kw: triton_quant.quantize_fp8(w, "block", (16, 32), scale, **kw),
}


def random_weight(rows, cols, dtype, device, seed=0):
    """Per-row magnitudes spread over 100×, an all-zero row and a tiny row (FP8 subnormals, the channel floor)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, -1, rows)[:, None]
    weight[min(1, rows - 1)] = 0.0
    weight[min(2, rows - 1)] *= 1e-4
    return weight.to(device=device, dtype=dtype)


def assert_bitwise_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float8_e4m3fn:
        actual, expected = actual.view(torch.uint8), expected.view(torch.uint8)
    mismatches = (actual.cpu() != expected.cpu()).sum().item()
    assert mismatches == 0, f"{mismatches} of {actual.numel()} elements differ"


def assert_matches_reference(kind, weight, scale=None):
    codes, out_scale = QUANTIZERS[kind](weight, scale, backend="triton")
    ref_codes, ref_scale = QUANTIZERS[kind](weight, scale, backend="torch")
    assert_bitwise_equal(codes, ref_codes)
    assert_bitwise_equal(out_scale, ref_scale)
    return codes, out_scale


@pytest.mark.parametrize("kind", list(QUANTIZERS))
@pytest.mark.parametrize(
    "shape, dtype, seed",
    [((37, 100), torch.bfloat16, 1),  # several rows per program, partial row tile and partial 16×32 blocks
     ((5, 1500), torch.float32, 2),  # rows wider than the interpreter's one-pass tile: two sweeps
     ((130, 200), torch.float16, 3)],  # partial 128×128 edge blocks
)  # fmt: skip
def test_dynamic_scales_match_reference(kind, shape, dtype, seed, device):
    assert_matches_reference(kind, random_weight(*shape, dtype, device, seed))


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_frozen_scales_match_reference_and_saturate(kind, device):
    old = random_weight(40, 96, torch.bfloat16, device)
    _, frozen = QUANTIZERS[kind](old, backend="torch")
    new = (old.float() * 1.5 + 1e-3).to(torch.bfloat16)  # beyond the frozen range: saturates
    codes, scale = assert_matches_reference(kind, new, frozen)
    assert scale is frozen
    limit = 127 if kind == "int8" else 448.0
    assert (codes.float().abs() == limit).sum() > 0


def test_non_contiguous_weight_and_scales(device):
    weight = random_weight(96, 64, torch.bfloat16, device).t()  # [64, 96] with strides (1, 64)
    for kind in ("int8", "fp8-tensor", "fp8-block-16x32"):
        assert_matches_reference(kind, weight)
    # frozen block scales [4, 3] stored transposed, and per-channel scales as a strided column
    block_scale = QUANTIZERS["fp8-block-16x32"](weight, backend="torch")[1].t().contiguous().t()
    assert_matches_reference("fp8-block-16x32", weight, block_scale)
    channel_scale = QUANTIZERS["int8"](weight, backend="torch")[1].repeat(1, 2)[:, :1]
    assert_matches_reference("int8", weight, channel_scale)


def test_fp8_encoding_matches_torch_cast_at_every_rounding_boundary(device):
    """With a frozen per-tensor scale of 1, codes = fp8(clamp(w, ±448)). Feed every E4M3 value, every midpoint
    between neighbours (ties) and the float32 values one ulp either side of each midpoint, both signs, plus values
    beyond ±448 and float32 subnormals: the hand-written encoder must agree with PyTorch's cast everywhere."""
    e4m3 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 … 448, all finite
    midpoints = (e4m3[1:] + e4m3[:-1]) / 2
    probes = torch.cat([e4m3, midpoints, midpoints.nextafter(torch.tensor(0.0)), midpoints.nextafter(torch.tensor(1e9)),
                        torch.tensor([449.0, 463.9, 464.0, 500.0, 1e30, 1e-40, 1e-45, 2.0**-10])])  # fmt: skip
    probes = torch.cat([probes, -probes])
    probes = torch.nn.functional.pad(probes, (0, -probes.numel() % 64)).reshape(-1, 64).to(device)
    assert_matches_reference("fp8-tensor", probes, torch.ones(1, device=device))


def test_int8_rounding_ties_go_to_even(device):
    # with a frozen scale of 1, codes = round_half_even(clamp(w, ±127)): ties k + 0.5 and their float32 neighbours
    ties = torch.arange(-130, 130, dtype=torch.float32) + 0.5
    probes = torch.stack([ties, ties.nextafter(torch.tensor(-1e9)), ties.nextafter(torch.tensor(1e9))]).to(device)
    codes, _ = assert_matches_reference("int8", probes, torch.ones(3, 1, device=device))
    assert codes[0, 130].item() == 0 and codes[0, 131].item() == 2 and codes[0, 132].item() == 2  # 0.5, 1.5, 2.5


def test_division_and_reciprocal_conventions(device):
    # values where w/s and w·(1/s) round to different codes (see tests/rollout/test_quant.py): each quantizer must
    # use the reference's operation, not just any correctly rounded one
    weight = torch.tensor([[3.0, -2.799212694168091, 0.00017656598356552422, 7.193429337348789e-05]] * 2,
                          device=device)  # fmt: skip
    for kind in QUANTIZERS:
        assert_matches_reference(kind, weight)


def test_all_zero_weight(device):
    weight = torch.zeros(8, 40, dtype=torch.bfloat16, device=device)
    for kind in QUANTIZERS:
        codes, scale = assert_matches_reference(kind, weight)
        assert not codes.float().any()
    assert triton_quant.quantize_fp8(weight, "tensor", backend="triton")[1].item() == 1.0


def test_wide_rows_take_the_two_sweep_path(device):
    """Rows wider than one tile on the GPU too (16,384 columns): amax in a first sweep, codes in a second."""
    weight = random_weight(3, 20_000, torch.bfloat16, device)
    for kind in ("int8", "fp8-channel"):
        assert_matches_reference(kind, weight)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nonfinite_weights_raise_or_count(device):
    weight = random_weight(12, 80, torch.float32, device)
    weight[3, 7], weight[9, 0], weight[10, 79] = float("nan"), float("inf"), -float("inf")
    before = weight.clone()
    for kind in QUANTIZERS:
        with pytest.raises(ValueError, match=r"q_proj: 3 non-finite values \(first at row 3, column 7"):
            QUANTIZERS[kind](weight, backend="triton", name="q_proj")
    assert torch.equal(weight.nan_to_num(), before.nan_to_num())
    # with a caller-owned counter nothing syncs or raises: counts accumulate over calls, for the caller to check
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    for kind in QUANTIZERS:
        QUANTIZERS[kind](weight, backend="triton", nonfinite_count=counter)
    assert counter.item() == 3 * len(QUANTIZERS)
    QUANTIZERS["int8"](before.nan_to_num(0.0, 0.0, 0.0), backend="triton", nonfinite_count=counter)
    assert counter.item() == 3 * len(QUANTIZERS)
    with pytest.raises(ValueError, match="nonfinite_count must be a 1-element int32 tensor"):
        QUANTIZERS["int8"](before, backend="triton", nonfinite_count=torch.zeros(1, device=device))


def test_bad_arguments(device):
    weight = random_weight(4, 8, torch.float32, device)
    with pytest.raises(ValueError, match="backend must be"):
        triton_quant.quantize_int8_per_channel(weight, backend="cuda")
    with pytest.raises(ValueError, match="power-of-two block sizes"):
        triton_quant.quantize_fp8(weight, "block", (48, 32), backend="triton")
    with pytest.raises(ValueError, match="w: expected a 2-D"):
        triton_quant.quantize_fp8(weight[0], "channel", backend="triton", name="w")
    with pytest.raises(ValueError, match=r"scale must be a float32 tensor of shape \(1,\)"):
        triton_quant.quantize_fp8(weight, "tensor", scale=torch.ones(4, 1, device=device), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(QUANTIZERS))
@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096)])
def test_7b_shapes_match_reference_on_gpu(kind, shape):
    assert_matches_reference(kind, random_weight(*shape, torch.bfloat16, "cuda"))


@pytest.mark.gpu
def test_fp8_matches_vllm_cuda_quantizers():
    """Per-tensor codes equal vLLM's static fp8 kernel given our scale; block codes and scales equal vLLM's
    `per_block_cast_to_fp8` (whose amax / 448.0 PyTorch's CUDA division turns into amax · float32(1/448))."""
    pytest.importorskip("vllm")
    from vllm import _custom_ops as ops
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    weight = random_weight(1000, 3000, torch.bfloat16, "cuda")
    codes, scale = triton_quant.quantize_fp8(weight, "tensor")
    vllm_codes, _ = ops.scaled_fp8_quant(weight, scale=scale)
    assert_bitwise_equal(codes, vllm_codes)
    codes, scale = triton_quant.quantize_fp8(weight, "block")
    vllm_codes, vllm_scale = per_block_cast_to_fp8(weight, [128, 128], use_ue8m0=False)
    assert_bitwise_equal(scale, vllm_scale)
    assert_bitwise_equal(codes, vllm_codes)
