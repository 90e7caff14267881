"""Rollout side: the vLLM engine wrapper, weight formats and quantizers, the weight-sync hook."""
