"""``flash-rc train`` recipes: verl's key names and defaults, plus ``flash_rc.engine`` / ``flash_rc.train``.

Why this schema: the same YAML a verl user writes for ``main_ppo`` runs here on one node. Keys the local backend
implements are fields with verl's defaults; verl keys it cannot honour are pinned to verl's default (a ``Literal``),
so leaving them alone is fine and changing them is an error naming the key; any other key is unknown and refused.
:func:`check_train_recipe` then checks what needs several keys at once (batch sizes that must divide, files that must
exist, a temperature the learner can divide by) — all before a process group, a model or an engine starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from flash_rc.algo.rollout_correction import RolloutCorrectionSection
from flash_rc.backends.local.metrics import LOGGERS
from flash_rc.config import EngineExtras, ModelSection, RolloutSection, Section
from flash_rc.errors import ConfigError, InputNotFoundError, ModelNotFoundError
from flash_rc.learner.config import ActorModelKeys, ActorSection, RefSection, check_actor
from flash_rc.rc.states import RCTrainConfig


class TrainDataSection(Section):
    """verl's ``data`` keys."""

    train_files: str | list[str]
    """Training prompts: verl parquet / JSONL rows (``flash-rc data``) or GSM8K JSONL (required)."""
    val_files: str | list[str] | None = None
    """Validation prompts (same formats); none: no validation."""
    train_batch_size: int = Field(1024, ge=1)
    """Prompts per training step (each sampled ``rollout.n`` times)."""
    max_prompt_length: int = Field(512, ge=1)
    """Longest prompt in tokens (chat template applied)."""
    max_response_length: int = Field(512, ge=1)
    """Generation budget per sample (also L_max of the overlong shaping)."""
    filter_overlong_prompts: bool = False
    """Drop prompts longer than ``max_prompt_length`` (off: such a prompt is an error, verl's ``truncation=error``)."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch (seeded by ``data.seed``)."""
    seed: int | None = Field(None, ge=0)
    """Seed of the prompt order and of the ``train_max_samples`` subset (null: torch's default generator, as verl)."""
    train_max_samples: int = Field(-1, ge=-1)
    """Use at most this many training prompts (-1: all)."""
    val_max_samples: int = Field(-1, ge=-1)
    """Use at most this many validation prompts (-1: all)."""
    prompt_key: Literal["prompt"] = "prompt"
    """Row field holding the chat messages (verl's default only)."""
    truncation: Literal["error"] = "error"
    """What an overlong prompt does: an error (``filter_overlong_prompts`` drops them instead)."""


class TrainRolloutKeys(Section):
    n: int = Field(1, ge=1)
    """Samples per prompt (the GRPO group size)."""
    temperature: float = Field(1.0, gt=0, le=2)
    """Training sampling temperature; the learner's log-probs use the same one."""
    top_p: Literal[1.0] = 1.0
    """Nucleus sampling: off for training (the learner's log-probs are of the full tempered distribution)."""
    top_k: Literal[-1, 0] = -1
    """Top-k: off for training (as top_p)."""
    calculate_log_probs: bool = True
    """The engine always returns processed rollout log-probs (rollout correction needs them)."""
    mode: Literal["sync", "async"] = "sync"
    """verl's rollout mode; the local engine serves both the same way."""
    free_cache_engine: bool = True
    """GPU: the engine sleeps (KV cache freed, weights offloaded) while the learner trains. No effect on CPU."""


TrainRolloutSection = type("TrainRolloutSection", (TrainRolloutKeys, RolloutSection), {
    "__doc__": "verl's ``actor_rollout_ref.rollout``: the engine's keys plus training sampling.",
})


class TrainModelSection(ModelSection, ActorModelKeys):
    """verl's ``actor_rollout_ref.model``: the model folder (engine and learner) and the learner's model keys."""


