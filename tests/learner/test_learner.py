"""The FSDP2 learner on the real tiny model: log-probs, gradient accumulation, the update and the sync into vLLM.

One process here is a world of one (gloo); ``test_distributed.py`` runs the 2-rank cases under torchrun. Exactness
tests use ``param_dtype=fp32`` so that differences come from the algorithm, not from bf16 rounding.
"""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flash_rc.algo.rollout_correction import RolloutCorrectionConfig
from flash_rc.errors import WeightUpdateError
from flash_rc.learner.batch import TrainSequence
from flash_rc.learner.config import ActorModelKeys, ActorSection
from flash_rc.learner.distributed import init_world
from flash_rc.learner.learner import Learner, LearnerSettings, MetricAccumulator
from flash_rc.rollout.checkpoint import full_tensor
from flash_rc.types import SamplingConfig

TEMPERATURE = 0.7


def actor(**overrides):
    keys = {"ppo_mini_batch_size": 2, "ppo_micro_batch_size_per_gpu": 8, "clip_ratio_high": 0.28,
            "fsdp_config": {"mixed_precision": {"param_dtype": "fp32"}}, "optim": {"lr": 1e-3}}
    return ActorSection.model_validate({**keys, **overrides})


def settings(**overrides) -> LearnerSettings:
    return LearnerSettings(actor=actor(**overrides), model=ActorModelKeys(), correction=RolloutCorrectionConfig(),
                           total_steps=4)


@pytest.fixture(scope="module")
def world():
    return init_world()


@pytest.fixture(scope="module")
def sequences():
    gen = torch.Generator().manual_seed(0)
    out = []
    for k in range(8):
        prompt = torch.randint(5, 300, (3 + k % 3,), generator=gen).tolist()
        response = torch.randint(5, 300, (2 + (5 * k) % 7,), generator=gen).tolist()
        rollout = (-torch.rand(len(response), generator=gen) * 5).tolist()
        out.append(TrainSequence(tuple(prompt), tuple(response), tuple(rollout), advantage=(-1.0) ** k * (1 + k / 8)))
    return out


