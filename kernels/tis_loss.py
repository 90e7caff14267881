"""Fused PPO-clip × rollout-IS loss: one Triton pass for loss, d loss / d log_prob and every mismatch diagnostic.

Why this exists. The TIS-corrected policy loss is elementwise, so its cost is pure memory traffic. Eager PyTorch spends
dozens of kernels on it (ratio, clamp, exp, clip, dual clip, IS weight, masked sums, a dozen metric reductions), each a
full read/write over [tokens]; this module reads log_prob, old_log_prob, rollout_log_prob, advantages and the mask once
and writes one float32 per token. The math is `flash_rc.algo.losses.tis_policy_loss` (read its docstring); this file is
only about *how* it is computed.

Layout. verl hands the loss padded [B, T] response tensors (rows = sequences, right padding, response_mask marks valid
tokens), and sequence-level IS and the seq-mean-* aggregations need per-row reductions. So the grid is one program per
row, looping over the row in BLOCK-sized chunks:

    _tis_fwd_kernel       grid (B,). Sequence / geometric IS first sweeps the row for Σ log ρ and the token count;
                          the main sweep re-reads the row from L2 while rows in flight × 17 B × T fit (256 rows of
                          8k tokens ≈ 36 MB on an H100's 50 MB), else from HBM. The main sweep computes per
                          token ℓ_t·w_t and the *unscaled* gradient g_t = ∂(ℓ_t w_t)/∂log_prob_t (stored, float32),
                          and accumulates 19 per-row partial sums (token counts, loss sum, Σδ, k3, ρ², w, w², min/max
                          w, fraction counts, clip counts, ppo_kl, Σ old, Σ rollout) into a [B, 19] float32 buffer.
    _tis_finalize_kernel  one program reduces the [B, 19] partials into the loss, the aggregation scale s and the
                          metrics (deterministic: no atomics).
    _tis_bwd_kernel       grid (B, T/BLOCK): d loss / d log_prob = g · grad_output · s (· 1/(n_b + 1e-8) per row for
                          seq-mean-token-mean). The scale depends on global counts and on grad_output, which are only
                          known after the forward, hence the 8 bytes/token second touch instead of writing the final
                          gradient in the forward.

Bytes per token (float32 log-probs/advantages, bool mask): forward reads 4·4 + 1 = 17 and writes 4; backward reads 4
and writes 4: 29 in total against a floor of 21 (read the inputs once, write the gradient once). Nothing syncs with the
host; the metrics come back as 0-dim device tensors.

Non-finite inputs: tokens where any input is NaN/±inf are dropped exactly like in the reference (zero loss, zero
gradient, excluded from the means), and counted in `rollout_corr/nonfinite_token_fraction`.
"""

from typing import Literal

import torch
import triton
import triton.language as tl

from flash_rc.algo.losses import (
    LOSS_AGG_MODES,
    GlobalBatchInfo,
    PolicyLossConfig,
    PolicyLossInputs,
    TISLossOutput,
    tis_policy_loss,
)
from flash_rc.algo.rollout_correction import SAFETY_BOUND, RolloutCorrectionConfig
from flash_rc.kernels.dispatch import INTERPRET, use_triton

# Same keys as tis_policy_loss, in the order of the metrics tensor _tis_finalize_kernel fills (the kernel stores each
# metric at the index of its key here: see _slot below).
METRIC_KEYS: tuple[str, ...] = (
    "rollout_corr/kl",
    "rollout_corr/k3_kl",
    "rollout_corr/training_log_ppl",
    "rollout_corr/training_ppl",
    "rollout_corr/rollout_log_ppl",
    "rollout_corr/rollout_ppl",
    "rollout_corr/log_ppl_diff",
    "rollout_corr/log_ppl_abs_diff",
    "rollout_corr/log_ppl_diff_max",
    "rollout_corr/log_ppl_diff_min",
    "rollout_corr/ppl_ratio",
    "rollout_corr/chi2_token",
    "rollout_corr/chi2_seq",
    "rollout_corr/rollout_is_mean",
    "rollout_corr/rollout_is_std",
    "rollout_corr/rollout_is_min",
    "rollout_corr/rollout_is_max",
    "rollout_corr/rollout_is_eff_sample_size",
    "rollout_corr/rollout_is_ratio_fraction_high",
    "rollout_corr/rollout_is_ratio_fraction_low",
    "rollout_corr/rollout_is_oob_ratio",
    "rollout_corr/nonfinite_token_fraction",
    "actor/ppo_kl",
    "actor/pg_clipfrac",
    "actor/pg_clipfrac_high",
    "actor/pg_clipfrac_low",
    "actor/pg_clipfrac_dual",
)


