"""Training backends: ``local`` (single-node loop) and ``verl`` (hooks for verl 0.9.1)."""
