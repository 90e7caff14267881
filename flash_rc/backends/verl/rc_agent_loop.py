"""The Reasoning Cache agent loop for verl 0.9.1: RC's training step, driven through verl's ``server_manager``.

What one problem does (``../shared/docs/reasoning-cache.md`` §2.1; the core is :mod:`flash_rc.rc`, the same code the
local backend's ``RCRollout`` runs):

1. an *online chain* of T_train = ``t_train`` reason → summarize cycles (:class:`~flash_rc.rc.scheduler.CycleScheduler`,
   every call ``server_manager.generate(..., sampling_params={**verl's, "max_tokens": H_R or H_S})``), starting from
   the problem's replay-buffer summary when it has one, each reasoning turn graded for the online accuracy;
2. ``n_summ`` training states drawn from its contexts (:func:`~flash_rc.rc.states.draw_states`);
3. K = ``k`` reasoning turns sampled per state, each scored on its own answer by the time-limited reward router
   (:func:`flash_rc.rewards.router.compute_score_async`), GRPO per (problem, state);
4. the chain's summaries added to the replay buffer (:func:`~flash_rc.rc.states.buffer_entries`).

How it maps onto verl. verl calls ``run`` once per *session*: ``rollout.n`` sessions per prompt, all in the same
``AgentLoopWorker`` process and event loop. verl copies the last output's reward onto every other output of a
session, so a session can carry only one turn with its own reward. Hence **``rollout.n = n_summ × k`` and session s
returns the one trained turn ``s % k`` of state ``s // k``**; the sessions of a prompt share one online chain (the
first to arrive starts it, the others await it; :data:`_ONLINE`). Any other ``rollout.n`` is refused at start
(:func:`~flash_rc.backends.verl.rc_advantage.check_rc_settings`, also usable in a dry run). Validation runs the same
loop with ``val_kwargs.n`` sessions (state ``(s // k) mod n_summ``); give validation rows ``agent_name:
single_turn_agent`` for plain single-turn validation.

Each output: prompt = the tokenized summary-conditioned reasoning prompt I_R(problem, context) (verl's own
Continuous-Token builder, so the ids are what verl's other loops would build), response = the turn's tokens with mask 1
and the rollout log-probs (``response_logprobs`` → ``rollout_log_probs`` for TIS), ``reward_score`` its own score,
``extra_fields["rc"]`` its metadata (``problem_key, state_index, depth, turn_type, cycle_step, turn_number, sample,
group, starting_step, model_version``) besides verl's weight-version fields. **Summaries are never trained and not
returned**: a mask-0 row would still cost verl a log-prob forward and a padded slot in every mini-batch, and RC trains
none of them (neither does the online chain's own reasoning).

Advantages need each row's state, which verl's advantage step does not pass: see
:mod:`flash_rc.backends.verl.rc_advantage` (``algorithm.adv_estimator=flash_rc_rc_grpo``,
``trainer.v1.trainer_mode=flash_rc_rc``).

Replay buffer. Agent loops run in ``rollout.agent.num_workers`` Ray actors and a problem lands on any of them, so the
buffer is one named Ray actor, ``flash_rc_rc_replay`` (a :class:`ReplayHost`), keyed by a hash of (data source,
problem text) — verl's uids are fresh every step. The trainer's checkpoint callback :class:`RCReplayCheckpoint`
(``trainer.checkpoint_callback_class``) creates it on the driver at start — loading ``rc_replay_buffer.jsonl`` from
the checkpoint verl resumes from (``trainer.resume_mode``, the same folder rule as verl's ``_load_checkpoint``) — and
saves it into every ``global_step_N`` folder verl writes. Limits: in the async trainer modes chains still in flight
at a save are not in it; ``replay.initial_path`` and ``sample_per_problem > 1`` are not supported here (refused).
Without Ray (tests, a single process) the host lives in this process.

RC's flags → ours → verl's keys::

    online_rollout_steps                      flash_rc.rc.t_train
    thinking_train_samples_per_online_rollout flash_rc.rc.n_summ
    thinking_train_n_samples                  flash_rc.rc.k          (actor_rollout_ref.rollout.n = n_summ * k)
    max_thinking_tokens / max_summary_tokens  flash_rc.rc.max_thinking_tokens / max_summary_tokens (H_R / H_S;
                                              actor_rollout_ref.rollout.response_length >= H_R)
    omit_online_rollout_initial_thinking_step flash_rc.rc.omit_initial_state
    use_replay_buffer, buffer_*               flash_rc.rc.replay.{enable, sample_per_problem, purge_on_add}
                                              + trainer.checkpoint_callback_class=
                                                flash_rc.backends.verl.rc_agent_loop.RCReplayCheckpoint
    (GRPO per prompt_id)                      algorithm.adv_estimator=flash_rc_rc_grpo,
                                              trainer.v1.trainer_mode=flash_rc_rc
    (the RC rollout generator)                actor_rollout_ref.rollout.agent.default_agent_loop=flash_rc_rc
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

from flash_rc.backends.verl.plugin import RC_REPLAY_CALLBACK
from flash_rc.backends.verl.rc_advantage import _get, check_rc_settings, rc_settings
from flash_rc.errors import ConfigError, PromptTooLongError
from flash_rc.rc.grading import make_grader, turn_score_request
from flash_rc.rc.replay import ReplayConfig, ReplayEntry, SummaryReplayBuffer
from flash_rc.rc.scheduler import CycleScheduler
from flash_rc.rc.state import ChainState
from flash_rc.rc.states import (
    RCTrainConfig,
    TrainingState,
    buffer_entries,
    chain_contexts,
    cycle_config,
    draw_states,
    initial_context,
    problem_text,
    start_from,
)
from flash_rc.rewards.router import compute_score_async
from flash_rc.types import Completion, SamplingConfig

logger = logging.getLogger(__name__)

REPLAY_ACTOR = "flash_rc_rc_replay"
"""Name of the Ray actor that holds the replay buffer for all agent-loop workers."""
REPLAY_FILE = "rc_replay_buffer.jsonl"
"""The buffer's file in each ``global_step_N`` checkpoint folder."""


