"""The ``flash_rc:`` section of a verl recipe, what it turns into in verl's own keys, and the checks run before Ray.

Why a translation and not more verl keys: verl 0.9.1's config is a fixed schema (hydra struct mode refuses keys it
does not declare), and what flash_rc adds — INT8/FP8 rollouts that requantize every weight sync, Reasoning Cache
training — is spread over several verl keys that must agree (the vLLM engine kwargs, the rollout load format, the
environment of the vLLM worker processes, the policy loss, the agent loop, the advantage estimator). A recipe states
the intent once (``flash_rc.engine.precision: int8``, ``flash_rc.rc.enable: true``) and :func:`translate` writes the
verl keys; an explicit verl setting that contradicts it is refused, naming the key, instead of silently winning or
losing. The knobs are the same fields as everywhere else in flash_rc (copied from ``EngineConfig`` and
``RCTrainConfig``), so a local recipe and a verl recipe spell them the same way.

:func:`check` then looks for everything that would otherwise fail minutes later on a cluster — unknown keys, files
that are not there, a GPU/batch layout that cannot be split, FP8 on a GPU that lacks it — plus verl's own
``validate_config`` (what ``verl.trainer.main_ppo.main`` runs), and returns every problem at once, one line each.
Nothing here starts Ray; only :func:`check` imports verl (whose package import loads the ``ray`` module).

What is not checked: remote data or model locations (``hdfs://``, ``s3://``, ``hf://``, ``https://``... and Hugging
Face Hub ids such as ``Qwen/Qwen2.5-32B``) — they are resolved by verl on the cluster, where the network is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import ValidationError, create_model

from flash_rc.backends.verl.plugin import (
    POLICY_LOSS,
    RC_ADV_ESTIMATOR,
    RC_AGENT_LOOP,
    RC_REPLAY_CALLBACK,
    RC_TRAINER_MODE,
)
from flash_rc.errors import ConfigError
from flash_rc.rc.states import RCTrainConfig
from flash_rc.rollout.engine_config import EngineConfig
from flash_rc.schema import Section, fields_of

VerlEngineSection = create_model(
    "VerlEngineSection",
    __base__=Section,
    __doc__="``flash_rc.engine`` of a verl recipe: the rollout engine's precision and how it requantizes syncs.",
    **fields_of(EngineConfig, {name: name for name in ("precision", "fp8_granularity", "scales", "visibility_sample")}),
)


class FlashRCVerlSection(Section):
    """The ``flash_rc:`` section of a verl recipe (``recipe/verl/*.yaml``)."""

    engine: VerlEngineSection = VerlEngineSection()
    rc: RCTrainConfig = RCTrainConfig()


FP8_MIN_CAPABILITY = (8, 9)
"""FP8 (E4M3) tensor-core GEMMs need compute capability 8.9 (Ada) or newer; older GPUs fall back to slow emulation."""

VERL_DEFAULTS = {
    "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla",
    "actor_rollout_ref.rollout.agent.default_agent_loop": "single_turn_agent",
    "algorithm.adv_estimator": "gae",
}
"""verl 0.9.1's defaults of the keys :func:`translate` writes: a value that is neither this nor ours is refused."""

FREE_FORM = ("reward.reward_kwargs", "reward.custom_reward_function.reward_kwargs", "ray_kwargs.ray_init")
"""Subtrees verl reads as free-form dicts although its YAML does not declare them (the DAPO reward manager's
``reward_kwargs``, the reward function's keyword arguments, ``ray.init``'s arguments): any key is allowed below."""

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------------- the section


def flash_rc_section(cfg: DictConfig) -> FlashRCVerlSection:
    """The recipe's ``flash_rc:`` section, validated (unknown keys and bad values raise one line each)."""
    raw = OmegaConf.to_container(cfg.get("flash_rc") or OmegaConf.create(), resolve=True)
    try:
        return FlashRCVerlSection.model_validate(raw)
    except ValidationError as error:
        lines = [f"flash_rc.{'.'.join(map(str, e['loc']))}: {e['msg']}" + _got(e) for e in error.errors()]
        raise ConfigError(_problems("invalid flash_rc section", lines)) from None


def _got(error: dict) -> str:
    return f" (got {error['input']!r})" if error["type"] not in ("missing", "extra_forbidden") else ""


def _problems(title: str, problems: list[str]) -> str:
    return f"{title}:\n" + "\n".join(problems) if len(problems) > 1 else f"{title}: {problems[0]}"


# ------------------------------------------------------------------------------------------------- translation


def translate(cfg: DictConfig) -> DictConfig:
    """A copy of the composed recipe with its ``flash_rc:`` section written into verl's keys.

    - ``flash_rc.engine.precision`` int8/fp8: ``rollout.engine_kwargs.vllm`` = the worker extension's engine kwargs,
      ``rollout.load_format: dummy`` (the engine's weights only ever arrive quantized, through the first sync),
      ``rollout.name: vllm``, and the worker settings (``scales``, ``visibility_sample``) as environment variables of
      every Ray process (``ray_kwargs.ray_init.runtime_env.env_vars``), where the vLLM workers read them; verl's own
      ``rollout.quantization`` must stay null (never two quantizers on one engine);
    - always: ``actor.policy_loss.loss_mode`` = flash_rc's PPO-clip x token-TIS loss (verl's ``vanilla`` numbers,
      through the fused kernel on CUDA);
    - ``flash_rc.rc.enable``: the RC agent loop as ``rollout.agent.default_agent_loop``, RC's per-state GRPO as
      ``algorithm.adv_estimator`` with its trainer mode ``trainer.v1.trainer_mode``, ``rollout.n`` = N_summ x K (one
      trained reasoning turn per verl session) and, with the replay buffer, its ``trainer.checkpoint_callback_class``;
    - built-in flash_rc model names (``tiny-qwen2``, ...) become their local folders, and relative local paths become
      absolute (Ray actors do not run in the launch directory).

    A key already holding a value that is neither verl's default nor ours is a contradiction: every one is reported
    together in one :class:`ConfigError`.
    """
    section = flash_rc_section(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # a copy; interpolations kept
    OmegaConf.set_struct(cfg, False)
    problems: list[str] = []
    precision = section.engine.precision

    def require(key: str, value: Any, allowed: tuple = (), why: str = "") -> None:
        current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if current is not None and current != value and current not in allowed:
            problems.append(f"{key}={current!r} contradicts {why}: leave it unset (flash_rc sets {value!r})")
        else:
            OmegaConf.update(cfg, key, value, force_add=True)

    quantization = OmegaConf.select(cfg, "actor_rollout_ref.rollout.quantization", default=None)
    if quantization is not None:
        problems.append(
            f"actor_rollout_ref.rollout.quantization={quantization!r} contradicts "
            f"flash_rc.engine.precision={precision}: verl's rollout quantization must stay null, the "
            "rollout precision is flash_rc.engine.precision (bf16|int8|fp8)"
        )
    if precision != "bf16":
        from flash_rc.backends.verl.worker_ext import SETTINGS_ENV, vllm_engine_kwargs

        why = f"flash_rc.engine.precision={precision}"
        if OmegaConf.is_missing(cfg.actor_rollout_ref.rollout, "name"):
            cfg.actor_rollout_ref.rollout.name = "vllm"
        require("actor_rollout_ref.rollout.name", "vllm", why=f"{why} (a vLLM worker extension)")
        require("actor_rollout_ref.rollout.load_format", "dummy", why=why)
        for key, value in vllm_engine_kwargs(precision, section.engine.fp8_granularity).items():
            require(f"actor_rollout_ref.rollout.engine_kwargs.vllm.{key}", value, why=why)
        for name, variable in SETTINGS_ENV.items():
            require(
                f"ray_kwargs.ray_init.runtime_env.env_vars.{variable}",
                str(getattr(section.engine, name)),
                why=f"flash_rc.engine.{name}={getattr(section.engine, name)}",
            )

    loss_key = "actor_rollout_ref.actor.policy_loss.loss_mode"
    require(loss_key, POLICY_LOSS, (VERL_DEFAULTS[loss_key],), "flash_rc's TIS policy loss")

    agent_key, adv_key = "actor_rollout_ref.rollout.agent.default_agent_loop", "algorithm.adv_estimator"
    if section.rc.enable:
        why = "flash_rc.rc.enable (RC chains, advantages grouped per (problem, summary) state)"
        require(agent_key, RC_AGENT_LOOP, (VERL_DEFAULTS[agent_key],), why)
        require(adv_key, RC_ADV_ESTIMATOR, (VERL_DEFAULTS[adv_key],), why)
        require("trainer.v1.trainer_mode", RC_TRAINER_MODE, ("sync",), why)
        # verl copies a session's last reward onto its other outputs: one trained turn per session, n_summ x k each
        require("actor_rollout_ref.rollout.n", section.rc.n_summ * section.rc.k, (1,), why)
        if section.rc.replay.enable:
            require("trainer.checkpoint_callback_class", RC_REPLAY_CALLBACK,
                    why="flash_rc.rc.replay.enable (the callback starts, resumes and saves the buffer)")
    else:
        for key, ours in ((agent_key, RC_AGENT_LOOP), (adv_key, RC_ADV_ESTIMATOR)):
            if OmegaConf.select(cfg, key, default=None) == ours:
                problems.append(f"{key}={ours} needs flash_rc.rc.enable=true (it reads the flash_rc.rc section)")

    for key in _model_keys(cfg):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value:
            OmegaConf.update(cfg, key, _local_model(value))
    for key in ("data.train_files", "data.val_files"):
        files = OmegaConf.select(cfg, key, default=None)
        if files is not None:
            absolute = [_absolute(file) for file in _as_list(files)]
            OmegaConf.update(cfg, key, absolute if isinstance(files, ListConfig | list) else absolute[0])
    if problems:
        raise ConfigError(_problems("the flash_rc section contradicts the recipe", problems))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _model_keys(cfg: DictConfig) -> list[str]:
    keys = ["actor_rollout_ref.model.path", "actor_rollout_ref.model.tokenizer_path"]
    if not _is_interpolation(cfg, "critic.model.path"):
        keys += ["critic.model.path", "critic.model.tokenizer_path"]
    return keys


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None)
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def _local_model(value: str) -> str:
    """A flash_rc built-in model name becomes its folder (built once); an existing relative path, absolute."""
    from flash_rc.models import BUILTIN_MODELS, resolve_model

    if value in BUILTIN_MODELS:
        return str(resolve_model(value))
    return _absolute(value)


def _absolute(value: str) -> str:
    if _REMOTE.match(value):
        return value
    path = Path(os.path.expanduser(value))
    return str(path.resolve()) if path.exists() else value


def _as_list(value: Any) -> list[str]:
    return [str(item) for item in value] if isinstance(value, ListConfig | list) else [str(value)]


# ------------------------------------------------------------------------------------------------- checks


def check(cfg: DictConfig, base: DictConfig, cuda_capabilities: list[tuple[int, int]] | None = None) -> None:
    """Every problem of a translated recipe, in one ConfigError; nothing is started.

    ``base`` is verl's own ``ppo_trainer`` config (the schema unknown keys are found against);
    ``cuda_capabilities`` the compute capability of each visible GPU (default: asked from torch; none on CPU).
    """
    section = flash_rc_section(cfg)
    problems = unknown_keys(cfg, base)
    problems += missing_files(cfg)
    problems += layout_problems(cfg, section)
    if cuda_capabilities is None:
        cuda_capabilities = _visible_capabilities()
    problems += precision_problems(section, cuda_capabilities)
    problems += verl_problems(cfg)
    if section.rc.enable:
        from flash_rc.backends.verl.rc_advantage import check_rc_settings

        try:
            check_rc_settings(cfg)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError(_problems("invalid verl recipe", problems))


def unknown_keys(cfg: DictConfig, base: DictConfig) -> list[str]:
    """Keys of ``cfg`` that verl's schema ``base`` does not declare, outermost only (recipe files may add keys that
    hydra's struct mode would refuse on the command line). Below an empty or null node of ``base``
    (``engine_kwargs.vllm``, ...) and below :data:`FREE_FORM` anything goes; ``flash_rc`` has its own schema."""
    return _unknown(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(base, resolve=False), "")


def _unknown(tree: dict, schema: dict, prefix: str) -> list[str]:
    problems = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if path in ("flash_rc", "hydra") or path in FREE_FORM:
            continue
        if key not in schema:
            problems.append(f"{path}: unknown key (verl 0.9.1's config has no such key)")
        elif isinstance(value, dict) and isinstance(schema[key], dict) and schema[key]:
            problems += _unknown(value, schema[key], f"{path}.")
    return problems


def missing_files(cfg: DictConfig) -> list[str]:
    """Local data, model and reward-function files that do not exist (remote ones are not checked; an RC replay
    buffer file, ``flash_rc.rc.replay.initial_path``, is refused on verl altogether by ``check_rc_settings``)."""
    from verl.trainer.ppo.utils import need_critic

    problems = []
    for key in ("data.train_files", "data.val_files"):
        for file in _as_list(OmegaConf.select(cfg, key, default=None) or []):
            if not _REMOTE.match(file) and not Path(os.path.expanduser(file)).is_file():
                problems.append(f"{key}: file not found: {file}")
    model_keys = ["actor_rollout_ref.model.path", "actor_rollout_ref.model.tokenizer_path"]
    if need_critic(cfg):
        model_keys += ["critic.model.path", "critic.model.tokenizer_path"]
    for key in model_keys:
        value = OmegaConf.select(cfg, key, default=None)
        if (
            value
            and not _REMOTE.match(value)
            and not Path(os.path.expanduser(value)).exists()
            and not (_HUB_ID.match(value) and not value.startswith("."))
        ):
            problems.append(f"{key}: model folder not found: {value} (a local path; Hub ids look like owner/name)")
    reward_path = OmegaConf.select(cfg, "reward.custom_reward_function.path", default=None)
    if reward_path:
        if reward_path.startswith("pkg://"):
            module = reward_path.removeprefix("pkg://")
            if _find_spec(module) is None:
                problems.append(f"reward.custom_reward_function.path: no module {module!r} importable here")
        elif not Path(os.path.expanduser(reward_path.removeprefix("file://"))).is_file():
            problems.append(f"reward.custom_reward_function.path: file not found: {reward_path}")
    return problems


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def layout_problems(cfg: DictConfig, section: FlashRCVerlSection) -> list[str]:
    """GPU and batch layouts that cannot be split: data-parallel size, rollout replicas, mini and micro batches.

    verl's ``validate_config`` checks the total batch against the GPU count and micro-batch settings; this adds what
    it leaves to a crash at start-up: Ulysses SP and rollout TP x DP x PP dividing the GPUs, the batch dividing into
    mini-batches, each mini-batch dividing over the data-parallel ranks and into micro-batches.
    """
    trainer, actor, rollout = cfg.trainer, cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    n_gpus = trainer.nnodes * trainer.n_gpus_per_node
    where = f"trainer.nnodes x trainer.n_gpus_per_node = {trainer.nnodes} x {trainer.n_gpus_per_node} = {n_gpus} GPUs"
    problems = []
    sp = actor.ulysses_sequence_parallel_size
    if n_gpus % sp:
        problems.append(f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp} does not divide {where}")
    replica = rollout.tensor_model_parallel_size * rollout.data_parallel_size * rollout.pipeline_model_parallel_size
    if n_gpus % replica:
        problems.append(
            f"a rollout replica (tensor_model_parallel_size x data_parallel_size x "
            f"pipeline_model_parallel_size = {replica} GPUs) does not divide {where}"
        )
    batch, mini = cfg.data.train_batch_size, actor.ppo_mini_batch_size
    if batch % mini:
        problems.append(
            f"data.train_batch_size={batch} is not a multiple of actor_rollout_ref.actor.ppo_mini_batch_size={mini}"
        )
    dp = n_gpus // sp if n_gpus % sp == 0 else None
    per_prompt = rollout.n  # RC: N_summ x K, one trained turn per session (translate sets it)
    sequences = mini * per_prompt
    if dp and not actor.use_dynamic_bsz:
        if sequences % dp:
            problems.append(
                f"a mini-batch of {sequences} sequences (ppo_mini_batch_size x {per_prompt} per prompt) "
                f"does not split over {dp} data-parallel ranks ({n_gpus} GPUs / sequence parallel {sp})"
            )
        elif actor.ppo_micro_batch_size_per_gpu and (sequences // dp) % actor.ppo_micro_batch_size_per_gpu:
            problems.append(
                f"{sequences // dp} sequences per data-parallel rank and mini-batch are not a multiple "
                f"of actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="
                f"{actor.ppo_micro_batch_size_per_gpu}"
            )
    if section.rc.enable:
        if not trainer.use_v1:
            problems.append(
                "flash_rc.rc.enable needs trainer.use_v1=true (the v1 trainer takes several outputs per "
                "sample from an agent loop)"
            )
    correction = cfg.algorithm.get("rollout_correction") or {}
    if correction.get("rollout_is") and not rollout.calculate_log_probs:
        problems.append(
            "algorithm.rollout_correction.rollout_is needs actor_rollout_ref.rollout.calculate_log_probs"
            "=true (the TIS weights divide by the rollout log-probs)"
        )
    return problems


def precision_problems(section: FlashRCVerlSection, cuda_capabilities: list[tuple[int, int]]) -> list[str]:
    """FP8 on a visible GPU below compute capability 8.9."""
    if section.engine.precision != "fp8":
        return []
    old = sorted({cap for cap in cuda_capabilities if tuple(cap) < FP8_MIN_CAPABILITY})
    return (
        [
            f"flash_rc.engine.precision=fp8 needs GPUs of compute capability >= 8.9 (Ada/Hopper or newer); this "
            f"machine's GPUs have {', '.join(f'{major}.{minor}' for major, minor in old)}: use int8"
        ]
        if old
        else []
    )


def _visible_capabilities() -> list[tuple[int, int]]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count())]


def verl_problems(cfg: DictConfig) -> list[str]:
    """What ``verl.trainer.main_ppo.main`` checks before ``run_ppo``: ``auto_set_device`` and ``validate_config``
    (its progress line goes to stderr so that a dry run's stdout stays YAML).

    verl's critic check builds the critic's ``HFModelConfig``, which reads the model's ``config.json``: for a Hub id
    that is not in the local Hugging Face cache it would go to the network, so that one check is left to the start
    of training (with a note on stderr) and everything else is still checked.
    """
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    use_critic = need_critic(cfg)
    critic_model = OmegaConf.select(cfg, "critic.model.path", default=None)
    if use_critic and _uncached_hub_model(critic_model):
        print(
            f"note: verl's critic check skipped: {critic_model} is not in the local Hugging Face cache (it is "
            "checked when training starts)",
            file=sys.stderr,
        )
        use_critic = False
    try:
        with contextlib.redirect_stdout(sys.stderr):
            auto_set_device(cfg)
            validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=use_critic)
    except Exception as error:  # verl raises AssertionError, ValueError, omegaconf errors...: all are problems here
        message = " ".join(str(error).split()) or type(error).__name__
        return [f"verl's validate_config: {message}"]
    return []


def _uncached_hub_model(path: str | None) -> bool:
    if not path or _REMOTE.match(path) or Path(os.path.expanduser(path)).exists() or not _HUB_ID.match(path):
        return False
    from huggingface_hub import try_to_load_from_cache

    return not isinstance(try_to_load_from_cache(path, "config.json"), str)
