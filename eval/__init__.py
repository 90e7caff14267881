"""Checkpoint sweeps and reports, importable only as ``flash_rc.eval`` (not implemented yet: a later issue)."""