def hf_log_probs(model, sequence: TrainSequence, temperature: float) -> torch.Tensor:
    ids = torch.tensor([list(sequence.prompt_token_ids) + list(sequence.response_token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(sequence.prompt_token_ids) - 1: -1].float() / temperature
    targets = torch.tensor(sequence.response_token_ids)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


def full_state(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: full_tensor(t).clone() for name, t in learner.state_source().state_dict().items()}


def test_log_probs_equal_an_hf_fp32_forward(world, tiny_model, sequences):
    learner = Learner(tiny_model, settings(), world)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ours = learner.log_probs(sequences, TEMPERATURE)
    for sequence, values in zip(sequences, ours):
        torch.testing.assert_close(values, hf_log_probs(hf, sequence, TEMPERATURE), atol=1e-5, rtol=1e-5)
    # bf16 compute (the default recipes') matches HF run in bf16 (the random tiny model's log-probs move by up to
    # ~0.3 between fp32 and bf16; ours stay within ~0.04 of HF's bf16)
    bf16 = Learner(tiny_model, replace(settings(), actor=actor(fsdp_config={})), world)
    hf_bf16 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    for sequence, values in zip(sequences, bf16.log_probs(sequences, TEMPERATURE)):
        torch.testing.assert_close(values, hf_log_probs(hf_bf16, sequence, TEMPERATURE), atol=0.06, rtol=0)


def gradients_of(learner: Learner, sequences, old, **actor_overrides) -> tuple[dict[str, torch.Tensor], float]:
    learner.settings = replace(learner.settings, actor=actor(**actor_overrides))
    learner.policy.train()
    learner.optimizer.zero_grad(set_to_none=True)
    metrics = MetricAccumulator()
    learner.backward(sequences, range(len(sequences)), old, None, TEMPERATURE, metrics)
    grads = {name: full_tensor(p.grad).clone() for name, p in learner.policy.named_parameters()}
    return grads, metrics.result(learner.world, 1)["actor/pg_loss"]


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_give_the_gradient_of_one_batch(world, tiny_model, sequences, loss_agg_mode):
    learner = Learner(tiny_model, settings(), world)
    current = learner.log_probs(sequences, TEMPERATURE)
    old = [values - 0.3 * torch.sin(torch.arange(values.numel(), dtype=torch.float32)) for values in current]
    one, loss_one = gradients_of(learner, sequences, old, ppo_micro_batch_size_per_gpu=8, loss_agg_mode=loss_agg_mode)
    four, loss_four = gradients_of(learner, sequences, old, ppo_micro_batch_size_per_gpu=2,
                                   loss_agg_mode=loss_agg_mode)
    budget, loss_budget = gradients_of(learner, sequences, old, use_dynamic_bsz=True, ppo_max_token_len_per_gpu=24,
                                       loss_agg_mode=loss_agg_mode)
    assert abs(loss_one) > 1e-3  # the clipped ratios and signed advantages give a real loss
    for name in one:
        torch.testing.assert_close(four[name], one[name], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(budget[name], one[name], atol=1e-5, rtol=1e-5, msg=name)
    assert loss_four == pytest.approx(loss_one, abs=1e-5) and loss_budget == pytest.approx(loss_one, abs=1e-5)


def test_update_changes_weights_and_the_sync_serves_them(world, tiny_model, tiny_engine, sequences):
    learner = Learner(tiny_model, settings(), world)
    before = full_state(learner)
    old = learner.log_probs(sequences, TEMPERATURE)
    metrics = learner.update(sequences, old, None, TEMPERATURE, mini_batch_sequences=8)
    after = full_state(learner)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before), "every parameter moves under AdamW with a nonzero gradient"
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/optimizer_steps"] == 1
    # old == current at the first mini-batch: the PPO ratio is 1 and nothing is clipped
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/pg_clipfrac"] == 0.0
    try:
        report = learner.sync(tiny_engine)
        assert report.model_version == tiny_engine.model_version and report.tensors > 0
        hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        hf.load_state_dict(after, strict=False)
        ((completion,),) = tiny_engine.generate([[5, 17, 42, 99]], SamplingConfig(max_tokens=16, seed=3,
                                                                                temperature=TEMPERATURE))
        sample = TrainSequence(tuple(completion.prompt_token_ids), tuple(completion.token_ids),
                               tuple(completion.logprobs), 0.0)
        reference = hf_log_probs(hf, sample, TEMPERATURE)
        torch.testing.assert_close(torch.tensor(completion.logprobs), reference, atol=1e-2, rtol=0)
        original = hf_log_probs(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), sample,
                                TEMPERATURE)
        assert (reference - original).abs().max() > 1e-2, "the update must be visible in the served log-probs"
        # the learner's own log-probs of the engine's sample: the mismatch an fp32 engine shows is ~0
        (ours,) = learner.log_probs([sample], TEMPERATURE)
        torch.testing.assert_close(ours, torch.tensor(completion.logprobs), atol=1e-2, rtol=0)
    finally:
        tiny_engine.load(load_file(next(tiny_model.glob("*.safetensors"))))  # the shared engine's weights back


def test_nonfinite_gradient_skips_the_step(world, tiny_model, sequences):
    learner = Learner(tiny_model, settings(), world)
    before = full_state(learner)
    old = learner.log_probs(sequences, TEMPERATURE)
    # an overflow inside the model (activations to inf) makes the gradient non-finite
    layer = learner.policy.causal_lm.get_decoder().layers[0]
    overflow = layer.register_forward_hook(lambda module, args, output: output * float("inf"))
    try:
        metrics = learner.update(sequences, old, None, TEMPERATURE, mini_batch_sequences=8)
    finally:
        overflow.remove()
    assert metrics["actor/nonfinite_grad_skipped_steps"] == 1.0 and "actor/grad_norm" not in metrics
    after = full_state(learner)
    assert all(torch.equal(before[name], after[name]) for name in before)
    # and the learner trains normally afterwards
    metrics = learner.update(sequences, old, None, TEMPERATURE, mini_batch_sequences=8)
    assert metrics["actor/nonfinite_grad_skipped_steps"] == 0.0


def test_sync_refuses_nonfinite_weights_and_keeps_the_engine(world, tiny_model, tiny_engine):
    learner = Learner(tiny_model, settings(), world)
    version = tiny_engine.model_version
    with torch.no_grad():
        next(learner.policy.parameters()).to_local().view(-1)[0] = float("nan")
    with pytest.raises(WeightUpdateError, match="not finite"):
        learner.sync(tiny_engine)
    assert tiny_engine.model_version == version


def test_kl_loss_and_entropy_bonus(world, tiny_model, sequences):
    learner = Learner(tiny_model, settings(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl",
                                           entropy_coeff=0.01), world)
    old = learner.log_probs(sequences, TEMPERATURE)
    ref = learner.log_probs(sequences, TEMPERATURE, reference=True)
    for a, b in zip(old, ref):  # the reference starts as the policy
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    first = learner.update(sequences, old, ref, TEMPERATURE, mini_batch_sequences=8)
    assert first["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6) and first["actor/entropy"] > 0
    second = learner.update(sequences, old, ref, TEMPERATURE, mini_batch_sequences=8)
    assert second["actor/kl_loss"] > 0  # the policy moved away from the frozen reference


def test_activation_checkpointing_gives_the_same_gradient(world, tiny_model, sequences):
    plain = Learner(tiny_model, settings(), world)
    old = plain.log_probs(sequences, TEMPERATURE)
    expected, _ = gradients_of(plain, sequences, old)
    checkpointed = Learner(tiny_model, replace(settings(), model=ActorModelKeys(enable_gradient_checkpointing=True)),
                           world)
    assert checkpointed.policy.causal_lm.is_gradient_checkpointing
    got, _ = gradients_of(checkpointed, sequences, old)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_tied_embedding_checkpoint_stores_the_shared_weight_once_and_loads_back(world, tmp_path):
    # SmolLM2 ties lm_head to embed_tokens: the checkpoint must hold one copy (as HF's save_pretrained of the base
    # model does), or an engine started from the base model refuses the checkpoint's extra lm_head.weight
    from flash_rc.models import build_tiny_qwen2

    tied = tmp_path / "tied"
    build_tiny_qwen2(tied, tie_word_embeddings=True)
    learner = Learner(tied, settings(), world)
    learner.save(tmp_path / "ckpt", tied)
    saved = load_file(next((tmp_path / "ckpt").glob("*.safetensors")))
    assert "lm_head.weight" not in saved and set(saved) == set(load_file(next(tied.glob("*.safetensors"))))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, saved["model.embed_tokens.weight"])
    learner.load(tmp_path / "ckpt")  # the optimizer state and weights read back
