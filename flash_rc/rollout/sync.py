"""The weight-sync hook: learner weights → running rollout engine, once per RL step.

``sync(engine, source)`` takes the learner's bf16 weights as a state dict, an iterable of ``(name, tensor)`` pairs, or
the learner module itself (plain or FSDP2-sharded: its state dict holds DTensors, gathered one tensor at a time while
streaming, never all at once). The engine validates everything first (names, types, shapes, values finite and in the
engine dtype's range — a bad update leaves the old weights serving), then streams the tensors layer by layer through
the one reload path of :mod:`flash_rc.rollout.reload` (converted to the engine's format, bf16 / INT8 / FP8 with frozen
or refreshed scales, checked as loaded, reloaded only into the modules they feed), resets the prefix cache and bumps
``model_version``. The returned :class:`SyncReport` carries the timing per phase and the update-visibility metrics,
ready to be logged with the training metrics. The engine is a :class:`~flash_rc.rollout.reload.WeightSink`; this
function is kept as the learner's one call.
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
