"""The RC training rollout source: online reason → summarize chains, then K reasoning turns from sampled states.

One collection (``../shared/docs/reasoning-cache.md`` §2.1, with the states of :mod:`flash_rc.rc.states`):

1. draw ``data.train_batch_size`` problems; each starts one online chain from scratch, or — with the replay buffer
   on and the problem in it — one chain per sampled buffer entry, from that summary at its depth;
2. run every chain's ``t_train`` cycles with the async scheduler (no phase barriers: each chain issues its next
   turn as soon as its last one finished), every reasoning turn graded for the online metrics;
3. the moment a chain finishes, draw its ``n_summ`` states and put K = ``k`` reasoning turns per state in flight
   (vLLM ``n=K`` on one prompt: one prefill, shared prefix) beside the chains still running — no barrier between
   online and training rollouts (``bench/rc_step.py``: 14% of a step at 256 engine slots); once all are back, score
   each turn on its own answer, GRPO per (problem, state) — through the same
   :class:`~flash_rc.backends.local.rollout.GroupCollector` as plain outcome RL, so rewards, shaping, advantages and
   metrics mean the same;
4. add every finished chain's contexts to the buffer (``purge_on_add``: only the latest chain's are kept).

Only the states' reasoning turns are trained: their prompt is the summary-conditioned I_R, their response the
reasoning, with the engine's rollout log-probs (so TIS corrects quantized RC rollouts) and the metadata
``{problem_id, sample_id, cycle_step, turn_type, turn_number, model_version, starting_step}``. A chain that fails
drops only its own states (counted in ``rc/online/failed_chains``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

from flash_rc.backends.local.rollout import (
    GroupCollector,
    OutcomeSettings,
    RolloutBatch,
    RolloutShards,
    request_seed,
    submit_prompts,
)
from flash_rc.data.prompts import PromptSampler, TrainPrompt
from flash_rc.rc.grading import make_grader
from flash_rc.rc.replay import SummaryReplayBuffer
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
from flash_rc.types import SamplingConfig


class RCRollout:
    """See the module docstring."""

    def __init__(self, engine, sampler: PromptSampler, settings: OutcomeSettings, rc: RCTrainConfig,
                 buffer: SummaryReplayBuffer | None, shards: RolloutShards | None = None):
        self.engine = engine
        self.sampler = sampler
        self.settings = settings
        self.rc = rc
        self.buffer = buffer
        self.shards = shards or RolloutShards()

    def state_dict(self) -> dict:
        state = {"sampler": self.sampler.state_dict()}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.buffer is not None and "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])

    # ------------------------------------------------------------------ online chains

    def _chains(self, prompts: Sequence[TrainPrompt]) -> list[tuple[tuple[int, int], tuple[TrainPrompt, ChainState,
                                                                                               str]]]:
        """((problem index, sample), (prompt, chain, initial context)) of every online chain of this rank's
        problems."""
        # every rank draws every problem's buffer entries, in batch order: the buffers (and their RNG) stay equal
        all_starts = [self.buffer.sample(p.uid) if self.buffer is not None else [] for p in prompts]
        chains = []
        for index in self.shards.mine(len(prompts)):
            prompt, starts = prompts[index], all_starts[index]
            for sample_id, start in enumerate(starts or [None]):
                chain = ChainState(problem_id=prompt.uid, sample_id=sample_id,
                                   problem=problem_text(prompt.messages, prompt.extra_info),
                                   ground_truth=None if prompt.ground_truth is None else str(prompt.ground_truth),
                                   data_source=prompt.data_source)
                if start is not None:
                    start_from(chain, start.text, start.starting_step, self.rc.mode)
                chains.append(((index, sample_id), (prompt, chain, initial_context(chain, self.rc.mode))))
        return chains

    def collect(self, step: int) -> RolloutBatch:
        s = self.settings
        started = time.perf_counter()
        prompts = self.sampler.next_batch()
        local = self._chains(prompts)
        entry_of = {id(chain): (key, prompt, initial) for key, (prompt, chain, initial) in local}
        scheduler = CycleScheduler(self.engine, cycle_config(self.rc, request_seed(self.rc.seed, "rc", step)),
                                   SamplingConfig(temperature=s.temperature), grader=make_grader("data_source"))
        collector = GroupCollector(self.engine, s, self.shards)
        sampling = SamplingConfig(max_tokens=self.rc.max_thinking_tokens, n=self.rc.k, temperature=s.temperature)
        pending = []

        def start_states(chain: ChainState) -> None:
            """A finished chain's states go to the engine at once, beside the chains still running."""
            if chain.status != "done":
                return
            key, prompt, initial = entry_of[id(chain)]
            rng = random.Random(request_seed(s.rollout_seed, "states", step, chain.problem_id, chain.sample_id))
            for state in draw_states(chain, chain_contexts(chain, self.rc.mode, initial), self.rc, rng):
                state_prompt = self._state_prompt(scheduler, prompt, state)
                (future,) = submit_prompts(self.engine, [state_prompt], sampling,
                                           [request_seed(s.rollout_seed, step, state_prompt.uid)])
                pending.append(((*key, state.index), state_prompt, state, future))

        asyncio.run(scheduler.run([chain for _, (_, chain, _) in local], on_chain_done=start_states))
        online_seconds = time.perf_counter() - started
        groups = collector.gather(pending)  # every rank's, in (problem, sample, state) order
        chains = [entry for _, entry in self.shards.merge(local)]
        metadata = [[self._metadata(g.info, c) for c in g.completions] for g in groups]
        batch = collector.batch(groups, metadata)
        if self.buffer is not None:
            for _, chain, initial in chains:
                if chain.status == "done":
                    self.buffer.add_chain(chain.problem_id,
                                          buffer_entries(chain, chain_contexts(chain, self.rc.mode, initial)), step)
        batch.metrics.update(self._metrics(chains, groups, online_seconds))
        batch.metrics["rollout/gen_batches"] = 1.0
        batch.metrics["rollout/short_of_batch"] = float(max(len(chains) * self.rc.n_summ - len(groups), 0))
        return batch

    def _state_prompt(self, scheduler: CycleScheduler, prompt: TrainPrompt, state: TrainingState) -> TrainPrompt:
        """The state as a prompt of its own: I_R(problem, context), its id the GRPO group (problem, sample, j)."""
        messages = scheduler.messages(state.prompt_view(), "reasoning")
        return TrainPrompt(uid=state.key, prompt_token_ids=tuple(self.engine.encode(messages)),
                           data_source=prompt.data_source, ground_truth=prompt.ground_truth,
                           extra_info=prompt.extra_info, messages=messages)

    @staticmethod
    def _metadata(state: TrainingState, completion) -> dict:
        return {"problem_id": state.chain.problem_id, "sample_id": state.chain.sample_id,
                "cycle_step": 2 * state.index, "turn_type": "reasoning", "turn_number": state.index + 1,
                "model_version": completion.model_version, "starting_step": state.depth}

    def _metrics(self, chains, groups, online_seconds: float) -> dict[str, float]:
        done = [chain for _, chain, _ in chains if chain.status == "done"]
        first = [bool(c.reasoning_turns[0].correct) for c in done if c.reasoning_turns]
        last = [bool(c.reasoning_turns[-1].correct) for c in done if c.reasoning_turns]
        best = [any(bool(t.correct) for t in c.reasoning_turns) for c in done]
        summaries = [len(t.token_ids) for c in done for t in c.turns if t.turn_type == "summarization"]
        mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
        metrics = {
            "rc/online/chains": float(len(chains)),
            "rc/online/failed_chains": float(len(chains) - len(done)),
            "rc/online/acc_first_cycle": mean(first),
            "rc/online/acc_last_cycle": mean(last),
            "rc/online/acc_best_of_chain": mean(best),
            "rc/online/tokens": float(sum(len(t.token_ids) for c in done for t in c.turns)),
            "rc/summary_length/mean": mean(summaries),
            "rc/states": float(len(groups)),
            "timing_s/online_rollout": online_seconds,
        }
        by_depth: dict[int, list[float]] = {}
        for group in groups:
            by_depth.setdefault(group.info.depth, []).extend(float(r["acc"]) for r in group.results)
        for depth, values in sorted(by_depth.items()):
            metrics[f"rc/train/acc_depth_{depth}"] = mean(values)
        metrics["rc/train/depth_mean"] = mean([depth for depth, values in by_depth.items() for _ in values])
        if self.buffer is not None:
            metrics.update(self.buffer.metrics())
        return metrics
