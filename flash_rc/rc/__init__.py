"""Reasoning Cache: prompts, chain state, the async cycle scheduler, per-turn grading and ``flash-rc decode``."""
