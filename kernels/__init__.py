"""Triton kernels (importable only as `flash_rc.kernels`): the learner's fused PPO-clip × TIS loss with mismatch
diagnostics and fused lm_head → target log-prob / entropy, and the rollout engine's INT8 / FP8 weight quantizers. Each
dispatches to Triton on CUDA tensors and to its plain-torch reference elsewhere (one rule for all: `dispatch.py`)."""

from flash_rc.kernels.linear_logprob import LinearLogProbOutput, fused_linear_logprob, linear_logprob_reference
from flash_rc.kernels.quant import quantize_fp8, quantize_int8_per_channel
from flash_rc.kernels.tis_loss import fused_tis_loss

__all__ = [
    "LinearLogProbOutput",
    "fused_linear_logprob",
    "fused_tis_loss",
    "linear_logprob_reference",
    "quantize_fp8",
    "quantize_int8_per_channel",
]