def _slot(key: str) -> tl.constexpr:
    """Where _tis_finalize_kernel stores metric `key`: its index in METRIC_KEYS, as a compile-time constant (a Triton
    kernel may read only constexpr globals). Deriving every index from the names means reordering METRIC_KEYS cannot
    mislabel a metric, and a misspelled key fails at import."""
    return tl.constexpr(METRIC_KEYS.index(key))


_M_KL = _slot("rollout_corr/kl")
_M_K3_KL = _slot("rollout_corr/k3_kl")
_M_TRAINING_LOG_PPL = _slot("rollout_corr/training_log_ppl")
_M_TRAINING_PPL = _slot("rollout_corr/training_ppl")
_M_ROLLOUT_LOG_PPL = _slot("rollout_corr/rollout_log_ppl")
_M_ROLLOUT_PPL = _slot("rollout_corr/rollout_ppl")
_M_LOG_PPL_DIFF = _slot("rollout_corr/log_ppl_diff")
_M_LOG_PPL_ABS_DIFF = _slot("rollout_corr/log_ppl_abs_diff")
_M_LOG_PPL_DIFF_MAX = _slot("rollout_corr/log_ppl_diff_max")
_M_LOG_PPL_DIFF_MIN = _slot("rollout_corr/log_ppl_diff_min")
_M_PPL_RATIO = _slot("rollout_corr/ppl_ratio")
_M_CHI2_TOKEN = _slot("rollout_corr/chi2_token")
_M_CHI2_SEQ = _slot("rollout_corr/chi2_seq")
_M_IS_MEAN = _slot("rollout_corr/rollout_is_mean")
_M_IS_STD = _slot("rollout_corr/rollout_is_std")
_M_IS_MIN = _slot("rollout_corr/rollout_is_min")
_M_IS_MAX = _slot("rollout_corr/rollout_is_max")
_M_IS_ESS = _slot("rollout_corr/rollout_is_eff_sample_size")
_M_IS_FRACTION_HIGH = _slot("rollout_corr/rollout_is_ratio_fraction_high")
_M_IS_FRACTION_LOW = _slot("rollout_corr/rollout_is_ratio_fraction_low")
_M_IS_OOB = _slot("rollout_corr/rollout_is_oob_ratio")
_M_NONFINITE = _slot("rollout_corr/nonfinite_token_fraction")
_M_PPO_KL = _slot("actor/ppo_kl")
_M_CLIPFRAC = _slot("actor/pg_clipfrac")
_M_CLIPFRAC_HIGH = _slot("actor/pg_clipfrac_high")
_M_CLIPFRAC_LOW = _slot("actor/pg_clipfrac_low")
_M_CLIPFRAC_DUAL = _slot("actor/pg_clipfrac_dual")

