"""PPO-clip × rollout-IS policy loss and verl's loss aggregation, in plain torch.

Why this exists. This is the reference math of the learner's policy loss: the Triton kernel in
`flash_rc.kernels.tis_loss` must reproduce `tis_policy_loss` (value, gradient and every metric), and CPU runs use it
directly. Semantics follow verl 0.9.1 `compute_policy_loss_vanilla` + `agg_loss`, so a flash_rc run is comparable
with a stock verl run using the same knobs.

Per valid token t (A = advantage, ε_low/ε_high = clip_ratio_low/high, c = clip_ratio_c > 1, w = rollout IS weight):

    r_t      = exp(clamp(log π_θ(y_t) − log π_old(y_t), −20, 20))
    ℓ_clip   = max(−A r_t, −A clip(r_t, 1 − ε_low, 1 + ε_high))        (asymmetric: DAPO clip-higher uses 0.2/0.28)
    ℓ_t      = min(ℓ_clip, −A c)   if A < 0   else ℓ_clip             (dual clip, Ye et al. 2019)
    ℓ_t^TIS  = w_t · ℓ_t            w_t = stopgrad(min(ρ_t, C)) etc.  (see flash_rc.algo.rollout_correction)

Aggregation over a padded [B, T] micro-batch with mask m (n_b = Σ_t m_bt; D = dp_size):

    token-mean               L = D · Σ_bt m ℓ / N_tok        N_tok = batch_num_tokens (global) or Σ m (local)
    token-sum                L = D · Σ_bt m ℓ
    seq-mean-token-sum       L = D · Σ_b (Σ_t m ℓ) / G        G = global_batch_size or #rows with n_b > 0
    seq-mean-token-mean      L = D · Σ_b (Σ_t m ℓ)/(n_b + 1e-8) / G
    seq-mean-token-sum-norm  L = seq-mean-token-sum / loss_scale_factor   (default factor: T = mask.shape[-1])

With data parallelism each rank sees a micro-batch but the optimiser wants the global mean; FSDP averages gradients
over ranks, so each rank scales by D and divides by the *global* count. As in verl, D > 1 without the global count is
an error.
Differences from verl: empty / fully masked batches give 0 instead of 0/0, and tokens with a NaN/inf input are dropped
(treated as masked) instead of poisoning the loss; `rollout_corr/nonfinite_token_fraction` reports how many.
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from pydantic import Field

from flash_rc.algo.diagnostics import is_weight_metrics, mismatch_metrics, ppo_clip_metrics
from flash_rc.algo.rollout_correction import SAFETY_BOUND, RolloutCorrectionConfig, rollout_is_weights
from flash_rc.schema import FrozenSection

LossAggMode = Literal[
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class PolicyLossConfig(FrozenSection):
    """PPO clip knobs, named as verl's `actor_rollout_ref.actor.*` keys (the learner's actor section extends it)."""

    clip_ratio_low: float = Field(0.2, ge=0, lt=1)
    """ε_low: r is clipped from below at 1 − ε_low (only matters for A < 0). In [0, 1)."""

    clip_ratio_high: float = Field(0.2, ge=0)
    """ε_high: r is clipped from above at 1 + ε_high (only matters for A > 0). DAPO clip-higher uses 0.28."""

    clip_ratio_c: float = Field(3.0, gt=1)
    """c > 1: dual-clip cap; for A < 0 the token loss never exceeds −A·c. verl default 3, DAPO recipes use 10."""

    loss_agg_mode: LossAggMode = "token-mean"
    """How [B, T] token losses become one scalar (see the module docstring)."""


class GlobalBatchInfo(FrozenSection):
    """Global counts for data-parallel loss scaling (verl's `config.global_batch_info`). Defaults: one rank, local
    counts."""

    dp_size: int = Field(1, ge=1)
    """Number of data-parallel ranks whose gradients FSDP averages."""

    batch_num_tokens: int | None = Field(None, gt=0)
    """Valid tokens in the global mini-batch; the token-mean denominator. Required for token-mean when dp_size > 1."""

    global_batch_size: int | None = Field(None, gt=0)
    """Sequences in the global mini-batch; the seq-mean-* denominator. Required for seq-mean-* when dp_size > 1."""

    loss_scale_factor: float | None = Field(None, gt=0)
    """Divisor of seq-mean-token-sum-norm; None uses the padded response length T (verl's default)."""

    def check(self, loss_agg_mode: str) -> None:
        """Raise if `loss_agg_mode` needs a global count that is missing under data parallelism."""
        if loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
        if self.dp_size == 1:
            return
        if loss_agg_mode == "token-mean" and self.batch_num_tokens is None:
            raise ValueError(f"loss_agg_mode='token-mean' with dp_size={self.dp_size} needs batch_num_tokens")
        if loss_agg_mode.startswith("seq-mean") and self.global_batch_size is None:
            raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size={self.dp_size} needs global_batch_size")


class TISLossOutput(NamedTuple):
    """The scalar loss (differentiable w.r.t. log_prob) and detached 0-dim metric tensors keyed like verl."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass(eq=False)
class PolicyLossInputs:
    """One padded micro-batch for the policy loss: five [B, T] tensors (B sequences, T the padded response length,
    as verl hands them to the loss). Construction validates them and names the offending tensor."""

    log_prob: torch.Tensor
    """log π_θ(y_t) under the current policy; the only tensor that receives gradient. Floating point."""
    old_log_prob: torch.Tensor
    """log π_old(y_t): the learner's no-grad recompute before the update (the PPO anchor). Floating point."""
    rollout_log_prob: torch.Tensor
    """log π_rollout(y_t) reported by the (quantized) sampler. Floating point."""
    advantages: torch.Tensor
    """A_t per token (outcome advantages broadcast over the response). Floating point."""
    response_mask: torch.Tensor
    """Nonzero on valid response tokens; bool, integer or floating, treated as binary."""

    def __post_init__(self) -> None:
        named = vars(self)
        for name, tensor in named.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        shape, device = self.log_prob.shape, self.log_prob.device
        if len(shape) != 2:
            raise ValueError(f"log_prob must be a padded [batch, response_length] tensor, got shape {tuple(shape)}")
        for name, tensor in named.items():
            if tensor.shape != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} like log_prob")
            if tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but log_prob is on {device}")
            if name != "response_mask" and tensor.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name} must be float32/bfloat16/float16/float64, got {tensor.dtype}")
        if self.response_mask.dtype.is_complex:
            raise TypeError(f"response_mask must be bool, integer or floating, got {self.response_mask.dtype}")


