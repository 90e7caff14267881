"""Engine weight formats: the compressed-tensors configs, conversion with frozen / refreshed scales, and the
update-visibility metrics on hand-worked cases (flash_rc/rollout/formats.py)."""

import pytest
import torch

from flash_rc.algo.quant import dequantize_int8, quantize_fp8, quantize_int8_per_channel
from flash_rc.rollout.formats import UpdateVisibility, WeightFormat, compressed_tensors_config


def visibility(old, new, frozen):
    """Metrics of one update of ``old`` → ``new`` through frozen INT8 scales."""
    (old_codes, _), (new_codes, _) = quantize_int8_per_channel(old, frozen), quantize_int8_per_channel(new, frozen)
    tracker = UpdateVisibility()
    tracker.add(old_codes, new_codes, old, new, dequantize_int8(old_codes, frozen, torch.float32),
                dequantize_int8(new_codes, frozen, torch.float32))
    return tracker.metrics()


def test_update_below_half_a_step_is_lost_entirely():
    # Frozen scale 1 (one code = 1.0). The learner moves 10.2 → 10.3 and −3.0 → −2.8: both stay nearest to the
    # same integer, no code changes, the engine receives none of the update: lost 1, relative error 1.
    metrics = visibility(torch.tensor([[10.2, -3.0]]), torch.tensor([[10.3, -2.8]]), torch.tensor([[1.0]]))
    assert metrics["sync/codes_changed_fraction"] == 0.0
    assert metrics["sync/update_lost_fraction"] == pytest.approx(1.0)
    assert metrics["sync/update_relative_error"] == pytest.approx(1.0)


def test_hand_worked_visibility():
    frozen = torch.tensor([[1.0]])
    old = torch.tensor([[10.4, 3.0, 0.0]])
    # 10.4 → 10.6 crosses 10.5: Δw = [0.2, 0, 0] but the code jumps 10 → 11 (Δŵ = [1, 0, 0]).
    # α = <Δw, Δŵ> / |Δw|² = 0.2 / 0.04 = 5 → nothing lost (clipped at 0); relative error |0.2 − 1| / 0.2 = 4.
    metrics = visibility(old, torch.tensor([[10.6, 3.0, 0.0]]), frozen)
    assert metrics["sync/update_lost_fraction"] == 0.0
    assert metrics["sync/update_relative_error"] == pytest.approx(4.0, rel=1e-5)
    assert metrics["sync/codes_changed_fraction"] == pytest.approx(1 / 3)
    # integer moves arrive exactly: Δw = Δŵ = [2, 0, −1], 2 of 3 codes changed, nothing lost, no error
    metrics = visibility(old, torch.tensor([[12.4, 3.0, -1.0]]), frozen)
    assert metrics["sync/codes_changed_fraction"] == pytest.approx(2 / 3)
    assert metrics["sync/update_lost_fraction"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["sync/update_relative_error"] == pytest.approx(0.0, abs=1e-6)
    # direct values: Δw = [3, 4] (|Δw|² = 25), Δŵ = [3, 0]: α = 9 / 25 → lost 0.64; error |[0, 4]| / 5 = 0.8
    tracker, zero = UpdateVisibility(), torch.zeros(1, 2, dtype=torch.int8)
    tracker.add(zero, zero, torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2),
                torch.tensor([[3.0, 0.0]]))
    metrics = tracker.metrics()
    assert metrics["sync/update_lost_fraction"] == pytest.approx(0.64)
    assert metrics["sync/update_relative_error"] == pytest.approx(0.8)
    assert metrics["sync/update_norm_sampled"] == pytest.approx(5.0)


def test_no_update_reports_no_loss_ratios():
    tracker, zero = UpdateVisibility(), torch.zeros(1, 2)
    tracker.add(zero.to(torch.int8), zero.to(torch.int8), zero, zero, zero, torch.ones(1, 2))
    assert tracker.metrics() == {"sync/codes_changed_fraction": 0.0, "sync/update_norm_sampled": 0.0}
    assert UpdateVisibility().metrics() == {}


