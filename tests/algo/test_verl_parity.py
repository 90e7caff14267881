"""Differential check of RLOO advantages, KL estimators and learning-rate schedules against verl 0.9.1's own functions
on random inputs (needs verl: ``make test-verl``; skipped elsewhere).

Not covered: verl's warmup resolution (`lr_warmup_steps` else `ratio · total`) lives inside its FSDP engine's
`_build_lr_scheduler`, whose module needs peft, which the verl env does not have; `resolve_warmup_steps` is checked
by hand-worked values in tests/learner/test_schedule.py.
"""

import random

import numpy as np
import pytest
import torch

from flash_rc.algo.advantages import rloo_advantages
from flash_rc.algo.kl import KL_TYPES, kl_penalty
from flash_rc.learner.schedule import lr_multiplier, make_lr_scheduler

pytestmark = pytest.mark.verl
core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl 0.9.1 is not importable here: build its env with `make verl-env`, run these with `make test-verl`",
)
torch_functional = pytest.importorskip("verl.utils.torch_functional")


def random_groups(rng: random.Random):
    """Shuffled uids of groups of 1..6 members (singletons included) and rewards that are binary or real."""
    uids = [f"u{group}" for group in range(rng.randint(1, 12)) for _ in range(rng.randint(1, 6))]
    rng.shuffle(uids)
    if rng.random() < 0.5:
        scores = [float(rng.random() < 0.5) for _ in uids]
    else:
        scores = [rng.uniform(-3, 3) for _ in uids]
    return np.array(uids, dtype=object), torch.tensor(scores)


@pytest.mark.parametrize("seed", range(50))
def test_rloo_matches_verl(seed):
    uids, scores = random_groups(random.Random(seed))
    response_mask = torch.ones(len(uids), 3)
    token_level_rewards = torch.zeros(len(uids), 3)
    token_level_rewards[:, -1] = scores  # outcome reward on the last token, as verl's reward manager puts it
    ours = rloo_advantages(scores, uids)[:, None] * response_mask
    reference, _ = core_algos.compute_rloo_outcome_advantage(token_level_rewards, response_mask, uids)
    vectorized, _ = core_algos.compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, uids)
    # verl's looped RLOO leaves a singleton's raw score; ours (and verl's vectorized RLOO) gives 0 there.
    singleton = torch.tensor([list(uids).count(uid) == 1 for uid in uids])
    expected = torch.where(singleton[:, None], torch.zeros_like(reference), reference)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, vectorized)
    if singleton.any():
        torch.testing.assert_close(reference[singleton, -1], scores[singleton])


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_kl_penalty_matches_verl_value_and_gradient(kl_type):
    generator = torch.Generator().manual_seed(KL_TYPES.index(kl_type))
    # Log-probs from 0 down to about −40, so some log ratios pass the ±20 clamp and some k3 values the 10 cap.
    log_prob = -torch.rand(64, 32, generator=generator).pow(3) * 40
    ref_log_prob = -torch.rand(64, 32, generator=generator).pow(3) * 40
    ours_inputs = [log_prob.clone().requires_grad_(), ref_log_prob.clone().requires_grad_()]
    verl_inputs = [log_prob.clone().requires_grad_(), ref_log_prob.clone().requires_grad_()]
    ours = kl_penalty(*ours_inputs, kl_type)
    reference = core_algos.kl_penalty(*verl_inputs, kl_type)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    upstream = torch.randn(64, 32, generator=generator)
    (ours * upstream).sum().backward()
    (reference * upstream).sum().backward()
    for mine, theirs in zip(ours_inputs, verl_inputs, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0)


def verl_scheduler(
    optimizer, lr_scheduler_type, total_steps, warmup_steps, min_lr_ratio, num_cycles, zero_indexed_step
):
    """What verl's FSDP engine builds for these optimizer keys (its `_build_lr_scheduler`, after warmup resolution)."""
    if lr_scheduler_type == "constant":
        return torch_functional.get_constant_schedule_with_warmup(optimizer=optimizer, num_warmup_steps=warmup_steps)
    return torch_functional.get_cosine_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        min_lr_ratio=min_lr_ratio,
        num_cycles=num_cycles,
        zero_indexed_step=zero_indexed_step,
    )


@pytest.mark.parametrize("seed", range(40))
def test_lr_schedules_match_verl(seed):
    rng = random.Random(seed)
    total_steps = rng.randint(1, 60)
    knobs = {
        "lr_scheduler_type": rng.choice(["constant", "cosine"]),
        "total_steps": total_steps,
        "warmup_steps": rng.choice([0, 1, rng.randint(0, total_steps), total_steps + 3]),
        "min_lr_ratio": rng.choice([0.0, 1.0, rng.random()]),
        "num_cycles": rng.choice([0.5, 1.0, rng.uniform(0.1, 2.0)]),
        "zero_indexed_step": rng.random() < 0.7,
    }
    reference = verl_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **knobs)
    steps = range(total_steps + 10)  # past the end too: the cosine comes back up there, in verl as here
    assert [lr_multiplier(step, **knobs) for step in steps] == [reference.lr_lambdas[0](step) for step in steps]

    optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-6) for _ in range(2)]
    schedulers = [make_lr_scheduler(optimizers[0], **knobs), verl_scheduler(optimizers[1], **knobs)]
    for _ in steps:
        assert optimizers[0].param_groups[0]["lr"] == optimizers[1].param_groups[0]["lr"]
        for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
            optimizer.step()
            scheduler.step()
