"""The data that crosses the engine boundary, with no dependency beyond the standard library.

Why a module of its own: the RC scheduler, the recipe configs, the reward and data code and (later) a verl agent loop
all speak in prompts, sampling settings and completions, but only the rollout engine needs vLLM and torch. Keeping
these types here lets every other part import them without starting vLLM's process-global set-up or Triton.

What crosses the boundary is token-aligned: a :class:`Completion` carries the prompt and response token ids and one
processed logprob per response token, so the learner sees exactly what the engine sampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Prompt = str | Sequence[Mapping[str, str]] | Sequence[int]
"""A raw text prompt, a list of chat messages (``[{"role": "user", "content": ...}]``), or prompt token ids."""

Precision = Literal["bf16", "int8", "fp8"]
"""Rollout weight precision: unquantized at the engine dtype, or W8A8 INT8 / FP8."""
FP8Granularity = Literal["channel", "tensor", "block"]
"""FP8 weight scales: per output channel, per tensor, or per 128x128 block."""
ScaleMode = Literal["refresh", "frozen"]
"""Quantization scales recomputed on every sync, or computed once at the first sync."""
InflightUpdate = Literal["recompute", "wait"]
"""What a weight update does to requests still generating (see ``EngineConfig.inflight_update``)."""


@dataclass
class SamplingConfig:
    """Per-call sampling parameters."""

    max_tokens: int = 512
    """Generation budget of this call (H_R or H_S for RC turns); clamped to the room left in the context."""
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    seed: int | None = None
    """Per-request seed: same seed + same weights + same prompt gives the same tokens."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (not included in the output)."""
    ignore_eos: bool = False
    """Keep generating past EOS until ``max_tokens`` (fixed-length decoding for benchmarks)."""


@dataclass
class Completion:
    """One generated sample with everything RL needs."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    """Processed logprob of each sampled token: log π_rollout(token) under the distribution it was sampled from."""
    finish_reason: str
    """``stop`` (EOS or stop string), ``length`` (budget exhausted) or ``abort``."""
    model_version_start: int
    """Engine weight version when the request was admitted."""
    model_version: int
    """Engine weight version that generated the last token (differs from the start only under in-flight updates)."""