@dataclass(eq=False)
class PPOTokenLoss:
    """Per-token PPO-clip loss and its branch flags ([B, T] each)."""

    loss: torch.Tensor
    """ℓ_t before IS weighting."""
    ppo_log_ratio: torch.Tensor
    """clamp(log π_θ − log π_old, ±20)."""
    clipped_high: torch.Tensor
    """A > 0 and r > 1 + ε_high: the clipped branch wins, no gradient."""
    clipped_low: torch.Tensor
    """A < 0 and r < 1 − ε_low: the clipped branch wins, no gradient."""
    dual_clipped: torch.Tensor
    """A < 0 and ℓ_clip > −A c: the constant dual-clip cap wins, no gradient."""


def ppo_clip_token_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, config: PolicyLossConfig
) -> PPOTokenLoss:
    """ℓ_t of the module docstring. Ties go to the unclipped branch (verl's clip fraction uses a strict >)."""
    ppo_log_ratio = torch.clamp(log_prob - old_log_prob, -SAFETY_BOUND, SAFETY_BOUND)
    ratio = torch.exp(ppo_log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    is_clipped = clipped > unclipped
    clip_loss = torch.where(is_clipped, clipped, unclipped)
    dual_cap = -advantages * config.clip_ratio_c
    dual_clipped = (advantages < 0) & (clip_loss > dual_cap)
    return PPOTokenLoss(
        loss=torch.where(dual_clipped, dual_cap, clip_loss),
        ppo_log_ratio=ppo_log_ratio,
        clipped_high=is_clipped & (advantages > 0),
        clipped_low=is_clipped & (advantages < 0),
        dual_clipped=dual_clipped,
    )


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    batch_info: GlobalBatchInfo = GlobalBatchInfo(),
) -> torch.Tensor:
    """Aggregate a [B, T] token-loss matrix into a scalar with verl's `agg_loss` semantics (module docstring).

    Values outside the mask are ignored even if NaN. An empty or fully masked batch gives exactly 0.
    """
    batch_info.check(loss_agg_mode)
    mask = loss_mask.bool()
    row_sums = torch.where(mask, loss_mat, 0.0).sum(dim=-1)
    row_tokens = mask.sum(dim=-1)
    dp_size = batch_info.dp_size
    if loss_agg_mode == "token-mean":
        num_tokens = batch_info.batch_num_tokens or row_tokens.sum().clamp_min(1)
        return row_sums.sum() / num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return row_sums.sum() * dp_size
    if loss_agg_mode == "seq-mean-token-mean":
        row_sums = row_sums / (row_tokens + 1e-8)
    num_seqs = batch_info.global_batch_size or (row_tokens > 0).sum().clamp_min(1)
    loss = row_sums.sum() / num_seqs * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (batch_info.loss_scale_factor or max(loss_mask.shape[-1], 1))
    return loss


