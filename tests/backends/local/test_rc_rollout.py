"""RCRollout on the real tiny vLLM engine: online chains, summary-conditioned states, K turns each, the replay buffer.

The random tiny model never solves a task, so the rows here are scored by a test scorer, ``parity`` (score 1 when the
response text has an even number of characters), in a file the reward pool's workers import by path: the K turns
of a state disagree, and the chains' per-turn grading runs through the same router. What the source did is read
back through spies that change nothing: a wrapper of the engine that records the scheduler's chain turns
(``agenerate``) apart from the states' K-sample requests (``submit``), a wrapper of ``CycleScheduler.run`` that keeps
every collection's chains, and a wrapper of ``score_completions`` that keeps every scored group.

The expected prompt of a state is built here from the default templates by hand (``str.format`` of I_R with the
problem and the state's context) and encoded by the engine; it must also be the very prompt the chain reasoned from
in that cycle. The tiny tokenizer spends ~2.3 characters a token, so I_R alone is ~265 tokens and I_S ~473: the
engine's 1024-token context (the ``tiny_engine`` fixture) holds every turn of these 8-16 token budgets.

The recipe checks of RC run through the CLI as in ``test_config.py`` (the ``run_train`` fixture of conftest.py): the
process group and the engine are stand-ins that raise ``AssertionError("started")``, so a refusal is proven to come
before either starts.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from flash_rc.algo.advantages import GRPOConfig, grpo_advantages
from flash_rc.backends.local import trainer
from flash_rc.backends.local.config import TrainRecipe
from flash_rc.backends.local.rc_rollout import RCRollout
from flash_rc.backends.local.rollout import OutcomeSettings, RolloutShards
from flash_rc.config import load_recipe
from flash_rc.data.prompts import PromptSampler, load_train_prompts
from flash_rc.data.rows import make_row, write_parquet_atomic
from flash_rc.errors import EXIT_BAD_DATA, EXIT_USAGE, RowError
from flash_rc.rc import prompts as templates
from flash_rc.rc.replay import ReplayConfig, ReplayEntry, SummaryReplayBuffer
from flash_rc.rc.scheduler import CycleScheduler
from flash_rc.rc.states import RCTrainConfig
from flash_rc.types import SamplingConfig

PARITY = "local_test_rc_parity"
THINKING, SUMMARY = 16, 12
"""H_R and H_S of every chain here (different, so a request's ``max_tokens`` tells its turn type)."""

SETTINGS = OutcomeSettings(train_batch_size=3, n=1, temperature=1.0, max_response_length=THINKING,
                           adv_estimator="grpo", norm_adv_by_std=True, filter_groups=False, filter_metric="acc",
                           max_num_gen_batches=0, overlong=None, rollout_seed=0)
"""GRPO at temperature 1, no shaping (RC reads the advantage keys; the batch size comes from the sampler)."""


def rc_config(**overrides) -> RCTrainConfig:
    """T_train 3, N_summ 2, K 3, the default templates, unless a test changes them."""
    return RCTrainConfig(**{"enable": True, "t_train": 3, "n_summ": 2, "k": 3, "max_thinking_tokens": THINKING,
                            "max_summary_tokens": SUMMARY, **overrides})


@pytest.fixture
def prompts(tmp_path, tokenizer, route_to_test_scorer):
    """``prompts(count)``: TrainPrompts of verl rows whose user message is "What is i + i?" and whose problem
    (``extra_info.question``, what RC builds its prompts around) is "i + i"; their data source is scored by parity."""
    route_to_test_scorer(PARITY, "parity", timeout_s=30.0)

    def load(count: int):
        rows = [make_row(PARITY, f"What is {i} + {i}?", "math", str(2 * i), "train", i, str(2 * i), f"{i} + {i}")
                for i in range(count)]
        path = write_parquet_atomic(rows, tmp_path / "rc_train.parquet")
        return load_train_prompts(str(path), tokenizer, max_prompt_length=64, filter_overlong_prompts=False).prompts

    return load


@dataclasses.dataclass
class Call:
    """One engine request: its id, prompt (messages for a chain turn, ids for a state), sampling and completions."""

    request_id: str
    prompt: Any
    sampling: SamplingConfig
    completions: list | None = None


class RecordingEngine:
    """The tiny engine, recording the scheduler's chain turns (``agenerate``) in ``turns`` and the states' K-sample
    requests (``submit``) in ``requests``; a chain turn whose request id ``fail`` accepts raises instead (an engine
    error for that turn)."""

    def __init__(self, engine, fail=lambda request_id: False):
        self.engine, self.fail = engine, fail
        self.turns: list[Call] = []
        self.requests: list[Call] = []

    def encode(self, prompt):
        return self.engine.encode(prompt)

    async def agenerate(self, prompt, sampling, request_id=None):
        call = Call(request_id, prompt, sampling)
        self.turns.append(call)
        if self.fail(request_id):
            raise RuntimeError("engine failed this request")
        call.completions = await self.engine.agenerate(prompt, sampling, request_id)
        return call.completions

    def submit(self, prompt, sampling, request_id=None) -> Future:
        call = Call(request_id, list(prompt), sampling)
        self.requests.append(call)
        future = self.engine.submit(prompt, sampling, request_id=request_id)
        future.add_done_callback(lambda done: setattr(call, "completions", None if done.exception() else
                                                      done.result()))
        return future


@pytest.fixture
def engine(tiny_engine):
    return RecordingEngine(tiny_engine)


@pytest.fixture
def chain_runs(monkeypatch):
    """The chains of every ``CycleScheduler.run``, one list per collection, as they ended."""
    runs = []
    real = CycleScheduler.run

    async def spy(self, chains, on_chain_done=None):
        runs.append(list(chains))
        return await real(self, chains, on_chain_done)

    monkeypatch.setattr(CycleScheduler, "run", spy)
    return runs


def chunks(sequences, n):
    return [sequences[i:i + n] for i in range(0, len(sequences), n)]


def state_of(call: Call) -> tuple[str, int, int]:
    """(problem id, sample id, j) of a state's request: its id is the GRPO group ``problem|sample|j``."""
    problem_id, sample_id, index = call.request_id.rsplit("|", 2)
    return problem_id, int(sample_id), int(index)


def request_of(engine: RecordingEngine, group) -> Call:
    """The one state request whose K completions are ``group``'s responses (states are submitted as their chains
    finish, so the engine sees them in completion order, not in the batch's)."""
    responses = [s.response_token_ids for s in group]
    (call,) = [c for c in engine.requests if [tuple(x.token_ids) for x in c.completions] == responses]
    return call


def by_request_id(calls: list[Call]) -> dict[str, Call]:
    calls_of = {call.request_id: call for call in calls}
    assert len(calls_of) == len(calls)  # a turn's id names it within a step
    return calls_of


def summaries(chain) -> list[str]:
    return [turn.text for turn in chain.turns if turn.turn_type == "summarization"]


def reasoning_prompt(engine, template: str, problem: str, context: str, field: str = "curr_summary"):
    """The ids of I_R(problem, context), filled here by hand: one user message, the engine's chat template."""
    return tuple(engine.encode([{"role": "user", "content": template.format(problem=problem, **{field: context})}]))


def summary_section(context: str) -> str:
    """How the default I_R shows a context (an empty one leaves the section blank)."""
    return f"### SUMMARY OF PREVIOUS ATTEMPT\n{context}\n\n### INSTRUCTIONS"


def by_chain(chains) -> dict[tuple[str, int], Any]:
    return {(chain.problem_id, chain.sample_id): chain for chain in chains}


# ---------------------------------------------------------------------- one collection


def test_one_collect_trains_k_turns_from_n_summ_summary_conditioned_states_per_chain(
        engine, prompts, chain_runs, scored, tiny_engine, tokenizer):
    train = prompts(3)
    batch = RCRollout(engine, PromptSampler(train, batch_size=3, seed=0), SETTINGS, rc_config(), None).collect(1)

    (chains,) = chain_runs
    assert sorted(c.problem_id for c in chains) == sorted(p.uid for p in train)
    assert all(c.status == "done" and c.sample_id == 0 and c.starting_step == 0 for c in chains)
    assert all(len(c.reasoning_turns) == 3 and len(summaries(c)) == 3 for c in chains)  # the last one too
    # B x N_summ x K = 3 x 2 x 3 sequences: one request of n = K per state, K sequences per group
    assert len(batch.sequences) == 18 and len(engine.requests) == 6 and len(scored) == 6
    problem = {p.uid: p.extra_info["question"] for p in train}
    chain_of = by_chain(chains)
    position = {chain.problem_id: i for i, chain in enumerate(chains)}  # the batch's order
    scored_of = {prompt.uid: (prompt, completions, results) for prompt, completions, results in scored}
    states: dict[tuple[str, int], list[int]] = {}
    order = []
    for group in chunks(batch.sequences, 3):
        call = request_of(engine, group)
        problem_id, sample_id, j = state_of(call)
        states.setdefault((problem_id, sample_id), []).append(j)
        order.append((position[problem_id], sample_id, j))
        prompt, completions, results = scored_of[call.request_id]
        chain = chain_of[(problem_id, sample_id)]
        context = [""] + summaries(chain)  # context_0 of a fresh chain is empty, context_j the j-th summary
        expected = reasoning_prompt(tiny_engine, templates.REASONING_PROMPT, problem[problem_id], context[j])
        # the K sequences share one prompt: I_R(problem, context_j), the very prompt of the chain's cycle j
        assert [s.prompt_token_ids for s in group] == [expected] * 3
        assert expected == tuple(chain.reasoning_turns[j].prompt_token_ids) == tuple(call.prompt)
        assert prompt.prompt_token_ids == expected and prompt.uid == call.request_id
        # decoded: the problem, then the summary of cycle j (state 0 of a fresh chain: a blank section)
        decoded = tokenizer.decode(expected)
        assert f"### PROBLEM\n{problem[problem_id]}\n\n" in decoded and summary_section(context[j]) in decoded
        assert j == 0 or context[j].strip()  # a real summary, so the check tells the states apart
        assert [s.response_token_ids for s in group] == [tuple(c.token_ids) for c in completions]
        assert [s.rollout_log_probs for s in group] == [tuple(c.logprobs) for c in completions]
        # each turn scored on its own text; GRPO within the state's group
        assert [r["score"] for r in results] == [float(len(c.text) % 2 == 0) for c in completions]
        rewards = torch.tensor([r["score"] for r in results])
        torch.testing.assert_close(torch.tensor([s.advantage for s in group]),
                                   grpo_advantages(rewards, [0] * 3, GRPOConfig()))
    # groups in (problem, sample, state) order, whatever order the chains finished in
    assert order == sorted(order)
    # N_summ = 2 distinct states per chain, drawn from cycles 0..T_train-1
    assert sorted(states) == sorted((p.uid, 0) for p in train)
    assert all(len(set(js)) == 2 and set(js) <= {0, 1, 2} for js in states.values())
    all_scores = [r["score"] for *_, results in scored for r in results]
    assert 0 < sum(all_scores) < 18  # groups really differ: the advantages above are not all 0
    assert batch.metrics["rc/online/chains"] == 3 and batch.metrics["rc/online/failed_chains"] == 0
    assert batch.metrics["rc/states"] == 6 and batch.metrics["rollout/short_of_batch"] == 0
    depths = [j for js in states.values() for j in js]
    assert batch.metrics["rc/train/depth_mean"] == pytest.approx(sum(depths) / 6)


def test_every_sequence_carries_its_state_in_the_metadata(engine, prompts, chain_runs, tiny_engine, tiny_model):
    from safetensors.torch import load_file

    tiny_engine.update_weights(load_file(tiny_model / "model.safetensors"))  # the same weights, a new version (>= 1)
    train = prompts(3)
    batch = RCRollout(engine, PromptSampler(train, batch_size=3, seed=0), SETTINGS, rc_config(), None).collect(1)

    chain_of = by_chain(chain_runs[0])
    assert len(batch.sequences) == 18
    for group in chunks(batch.sequences, 3):
        call = request_of(engine, group)
        problem_id, sample_id, j = state_of(call)
        for sequence, completion in zip(group, call.completions, strict=True):
            # reasoning turn j + 1 of the chain is turn 2j of it (reason, summarize, reason, ...)
            assert sequence.metadata == {
                "problem_id": problem_id, "sample_id": sample_id, "cycle_step": 2 * j, "turn_type": "reasoning",
                "turn_number": j + 1, "model_version": tiny_engine.model_version,
                "starting_step": chain_of[(problem_id, sample_id)].starting_step + j}
            assert completion.model_version == tiny_engine.model_version
            assert chain_of[(problem_id, sample_id)].reasoning_turns[j].cycle_step == 2 * j


def test_summaries_are_generated_but_never_trained(engine, prompts, chain_runs, tokenizer):
    train = prompts(3)
    batch = RCRollout(engine, PromptSampler(train, batch_size=3, seed=0), SETTINGS, rc_config(), None).collect(1)

    # the chains' turns: one completion each, H_R for reasoning, H_S for summaries (3 chains x 3 cycles each)
    kinds = [call.request_id.rsplit("|", 4)[2] for call in engine.turns]
    assert kinds.count("reasoning") == kinds.count("summarization") == 9
    assert all(call.sampling.n == 1 for call in engine.turns)
    assert all(call.sampling.max_tokens == (THINKING if kind == "reasoning" else SUMMARY)
               for call, kind in zip(engine.turns, kinds))
    summary_tokens = {tuple(turn.token_ids) for chain in chain_runs[0] for turn in chain.turns
                      if turn.turn_type == "summarization"}
    assert len(summary_tokens) == 9
    assert not summary_tokens & {s.response_token_ids for s in batch.sequences}
    # every trained response is one of the K of a state's request: n = K, H_R tokens, on an I_R prompt
    assert all(call.sampling.n == 3 and call.sampling.max_tokens == THINKING for call in engine.requests)
    assert sorted(request_of(engine, group).request_id for group in chunks(batch.sequences, 3)) == sorted(
        by_request_id(engine.requests))
    for call in engine.requests:
        decoded = tokenizer.decode(call.prompt)
        assert "### SUMMARY OF PREVIOUS ATTEMPT" in decoded and "### LATEST CANDIDATE SOLUTION" not in decoded


def test_omit_initial_state_never_trains_from_the_initial_context(engine, prompts):
    train = prompts(3)
    rc = rc_config(t_train=3, n_summ=2, k=2, omit_initial_state=True)
    batch = RCRollout(engine, PromptSampler(train, batch_size=3, seed=0), SETTINGS, rc, None).collect(1)

    # N_summ = 2 of cycles {1, 2}: both, for every chain (without the option: 2 of {0, 1, 2})
    assert sorted(state_of(call) for call in engine.requests) == sorted(
        (p.uid, 0, j) for p in train for j in (1, 2))
    assert len(batch.sequences) == 12
    assert {s.metadata["cycle_step"] for s in batch.sequences} == {2, 4}


# ---------------------------------------------------------------------- the replay buffer


def test_the_replay_buffer_starts_the_next_chains_from_the_last_summaries(engine, prompts, chain_runs, tokenizer):
    train = prompts(3)
    problem = {p.uid: p.extra_info["question"] for p in train}
    replay = ReplayConfig(enable=True)
    buffer = SummaryReplayBuffer(replay, seed=0)
    # the batch is every prompt, so each step's chains are the same 3 problems
    source = RCRollout(engine, PromptSampler(train, batch_size=3, seed=0), SETTINGS,
                       rc_config(t_train=2, n_summ=2, k=2, replay=replay), buffer)

    first = source.collect(1)
    after_first = {p.uid: buffer.entries(p.uid) for p in train}
    for chain in chain_runs[0]:
        # a fresh chain leaves its summaries after cycles 1 and 2, at depths 1 and 2, made at step 1
        s1, s2 = summaries(chain)
        assert chain.starting_step == 0
        assert after_first[chain.problem_id] == [ReplayEntry(s1, 1, 1), ReplayEntry(s2, 2, 1)]
    # T_train = N_summ = 2: states 0 and 1 of depth-0 chains, mean depth 0.5
    assert first.metrics["rc/train/depth_mean"] == 0.5
    assert first.metrics["rc/buffer/entries"] == 6 and first.metrics["rc/buffer/depth_max"] == 2
    turns_of_first = len(engine.turns)

    second = source.collect(2)
    starts = {}
    for chain in chain_runs[1]:
        # each chain resumed from one of its problem's step-1 summaries, at that summary's depth
        (start,) = [e for e in after_first[chain.problem_id] if e.starting_step == chain.starting_step]
        starts[chain.problem_id] = start
        assert chain.reasoning_turns[0].prompt == templates.REASONING_PROMPT.format(
            problem=problem[chain.problem_id], curr_summary=start.text)
        # purge_on_add: only this chain's summaries are left, one and two cycles deeper than its start
        s1, s2 = summaries(chain)
        assert buffer.entries(chain.problem_id) == [ReplayEntry(s1, start.starting_step + 1, 2),
                                                    ReplayEntry(s2, start.starting_step + 2, 2)]
    # the turns' request ids end with the chain's starting step
    assert all(call.request_id.endswith(f"|{starts[call.request_id.rsplit('|', 4)[0]].starting_step}")
               for call in engine.turns[turns_of_first:])
    for group in chunks(second.sequences, 2):
        metadata = group[0].metadata
        start = starts[metadata["problem_id"]]
        j = metadata["turn_number"] - 1
        assert metadata["starting_step"] == start.starting_step + j >= 1
        if j == 0:  # the state of the initial context is I_R of the replayed summary
            assert summary_section(start.text) in tokenizer.decode(group[0].prompt_token_ids)
    # every state of step 2 is deeper than step 1's: depth = start + j, so mean = mean(start) + 0.5 >= 1.5
    mean_start = sum(start.starting_step for start in starts.values()) / 3
    assert second.metrics["rc/train/depth_mean"] == pytest.approx(mean_start + 0.5)
    assert second.metrics["rc/train/depth_mean"] > first.metrics["rc/train/depth_mean"]
    assert second.metrics["rc/buffer/entries"] == 6
    assert second.metrics["rc/buffer/depth_max"] == max(start.starting_step for start in starts.values()) + 2


def test_a_resumed_source_continues_as_the_uninterrupted_one(engine, prompts, tiny_engine):
    train = prompts(2)
    rc = rc_config(t_train=2, n_summ=1, k=2, replay=ReplayConfig(enable=True))

    def source(recording):
        buffer = SummaryReplayBuffer(rc.replay, seed=0)
        return RCRollout(recording, PromptSampler(train, batch_size=2, seed=0), SETTINGS, rc, buffer)

    uninterrupted = source(engine)
    uninterrupted.collect(1)
    uninterrupted.collect(2)  # the buffer's RNG has drawn by now (step 1's buffer was empty)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # as a checkpoint stores it
    turns_before, requests_before = len(engine.turns), len(engine.requests)
    expected = uninterrupted.collect(3)

    replay_engine = RecordingEngine(tiny_engine)
    resumed = source(replay_engine)  # a new sampler and an empty buffer, then the checkpoint's state
    resumed.load_state_dict(state)
    again = resumed.collect(3)

    def requests(calls):  # the same requests (their order is the chains' finishing order, which may vary)
        return {request_id: (c.prompt, c.sampling) for request_id, c in by_request_id(calls).items()}

    assert requests(replay_engine.turns) == requests(engine.turns[turns_before:])
    # the chains resumed from the buffer (depth >= 1 in their request ids), so the loaded entries mattered
    assert all(int(c.request_id.rsplit("|", 1)[1]) >= 1 for c in replay_engine.turns)
    assert requests(replay_engine.requests) == requests(engine.requests[requests_before:])
    fields = ("prompt_token_ids", "response_token_ids", "advantage", "metadata")
    assert len(again.sequences) == len(expected.sequences) == 4
    for got, want in zip(again.sequences, expected.sequences):
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
        # the same tokens; their float32 log-probs may differ in the last bits, as the engine batched the chains'
        # turns differently (they run asynchronously)
        torch.testing.assert_close(torch.tensor(got.rollout_log_probs), torch.tensor(want.rollout_log_probs),
                                   rtol=0, atol=1e-4)
    assert resumed.state_dict() == uninterrupted.state_dict()


@pytest.mark.parametrize("mode, instructions", [("self_refine", "find and fix any mistakes"),
                                                ("self_verify", "check every step")])
def test_summary_free_baselines_condition_on_the_previous_reasoning(engine, prompts, chain_runs, tiny_engine,
                                                                    tokenizer, mode, instructions):
    train = prompts(2)
    problem = {p.uid: p.extra_info["question"] for p in train}
    replay = ReplayConfig(enable=True)
    buffer = SummaryReplayBuffer(replay, seed=0)
    rc = rc_config(mode=mode, t_train=2, n_summ=2, k=2, replay=replay)
    batch = RCRollout(engine, PromptSampler(train, batch_size=2, seed=0), SETTINGS, rc, buffer).collect(1)

    # no summarization turn is ever requested: a chain is T_train reasoning turns
    assert [call.request_id.rsplit("|", 4)[2] for call in engine.turns] == ["reasoning"] * 4
    assert all(c.turns == c.reasoning_turns and len(c.turns) == 2 for c in chain_runs[0])
    template = {"self_refine": templates.SELF_REFINE_PROMPT, "self_verify": templates.SELF_VERIFY_PROMPT}[mode]
    chain_of = by_chain(chain_runs[0])
    assert len(batch.sequences) == 8
    for group in chunks(batch.sequences, 2):
        problem_id, sample_id, j = state_of(request_of(engine, group))
        chain = chain_of[(problem_id, sample_id)]
        context = [""] + [turn.text for turn in chain.reasoning_turns]  # context_j = reasoning turn j
        expected = reasoning_prompt(tiny_engine, template, problem[problem_id], context[j], "curr_reasoning")
        assert [s.prompt_token_ids for s in group] == [expected] * 2
        assert expected == tuple(chain.reasoning_turns[j].prompt_token_ids)
        decoded = tokenizer.decode(expected)
        assert instructions in decoded and f"### PREVIOUS ATTEMPT\n{context[j]}\n\n###" in decoded
        assert j == 0 or context[j].strip()
    # the buffer holds each chain's reasoning traces, at depths 1 and 2
    for chain in chain_runs[0]:
        r1, r2 = (turn.text for turn in chain.reasoning_turns)
        assert buffer.entries(chain.problem_id) == [ReplayEntry(r1, 1, 1), ReplayEntry(r2, 2, 1)]
    assert "rc/summary_length/mean" in batch.metrics and batch.metrics["rc/summary_length/mean"] == 0


def test_a_failed_chain_drops_only_its_own_states(tiny_engine, prompts, chain_runs):
    train = prompts(3)
    failing = train[0].uid
    # the first reasoning turn of that problem's chain fails, every attempt; one retry, no backoff
    engine = RecordingEngine(tiny_engine, fail=lambda rid: rid.startswith(f"{failing}|") and "|reasoning|1|" in rid)
    buffer = SummaryReplayBuffer(ReplayConfig(enable=True), seed=0)
    rc = rc_config(max_retries=1, retry_base_delay=0.0, replay=ReplayConfig(enable=True))
    batch = RCRollout(engine, PromptSampler(train, batch_size=3, seed=0), SETTINGS, rc, buffer).collect(1)

    assert [c.request_id for c in engine.turns if c.request_id.startswith(f"{failing}|")] == [
        f"{failing}|0|reasoning|1|0"] * 2  # tried twice, nothing after
    (failed,) = [c for c in chain_runs[0] if c.status == "failed"]
    assert failed.problem_id == failing and "engine failed this request" in failed.error and failed.turns == []
    assert batch.metrics["rc/online/failed_chains"] == 1 and batch.metrics["rc/online/chains"] == 3
    # the other two chains' N_summ = 2 states each, K = 3 turns each; the failed one's missing, counted
    others = {p.uid for p in train[1:]}
    assert sorted(state_of(c)[0] for c in engine.requests) == sorted([*others, *others])
    assert len(batch.sequences) == 12 and {s.metadata["problem_id"] for s in batch.sequences} == others
    assert batch.metrics["rc/states"] == 4 and batch.metrics["rollout/short_of_batch"] == 2
    assert batch.metrics["rollout/failed_requests"] == 0
    # nor does it reach the buffer; the others' summaries do
    assert failing not in buffer and all(problem_id in buffer for problem_id in others)


# ---------------------------------------------------------------------- recipes


@pytest.fixture
def train_cli(run_train, arithmetic_data, tmp_path, tiny_model):
    """``train_cli(*overrides)`` -> (exit status, stderr) of ``flash-rc train`` on a valid RC recipe + overrides,
    with the process group and the engine replaced by stand-ins that raise ``AssertionError("started")``."""
    base = [
        f"data.train_files={arithmetic_data['train']}", "data.train_batch_size=4", "data.max_prompt_length=128",
        "data.max_response_length=16", f"actor_rollout_ref.model.path={tiny_model}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.max_model_len=1024", f"trainer.default_local_dir={tmp_path / 'run'}",
        "flash_rc.train.progress=false", "flash_rc.rc.enable=true", "flash_rc.rc.t_train=2", "flash_rc.rc.n_summ=2",
        "flash_rc.rc.k=2", f"flash_rc.rc.max_thinking_tokens={THINKING}", f"flash_rc.rc.max_summary_tokens={SUMMARY}",
    ]
    return lambda *overrides: run_train([*base, *overrides])


def test_the_rc_base_recipe_reaches_the_process_group(train_cli):
    # the control: every refusal below differs from this run by its overrides alone
    with pytest.raises(AssertionError, match="started"):
        train_cli()


BAD_RC_RECIPES = {
    # name: (overrides, what the message must say)
    "more states than cycles": (["flash_rc.rc.n_summ=3"], ["n_summ=3", "t_train=2", "(n_summ <= t_train)"]),
    # T_train = 2 without cycle 0 leaves 1 state to draw 2 from
    "more states than cycles past the initial one": (
        ["flash_rc.rc.omit_initial_state=true"], ["n_summ=2", "has only 1", "t_train - 1 (omit_initial_state)"]),
    "one turn per state has no baseline": (["flash_rc.rc.k=1"], ["flash_rc.rc.k=1", "K >= 2"]),
    "rollout.n set with rc": (["actor_rollout_ref.rollout.n=2"], ["actor_rollout_ref.rollout.n", "flash_rc.rc.k"]),
    "dynamic sampling with rc": (["algorithm.filter_groups.enable=true"], ["algorithm.filter_groups"]),
    # the summarization turn carries a summary and a reasoning turn besides its template and the problem
    "thinking budget past the context": (
        ["flash_rc.rc.max_thinking_tokens=600"],
        ["an RC summarization turn needs up to", "612 carried", "actor_rollout_ref.rollout.max_model_len=1024"]),
}


@pytest.mark.parametrize("overrides, expected", BAD_RC_RECIPES.values(), ids=BAD_RC_RECIPES.keys())
def test_a_bad_rc_recipe_is_refused_before_anything_starts(train_cli, assert_refused, overrides, expected):
    status, err = train_cli(*overrides)
    assert_refused(status, err, EXIT_USAGE, expected)


def corrupt_buffer(tmp_path):
    path = tmp_path / "initial_buffer.jsonl"
    path.write_text(json.dumps({"problem_id": "arithmetic_train/0", "entries": []}) + "\n{not json\n")
    return path


def test_a_corrupt_initial_buffer_is_refused_before_anything_starts(train_cli, assert_refused, tmp_path):
    path = corrupt_buffer(tmp_path)
    status, err = train_cli("flash_rc.rc.replay.enable=true", f"flash_rc.rc.replay.initial_path={path}")
    assert_refused(status, err, EXIT_BAD_DATA, [f"{path}:2", "invalid JSON"])


@pytest.fixture
def rc_recipe(tmp_path, prompts):
    """``rc_recipe(*overrides)`` -> (recipe, prompt set) of a replay-buffer RC recipe over 2 parity prompts."""
    train = prompts(2)

    def make(*overrides: str):
        recipe = load_recipe(TrainRecipe, None, [
            f"data.train_files={tmp_path / 'rc_train.parquet'}", "data.train_batch_size=2",
            "flash_rc.rc.enable=true", "flash_rc.rc.replay.enable=true", *overrides])
        return recipe, SimpleNamespace(prompts=train)

    return make


def test_the_trainer_preloads_a_buffer_from_another_dataset_counting_the_unknown_problems(rc_recipe, tmp_path,
                                                                                          capsys):
    path = tmp_path / "other_buffer.jsonl"
    entry = {"text": "I computed 0 + 0 = 0.", "starting_step": 4, "added_at_step": 9}
    path.write_text("".join(json.dumps({"problem_id": problem_id, "entries": [entry]}) + "\n"
                            for problem_id in ("rc_train/1", "gsm8k/7", "gsm8k/8")))
    recipe, train = rc_recipe(f"flash_rc.rc.replay.initial_path={path}")
    source = trainer._rollout_source(recipe, None, PromptSampler(train.prompts, 2, seed=0), RolloutShards(), train,
                                     SimpleNamespace(is_main=True))

    # 1 of the 3 problems is in the training data; the other 2 are counted and skipped, the run goes on
    assert capsys.readouterr().out == (f"flash-rc train: replay buffer {path}: "
                                       "{'loaded': 1, 'unknown_problems': 2, 'entries': 1}\n")
    assert isinstance(source, RCRollout) and len(source.buffer) == 1
    assert source.buffer.entries("rc_train/1") == [ReplayEntry("I computed 0 + 0 = 0.", 4, 9)]


def test_the_trainer_names_the_line_of_a_corrupt_initial_buffer(rc_recipe, tmp_path):
    path = corrupt_buffer(tmp_path)
    recipe, train = rc_recipe(f"flash_rc.rc.replay.initial_path={path}")
    with pytest.raises(RowError, match=rf"^{path}:2: invalid JSON"):
        trainer._rollout_source(recipe, None, PromptSampler(train.prompts, 2, seed=0), RolloutShards(), train,
                                SimpleNamespace(is_main=True))
