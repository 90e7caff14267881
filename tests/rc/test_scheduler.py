"""The async cycle scheduler: no barrier, retries without duplication, per-chain failure, and a real-engine run."""

from __future__ import annotations

import asyncio
import time

import pytest

from flash_rc.rc.scheduler import CycleConfig, CycleScheduler, turn_seed
from flash_rc.rc.state import ChainState
from flash_rc.types import Completion, SamplingConfig


class ScriptedEngine:
    """An async engine whose latency and failures are scripted per problem (scheduling logic only)."""

    def __init__(self, latency=lambda problem, n: 0.0, failures=lambda problem, n: None):
        self.latency, self.failures = latency, failures
        self.calls: dict[str, int] = {}
        self.active = self.max_active = 0

    async def agenerate(self, messages, sampling: SamplingConfig, request_id=None):
        problem, _, turn_type, _, _ = request_id.rsplit("|", 4)  # the turn's identity, not parsed from the prompt
        n = self.calls[problem] = self.calls.get(problem, 0) + 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.latency(problem, n))
            error = self.failures(problem, n)
            if error is not None:
                raise error
        finally:
            self.active -= 1
        kind = "summary" if turn_type == "summarization" else "reasoning"
        return [Completion([1], [2, 3], f"{kind} {n} of {problem}", [-0.1, -0.2], "stop", 0, 0)]


def chains(*problems):
    return [ChainState(problem_id=p, sample_id=0, problem=p) for p in problems]


def run(engine, config, states):
    return asyncio.run(CycleScheduler(engine, config).run(states))


def test_no_global_barrier():
    # "slow" needs 0.4 s for its first reasoning turn; "fast" finishes all 4 turns (2 cycles) in ~0.04 s.
    engine = ScriptedEngine(latency=lambda p, n: 0.4 if (p == "slow" and n == 1) else 0.01)
    finished_at = {}
    start = time.perf_counter()
    scheduler = CycleScheduler(engine, CycleConfig(num_cycles=2))
    asyncio.run(scheduler.run(chains("slow", "fast"),
                              on_chain_done=lambda c: finished_at.setdefault(c.problem, time.perf_counter() - start)))
    # with phase barriers "fast" could not finish before the slow first phase (0.4 s) ended
    assert finished_at["fast"] < 0.3 < finished_at["slow"]


def test_retries_do_not_duplicate_turns_or_counters():
    # the first two calls for "flaky" fail with a transient error; the third succeeds
    engine = ScriptedEngine(failures=lambda p, n: ConnectionError("reset") if p == "flaky" and n <= 2 else None)
    (chain,) = run(engine, CycleConfig(num_cycles=2, retry_base_delay=0.001), chains("flaky"))
    assert chain.status == "done"
    assert [(t.turn_type, t.turn_number) for t in chain.turns] == [
        ("reasoning", 1), ("summarization", 1), ("reasoning", 2), ("summarization", 2)]
    assert (chain.reasoning_turn_number, chain.summarization_turn_number, chain.overall_cycle_step) == (2, 2, 4)
    assert engine.calls["flaky"] == 6  # 4 turns + 2 failed attempts


def test_a_chain_that_keeps_failing_is_marked_and_the_others_finish():
    engine = ScriptedEngine(failures=lambda p, n: TimeoutError("engine down") if p == "bad" and n >= 2 else None)
    done = []
    states = chains("bad", "good1", "good2")
    scheduler = CycleScheduler(engine, CycleConfig(num_cycles=2, max_retries=2, retry_base_delay=0.001))
    asyncio.run(scheduler.run(states, on_chain_done=done.append))
    bad, good1, good2 = states
    assert bad.status == "failed" and "engine down" in bad.error
    assert len(bad.turns) == 1  # the reasoning turn that succeeded is kept
    assert good1.status == good2.status == "done" and len(good1.turns) == 4
    assert sorted(c.problem for c in done) == ["bad", "good1", "good2"]


def test_bad_input_fails_without_retries():
    engine = ScriptedEngine(failures=lambda p, n: ValueError("prompt too long"))
    (chain,) = run(engine, CycleConfig(num_cycles=2, max_retries=5, retry_base_delay=0.001), chains("x"))
    assert chain.status == "failed" and "prompt too long" in chain.error and engine.calls["x"] == 1


