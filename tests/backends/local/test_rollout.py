"""OutcomeRollout on the real tiny vLLM engine, scored by test scorers in the real reward pool.

The random tiny model never solves a task, so the test scorers of conftest.py judge what it does produce: ``parity``
gives 1 to a response whose text has an even number of characters (so the samples of a prompt disagree), ``constant``
gives every response score 0.5 and acc true (every group all-equal), ``hang_or_parity`` sleeps far past its time limit
(2 s here) when the ground truth is ``hang``. They live in a file the pool's worker processes import by path. What the
rollout did is read back through spies that change nothing: a wrapper of the engine that records every request, a
wrapper of ``score_completions`` (the ``scored`` fixture) that records every group and its reward results, and (for
the shaping test) a wrapper of ``GroupCollector._advantages`` that records the rewards each group's advantages are
computed from.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future

import pytest
import torch

from flash_rc.algo.advantages import (
    GRPOConfig,
    OverlongConfig,
    grpo_advantages,
    rloo_advantages,
)
from flash_rc.backends.local.rollout import (
    GroupCollector,
    OutcomeRollout,
    OutcomeSettings,
    request_seed,
    validation_metrics,
)
from flash_rc.data.prompts import PromptSampler, load_train_prompts
from flash_rc.data.rows import make_row, write_parquet_atomic
from flash_rc.learner.batch import TrainSequence
from flash_rc.types import SamplingConfig

PARITY, CONSTANT, HANG = "local_test_parity", "local_test_constant", "local_test_hang"
MAX_TOKENS = 8

BASE_SETTINGS = OutcomeSettings(train_batch_size=4, n=2, temperature=1.0, max_response_length=MAX_TOKENS,
                                adv_estimator="grpo", norm_adv_by_std=True, filter_groups=False, filter_metric="acc",
                                max_num_gen_batches=0, overlong=None, rollout_seed=0)
"""4 prompts a step, GRPO, no dynamic sampling or shaping; each test changes what it exercises."""


def settings(**overrides) -> OutcomeSettings:
    return dataclasses.replace(BASE_SETTINGS, **overrides)


@pytest.fixture(autouse=True)
def scorers(route_to_test_scorer):
    route_to_test_scorer(PARITY, "parity", timeout_s=30.0)
    route_to_test_scorer(CONSTANT, "constant", timeout_s=30.0)
    route_to_test_scorer(HANG, "hang_or_parity", timeout_s=2.0)


@pytest.fixture
def prompts(tmp_path, tokenizer):
    """``prompts(data_source, count, ground_truths=None)``: TrainPrompts loaded from a parquet of verl rows."""
    def load(data_source: str, count: int, ground_truths: list[str] | None = None):
        truths = ground_truths or ["x"] * count
        rows = [make_row(data_source, f"What is {i} + {i}?", "math", truths[i], "train", i, truths[i], f"{i} + {i}")
                for i in range(count)]
        path = write_parquet_atomic(rows, tmp_path / f"{data_source}.parquet")
        return load_train_prompts(str(path), tokenizer, max_prompt_length=128, filter_overlong_prompts=False).prompts

    return load


class RecordingEngine:
    """The tiny engine, recording each request ``(request_id, prompt ids, sampling)``; ``fail`` names request ids
    whose future fails instead (an engine error for one prompt)."""

    def __init__(self, engine, fail=()):
        self.engine, self.fail, self.requests = engine, set(fail), []

    def submit(self, prompt, sampling, request_id=None):
        self.requests.append((request_id, list(prompt), sampling))
        if request_id in self.fail:
            future = Future()
            future.set_exception(RuntimeError("engine failed this request"))
            return future
        return self.engine.submit(prompt, sampling, request_id=request_id)


@pytest.fixture
def engine(tiny_engine):
    return RecordingEngine(tiny_engine)


def scores_of(results) -> torch.Tensor:
    return torch.tensor([r["score"] for r in results], dtype=torch.float32)


def chunks(sequences, n):
    return [sequences[i:i + n] for i in range(0, len(sequences), n)]


def assert_group_matches(sequences, prompt, completions):
    """The sequences of one group are its completions, in order, for its prompt."""
    assert [s.prompt_token_ids for s in sequences] == [prompt.prompt_token_ids] * len(completions)
    assert [s.response_token_ids for s in sequences] == [tuple(c.token_ids) for c in completions]
    for sequence, completion in zip(sequences, completions):
        assert isinstance(sequence, TrainSequence)
        assert len(sequence.rollout_log_probs) == len(sequence.response_token_ids) > 0
        assert sequence.rollout_log_probs == tuple(completion.logprobs)
        assert all(math.isfinite(lp) and lp <= 0 for lp in sequence.rollout_log_probs)


def test_grpo_sequences_are_the_scored_groups_with_group_baselined_advantages(engine, prompts, scored):
    train = prompts(PARITY, 8)
    sampler = PromptSampler(train, batch_size=4, seed=0)
    batch = OutcomeRollout(engine, sampler, settings(n=4)).collect(step=1)

    assert len(scored) == 4 and len(batch.sequences) == 16
    # every request asked for n samples of max_response_length tokens at the training temperature
    assert all(s.n == 4 and s.max_tokens == MAX_TOKENS and s.temperature == 1.0 for *_, s in engine.requests)
    assert [ids for _, ids, _ in engine.requests] == [list(p.prompt_token_ids) for p, *_ in scored]
    for sequences, (prompt, completions, results) in zip(chunks(batch.sequences, 4), scored, strict=True):
        assert_group_matches(sequences, prompt, completions)
        # the scorer ran on the response text: parity of its length
        assert [r["score"] for r in results] == [float(len(c.text) % 2 == 0) for c in completions]
        # vLLM seeds the n samples of one seeded request differently
        assert len({tuple(c.token_ids) for c in completions}) > 1
        advantages = torch.tensor([s.advantage for s in sequences])
        assert float(advantages.sum()) == pytest.approx(0.0, abs=1e-5)
        torch.testing.assert_close(advantages, grpo_advantages(scores_of(results), [0] * 4, GRPOConfig()))
    all_scores = [r["score"] for *_, results in scored for r in results]
    assert 0 < sum(all_scores) < 16  # the groups really differ: the advantages above are not all 0
    assert batch.metrics["critic/score/mean"] == pytest.approx(sum(all_scores) / 16)
    assert batch.metrics["rollout/gen_batches"] == 1 and batch.metrics["rollout/short_of_batch"] == 0
    assert batch.metrics["reward/failed"] == 0 and batch.metrics["reward/timeouts"] == 0
    assert batch.generated_tokens == sum(len(s.response_token_ids) for s in batch.sequences)


def test_rloo_advantages_leave_one_out(engine, prompts, scored):
    sampler = PromptSampler(prompts(PARITY, 4), batch_size=4, seed=0)
    batch = OutcomeRollout(engine, sampler, settings(n=3, adv_estimator="rloo")).collect(step=1)

    for sequences, (prompt, completions, results) in zip(chunks(batch.sequences, 3), scored, strict=True):
        assert_group_matches(sequences, prompt, completions)
        rewards = scores_of(results)
        advantages = torch.tensor([s.advantage for s in sequences])
        torch.testing.assert_close(advantages, rloo_advantages(rewards, [0] * 3))
        # A_i = r_i - mean of the other two, e.g. rewards (1, 0, 0) -> (1, -0.5, -0.5)
        leave_one_out = torch.stack([rewards[i] - (rewards.sum() - rewards[i]) / 2 for i in range(3)])
        torch.testing.assert_close(advantages, leave_one_out)


def test_the_same_sampler_state_and_step_sample_the_same_tokens(engine, prompts, tiny_engine):
    train = prompts(PARITY, 8)
    first = OutcomeRollout(engine, PromptSampler(train, batch_size=4, seed=0), settings())
    first.sampler.next_batch()  # start mid-epoch, as a resumed run does
    state = first.state_dict()
    batch = first.collect(step=3)
    # the request seeds come from (rollout_seed, step, generation batch, prompt uid)
    drawn = [request_id for request_id, *_ in engine.requests]
    assert [s.seed for *_, s in engine.requests] == [request_seed(0, 3, 0, uid) for uid in drawn]

    replay_engine = RecordingEngine(tiny_engine)
    replay = OutcomeRollout(replay_engine, PromptSampler(train, batch_size=4, seed=0), settings())
    replay.load_state_dict(state)
    again = replay.collect(step=3)
    assert [request_id for request_id, *_ in replay_engine.requests] == drawn
    assert [s.response_token_ids for s in again.sequences] == [s.response_token_ids for s in batch.sequences]
    assert [s.advantage for s in again.sequences] == [s.advantage for s in batch.sequences]

    # another step from the same state draws the same prompts but other samples
    other = OutcomeRollout(engine, PromptSampler(train, batch_size=4, seed=0), settings())
    other.load_state_dict(state)
    elsewhere = other.collect(step=4)
    assert [s.prompt_token_ids for s in elsewhere.sequences] == [s.prompt_token_ids for s in batch.sequences]
    assert [s.response_token_ids for s in elsewhere.sequences] != [s.response_token_ids for s in batch.sequences]


def test_dynamic_sampling_keeps_only_groups_whose_acc_differs(engine, prompts, scored):
    sampler = PromptSampler(prompts(PARITY, 8), batch_size=4, seed=0)
    batch = OutcomeRollout(engine, sampler, settings(filter_groups=True, max_num_gen_batches=10)).collect(step=1)

    mixed = [(prompt, completions) for prompt, completions, results in scored
             if len({r["acc"] for r in results}) > 1]
    # generation batches were drawn until 4 mixed groups were kept (not one more); they are the first 4 seen, in order
    gen_batches = batch.metrics["rollout/gen_batches"]
    assert len(scored) == 4 * gen_batches
    assert sum(len({r["acc"] for r in results}) > 1 for *_, results in scored[:-4]) < 4
    assert batch.metrics["rollout/groups_kept"] == 4 and batch.metrics["rollout/short_of_batch"] == 0
    assert len(batch.sequences) == 8
    for sequences, (prompt, completions) in zip(chunks(batch.sequences, 2), mixed[:4], strict=True):
        assert_group_matches(sequences, prompt, completions)
        # n = 2, scores (1, 0): centred (+0.5, -0.5), unbiased std sqrt(0.5), so GRPO gives ±1/√2 ≈ ±0.707
        assert sorted(s.advantage for s in sequences) == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)],
                                                                        rel=1e-5)
    assert batch.metrics["rollout/groups_kept_fraction"] == pytest.approx(4 / len(scored))


def test_dynamic_sampling_over_all_equal_groups_stops_at_max_num_gen_batches(engine, prompts, scored):
    sampler = PromptSampler(prompts(CONSTANT, 8), batch_size=4, seed=0)
    batch = OutcomeRollout(engine, sampler, settings(filter_groups=True, max_num_gen_batches=2)).collect(step=1)

    assert len(engine.requests) == 8 and len(scored) == 8  # 2 generation batches of 4 prompts, all scored
    assert batch.sequences == []
    assert batch.metrics["rollout/gen_batches"] == 2
    assert batch.metrics["rollout/groups_kept"] == 0 and batch.metrics["rollout/short_of_batch"] == 4
    assert batch.metrics["critic/score/mean"] == 0.5


def test_a_scorer_past_its_timeout_scores_zero_and_the_step_goes_on(engine, prompts, scored):
    train = prompts(HANG, 4, ground_truths=["x", "hang", "x", "x"])
    batch = OutcomeRollout(engine, PromptSampler(train, batch_size=4, seed=0), settings()).collect(step=1)

    assert len(batch.sequences) == 8
    hung = [results for prompt, _, results in scored if prompt.ground_truth == "hang"]
    assert len(hung) == 1
    assert [(r["score"], r["acc"], r["reason"].split(":")[0]) for r in hung[0]] == [(0.0, False, "timeout")] * 2
    # the other prompts' samples were scored as usual meanwhile
    assert {r["reason"] for prompt, _, results in scored if prompt.ground_truth != "hang" for r in results} <= {
        "even", "odd"}
    assert batch.metrics["reward/timeouts"] == 2 and batch.metrics["reward/failed"] == 2
    # the hung group scored (0, 0): no signal, advantages 0
    index = [prompt.ground_truth for prompt, *_ in scored].index("hang")
    assert [s.advantage for s in batch.sequences[2 * index:2 * index + 2]] == [0.0, 0.0]


def test_a_request_the_engine_fails_drops_its_group_and_is_counted(tiny_engine, prompts, scored):
    train = prompts(PARITY, 4)
    engine = RecordingEngine(tiny_engine, fail={train[0].uid})
    batch = OutcomeRollout(engine, PromptSampler(train, batch_size=4, seed=0), settings()).collect(step=1)

    assert batch.metrics["rollout/failed_requests"] == 1
    assert [prompt.uid for prompt, *_ in scored] == [uid for uid, *_ in engine.requests if uid != train[0].uid]
    assert len(batch.sequences) == 6 and batch.metrics["rollout/short_of_batch"] == 1
    for sequences, (prompt, completions, _) in zip(chunks(batch.sequences, 2), scored, strict=True):
        assert_group_matches(sequences, prompt, completions)


@pytest.mark.parametrize("max_resp_len, buffer_length, penalty_factor, at_max_tokens", [
    (8, 8, 0.5, -0.5),  # the ramp spans the whole length: -(8 - (8 - 8)) / 8 * 0.5
    (12, 8, 0.5, -0.25),  # L_max = 12 above the 8 generated: -(8 - (12 - 8)) / 8 * 0.5
    (16, 8, 1.0, 0.0),  # the ramp starts at 16 - 8 = 8 tokens: no penalty yet
])
def test_overlong_shaping_adds_the_length_penalty_to_the_score(engine, prompts, scored, monkeypatch, max_resp_len,
                                                               buffer_length, penalty_factor, at_max_tokens):
    rewards_seen = []
    real = GroupCollector._advantages

    def spy(self, rewards):
        rewards_seen.append(rewards.clone())
        return real(self, rewards)

    monkeypatch.setattr(GroupCollector, "_advantages", spy)
    overlong = OverlongConfig(max_response_length=max_resp_len, buffer_length=buffer_length,
                              penalty_factor=penalty_factor)
    sampler = PromptSampler(prompts(PARITY, 4), batch_size=4, seed=0)
    batch = OutcomeRollout(engine, sampler, settings(n=4, overlong=overlong)).collect(step=1)

    lengths = [len(c.token_ids) for _, completions, _ in scored for c in completions]
    scores = torch.cat([scores_of(results) for *_, results in scored])
    rewards = torch.cat(rewards_seen)
    penalties = torch.tensor([min(-(length - (max_resp_len - buffer_length)) / buffer_length * penalty_factor, 0.0)
                              for length in lengths])
    torch.testing.assert_close(rewards, scores + penalties)
    full_length = [i for i, length in enumerate(lengths) if length == MAX_TOKENS]
    assert full_length  # the random model rarely ends early: most responses use the whole budget
    assert [float(rewards[i] - scores[i]) for i in full_length] == pytest.approx([at_max_tokens] * len(full_length))
    assert batch.metrics["reward/overlong_penalty/mean"] == pytest.approx(float(penalties.mean()), abs=1e-6)
    assert batch.metrics["critic/rewards/mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    for sequences, group_rewards in zip(chunks(batch.sequences, 4), rewards_seen, strict=True):
        torch.testing.assert_close(torch.tensor([s.advantage for s in sequences]),
                                   grpo_advantages(group_rewards, [0] * 4, GRPOConfig()))


def test_validation_metrics_are_per_data_source(engine, prompts, scored):
    val = prompts(PARITY, 3) + prompts(CONSTANT, 2)
    metrics = validation_metrics(engine, val, SamplingConfig(n=2, max_tokens=MAX_TOKENS, temperature=1.0), seed=5)

    assert [s.seed for *_, s in engine.requests] == [request_seed(5, "val", p.uid) for p in val]
    parity_results = [r for prompt, _, results in scored if prompt.data_source == PARITY for r in results]
    assert len(parity_results) == 6
    parity_mean = sum(r["score"] for r in parity_results) / 6
    assert metrics[f"val/{PARITY}/score/mean@2"] == pytest.approx(parity_mean)
    assert metrics[f"val/{PARITY}/acc/mean@2"] == pytest.approx(parity_mean)  # acc = score for parity
    assert metrics[f"val/{CONSTANT}/score/mean@2"] == 0.5 and metrics[f"val/{CONSTANT}/acc/mean@2"] == 1.0
    assert metrics["val/failed_requests"] == 0
    lengths = [len(c.token_ids) for _, completions, _ in scored for c in completions]
    assert metrics["val/response_length/mean"] == pytest.approx(sum(lengths) / 10)