def finite_token_mask(response_mask: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """response_mask (as bool) with every token dropped where any of `tensors` is NaN or ±inf."""
    valid = response_mask.bool()
    for tensor in tensors:
        valid = valid & torch.isfinite(tensor)
    return valid


def tis_policy_loss(
    batch: PolicyLossInputs,
    loss_config: PolicyLossConfig = PolicyLossConfig(),
    correction: RolloutCorrectionConfig = RolloutCorrectionConfig(),
    batch_info: GlobalBatchInfo = GlobalBatchInfo(),
) -> TISLossOutput:
    """PPO-clip loss × rollout IS weights, aggregated, plus every mismatch / clip diagnostic (reference path).

    Only `batch.log_prob` receives gradient (old/rollout log-probs and advantages are data). Computation and the
    returned loss are float32 (float64 inputs stay float64, for gradcheck).
    """
    batch_info.check(loss_config.loss_agg_mode)
    log_prob, response_mask = batch.log_prob, batch.response_mask
    compute_dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    old, rollout, adv = (t.detach().to(compute_dtype) for t in (batch.old_log_prob, batch.rollout_log_prob,
                                                                 batch.advantages))  # fmt: skip
    valid = finite_token_mask(response_mask, log_prob.detach(), old, rollout, adv)
    # Zero the dropped tokens so no NaN/inf reaches the arithmetic (where() keeps their gradient exactly 0).
    current = torch.where(valid, log_prob.to(compute_dtype), 0.0)
    old, rollout, adv = (torch.where(valid, t, 0.0) for t in (old, rollout, adv))

    ppo = ppo_clip_token_loss(current, old, adv, loss_config)
    is_weights = rollout_is_weights(old, rollout, valid, correction)
    loss = agg_loss(ppo.loss * is_weights.weights, valid, loss_config.loss_agg_mode, batch_info)

    masked_in = response_mask.bool().sum()
    dropped = masked_in - valid.sum()
    metrics = {
        **mismatch_metrics(old, rollout, valid),
        **is_weight_metrics(is_weights, valid, correction.threshold, correction.lower_bound),
        **ppo_clip_metrics(ppo.ppo_log_ratio, ppo.clipped_high, ppo.clipped_low, ppo.dual_clipped, valid),
        "rollout_corr/nonfinite_token_fraction": torch.where(masked_in > 0, dropped / masked_in.clamp_min(1), 0.0),
    }
    return TISLossOutput(loss, {key: value.detach().float() for key, value in metrics.items()})
