"""Asynchronous RC cycle scheduler: many chains at once, no global barrier.

RC's verl trainer runs a cycle as two *phases* over the whole batch (every chain's reasoning turn, then every
chain's summary), so each of the 2T phases waits for the slowest sequence in the batch — and reasoning lengths are
long-tailed. Here every chain is its own asyncio task: it issues its next turn the moment its previous turn
finished, and the engine's continuous batching mixes chains that are at different cycles. The only limit is
``max_concurrent_chains`` (a semaphore), which bounds memory for prompts and KV cache.

Failures are per chain. A failed generation is retried with exponential backoff *before* the chain state is touched
(state only changes in :meth:`ChainState.record_turn`, after a turn completed), so retries never duplicate turns or
counters. A chain that still fails is marked ``failed`` with its reason and the other chains go on; bad input (a
prompt longer than the context) fails at once without retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from pydantic import Field

from flash_rc.rc import prompts as P
from flash_rc.rc.state import ChainMode, ChainState, SummaryMode, Turn, TurnType
from flash_rc.schema import Section
from flash_rc.types import Completion, Prompt, SamplingConfig

logger = logging.getLogger(__name__)


class AsyncGenerator(Protocol):
    """What the scheduler needs from an engine: ``RolloutEngine``, verl's server manager behind an adapter, or a
    simulated one. ``request_id`` names the turn (:func:`turn_request_id`); a retry reuses it."""

    async def agenerate(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None
                        ) -> list[Completion]: ...


Renderer = Callable[[Sequence[Mapping[str, str]]], Prompt]
"""Turns a turn's chat messages into what the engine takes: the messages themselves for an engine that applies the
chat template (``RolloutEngine``), or token ids (``flash_rc.chat.ChatRenderer``) for one that takes ids."""


def _as_messages(messages: Sequence[Mapping[str, str]]) -> Prompt:
    return messages


class CycleConfig(Section):
    """How chains are decoded (the ``flash_rc.rc`` section of a recipe)."""

    num_cycles: int = Field(2, ge=1)
    """Reasoning turns per chain (T). In ``rc`` mode each is followed by a summarization turn."""
    max_thinking_tokens: int = Field(16384, ge=1)
    """H_R: token budget of a reasoning turn."""
    max_summary_tokens: int = Field(2048, ge=1)
    """H_S: token budget of a summarization turn."""
    seed: int = 0
    """Base seed; each turn's seed is derived from (seed, problem, sample, turn), so runs are reproducible."""
    mode: ChainMode = "rc"
    """``rc`` (summaries), or a summary-free baseline: ``self_refine`` / ``self_verify`` (conditioned on the
    previous full reasoning)."""
    summary_mode: SummaryMode = "replace"
    """``replace``: the new summary replaces the old one (RC default); ``append``: summaries accumulate."""
    use_think_tags: bool = False
    """Only the text before ``</think>`` of a reasoning turn is summarized; think tags are stripped from summaries."""
    summarize_last_cycle: bool = True
    """Also summarize the last reasoning turn (its summary seeds the replay buffer)."""
    reasoning_prompt: str | None = None
    """I_R: a template file or template text with {problem} and {curr_summary} (baselines: {curr_reasoning})."""
    summarization_prompt: str | None = None
    """I_S: a template file or template text with {problem}, {existing_summary} and {reasoning}."""
    system_prompt: str | None = None
    """Optional system message put before every turn's user message."""
    max_concurrent_chains: int = Field(64, ge=1)
    """Chains in flight at once."""
    max_retries: int = Field(3, ge=0)
    """Retries of a failed generation call before the chain is marked failed."""
    retry_base_delay: float = Field(0.5, ge=0)
    """Backoff before retry k is ``retry_base_delay * 2**k`` seconds."""


@dataclasses.dataclass(frozen=True)
class CyclePrompts:
    """The validated templates a run uses."""

    reasoning: P.PromptTemplate
    summarization: P.PromptTemplate | None

    @classmethod
    def from_config(cls, config: CycleConfig) -> "CyclePrompts":
        if config.mode == "rc":
            return cls(
                P.load_template(config.reasoning_prompt, P.REASONING_PROMPT, P.REASONING_FIELDS),
                P.load_template(config.summarization_prompt, P.SUMMARIZATION_PROMPT, P.SUMMARIZATION_FIELDS),
            )
        default = P.SELF_REFINE_PROMPT if config.mode == "self_refine" else P.SELF_VERIFY_PROMPT
        return cls(P.load_template(config.reasoning_prompt, default, P.BASELINE_FIELDS), None)


Grader = Callable[[ChainState, Turn], Awaitable[None]]
"""Awaited after every reasoning turn; sets ``turn.pred``, ``turn.score`` and ``turn.correct`` (async, so slow
scorers such as math-verify run in the reward pool without blocking the other chains)."""