class ActorRolloutRefTrainSection(Section):
    model: TrainModelSection = TrainModelSection()
    actor: ActorSection = ActorSection()
    rollout: TrainRolloutSection = TrainRolloutSection()
    ref: RefSection = RefSection()
    hybrid_engine: Literal[True] = True
    """Actor and rollout share the devices (always, locally)."""


class FilterGroupsSection(Section):
    """DAPO dynamic sampling: keep only groups whose metric differs between samples."""

    enable: bool = False
    """Keep only groups whose samples differ in ``metric``, drawing more prompts to fill the batch."""
    metric: Literal["acc", "score", "seq_reward", "seq_final_reward"] = "acc"
    """Per-sample value compared within a group (``seq_reward``/``seq_final_reward``: the shaped reward)."""
    max_num_gen_batches: int = Field(0, ge=0)
    """Generation batches per step at most (0: no limit). A step that runs out trains on the groups it kept."""


class AlgorithmSection(Section):
    """verl's ``algorithm``."""

    adv_estimator: Literal["grpo", "rloo"] = "grpo"
    """Outcome advantage: GRPO group baseline (normalised by the std) or RLOO leave-one-out."""
    norm_adv_by_std_in_grpo: bool = True
    """GRPO: divide by the group std (False: Dr. GRPO)."""
    filter_groups: FilterGroupsSection = FilterGroupsSection()
    rollout_correction: RolloutCorrectionSection = RolloutCorrectionSection()
    use_kl_in_reward: Literal[False] = False
    """KL penalty in the reward: not supported locally (use ``actor.use_kl_loss``)."""
    gamma: Literal[1.0] = 1.0
    """Discount (outcome rewards: 1)."""
    lam: Literal[1.0] = 1.0
    """GAE λ (no critic: 1)."""


class OverlongBufferSection(Section):
    """DAPO overlong shaping: 0 up to ``max_response_length − len`` tokens, then a ramp to −``penalty_factor``."""

    enable: bool = False
    """Add the overlong penalty to the reward of every sample."""
    len: int = Field(0, ge=0)
    """L_buf, the length of the ramp."""
    penalty_factor: float = Field(1.0, ge=0)
    """Penalty at the full response length."""
    log: bool = False
    """verl logs the penalty when set; here it is always in the metrics."""


class RewardKwargs(Section):
    overlong_buffer_cfg: OverlongBufferSection = OverlongBufferSection()
    max_resp_len: int | None = None
    """L_max of the shaping (default: ``data.max_response_length``)."""


class RewardSection(Section):
    """verl's ``reward``: rule rewards routed by ``data_source`` (``flash_rc.rewards.router``)."""

    reward_kwargs: RewardKwargs = RewardKwargs()
    reward_manager: Literal["naive", "dapo"] = "naive"
    """verl's reward manager name; both score through the router (``dapo`` when overlong shaping is on)."""


