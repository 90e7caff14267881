"""GRPO per (problem, state) for RC training on verl 0.9.1, and the RC settings both halves of the plugin read.

Why verl's own ``grpo`` cannot do it. RC trains K reasoning turns per drawn state and compares each turn only with
the other K of the same state (``../shared/docs/reasoning-cache.md`` §2.1). In verl 0.9.1's v1 trainer:

* ``AgentLoopWorkerTQ._agent_loop_postprocess`` copies the *last* output's ``reward_score`` onto every earlier output
  of a session, so several trained turns in one session cannot keep their own rewards. The RC agent loop therefore
  returns **one trained turn per session** (``rollout.n = N_summ × K``; session s trains state ``s // K``), each the
  final output of its session, scored on its own answer.
* ``trainer_base._compute_advantage`` reads only ``uid`` (the *problem's* id, written from the prompt's fields after
  the agent loop's, so the loop cannot change it) and hands a registered estimator
  ``fn(token_level_rewards, response_mask, config, index=uid)``; ``grpo`` would group all N_summ × K turns of a
  problem together. The only per-row identity that reaches the advantage step is the TransferQueue key
  ``{uid}_{session_id}_{output_index}`` (``batch.keys``), and only ``compute_advantage_for_multi_trajectories`` sees it.

So the group of a row is derived from its key: ``{uid}|{session_id // K}`` (:func:`rc_group_ids`), and a trainer
mode ``flash_rc_rc`` (:func:`register_rc_trainer`: verl's ``PPOTrainerSync`` with :class:`RCAdvantageMixin`) puts
the batch's keys in scope around verl's own ``_compute_advantage``; :func:`compute_rc_grpo_advantage` (registered as
``algorithm.adv_estimator=flash_rc_rc_grpo``) reads them, checks they are the rows it was given (the uid part of each
group equals ``index``), and runs :func:`flash_rc.algo.advantages.grpo_advantages` over them. Outside that trainer
mode it refuses to run rather than silently grouping per problem. verl's synthetic padding rows (uid ``pad…``) form
groups of their own, and their response mask is zero.

Config keys (verl 0.9.1 spelling)::

    actor_rollout_ref.rollout.agent.default_agent_loop=flash_rc_rc
    actor_rollout_ref.rollout.n=<n_summ * k>
    algorithm.adv_estimator=flash_rc_rc_grpo
    trainer.v1.trainer_mode=flash_rc_rc        # registered by register_rc_trainer() in the TaskRunner process
    flash_rc.rc: {enable: true, t_train, n_summ, k, max_thinking_tokens, max_summary_tokens, replay: {...}}
    trainer.checkpoint_callback_class=flash_rc.backends.verl.rc_agent_loop.RCReplayCheckpoint  # with replay.enable

This module imports no heavy verl module (the plugin imports it lazily; the trainer base is imported only inside
:func:`register_rc_trainer`, because it needs ``transfer_queue``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from flash_rc.algo.advantages import GRPOConfig, grpo_advantages
from flash_rc.backends.verl.plugin import RC_ADV_ESTIMATOR, RC_REPLAY_CALLBACK, RC_TRAINER_MODE
from flash_rc.errors import ConfigError
from flash_rc.rc.states import RCTrainConfig

_batch_keys: contextvars.ContextVar[tuple[Sequence[str], int] | None] = contextvars.ContextVar(
    "flash_rc_rc_batch_keys", default=None
)


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b.c`` of an OmegaConf / dict / dataclass config, ``default`` where a level is missing."""
    node = config
    for name in dotted.split("."):
        if node is None:
            return default
        node = node.get(name, None) if hasattr(node, "get") else getattr(node, name, None)
    return default if node is None else node


