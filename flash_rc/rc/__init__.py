"""Reasoning Cache: prompts, chain state, the async cycle scheduler and ``flash-rc decode``."""
