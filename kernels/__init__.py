"""Triton kernels of the learner (importable only as `flash_rc.kernels`): the fused PPO-clip × TIS loss with mismatch
diagnostics, and the fused lm_head → target log-prob / entropy. Each dispatches to Triton on CUDA tensors and to its
plain-torch reference elsewhere."""

from flash_rc.kernels.linear_logprob import LinearLogProbOutput, fused_linear_logprob, linear_logprob_reference
from flash_rc.kernels.tis_loss import fused_tis_loss

__all__ = ["LinearLogProbOutput", "fused_linear_logprob", "fused_tis_loss", "linear_logprob_reference"]