def problem_key(data_source: str, problem: str) -> str:
    """The replay buffer's id of a problem: stable across steps and workers (verl's uids are fresh every step)."""
    return hashlib.blake2b(f"{data_source}\n{problem}".encode(), digest_size=12).hexdigest()


# ---------------------------------------------------------------------- engine adapter


class ServerEngine:
    """The scheduler's ``AsyncGenerator`` over verl's ``server_manager``: prompt ids in, one completion out.

    verl's sampling parameters (temperature, top-p/k, ``logprobs``) are used as given; ``max_tokens`` is the turn's
    budget (H_R or H_S). The weight versions are verl's ``min_global_steps`` / ``max_global_steps`` of the output.
    """

    def __init__(self, server_manager: Any, tokenizer: Any, sampling_params: dict[str, Any]):
        self.server_manager = server_manager
        self.tokenizer = tokenizer
        self.sampling_params = dict(sampling_params)

    async def generate(self, prompt_ids: list[int], max_tokens: int, request_id: str) -> tuple[Completion, Any]:
        """One generation: the completion and verl's ``TokenOutput``."""
        output = await self.server_manager.generate(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            sampling_params={**self.sampling_params, "max_tokens": max_tokens},
        )
        ids = list(output.token_ids)
        finish = "abort" if output.stop_reason == "aborted" else "length" if len(ids) >= max_tokens else "stop"
        versions = output.extra_fields or {}
        completion = Completion(
            prompt_token_ids=list(prompt_ids),
            token_ids=ids,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            logprobs=list(output.log_probs or []),
            finish_reason=finish,
            model_version_start=int(versions.get("min_global_steps") or 0),
            model_version=int(versions.get("max_global_steps") or 0),
        )
        return completion, output

    async def agenerate(self, prompt, sampling: SamplingConfig, request_id: str | None = None) -> list[Completion]:
        completion, _ = await self.generate(prompt, sampling.max_tokens, request_id)
        return [completion]


# ---------------------------------------------------------------------- replay buffer host


class ReplayHost:
    """The replay buffer of a run (a plain object: run as the named Ray actor, or in-process without Ray)."""

    def __init__(self, replay: dict[str, Any], seed: int, resume_file: str | None = None):
        self.buffer = SummaryReplayBuffer(ReplayConfig.model_validate(replay), seed)
        self.resumed_from = None
        if resume_file is not None and Path(resume_file).is_file():
            self.buffer.load(resume_file)
            self.resumed_from = resume_file

    def sample(self, problem: str) -> list[ReplayEntry]:
        return self.buffer.sample(problem)

    def add_chain(self, problem: str, entries: list[tuple[str, int]], step: int) -> int:
        return self.buffer.add_chain(problem, entries, step)

    def save(self, path: str) -> str:
        return str(self.buffer.save(path))

    def metrics(self) -> dict[str, float]:
        return self.buffer.metrics()