def rc_settings(config: Any) -> RCTrainConfig:
    """The validated ``flash_rc.rc`` section of a verl trainer config (the same section the local recipes use)."""
    section = _get(config, "flash_rc.rc")
    if section is None:
        raise ConfigError("flash_rc.rc is missing: the RC agent loop needs the flash_rc.rc section (enable: true, ...)")
    try:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        raw = dict(section)
    try:
        return RCTrainConfig.model_validate(raw)
    except ValueError as error:
        first = str(error).splitlines()
        raise ConfigError(f"flash_rc.rc: {' '.join(line.strip() for line in first[1:3])}") from None


def check_rc_settings(config: Any) -> RCTrainConfig:
    """Every problem of a verl config for RC training in one ConfigError (one line per problem); the settings if none.

    Meant for the launcher's dry run as well as the agent loop's start: nothing here needs Ray or a GPU.
    """
    rc = rc_settings(config)
    problems = []
    if not rc.enable:
        problems.append("flash_rc.rc.enable is false but the RC agent loop was selected")
    if rc.k < 2:
        problems.append(
            f"flash_rc.rc.k={rc.k}: GRPO per state needs K >= 2 turns per state (a group of one has no baseline)"
        )
    n = _get(config, "actor_rollout_ref.rollout.n")
    if n != rc.n_summ * rc.k:
        problems.append(
            f"actor_rollout_ref.rollout.n={n} must be flash_rc.rc.n_summ * k = {rc.n_summ * rc.k} "
            "(one trained reasoning turn per verl session)"
        )
    response_length = _get(config, "actor_rollout_ref.rollout.response_length")
    if response_length is not None and response_length < rc.max_thinking_tokens:
        problems.append(
            f"actor_rollout_ref.rollout.response_length={response_length} is below "
            f"flash_rc.rc.max_thinking_tokens={rc.max_thinking_tokens} (trained turns would be cut)"
        )
    estimator = _get(config, "algorithm.adv_estimator")
    if estimator != RC_ADV_ESTIMATOR:
        problems.append(
            f"algorithm.adv_estimator={estimator} groups all turns of a problem together; RC needs "
            f"{RC_ADV_ESTIMATOR} (GRPO per problem and state)"
        )
    mode = _get(config, "trainer.v1.trainer_mode")
    if mode != RC_TRAINER_MODE:
        problems.append(
            f"trainer.v1.trainer_mode={mode}: RC needs {RC_TRAINER_MODE} (it passes each turn's state to "
            f"{RC_ADV_ESTIMATOR})"
        )
    if _get(config, "algorithm.filter_groups.enable", False):
        problems.append(
            "algorithm.filter_groups (dynamic sampling) filters per problem, not per state: not "
            "supported with flash_rc.rc"
        )
    if rc.replay.enable and rc.replay.sample_per_problem != 1:
        problems.append(
            f"flash_rc.rc.replay.sample_per_problem={rc.replay.sample_per_problem}: the verl backend runs "
            "one online chain per problem (set 1)"
        )
    callback = _get(config, "trainer.checkpoint_callback_class")
    if rc.replay.enable and callback != RC_REPLAY_CALLBACK:
        problems.append(
            f"trainer.checkpoint_callback_class={callback}: the replay buffer needs {RC_REPLAY_CALLBACK} "
            "(it starts, resumes and saves the buffer)"
        )
    if rc.replay.enable and rc.replay.initial_path is not None:
        problems.append(
            "flash_rc.rc.replay.initial_path is not supported by the verl backend yet (its buffer is "
            "keyed by problem hash; resume from a checkpoint instead)"
        )
    if problems:
        raise ConfigError("invalid RC settings for verl: " + "; ".join(problems))
    return rc


# ---------------------------------------------------------------------- groups


def rc_group_ids(batch_keys: Sequence[str], k: int) -> list[str]:
    """``{uid}|{state}`` of each TransferQueue key ``{uid}_{session_id}_{output_index}`` (state = session_id // K).

    >>> rc_group_ids(["u1_0_0", "u1_3_0", "u1_4_0", "pad9_0_0"], k=4)
    ['u1|0', 'u1|0', 'u1|1', 'pad9|0']
    """
    groups = []
    for key in batch_keys:
        fields = str(key).rsplit("_", 2)
        if len(fields) != 3 or not fields[1].isdigit() or fields[2] != "0":
            raise ValueError(
                f"unexpected RC row key {key!r}: expected {{uid}}_{{session_id}}_0 (one trained turn per session)"
            )
        groups.append(f"{fields[0]}|{int(fields[1]) // k}")
    return groups