def test_fp8_signed_zero_is_not_a_code_change():
    old = torch.tensor([[-1e-9, 1.0, 0.5]])  # −1e-9 rounds to −0 (0x80) …
    new = torch.tensor([[1e-9, 1.0, 0.75]])  # … and +1e-9 to +0 (0x00): the same value for the engine
    scale = torch.tensor([1.0])
    (old_codes, _), (new_codes, _) = quantize_fp8(old, "tensor", scale=scale), quantize_fp8(new, "tensor", scale=scale)
    assert old_codes.view(torch.uint8)[0, 0] == 0x80 and new_codes.view(torch.uint8)[0, 0] == 0x00
    tracker = UpdateVisibility()
    tracker.add(old_codes, new_codes, old, new, old_codes.float(), new_codes.float())
    assert tracker.metrics()["sync/codes_changed_fraction"] == pytest.approx(1 / 3)  # only 0.5 → 0.75
    with pytest.raises(ValueError, match="differ in dtype"):
        tracker.add(old_codes, quantize_int8_per_channel(new)[0], old, new, old, new)
    with pytest.raises(ValueError, match="shapes differ"):
        tracker.add(old_codes, new_codes[:, :2], old, new, old, new)


def test_small_rl_updates_round_away_with_frozen_int8_scales():
    """An RL-sized step δ ~ N(0, (0.01 s)²) per weight (s = the row's step) flips a code with probability
    E|δ|/s = 0.01·√(2/π) ≈ 0.8%, each flip moving the engine by a whole step: E||Δŵ||² ≈ 0.008 s² against
    ||Δw||² = 1e-4 s² per weight, so the relative error ≈ √(0.008/1e-4 − 1) ≈ 9: what the engine sees is mostly
    rounding noise, although on average it points the right way (lost fraction near 0). An SFT-sized step (10 s)
    comes through almost exactly."""
    generator = torch.Generator().manual_seed(1)
    old = torch.randn(64, 512, generator=generator) * 0.02
    _, frozen = quantize_int8_per_channel(old)
    results = {}
    for label, step in (("rl", 0.01), ("sft", 10.0)):
        results[label] = visibility(old, old + step * frozen * torch.randn(old.shape, generator=generator), frozen)
    assert 0.005 < results["rl"]["sync/codes_changed_fraction"] < 0.011
    assert 6.0 < results["rl"]["sync/update_relative_error"] < 12.0
    assert results["sft"]["sync/codes_changed_fraction"] > 0.9
    assert results["sft"]["sync/update_relative_error"] < 0.1 and results["sft"]["sync/update_lost_fraction"] < 0.01


def test_convert_passes_unquantized_tensors_and_freezes_scales():
    fmt = WeightFormat(precision="int8", scales="frozen", quantized_names=frozenset({"w"}), visibility_sample=1.0)
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    ((name, bias),) = fmt.convert("b", torch.ones(2))  # unquantized: passed on in the engine dtype (bf16)
    assert name == "b" and bias.dtype == torch.bfloat16 and bias.tolist() == [1.0, 1.0]
    (name, codes), (scale_name, scale) = fmt.convert("w", weight)
    # per-row amax / 127: [2/127, 0.5/127]; codes round(w / s): [[64, -127], [127, 64]] (63.5 → 64, half to even)
    assert (name, scale_name) == ("w", "w_scale")
    torch.testing.assert_close(scale, torch.tensor([[2 / 127], [0.5 / 127]]))
    assert codes.tolist() == [[64, -127], [127, 64]]
    assert fmt.take_visibility() == {}  # nothing to compare with on the first sync
    # doubled weights through the frozen scales saturate at ±127 and keep the old scales
    (_, codes), (_, scale_again) = fmt.convert("w", 2 * weight)
    assert scale_again is scale and codes.tolist() == [[127, -127], [127, 127]]
    assert fmt.take_visibility()["sync/update_lost_fraction"] > 0.3


def test_compressed_tensors_configs():
    int8 = compressed_tensors_config("int8", "channel")
    group = int8["config_groups"]["group_0"]
    assert int8["format"] == "int-quantized" and int8["ignore"] == ["lm_head"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    block = compressed_tensors_config("fp8", "block")["config_groups"]["group_0"]
    assert block["weights"]["block_structure"] == [128, 128]
    assert block["input_activations"] | {} == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                                               "dynamic": True, "group_size": 128}
    with pytest.raises(ValueError, match="no quantization config"):
        compressed_tensors_config("bf16", "channel")
