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

from flash_rc.rollout.engine import RolloutEngine
from flash_rc.rollout.reload import SyncReport, WeightSource, named_weights
from flash_rc.types import InflightUpdate

__all__ = ["SyncReport", "WeightSource", "named_weights", "sync"]


def sync(engine: RolloutEngine, source: WeightSource, strict: bool = True,
         inflight: InflightUpdate | None = None) -> SyncReport:  # fmt: skip
    """Push the learner's weights into the running engine; see the module docstring (``RolloutEngine.load``)."""
    return engine.load(source, strict=strict, inflight=inflight)