def test_concurrency_is_bounded():
    engine = ScriptedEngine(latency=lambda p, n: 0.005)
    states = run(engine, CycleConfig(num_cycles=2, max_concurrent_chains=3), chains(*[f"p{i}" for i in range(10)]))
    assert engine.max_active == 3 and all(c.status == "done" for c in states)


def test_baseline_conditions_on_the_previous_reasoning():
    engine = ScriptedEngine()
    (chain,) = run(engine, CycleConfig(num_cycles=2, mode="self_refine"), chains("q"))
    assert [t.turn_type for t in chain.turns] == ["reasoning", "reasoning"]
    assert "### PREVIOUS ATTEMPT\nreasoning 1 of q" in chain.turns[1].prompt


def test_turn_seeds_are_stable_and_distinct():
    chain = ChainState(problem_id="p", sample_id=0, problem="x")
    seeds = {turn_seed(0, chain, "reasoning"), turn_seed(0, chain, "summarization"), turn_seed(1, chain, "reasoning"),
             turn_seed(0, ChainState(problem_id="p", sample_id=1, problem="x"), "reasoning")}
    assert len(seeds) == 4 and turn_seed(0, chain, "reasoning") == turn_seed(0, chain, "reasoning")


def test_sampling_n_must_be_one():
    with pytest.raises(ValueError, match="one completion per turn"):
        CycleScheduler(ScriptedEngine(), CycleConfig(), sampling=SamplingConfig(n=2))


def test_real_engine_cycles(tiny_engine):
    graded = []

    async def grader(chain, turn):
        graded.append((chain.problem_id, turn.turn_number))
        turn.pred, turn.score, turn.correct = "x", 0.0, False

    config = CycleConfig(num_cycles=2, max_thinking_tokens=24, max_summary_tokens=12)
    states = [ChainState(problem_id=str(i), sample_id=0, problem=f"What is {i} + 4?") for i in range(3)]
    scheduler = CycleScheduler(tiny_engine, config, SamplingConfig(temperature=1.0), grader=grader)
    asyncio.run(scheduler.run(states))
    for chain in states:
        assert chain.status == "done" and len(chain.turns) == 4
        for turn in chain.turns:
            assert len(turn.token_ids) == len(turn.logprobs) > 0
            assert len(turn.token_ids) <= (24 if turn.turn_type == "reasoning" else 12)
            assert turn.model_version == tiny_engine.model_version
        # cycle 2 reasons from the summary written in cycle 1, and summarizes cycle 2's reasoning
        summary_1 = chain.turns[1].text
        assert f"### SUMMARY OF PREVIOUS ATTEMPT\n{summary_1}\n" in chain.turns[2].prompt
        assert chain.turns[3].prompt.endswith(chain.turns[2].text)
    assert sorted(graded) == [(str(i), t) for i in range(3) for t in (1, 2)]


def test_a_token_id_engine_gets_the_ids_the_in_process_engine_would_render(tiny_model):
    """With a ChatRenderer the scheduler sends token ids (verl's server manager takes ids), one request id per turn."""
    from transformers import AutoTokenizer

    from flash_rc.chat import ChatRenderer, prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    seen = []

    class TokenIdEngine:
        async def agenerate(self, prompt, sampling, request_id=None):
            assert all(isinstance(t, int) for t in prompt)
            seen.append((request_id, prompt))
            return [Completion(list(prompt), [5, 6], "text", [-0.5, -0.5], "stop", 0, 0)]

    config = CycleConfig(num_cycles=1, max_retries=3, retry_base_delay=0.001)
    short, too_long = ChainState(problem_id="p|1", sample_id=0, problem="What is 2 + 2?"), \
        ChainState(problem_id="q", sample_id=0, problem="long " * 2000)
    scheduler = CycleScheduler(TokenIdEngine(), config, render=ChatRenderer(tokenizer, max_model_len=1024))
    asyncio.run(scheduler.run([short, too_long]))
    assert short.status == "done" and [t.turn_type for t in short.turns] == ["reasoning", "summarization"]
    assert [rid for rid, _ in seen] == ["p|1|0|reasoning|1|0", "p|1|0|summarization|1|0"]
    reasoning_messages = [{"role": "user", "content": short.turns[0].prompt}]
    assert seen[0][1] == prompt_token_ids(tokenizer, reasoning_messages)  # what RolloutEngine.encode renders
    # a prompt longer than the context fails its chain at render time: never sent, never retried
    assert too_long.status == "failed" and "PromptTooLongError" in too_long.error and len(seen) == 2