# Column layout of the per-row partial sums.
_N_MASK = tl.constexpr(0)  # tokens with mask != 0
_N_VALID = tl.constexpr(1)  # ... and every input finite
_LOSS = tl.constexpr(2)  # Σ ℓ_t w_t
_DELTA = tl.constexpr(3)  # Σ δ_t, δ = old − rollout
_OLD = tl.constexpr(4)  # Σ old_log_prob
_ROLLOUT = tl.constexpr(5)  # Σ rollout_log_prob
_K3 = tl.constexpr(6)  # Σ e^δ̄ − δ̄ − 1
_RHO2 = tl.constexpr(7)  # Σ e^{2δ̄}
_W = tl.constexpr(8)  # Σ w
_W2 = tl.constexpr(9)  # Σ w²
_W_MIN = tl.constexpr(10)
_W_MAX = tl.constexpr(11)
_HIGH = tl.constexpr(12)  # #ρ > C
_LOW = tl.constexpr(13)  # #ρ < lo
_OOB = tl.constexpr(14)  # #zeroed by mask mode
_CLIP_HIGH = tl.constexpr(15)
_CLIP_LOW = tl.constexpr(16)
_CLIP_DUAL = tl.constexpr(17)
_PPO_KL = tl.constexpr(18)  # Σ −clamp(log_prob − old)
NUM_ROW_STATS = 19
_NUM_STATS = tl.constexpr(NUM_ROW_STATS)
_BOUND = tl.constexpr(SAFETY_BOUND)

_IS_LEVEL_CODES = {None: 0, "token": 1, "sequence": 2, "geometric": 3}
# token-mean 0, token-sum 1, seq-mean-token-sum 2, seq-mean-token-mean 3, seq-mean-token-sum-norm 4
_AGG_CODES = {mode: code for code, mode in enumerate(LOSS_AGG_MODES)}


@triton.jit
def _load_tokens(lp_ptr, old_ptr, roll_ptr, adv_ptr, mask_ptr, row, offs, T, s_lp, s_old, s_roll, s_adv, s_mask):
    """Load one chunk of a row; returns (masked_in, valid, log_prob, old, rollout, advantage), the last four float32
    and zeroed wherever `valid` is False (valid = masked in and all four inputs finite)."""
    in_row = offs < T
    masked_in = (tl.load(mask_ptr + row * s_mask + offs, mask=in_row, other=0) != 0) & in_row
    lp = tl.load(lp_ptr + row * s_lp + offs, mask=in_row, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + row * s_old + offs, mask=in_row, other=0.0).to(tl.float32)
    roll = tl.load(roll_ptr + row * s_roll + offs, mask=in_row, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + row * s_adv + offs, mask=in_row, other=0.0).to(tl.float32)
    inf = float("inf")
    valid = masked_in & (tl.abs(lp) < inf) & (tl.abs(old) < inf) & (tl.abs(roll) < inf) & (tl.abs(adv) < inf)
    return (
        masked_in,
        valid,
        tl.where(valid, lp, 0.0),
        tl.where(valid, old, 0.0),
        tl.where(valid, roll, 0.0),
        tl.where(valid, adv, 0.0),
    )


@triton.jit
def _clamp_bound(x):
    return tl.minimum(tl.maximum(x, -_BOUND), _BOUND)