_LOCAL_HOST: ReplayHost | None = None
"""The host when Ray is not running (one process)."""


def _ray():
    import ray

    return ray if ray.is_initialized() else None


def resume_checkpoint_dir(config: Any) -> Path | None:
    """The ``global_step_N`` folder verl's trainer resumes from (``trainer.resume_mode``), None for a fresh start."""
    mode = _get(config, "trainer.resume_mode", "auto")
    if mode == "disable":
        return None
    if mode == "resume_path":
        path = _get(config, "trainer.resume_from_path")
        return Path(os.path.abspath(path)) if path else None
    base = Path(os.path.abspath(str(_get(config, "trainer.default_local_dir", "checkpoints"))))
    tracker = base / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return None
    folder = base / f"global_step_{int(tracker.read_text().strip())}"
    return folder if folder.is_dir() else None


def start_replay_host(config: Any) -> ReplayHost | Any | None:
    """Create the run's replay buffer (driver side, at trainer start), resumed from verl's resume checkpoint."""
    global _LOCAL_HOST
    rc = rc_settings(config)
    if not (rc.enable and rc.replay.enable):
        return None
    folder = resume_checkpoint_dir(config)
    resume = str(folder / REPLAY_FILE) if folder is not None else None
    args = (rc.replay.model_dump(), rc.seed, resume)
    ray = _ray()
    if ray is None:
        _LOCAL_HOST = ReplayHost(*args)
        return _LOCAL_HOST
    actor = ray.remote(num_cpus=0)(ReplayHost).options(name=REPLAY_ACTOR, get_if_exists=True)
    return actor.remote(*args)


def replay_host() -> ReplayHost | Any | None:
    """The run's replay buffer (the named actor, or this process's host), None if none was started."""
    ray = _ray()
    if ray is None:
        return _LOCAL_HOST
    try:
        return ray.get_actor(REPLAY_ACTOR)
    except ValueError:
        return None


async def _call(host: Any, method: str, *args: Any) -> Any:
    if isinstance(host, ReplayHost):
        return getattr(host, method)(*args)
    return await getattr(host, method).remote(*args)


class RCReplayCheckpoint(CheckpointCallback):
    """``trainer.checkpoint_callback_class``: starts the replay buffer with the trainer (resumed from verl's resume
    checkpoint) and writes it into each checkpoint folder as :data:`REPLAY_FILE`."""

    def __init__(self, config=None):
        super().__init__(config)
        self.host = start_replay_host(config) if config is not None else None

    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs) -> None:
        if self.host is None:
            return
        path = str(Path(checkpoint_dir) / REPLAY_FILE)
        if isinstance(self.host, ReplayHost):
            self.host.save(path)
        else:
            _ray().get(self.host.save.remote(path))


# ---------------------------------------------------------------------- the loop


@dataclass
class _Online:
    """One problem's finished online chain and the states drawn from it."""

    chain: ChainState
    states: list[TrainingState]
    scheduler: CycleScheduler


_ONLINE: dict[str, asyncio.Future] = {}
"""verl uid → the online chain its sessions share. An entry is removed when its chain ends: all sessions of a prompt
have registered by then, because verl creates them in one loop before any of them runs (and each reaches this
registry before its first ``await``), while the chain cannot end before its first generation returns."""


