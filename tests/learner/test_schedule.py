"""Learning-rate schedule with warmup (flash_rc/learner/schedule.py)."""

import math
from itertools import pairwise

import pytest
import torch

from flash_rc.learner.schedule import lr_multiplier, make_lr_scheduler, resolve_warmup_steps


def multipliers(steps, **kwargs):
    return [lr_multiplier(step, **kwargs) for step in steps]


def test_constant_with_warmup_hand_worked():
    # Warmup 2 of 10: λ = 0/2, 1/2, then 1 for good (also past the end).
    assert multipliers(range(6), total_steps=10, warmup_steps=2) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_multiplier(12, total_steps=10, warmup_steps=2) == 1.0
    # No warmup: 1 from the first step (the max(1, W) keeps 0/0 away).
    assert lr_multiplier(0, total_steps=10, warmup_steps=0) == 1.0


def test_cosine_with_warmup_hand_worked():
    # Warmup 2 of 10, p = (s − 2)/8: s=2 → cos 0 → 1; s=4 → ½(1 + cos π/4) = 0.85355; s=6 → ½(1 + cos π/2) = ½;
    # s=10 → ½(1 + cos π) = 0 = min_lr_ratio.
    values = multipliers([0, 1, 2, 4, 6, 10], total_steps=10, warmup_steps=2, lr_scheduler_type="cosine")
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.5 * (1 + math.sqrt(0.5)), 0.5, 0.0], abs=1e-12)


def test_cosine_min_lr_ratio_and_cycles():
    cosine = {"total_steps": 10, "warmup_steps": 2, "lr_scheduler_type": "cosine", "min_lr_ratio": 0.1}
    # λ = 0.1 + 0.9 · ½(1 + cos πp): s=6 → 0.1 + 0.45 = 0.55; the end value is min_lr_ratio.
    assert lr_multiplier(6, **cosine) == pytest.approx(0.55)
    assert lr_multiplier(10, **cosine) == pytest.approx(0.1)
    # One full cycle: down to the floor at mid-way (s=6), back up to 1 at the end.
    assert lr_multiplier(6, **cosine, num_cycles=1.0) == pytest.approx(0.1)
    assert lr_multiplier(10, **cosine, num_cycles=1.0) == pytest.approx(1.0)


def test_one_indexed_steps_shift_the_cosine_schedule_only():
    cosine = {"total_steps": 10, "warmup_steps": 2, "lr_scheduler_type": "cosine"}
    # zero_indexed_step=False evaluates the schedule at s + 1: step 0 is half-way through warmup, step 9 is the end.
    assert lr_multiplier(0, **cosine, zero_indexed_step=False) == 0.5
    assert lr_multiplier(9, **cosine, zero_indexed_step=False) == pytest.approx(0.0, abs=1e-12)
    # verl's constant schedule ignores the flag.
    assert lr_multiplier(0, total_steps=10, warmup_steps=2, zero_indexed_step=False) == 0.0


def test_make_lr_scheduler_drives_the_optimizer_lr():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = make_lr_scheduler(optimizer, total_steps=10, warmup_steps=2, lr_scheduler_type="cosine",
                                  min_lr_ratio=0.1)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # 0.1 · (0, ½, 1, ..., 0.55 at step 6, ..., 0.1 at step 10)
    assert lrs[:3] == pytest.approx([0.0, 0.05, 0.1])
    assert lrs[6] == pytest.approx(0.055) and lrs[10] == pytest.approx(0.01)
    assert all(a >= b for a, b in pairwise(lrs[2:]))  # non-increasing after warmup


@pytest.mark.parametrize(
    "lr_warmup_steps, ratio, total_steps, expected",
    [
        (5, 0.5, 100, 5),  # explicit steps win over the ratio
        (-1, 0.1, 95, 9),  # verl's default −1 defers to the ratio: int(9.5) = 9
        (None, 0.1, 95, 9),
        (0, 0.0, 100, 0),
    ],
)
def test_resolve_warmup_steps(lr_warmup_steps, ratio, total_steps, expected):
    assert resolve_warmup_steps(lr_warmup_steps, ratio, total_steps) == expected


def test_bad_arguments_raise_naming_the_value():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"lr_scheduler_type must be one of \('constant', 'cosine'\), got 'linear'"):
        make_lr_scheduler(optimizer, total_steps=10, warmup_steps=0, lr_scheduler_type="linear")
    with pytest.raises(ValueError, match="min_lr_ratio must be in \\[0, 1\\], got 1.5"):
        make_lr_scheduler(optimizer, total_steps=10, warmup_steps=0, lr_scheduler_type="cosine", min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="total_steps must be >= 1, got -1"):
        lr_multiplier(0, total_steps=-1, warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -2"):
        lr_multiplier(0, total_steps=10, warmup_steps=-2)
    with pytest.raises(ValueError, match="lr_warmup_steps_ratio must be in \\[0, 1\\], got 1.5"):
        resolve_warmup_steps(-1, 1.5, 10)
