"""Reference RL math in plain torch: PPO-clip x TIS losses, rollout correction, mismatch diagnostics, GRPO/DAPO
advantages. The Triton kernels in ``flash_rc.kernels`` are tested against these."""
