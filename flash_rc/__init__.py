"""flash_rc: quantized vLLM rollouts + Reasoning Cache cycles + TIS-corrected bf16 learner."""
__version__ = "0.1.0"
