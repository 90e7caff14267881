"""verl 0.9.1 hooks: ``worker_ext`` gives verl INT8 (W8A8) rollouts through a vLLM worker extension."""