@triton.jit
def _tis_fwd_kernel(
    lp_ptr, old_ptr, roll_ptr, adv_ptr, mask_ptr, grad_ptr, stats_ptr,
    T, s_lp, s_old, s_roll, s_adv, s_mask,
    clip_low, clip_high, clip_c, threshold, lower_bound,
    IS_LEVEL: tl.constexpr, IS_MASK: tl.constexpr, STORE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros((), tl.float32)

    # Sequence / geometric IS: the row-level log-ratio must be known before any weight (first sweep).
    row_log_ratio = zero
    if IS_LEVEL >= 2:
        row_tokens = zero
        for t0 in range(0, T, BLOCK):
            _, valid, _, old, roll, _ = _load_tokens(
                lp_ptr, old_ptr, roll_ptr, adv_ptr, mask_ptr, row, t0 + lanes, T, s_lp, s_old, s_roll, s_adv, s_mask
            )
            row_log_ratio += tl.sum(old - roll)
            row_tokens += tl.sum(valid.to(tl.float32))
        if IS_LEVEL == 3:
            row_log_ratio = row_log_ratio / tl.maximum(row_tokens, 1.0)
    row_rho = tl.exp(_clamp_bound(row_log_ratio))

    n_mask, n_valid, loss_sum, delta_sum, old_sum, roll_sum = zero, zero, zero, zero, zero, zero
    k3_sum, rho2_sum, w_sum, w2_sum, n_high, n_low, n_oob = zero, zero, zero, zero, zero, zero, zero
    n_clip_high, n_clip_low, n_dual, ppo_kl_sum = zero, zero, zero, zero
    w_min = zero + float("inf")
    w_max = zero - float("inf")
    for t0 in range(0, T, BLOCK):
        offs = t0 + lanes
        masked_in, valid, lp, old, roll, adv = _load_tokens(
            lp_ptr, old_ptr, roll_ptr, adv_ptr, mask_ptr, row, offs, T, s_lp, s_old, s_roll, s_adv, s_mask
        )
        # Rollout importance weight w (detached: it never enters the gradient below).
        delta = old - roll
        delta_c = _clamp_bound(delta)
        rho_token = tl.exp(delta_c)
        rho = rho_token
        if IS_LEVEL >= 2:
            rho = tl.zeros_like(rho_token) + row_rho
        if IS_LEVEL == 0:
            weight = tl.where(valid, 1.0, 0.0)
            out_of_bounds = tl.zeros_like(valid)
        elif IS_MASK:
            inside = (rho >= lower_bound) & (rho <= threshold)
            weight = tl.where(valid & inside, rho, 0.0)
            out_of_bounds = valid & ~inside
        else:
            weight = tl.where(valid, tl.minimum(rho, threshold), 0.0)
            out_of_bounds = tl.zeros_like(valid)

        # PPO clip + dual clip; ties go to the unclipped branch like the reference.
        ppo_log_ratio = lp - old
        ppo_log_ratio_c = _clamp_bound(ppo_log_ratio)
        ratio = tl.exp(ppo_log_ratio_c)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        is_clipped = clipped > unclipped
        clip_loss = tl.where(is_clipped, clipped, unclipped)
        dual_cap = -adv * clip_c
        dual = (adv < 0) & (clip_loss > dual_cap)
        token_loss = tl.where(dual, dual_cap, clip_loss) * weight

        if STORE_GRAD:
            # ∂(ℓ w)/∂log_prob = −A r w on the unclipped branch inside the ±20 clamp, else 0.
            live = valid & ~is_clipped & ~dual & (ppo_log_ratio >= -_BOUND) & (ppo_log_ratio <= _BOUND)
            tl.store(grad_ptr + row * T + offs, tl.where(live, unclipped * weight, 0.0), mask=offs < T)

        n_mask += tl.sum(masked_in.to(tl.float32))
        n_valid += tl.sum(valid.to(tl.float32))
        loss_sum += tl.sum(token_loss)
        delta_sum += tl.sum(delta)
        old_sum += tl.sum(old)
        roll_sum += tl.sum(roll)
        k3_sum += tl.sum(tl.where(valid, rho_token - delta_c - 1.0, 0.0))
        rho2_sum += tl.sum(tl.where(valid, rho_token * rho_token, 0.0))
        w_sum += tl.sum(weight)
        w2_sum += tl.sum(weight * weight)
        w_min = tl.minimum(w_min, tl.min(tl.where(valid, weight, float("inf"))))
        w_max = tl.maximum(w_max, tl.max(tl.where(valid, weight, -float("inf"))))
        n_high += tl.sum((valid & (rho > threshold)).to(tl.float32))
        n_low += tl.sum((valid & (rho < lower_bound)).to(tl.float32))
        n_oob += tl.sum(out_of_bounds.to(tl.float32))
        n_clip_high += tl.sum((valid & is_clipped & (adv > 0)).to(tl.float32))
        n_clip_low += tl.sum((valid & is_clipped & (adv < 0)).to(tl.float32))
        n_dual += tl.sum((valid & dual).to(tl.float32))
        ppo_kl_sum += tl.sum(tl.where(valid, -ppo_log_ratio_c, 0.0))

    stats = stats_ptr + row * _NUM_STATS
    tl.store(stats + _N_MASK, n_mask)
    tl.store(stats + _N_VALID, n_valid)
    tl.store(stats + _LOSS, loss_sum)
    tl.store(stats + _DELTA, delta_sum)
    tl.store(stats + _OLD, old_sum)
    tl.store(stats + _ROLLOUT, roll_sum)
    tl.store(stats + _K3, k3_sum)
    tl.store(stats + _RHO2, rho2_sum)
    tl.store(stats + _W, w_sum)
    tl.store(stats + _W2, w2_sum)
    tl.store(stats + _W_MIN, w_min)
    tl.store(stats + _W_MAX, w_max)
    tl.store(stats + _HIGH, n_high)
    tl.store(stats + _LOW, n_low)
    tl.store(stats + _OOB, n_oob)
    tl.store(stats + _CLIP_HIGH, n_clip_high)
    tl.store(stats + _CLIP_LOW, n_clip_low)
    tl.store(stats + _CLIP_DUAL, n_dual)
    tl.store(stats + _PPO_KL, ppo_kl_sum)


@triton.jit
def _column(stats_ptr, rows, in_batch, column, other):
    return tl.load(stats_ptr + rows * _NUM_STATS + column, mask=in_batch, other=other)


@triton.jit
def _tis_finalize_kernel(
    stats_ptr, loss_ptr, scale_ptr, metrics_ptr,
    B, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor,
    AGG_MODE: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    lanes = tl.arange(0, BLOCK_B)
    zero = tl.zeros((), tl.float32)
    n_mask, n_valid, n_rows, loss_sum, row_mean_loss_sum = zero, zero, zero, zero, zero
    delta_sum, k3_sum, rho2_sum, w_sum, w2_sum = zero, zero, zero, zero, zero
    n_high, n_low, n_oob, n_clip_high, n_clip_low, n_dual, ppo_kl_sum = zero, zero, zero, zero, zero, zero, zero
    train_lp, train_ppl, roll_lp, roll_ppl, diff_sum, abs_diff_sum, ppl_ratio, chi2_seq = (
        zero, zero, zero, zero, zero, zero, zero, zero
    )  # fmt: skip
    w_min = zero + float("inf")
    w_max = zero - float("inf")
    diff_min = zero + float("inf")
    diff_max = zero - float("inf")
    for b0 in range(0, B, BLOCK_B):
        rows = (b0 + lanes).to(tl.int64)
        in_batch = rows < B
        row_valid = _column(stats_ptr, rows, in_batch, _N_VALID, 0.0)
        row_loss = _column(stats_ptr, rows, in_batch, _LOSS, 0.0)
        row_delta = _column(stats_ptr, rows, in_batch, _DELTA, 0.0)
        has_tokens = row_valid > 0
        inv_tokens = 1.0 / tl.maximum(row_valid, 1.0)
        n_mask += tl.sum(_column(stats_ptr, rows, in_batch, _N_MASK, 0.0))
        n_valid += tl.sum(row_valid)
        n_rows += tl.sum(has_tokens.to(tl.float32))
        loss_sum += tl.sum(row_loss)
        row_mean_loss_sum += tl.sum(row_loss / (row_valid + 1e-8))
        delta_sum += tl.sum(row_delta)
        k3_sum += tl.sum(_column(stats_ptr, rows, in_batch, _K3, 0.0))
        rho2_sum += tl.sum(_column(stats_ptr, rows, in_batch, _RHO2, 0.0))
        w_sum += tl.sum(_column(stats_ptr, rows, in_batch, _W, 0.0))
        w2_sum += tl.sum(_column(stats_ptr, rows, in_batch, _W2, 0.0))
        w_min = tl.minimum(w_min, tl.min(_column(stats_ptr, rows, in_batch, _W_MIN, float("inf"))))
        w_max = tl.maximum(w_max, tl.max(_column(stats_ptr, rows, in_batch, _W_MAX, -float("inf"))))
        n_high += tl.sum(_column(stats_ptr, rows, in_batch, _HIGH, 0.0))
        n_low += tl.sum(_column(stats_ptr, rows, in_batch, _LOW, 0.0))
        n_oob += tl.sum(_column(stats_ptr, rows, in_batch, _OOB, 0.0))
        n_clip_high += tl.sum(_column(stats_ptr, rows, in_batch, _CLIP_HIGH, 0.0))
        n_clip_low += tl.sum(_column(stats_ptr, rows, in_batch, _CLIP_LOW, 0.0))
        n_dual += tl.sum(_column(stats_ptr, rows, in_batch, _CLIP_DUAL, 0.0))
        ppo_kl_sum += tl.sum(_column(stats_ptr, rows, in_batch, _PPO_KL, 0.0))
        # Per-sequence diagnostics (rows without valid tokens are left out).
        row_train_lp = -_column(stats_ptr, rows, in_batch, _OLD, 0.0) * inv_tokens
        row_roll_lp = -_column(stats_ptr, rows, in_batch, _ROLLOUT, 0.0) * inv_tokens
        row_diff = -row_delta * inv_tokens
        train_lp += tl.sum(tl.where(has_tokens, row_train_lp, 0.0))
        train_ppl += tl.sum(tl.where(has_tokens, tl.exp(_clamp_bound(row_train_lp)), 0.0))
        roll_lp += tl.sum(tl.where(has_tokens, row_roll_lp, 0.0))
        roll_ppl += tl.sum(tl.where(has_tokens, tl.exp(_clamp_bound(row_roll_lp)), 0.0))
        diff_sum += tl.sum(tl.where(has_tokens, row_diff, 0.0))
        abs_diff_sum += tl.sum(tl.where(has_tokens, tl.abs(row_diff), 0.0))
        diff_min = tl.minimum(diff_min, tl.min(tl.where(has_tokens, row_diff, float("inf"))))
        diff_max = tl.maximum(diff_max, tl.max(tl.where(has_tokens, row_diff, -float("inf"))))
        ppl_ratio += tl.sum(tl.where(has_tokens, tl.exp(_clamp_bound(row_diff)), 0.0))
        chi2_seq += tl.sum(tl.where(has_tokens, tl.exp(2.0 * _clamp_bound(row_delta)), 0.0))

    # Loss = aggregated Σ ℓ w; the same scale s multiplies the stored per-token gradients in the backward.
    if AGG_MODE == 0:
        scale = dp_size / tl.where(batch_num_tokens > 0, batch_num_tokens, tl.maximum(n_valid, 1.0))
    elif AGG_MODE == 1:
        scale = zero + dp_size
    else:
        scale = dp_size / tl.where(global_batch_size > 0, global_batch_size, tl.maximum(n_rows, 1.0))
        if AGG_MODE == 4:
            scale = scale / loss_scale_factor
    if AGG_MODE == 3:
        loss = row_mean_loss_sum * scale
    else:
        loss = loss_sum * scale
    tl.store(loss_ptr, loss)
    tl.store(scale_ptr, scale)

    has_token = n_valid > 0
    has_row = n_rows > 0
    tokens = tl.maximum(n_valid, 1.0)
    seqs = tl.maximum(n_rows, 1.0)
    w_mean = w_sum / tokens
    ess = tl.where(w2_sum > 0, w_sum * w_sum / tl.maximum(n_valid * w2_sum, 1e-30), 0.0)
    clip_high = n_clip_high / tokens
    clip_low = n_clip_low / tokens
    tl.store(metrics_ptr + _M_KL, -delta_sum / tokens)
    tl.store(metrics_ptr + _M_K3_KL, k3_sum / tokens)
    tl.store(metrics_ptr + _M_TRAINING_LOG_PPL, train_lp / seqs)
    tl.store(metrics_ptr + _M_TRAINING_PPL, train_ppl / seqs)
    tl.store(metrics_ptr + _M_ROLLOUT_LOG_PPL, roll_lp / seqs)
    tl.store(metrics_ptr + _M_ROLLOUT_PPL, roll_ppl / seqs)
    tl.store(metrics_ptr + _M_LOG_PPL_DIFF, diff_sum / seqs)
    tl.store(metrics_ptr + _M_LOG_PPL_ABS_DIFF, abs_diff_sum / seqs)
    tl.store(metrics_ptr + _M_LOG_PPL_DIFF_MAX, tl.where(has_row, diff_max, 0.0))
    tl.store(metrics_ptr + _M_LOG_PPL_DIFF_MIN, tl.where(has_row, diff_min, 0.0))
    tl.store(metrics_ptr + _M_PPL_RATIO, ppl_ratio / seqs)
    tl.store(metrics_ptr + _M_CHI2_TOKEN, tl.where(has_token, rho2_sum / tokens - 1.0, 0.0))
    tl.store(metrics_ptr + _M_CHI2_SEQ, tl.where(has_row, chi2_seq / seqs - 1.0, 0.0))
    tl.store(metrics_ptr + _M_IS_MEAN, w_mean)
    tl.store(metrics_ptr + _M_IS_STD, tl.sqrt(tl.maximum(w2_sum / tokens - w_mean * w_mean, 0.0)))
    tl.store(metrics_ptr + _M_IS_MIN, tl.where(has_token, w_min, 0.0))
    tl.store(metrics_ptr + _M_IS_MAX, tl.where(has_token, w_max, 0.0))
    tl.store(metrics_ptr + _M_IS_ESS, ess)
    tl.store(metrics_ptr + _M_IS_FRACTION_HIGH, n_high / tokens)
    tl.store(metrics_ptr + _M_IS_FRACTION_LOW, n_low / tokens)
    tl.store(metrics_ptr + _M_IS_OOB, n_oob / tokens)
    tl.store(metrics_ptr + _M_NONFINITE, (n_mask - n_valid) / tl.maximum(n_mask, 1.0))
    tl.store(metrics_ptr + _M_PPO_KL, ppo_kl_sum / tokens)
    tl.store(metrics_ptr + _M_CLIPFRAC, clip_high + clip_low)
    tl.store(metrics_ptr + _M_CLIPFRAC_HIGH, clip_high)
    tl.store(metrics_ptr + _M_CLIPFRAC_LOW, clip_low)
    tl.store(metrics_ptr + _M_CLIPFRAC_DUAL, n_dual / tokens)


@triton.jit
def _tis_bwd_kernel(
    grad_ptr, grad_out_ptr, scale_ptr, stats_ptr, dlp_ptr, T, ROW_MEAN: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < T
    scale = tl.load(grad_out_ptr).to(tl.float32) * tl.load(scale_ptr)
    if ROW_MEAN:
        scale = scale / (tl.load(stats_ptr + row * _NUM_STATS + _N_VALID) + 1e-8)
    grad = tl.load(grad_ptr + row * T + offs, mask=in_row, other=0.0)
    tl.store(dlp_ptr + row * T + offs, (grad * scale).to(dlp_ptr.dtype.element_ty), mask=in_row)


def _row_block(length: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of `length` tokens: big enough to keep loads in flight, small under the
    interpreter."""
    if INTERPRET:
        return min(64, max(16, triton.next_power_of_2(max(length, 1)))), 1
    block = min(2048, max(128, triton.next_power_of_2(max(length, 1))))
    return block, 8 if block >= 2048 else 4


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 or tensor.size(-1) <= 1 else tensor.contiguous()


class _FusedTISLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_prob, old_log_prob, rollout_log_prob, advantages, response_mask,
                loss_config: PolicyLossConfig, correction: RolloutCorrectionConfig,
                batch_info: GlobalBatchInfo):  # fmt: skip
        batch, length = log_prob.shape
        device = log_prob.device
        tensors = (log_prob, old_log_prob, rollout_log_prob, advantages, response_mask)
        inputs = [_last_dim_contiguous(t) for t in tensors]
        store_grad = ctx.needs_input_grad[0]
        grad = torch.empty((batch, length) if store_grad else (0,), dtype=torch.float32, device=device)
        stats = torch.empty((batch, NUM_ROW_STATS), dtype=torch.float32, device=device)
        loss = torch.empty((), dtype=torch.float32, device=device)
        scale = torch.empty((1,), dtype=torch.float32, device=device)
        metrics = torch.empty((len(METRIC_KEYS),), dtype=torch.float32, device=device)
        block, num_warps = _row_block(length)
        if batch > 0:
            _tis_fwd_kernel[(batch,)](
                *inputs, grad, stats,
                length, *(t.stride(0) for t in inputs),
                loss_config.clip_ratio_low, loss_config.clip_ratio_high, loss_config.clip_ratio_c,
                correction.threshold, correction.lower_bound,
                IS_LEVEL=_IS_LEVEL_CODES[correction.level], IS_MASK=correction.mode == "mask",
                STORE_GRAD=store_grad, BLOCK=block, num_warps=num_warps,
            )  # fmt: skip
        _tis_finalize_kernel[(1,)](
            stats, loss, scale, metrics,
            batch, float(batch_info.dp_size), float(batch_info.batch_num_tokens or 0),
            float(batch_info.global_batch_size or 0), float(batch_info.loss_scale_factor or max(length, 1)),
            AGG_MODE=_AGG_CODES[loss_config.loss_agg_mode], BLOCK_B=16 if INTERPRET else 256,
        )  # fmt: skip
        ctx.save_for_backward(grad, stats, scale)
        ctx.row_mean = loss_config.loss_agg_mode == "seq-mean-token-mean"
        ctx.grad_dtype = log_prob.dtype
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        grad, stats, scale = ctx.saved_tensors
        batch, length = grad.shape
        grad_log_prob = torch.empty((batch, length), dtype=ctx.grad_dtype, device=grad.device)
        block, num_warps = _row_block(length)
        if grad.numel() > 0:
            _tis_bwd_kernel[(batch, triton.cdiv(length, block))](
                grad, grad_loss, scale, stats, grad_log_prob, length,
                ROW_MEAN=ctx.row_mean, BLOCK=block, num_warps=num_warps,
            )  # fmt: skip
        return grad_log_prob, None, None, None, None, None, None, None


def fused_tis_loss(
    batch: PolicyLossInputs,
    loss_config: PolicyLossConfig = PolicyLossConfig(),
    correction: RolloutCorrectionConfig = RolloutCorrectionConfig(),
    batch_info: GlobalBatchInfo = GlobalBatchInfo(),
    backend: Literal["auto", "triton", "torch"] = "auto",
) -> TISLossOutput:
    """PPO-clip × rollout-IS loss over a padded [B, T] batch, with all `rollout_corr/*` and `actor/*` diagnostics.

    Same contract as `flash_rc.algo.losses.tis_policy_loss`. backend="auto" runs the Triton kernels on CUDA tensors
    and the torch reference otherwise; "triton" on CPU tensors needs TRITON_INTERPRET=1 (the test suite does that).
    """
    batch_info.check(loss_config.loss_agg_mode)
    if not use_triton(batch.log_prob, backend, "fused_tis_loss: log_prob"):
        return tis_policy_loss(batch, loss_config, correction, batch_info)
    loss, metrics = _FusedTISLoss.apply(
        batch.log_prob, batch.old_log_prob, batch.rollout_log_prob, batch.advantages, batch.response_mask,
        loss_config, correction, batch_info,
    )  # fmt: skip
    return TISLossOutput(loss, dict(zip(METRIC_KEYS, metrics.unbind(0), strict=True)))