class TrainerSection(Section):
    """verl's ``trainer``."""

    project_name: str = "flash_rc"
    """wandb project; the default run directory is ``checkpoints/<project_name>/<experiment_name>``."""
    experiment_name: str = "local"
    """The run's name (wandb run name; part of the default run directory)."""
    total_epochs: int = Field(1, ge=1)
    """Passes over the training prompts."""
    total_training_steps: int | None = Field(None, ge=1)
    """Stop after this many steps (default: the data's steps per epoch × ``total_epochs``)."""
    save_freq: int = -1
    """Checkpoint every this many steps (and at the last step); ≤ 0: only at the last step."""
    test_freq: int = -1
    """Validate every this many steps (and at the last step); ≤ 0: never during training."""
    val_before_train: bool = False
    """Validate once before the first step."""
    default_local_dir: str | None = None
    """Run directory: ``global_step_N/`` checkpoints and ``metrics.jsonl`` (default:
    ``checkpoints/<project_name>/<experiment_name>``)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.default_local_dir or f"checkpoints/{self.project_name}/{self.experiment_name}").expanduser()
    resume_mode: Literal["auto", "disable"] = "auto"
    """``auto``: resume from the latest complete checkpoint in the run directory; ``disable``: start fresh (the run
    directory must hold no checkpoint)."""
    logger: list[str] = Field(default_factory=lambda: ["console"])
    """Where metrics go besides ``metrics.jsonl``: ``console``, ``wandb``, ``tensorboard``."""
    n_gpus_per_node: int = Field(1, ge=1)
    """Processes per node; must equal the torchrun world size (``--nproc_per_node``)."""
    nnodes: Literal[1] = 1
    """One node locally (clusters: the verl backend)."""
    max_actor_ckpt_to_keep: int | None = Field(None, ge=1)
    """Keep only the newest this many checkpoints (None: all)."""


class TrainOptions(Section):
    """``flash_rc.train``: what verl has no key for."""

    rollout_seed: int = 0
    """Base of the per-request sampling seeds (each request's seed derives from it, the step and the prompt), so a
    resumed run samples what an uninterrupted one would."""
    progress: bool = True
    """Show a progress bar over the steps."""
    engine_ranks: Literal["auto", "first", "all"] = "auto"
    """Which ranks host a rollout engine: ``first`` (rank 0 generates, the batch is broadcast), ``all``
    (data-parallel rollouts: each rank samples and scores its share of the prompts); ``auto``: all on GPU, first on
    CPU."""


class FlashRCTrainSection(Section):
    engine: EngineExtras = EngineExtras()
    train: TrainOptions = TrainOptions()
    rc: RCTrainConfig = RCTrainConfig()


def sequences_per_prompt(recipe: "TrainRecipe") -> int:
    """Trained sequences each prompt of a step yields: ``rollout.n``, or N_summ × K states' turns with RC."""
    rc = recipe.flash_rc.rc
    return rc.n_summ * rc.k if rc.enable else recipe.actor_rollout_ref.rollout.n


class TrainRecipe(Section):
    """A ``flash-rc train`` recipe."""

    data: TrainDataSection
    actor_rollout_ref: ActorRolloutRefTrainSection = ActorRolloutRefTrainSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    reward: RewardSection = RewardSection()
    trainer: TrainerSection = TrainerSection()
    flash_rc: FlashRCTrainSection = FlashRCTrainSection()


def _files(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check_train_recipe(recipe: TrainRecipe, world_size: int) -> None:
    """Every cross-key problem of the recipe in one ConfigError, before anything heavy starts."""
    from flash_rc.models import resolve_model

    problems = []
    data, actor_rollout_ref = recipe.data, recipe.actor_rollout_ref
    rollout = actor_rollout_ref.rollout
    problems += check_actor(actor_rollout_ref.actor, sequences_per_prompt(recipe), data.train_batch_size, world_size)
    rc = recipe.flash_rc.rc
    if rc.enable:
        if rc.k < 2:
            problems.append(f"flash_rc.rc.k={rc.k}: {recipe.algorithm.adv_estimator} needs K >= 2 samples per state "
                            "(a group of one has no baseline)")
        if rollout.n != 1:
            problems.append("actor_rollout_ref.rollout.n is not used with flash_rc.rc.enable (each state samples "
                            "flash_rc.rc.k turns); leave it at 1")
        if recipe.algorithm.filter_groups.enable:
            problems.append("algorithm.filter_groups (dynamic sampling) is not supported with flash_rc.rc.enable")
    if recipe.trainer.n_gpus_per_node != world_size:
        problems.append(f"trainer.n_gpus_per_node={recipe.trainer.n_gpus_per_node} but {world_size} processes run "
                        "(torchrun --nproc_per_node)")
    if data.max_prompt_length + data.max_response_length > rollout.max_model_len:
        problems.append(f"data.max_prompt_length + data.max_response_length = "
                        f"{data.max_prompt_length + data.max_response_length} exceeds "
                        f"actor_rollout_ref.rollout.max_model_len={rollout.max_model_len}")
    unknown_loggers = sorted(set(recipe.trainer.logger) - set(LOGGERS))  # before wandb / tensorboard import
    if unknown_loggers:
        problems.append(f"trainer.logger: unknown {unknown_loggers}; choose from {list(LOGGERS)}")
    overlong = recipe.reward.reward_kwargs.overlong_buffer_cfg
    max_resp_len = recipe.reward.reward_kwargs.max_resp_len or data.max_response_length
    if overlong.enable and not 0 < overlong.len <= max_resp_len:
        problems.append(f"reward.reward_kwargs.overlong_buffer_cfg.len={overlong.len} must be in (0, {max_resp_len}]")
    if problems:
        raise ConfigError("invalid recipe:\n" + "\n".join(f"  {p}" for p in problems))
    for key, files in (("data.train_files", _files(data.train_files)), ("data.val_files", _files(data.val_files))):
        for file in files:
            if not Path(os.path.expanduser(file)).is_file():
                raise InputNotFoundError(f"{key}: file not found: {file}")
    try:
        resolve_model(actor_rollout_ref.model.path)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"actor_rollout_ref.model.path: {error}") from None
    from flash_rc.config import engine_config
    from flash_rc.rollout.engine import check_platform_support

    check_platform_support(engine_config(recipe), on_cpu=not torch.cuda.is_available())
    if rc.enable:
        check_rc_lengths(recipe)
        if rc.replay.enable and rc.replay.initial_path:  # a corrupt buffer file fails here, naming its line
            from flash_rc.rc.replay import SummaryReplayBuffer

            SummaryReplayBuffer(rc.replay).load_initial(rc.replay.initial_path, known_problem_ids=())


def check_rc_lengths(recipe: TrainRecipe) -> None:
    """RC turns fit the context: the longest prompt each turn type can have (template + problem + the summaries and
    reasoning it carries) plus its budget, with the problem bounded by ``data.max_prompt_length``."""
    from transformers import AutoTokenizer

    from flash_rc.chat import prompt_token_ids
    from flash_rc.models import resolve_model
    from flash_rc.rc.scheduler import CyclePrompts
    from flash_rc.rc.states import cycle_config

    rc, data = recipe.flash_rc.rc, recipe.data
    max_model_len = recipe.actor_rollout_ref.rollout.max_model_len
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(recipe.actor_rollout_ref.model.path))
    prompts = CyclePrompts.from_config(cycle_config(rc, seed=0))
    # summaries: H_S each ("append" keeps all t_train of them); reasoning traces (baselines): H_R each
    context = rc.max_summary_tokens * (rc.t_train if rc.summary_mode == "append" else 1) if rc.mode == "rc" \
        else rc.max_thinking_tokens
    empty = dict.fromkeys(("problem", "curr_summary", "curr_reasoning", "existing_summary", "reasoning"), "")
    turns = [("reasoning", prompts.reasoning, context, rc.max_thinking_tokens)]
    if prompts.summarization is not None:
        turns.append(("summarization", prompts.summarization, context + rc.max_thinking_tokens, rc.max_summary_tokens))
    problems = []
    for name, template, carried, budget in turns:
        fields = {field: empty[field] for field in template.fields}
        messages = [{"role": "user", "content": template.fill(**fields)}]
        needed = len(prompt_token_ids(tokenizer, messages)) + data.max_prompt_length + carried + budget
        if needed > max_model_len:
            problems.append(f"an RC {name} turn needs up to {needed} tokens (template, a problem of "
                            f"data.max_prompt_length={data.max_prompt_length}, {carried} carried, {budget} generated) "
                            f"but actor_rollout_ref.rollout.max_model_len={max_model_len}")
    if problems:
        raise ConfigError("invalid recipe:\n" + "\n".join(f"  {p}" for p in problems))
