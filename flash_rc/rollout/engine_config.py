"""How to start a rollout engine: every engine knob, with its type, bounds and docstring, declared once.

Why apart from the engine: recipes, the CLI and (later) the learner validate engine settings long before an engine
starts, and importing the engine means importing vLLM and torch. This module needs only pydantic; the recipe reader
maps verl's keys onto these fields through one table (``flash_rc.config.ENGINE_RECIPE_KEYS``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from flash_rc.schema import Section
from flash_rc.types import FP8Granularity, InflightUpdate, Precision, ScaleMode

EngineDtype = Literal["bfloat16", "float16", "float32"]


class EngineConfig(Section):
    """How to start the rollout engine."""

    model: str = "tiny-qwen2"
    """Built-in model name (see ``flash_rc.models``) or a local HF model directory."""
    dtype: EngineDtype = "bfloat16"
    """Compute dtype of the engine (``bfloat16``, ``float16`` or ``float32``)."""
    max_model_len: int = Field(4096, ge=16)
    """Context window: prompt + generated tokens per request."""
    seed: int = 0
    """Engine seed (requests may carry their own seed for reproducible sampling)."""
    kv_cache_gib: float = Field(2.0, gt=0)
    """CPU only: KV cache size in GiB."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """GPU only: fraction of GPU memory vLLM may use for weights + KV cache."""
    max_num_seqs: int = Field(256, ge=1)
    """Maximum number of sequences decoded together (continuous-batching width)."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prompt prefixes (e.g. K samples of one RC state). Cleared on every weight update."""
    enforce_eager: bool | None = None
    """Disable CUDA graphs / torch.compile. ``None``: eager on CPU (starts in ~2 s instead of ~20 s of
    torch.compile), compiled on GPU."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Tensor parallel degree (GPU)."""
    inflight_update: InflightUpdate = "recompute"
    """What a weight update does to requests still generating: ``recompute`` applies the update between two decode
    steps and re-prefills running requests with the new weights (their earlier tokens keep the old logprobs, later
    tokens are sampled from the new policy; each completion records both versions); ``wait`` lets running requests
    finish on the old weights first, holding back new requests until the update is done."""
    precision: Precision = "bf16"
    """Rollout weights: ``bf16`` (unquantized, at ``dtype``), ``int8`` (W8A8: per-channel int8 weights, dynamic
    per-token int8 activations) or ``fp8`` (W8A8 E4M3, see ``fp8_granularity``). lm_head and embeddings stay at
    ``dtype``."""
    fp8_granularity: FP8Granularity = "channel"
    """FP8 weight scales: per output ``channel`` (CPU and GPU), per ``tensor`` or per 128x128 ``block`` (GPU)."""
    quantizer: Literal["flash_rc", "vllm"] = "flash_rc"
    """Who quantizes the synced weights. ``flash_rc``: our quantizers (bit-identical to vLLM's conventions) into a
    compressed-tensors W8A8 engine, with frozen or refreshed scales and update-visibility metrics. ``vllm`` (FP8
    only): vLLM's own online FP8 quantization (``fp8`` / ``fp8_per_channel`` / ``fp8_per_block``) re-quantizes the
    bf16 weights it receives; scales are always refreshed and no visibility metrics are reported."""
    scales: ScaleMode = "refresh"
    """``refresh``: quantization scales recomputed from every synced weight; ``frozen``: computed once at start
    (Flash RL's INT8 semantics; small updates may round away, watch ``sync/update_lost_fraction``)."""
    fp32_lm_head: bool = False
    """Compute the lm_head (logits) in float32, closer to the learner's logprobs."""
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    """GPU only: store the KV cache in FP8 (halves KV traffic, the larger lever for long rollouts)."""
    visibility_sample: float = Field(1 / 64, ge=0, le=1)
    """Fraction of rows of each quantized weight tracked for the update-visibility metrics (0: off, 1: exact)."""
    enable_sleep_mode: bool = False
    """GPU only: start vLLM with sleep mode, so the engine can free its KV cache and offload its weights while a
    colocated learner trains (``RolloutEngine.sleep`` / ``wake_up``)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed verbatim to ``vllm.LLM``."""


VLLM_ARGS = ("dtype", "max_model_len", "seed", "max_num_seqs", "enable_prefix_caching", "tensor_parallel_size",
             "kv_cache_dtype", "enable_sleep_mode")
"""EngineConfig fields that are ``vllm.LLM`` arguments of the same name and meaning, passed as they are."""