class CycleScheduler:
    """Runs chains through their cycles on an async engine.

    ``sampling`` gives temperature / top-p / top-k for every turn; its ``max_tokens`` and ``seed`` are replaced per
    turn (H_R or H_S, and a seed derived from the chain and turn). ``render`` turns each turn's messages into the
    engine's prompt (a renderer that raises ``ValueError``, e.g. a prompt too long for the context, fails the chain
    at once, without retries).
    """

    def __init__(
        self,
        engine: AsyncGenerator,
        config: CycleConfig,
        sampling: SamplingConfig | None = None,
        grader: Grader | None = None,
        render: Renderer = _as_messages,
    ):
        self.engine = engine
        self.render = render
        self.config = config
        self.sampling = sampling or SamplingConfig()
        if self.sampling.n != 1:
            raise ValueError("RC chains sample one completion per turn; run more chains (samples) instead of n > 1")
        self.prompts = CyclePrompts.from_config(config)
        self.grader = grader

    async def run(
        self, chains: Sequence[ChainState], on_chain_done: Callable[[ChainState], None] | None = None
    ) -> list[ChainState]:
        """Run every chain to completion (or failure); ``on_chain_done`` is called as each chain ends."""
        slots = asyncio.Semaphore(self.config.max_concurrent_chains)

        async def run_one(chain: ChainState) -> ChainState:
            async with slots:
                await self.run_chain(chain)
            if on_chain_done is not None:
                on_chain_done(chain)
            return chain

        return list(await asyncio.gather(*(run_one(chain) for chain in chains)))

    async def run_chain(self, chain: ChainState) -> ChainState:
        """All cycles of one chain, each turn issued as soon as the previous one finished."""
        chain.status = "running"
        try:
            for cycle in range(self.config.num_cycles):
                turn = await self.turn(chain, "reasoning")
                if self.grader is not None:
                    await self.grader(chain, turn)
                last = cycle == self.config.num_cycles - 1
                if self.prompts.summarization is not None and (not last or self.config.summarize_last_cycle):
                    await self.turn(chain, "summarization")
            chain.status = "done"
        except Exception as error:  # one chain's failure never stops the others
            chain.status, chain.error = "failed", f"{type(error).__name__}: {error}"
            logger.warning("chain %s/%s failed: %s", chain.problem_id, chain.sample_id, chain.error)
        return chain

    def messages(self, chain: ChainState, turn_type: TurnType) -> list[dict[str, str]]:
        """The chat messages of ``chain``'s next turn of ``turn_type`` (the filled template, after the system
        prompt when there is one)."""
        template = self.prompts.reasoning if turn_type == "reasoning" else self.prompts.summarization
        messages = [{"role": "user", "content": template.fill(**chain.prompt_values(turn_type))}]
        if self.config.system_prompt:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        return messages

    async def turn(self, chain: ChainState, turn_type: TurnType) -> Turn:
        """Generate and record one turn of ``chain`` (retrying transient engine errors)."""
        messages = self.messages(chain, turn_type)
        prompt = messages[-1]["content"]
        request_id = turn_request_id(chain, turn_type)
        sampling = dataclasses.replace(
            self.sampling,
            max_tokens=self.config.max_thinking_tokens if turn_type == "reasoning" else self.config.max_summary_tokens,
            seed=turn_seed(self.config.seed, chain, turn_type),
        )
        (completion,) = await self._generate_with_retries(self.render(messages), sampling, request_id)
        return chain.record_turn(turn_type, prompt, completion, self.config.summary_mode, self.config.use_think_tags)

    async def _generate_with_retries(self, prompt: Prompt, sampling: SamplingConfig, request_id: str
                                     ) -> list[Completion]:
        for attempt in range(self.config.max_retries + 1):
            try:
                return await self.engine.agenerate(prompt, sampling, request_id=request_id)
            except (ValueError, TypeError):  # bad input (e.g. prompt too long): retrying cannot help
                raise
            except Exception as error:
                if attempt == self.config.max_retries:
                    raise
                delay = self.config.retry_base_delay * 2**attempt
                logger.info("generation failed (%s), retry %d in %.2fs", error, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def turn_request_id(chain: ChainState, turn_type: TurnType) -> str:
    """The id of ``chain``'s next turn of ``turn_type``: ``problem_id|sample_id|turn_type|number|starting_step``.

    Stable across retries and scheduling order; the fields after the problem id never contain ``|``, so
    ``request_id.rsplit("|", 4)`` recovers all five even when the problem id does.
    """
    number = (chain.reasoning_turn_number if turn_type == "reasoning" else chain.summarization_turn_number) + 1
    return f"{chain.problem_id}|{chain.sample_id}|{turn_type}|{number}|{chain.starting_step}"


def turn_seed(base_seed: int, chain: ChainState, turn_type: TurnType) -> int:
    """A stable 31-bit seed per (run seed, problem, sample, turn) — independent of scheduling order."""
    key = f"{base_seed}|{turn_request_id(chain, turn_type)}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF
