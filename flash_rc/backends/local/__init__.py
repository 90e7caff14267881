"""The single-node training loop (not implemented yet: a later issue)."""
