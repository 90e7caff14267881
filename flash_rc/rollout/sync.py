"""The weight-sync hook: learner weights → running rollout engine, once per RL step.

``sync(engine, source)`` takes the learner's bf16 weights as a state dict, an iterable of ``(name, tensor)`` pairs, or
the learner module itself (plain or FSDP2-sharded: its state dict holds DTensors, gathered one tensor at a time while
streaming, never all at once). The engine validates everything first (names, shapes, finite values — a bad update
leaves the old weights serving), then streams the tensors layer by layer into vLLM, re-quantizing each one to the
engine's format (bf16 / INT8 / FP8, frozen or refreshed scales) on the way, resets the prefix cache and bumps
``model_version``. The returned :class:`SyncReport` carries the timing and the update-visibility metrics, ready to be
logged with the training metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from flash_rc.rollout.checkpoint import local_tensor
from flash_rc.rollout.engine import RolloutEngine

WeightSource = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | torch.nn.Module


@dataclass
class SyncReport:
    """What one sync did."""

    model_version: int
    seconds: float
    tensors: int
    source_bytes: int
    """Bytes of the learner tensors streamed (full, unsharded sizes)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``sync/seconds``, ``sync/gb_per_s`` and the visibility metrics (``sync/codes_changed_fraction``, ...)."""


def named_weights(source: WeightSource, checkpoint_names: Iterable[str] = ()) -> Mapping[str, torch.Tensor]:
    """A name → tensor mapping for any supported source.

    A module's state dict may hold tied aliases the checkpoint does not store (``lm_head.weight`` tied to
    ``model.embed_tokens.weight``): an alias of a tensor already present under a checkpoint name is dropped. An
    iterable of pairs is collected into a dict (it must be validated before anything is loaded).
    """
    if isinstance(source, torch.nn.Module):
        state = source.state_dict()
        known = set(checkpoint_names)
        kept_storage = {_storage_key(t) for name, t in state.items() if name in known}
        return {name: t for name, t in state.items() if name in known or _storage_key(t) not in kept_storage}
    if isinstance(source, Mapping):
        return source
    return dict(source)


def _storage_key(tensor: torch.Tensor) -> tuple:
    local = local_tensor(tensor)
    return (local.device, local.untyped_storage().data_ptr(), local.storage_offset())


def sync(
    engine: RolloutEngine,
    source: WeightSource,
    strict: bool = True,
    inflight: Literal["recompute", "wait"] | None = None,
) -> SyncReport:
    """Push the learner's weights into the running engine; see the module docstring."""
    weights = named_weights(source, engine.checkpoint_shapes)
    source_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    start = time.perf_counter()
    version = engine.update_weights(weights, strict=strict, inflight=inflight)
    seconds = time.perf_counter() - start
    metrics = {"sync/seconds": seconds, "sync/gb_per_s": source_bytes / 1e9 / seconds if seconds else 0.0}
    metrics.update(engine.weight_format.take_visibility())
    return SyncReport(version, seconds, len(weights), source_bytes, metrics)
