"""The single-node backend: ``flash-rc train`` (trainer), its recipe schema, rollout sources, checkpoints and
metrics."""