class RCAgentLoop(AgentLoopBase):
    """RC's training step for one verl session (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rc: RCTrainConfig = check_rc_settings(self.config)
        self.prompt_length = self.rollout_config.prompt_length
        self.response_length = self.rollout_config.response_length

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """A turn's prompt ids (verl's Continuous-Token builder); a prompt over ``rollout.prompt_length`` fails the
        chain at once (verl would left-truncate it, cutting the problem off)."""
        ids = self.continuous_token_builder.build_initial_tokens(messages)
        if len(ids) > self.prompt_length:
            raise PromptTooLongError(
                f"RC turn prompt has {len(ids)} tokens, over actor_rollout_ref.rollout."
                f"prompt_length={self.prompt_length}"
            )
        return list(ids)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        uid, session = str(kwargs["uid"]), int(kwargs["session_id"])
        engine = ServerEngine(self.server_manager, self.tokenizer, sampling_params)
        online = _ONLINE.get(uid)
        if online is None:
            online = _ONLINE[uid] = asyncio.ensure_future(self._online(engine, uid, kwargs))
            online.add_done_callback(lambda _: _ONLINE.pop(uid, None))
        shared: _Online = await asyncio.shield(online)
        state = shared.states[(session // self.rc.k) % len(shared.states)]
        return await self._trained_turn(engine, shared, state, session % self.rc.k, kwargs)

    async def _online(self, engine: ServerEngine, uid: str, row: dict[str, Any]) -> _Online:
        """The problem's online chain (from its buffered summary if it has one), its states, its buffer entries."""
        reward_model = row.get("reward_model") or {}
        data_source = str(row.get("data_source", ""))
        problem = problem_text(list(row["raw_prompt"]), row.get("extra_info"))
        if not problem.strip():
            raise ConfigError(f"row {uid}: no problem text (neither extra_info.question nor a user message)")
        key, step = problem_key(data_source, problem), int(row.get("global_steps", 0) or 0)
        ground_truth = reward_model.get("ground_truth")
        chain = ChainState(
            problem_id=uid,
            sample_id=0,
            problem=problem,
            data_source=data_source,
            ground_truth=None if ground_truth is None else str(ground_truth),
        )
        host = replay_host() if self.rc.replay.enable else None
        if self.rc.replay.enable and host is None:
            raise ConfigError(
                "flash_rc.rc.replay.enable: no replay buffer was started (is "
                f"trainer.checkpoint_callback_class={RC_REPLAY_CALLBACK} set?)"
            )
        starts = await _call(host, "sample", key) if host is not None else []
        if starts:  # sample_per_problem is 1 here: at most one
            start_from(chain, starts[0].text, starts[0].starting_step, self.rc.mode)
        initial = initial_context(chain, self.rc.mode)
        scheduler = CycleScheduler(
            engine, cycle_config(self.rc, self.rc.seed), grader=make_grader("data_source"), render=self.render
        )
        await scheduler.run_chain(chain)
        if chain.status != "done":
            raise RuntimeError(f"RC online chain of {uid} failed: {chain.error}")
        contexts = chain_contexts(chain, self.rc.mode, initial)
        states = draw_states(chain, contexts, self.rc, random.Random(f"{self.rc.seed}|{key}|{step}"))
        if host is not None:
            await _call(host, "add_chain", key, buffer_entries(chain, contexts), step)
        return _Online(chain, states, scheduler)

    async def _trained_turn(self, engine: ServerEngine, shared: _Online, state: TrainingState, sample: int,
                            row: dict[str, Any]) -> AgentLoopOutput:  # fmt: skip
        """One reasoning turn from ``state``, scored on its own answer."""
        chain = shared.chain
        prompt_ids = self.render(shared.scheduler.messages(state.prompt_view(), "reasoning"))
        started = time.perf_counter()
        completion, output = await engine.generate(
            prompt_ids, self.rc.max_thinking_tokens, request_id=f"{state.key}|train|{sample}"
        )
        generated = time.perf_counter()
        request = turn_score_request(
            completion.text, chain.ground_truth, chain.data_source, extra_info=row.get("extra_info")
        )
        result = await compute_score_async(
            request.data_source, request.solution_str, request.ground_truth, request.extra_info, **request.kwargs
        )
        score = float(result["score"])
        length = min(len(completion.token_ids), self.response_length)
        metadata = {
            "problem_key": problem_key(chain.data_source, chain.problem),
            "state_index": state.index,
            "depth": state.depth,
            "starting_step": chain.starting_step,
            "turn_type": "reasoning",
            "cycle_step": 2 * state.index,
            "turn_number": state.index + 1,
            "sample": sample,
            "group": f"{chain.problem_id}|{int(row['session_id']) // self.rc.k}",
            "model_version": completion.model_version,
        }
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=completion.token_ids[:length],
            response_mask=[1] * length,
            response_logprobs=completion.logprobs[:length] if completion.logprobs else None,
            reward_score=score,
            num_turns=2,
            metrics=AgentLoopMetrics(
                generate_sequences=generated - started, compute_score=time.perf_counter() - generated
            ),
            extra_fields={
                **(output.extra_fields or {}),
                "rc": metadata,
                "turn_scores": [],
                "tool_rewards": [],
                "reward_extra_info": {"acc": float(bool(result["acc"])), "score": score},
            },
        )