@contextlib.contextmanager
def rc_turn_groups(batch_keys: Sequence[str], k: int) -> Iterator[None]:
    """Within this block :func:`compute_rc_grpo_advantage` groups the rows of ``batch_keys`` (in that order)."""
    token = _batch_keys.set((list(batch_keys), k))
    try:
        yield
    finally:
        _batch_keys.reset(token)


def compute_rc_grpo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Any = None,
                              index: np.ndarray | Sequence[str] | None = None, **kwargs: Any
                              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """verl's advantage-estimator signature: GRPO per (problem, state) over the rows of the current batch.

    ``A_i = (R_i - mean_g R) / (std_g R + 1e-6)`` over the group g of row i (``std`` unbiased, as verl's ``grpo``;
    ``algorithm.norm_adv_by_std_in_grpo=false`` drops the division), broadcast over the response tokens; returns are
    the advantages (outcome reward, no critic). The groups come from :func:`rc_turn_groups`.
    """
    scope = _batch_keys.get()
    if scope is None:
        raise ConfigError(
            f"{RC_ADV_ESTIMATOR} needs each turn's state: run with trainer.v1.trainer_mode={RC_TRAINER_MODE}"
        )
    keys, k = scope
    groups = rc_group_ids(keys, k)
    uids = [str(uid) for uid in (index if index is not None else [])]
    if len(groups) != token_level_rewards.shape[0] or len(uids) != len(groups):
        raise ValueError(
            f"{RC_ADV_ESTIMATOR}: {token_level_rewards.shape[0]} rows, {len(uids)} uids and {len(groups)} keys in scope"
        )
    for row, (uid, group) in enumerate(zip(uids, groups)):
        if group.rsplit("|", 1)[0] != uid:
            raise ValueError(f"{RC_ADV_ESTIMATOR}: row {row} has uid {uid!r} but its key in scope is {keys[row]!r}")
    grpo = GRPOConfig(norm_by_std=bool(_get(config, "norm_adv_by_std_in_grpo", True)))
    scores = token_level_rewards.sum(dim=-1).float()
    advantages = grpo_advantages(scores, groups, grpo).to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


# ---------------------------------------------------------------------- trainer mode


class RCAdvantageMixin:
    """Puts the batch's keys in scope around verl's ``_compute_advantage`` (mix in before a v1 ``PPOTrainer``)."""

    def _compute_advantage(self, batch, metrics):
        with rc_turn_groups(batch.keys, rc_settings(self.config).k):
            return super()._compute_advantage(batch, metrics)


def register_rc_trainer() -> type:
    """Register ``trainer.v1.trainer_mode=flash_rc_rc`` (verl's ``PPOTrainerSync`` + :class:`RCAdvantageMixin`).

    Must run in the process that resolves the trainer (verl's TaskRunner actor) before ``get_trainer_cls``: e.g. from
    the plugin's import hook right after ``verl.trainer.ppo.v1.trainer_sync`` has executed (it imports only that
    module and ``trainer_base``, so it works while the ``verl.trainer.ppo.v1`` package is still initialising).
    Needs ``transfer_queue`` (verl's v1 trainer imports it), so it is not exercised on the CPU test machine.
    Idempotent.
    """
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    if RC_TRAINER_MODE in TRAINER_REGISTRY:
        return TRAINER_REGISTRY[RC_TRAINER_MODE]
    trainer = type(
        "RCTrainerSync",
        (RCAdvantageMixin, PPOTrainerSync),
        {"__module__": __name__, "__doc__": "verl's sync trainer with RC's per-state advantage groups."},
    )
    return register_trainer(RC_TRAINER_MODE)(trainer)
