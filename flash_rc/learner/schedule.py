"""The learner's learning-rate schedule: linear warmup, then constant or cosine, as verl 0.9.1's FSDP actor.

Why this exists. A flash_rc run should follow the same learning-rate curve as a stock verl run with the same
`actor_rollout_ref.actor.optim` keys, so the multiplier here is verl's `get_constant_schedule_with_warmup` /
`get_cosine_schedule_with_warmup` (verl/utils/torch_functional.py) number for number, and the warmup length is
resolved as verl's FSDP engine does (`lr_warmup_steps`, else `lr_warmup_steps_ratio · total_training_steps`).

The optimizer's lr is multiplied by λ(s) at optimizer step s = 0, 1, ... (W = warmup steps, T = total steps,
m = min_lr_ratio, c = num_cycles):

    warmup (s < W):  λ = s / max(1, W)                              (so the first step runs at lr 0 when W > 0)
    "constant":      λ = 1
    "cosine":        λ = max(m, m + (1 − m) · ½ (1 + cos(2π c · p))),   p = (s − W) / max(1, T − W)

With the default c = ½ the cosine falls from 1 at s = W to m at s = T. verl counts the cosine's steps from 0 by
default; `zero_indexed_step=False` (verl's torchtitan convention) evaluates the cosine schedule at s + 1. As in verl,
the constant schedule always counts from 0.
"""

import math
from functools import partial
from typing import Literal, get_args

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LRSchedulerType = Literal["constant", "cosine"]
LR_SCHEDULER_TYPES: tuple[str, ...] = get_args(LRSchedulerType)


def resolve_warmup_steps(lr_warmup_steps: int | None, lr_warmup_steps_ratio: float, total_steps: int) -> int:
    """Warmup length from verl's keys: `lr_warmup_steps` if it is > 0, else int(lr_warmup_steps_ratio · total_steps)
    (so verl's default lr_warmup_steps = −1, or None, defers to the ratio)."""
    if not 0 <= lr_warmup_steps_ratio <= 1:
        raise ValueError(f"lr_warmup_steps_ratio must be in [0, 1], got {lr_warmup_steps_ratio}")
    if lr_warmup_steps is not None and lr_warmup_steps > 0:
        return lr_warmup_steps
    return int(lr_warmup_steps_ratio * total_steps)


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    lr_scheduler_type: LRSchedulerType = "constant",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
    zero_indexed_step: bool = True,
) -> float:
    """λ(step): the factor on the optimizer's base lr at optimizer step `step` (see the module docstring)."""
    if lr_scheduler_type not in LR_SCHEDULER_TYPES:
        raise ValueError(f"lr_scheduler_type must be one of {LR_SCHEDULER_TYPES}, got {lr_scheduler_type!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if lr_scheduler_type == "cosine" and not zero_indexed_step:
        step += 1
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if lr_scheduler_type == "constant":
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    cosine = math.cos(math.pi * float(num_cycles) * 2.0 * progress)
    coef, intercept = (1 - min_lr_ratio) * 0.5, (1 + min_lr_ratio) * 0.5  # verl's operation order: bit-equal numbers
    return max(min_lr_ratio, cosine * coef + intercept)


def make_lr_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    lr_scheduler_type: LRSchedulerType = "constant",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
    zero_indexed_step: bool = True,
) -> LambdaLR:
    """A LambdaLR applying `lr_multiplier` to every param group's lr; call `.step()` after each optimizer step.
    Bad arguments raise here (LambdaLR evaluates step 0 when it is built); resume with its state_dict."""
    multiplier = partial(
        lr_multiplier,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        lr_scheduler_type=lr_scheduler_type,
        min_lr_ratio=min_lr_ratio,
        num_cycles=num_cycles,
        zero_indexed_step=zero_indexed_step,
    )
    return LambdaLR(optimizer, multiplier)
