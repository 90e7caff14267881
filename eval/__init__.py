"""Checkpoint sweeps on GSM8K, importable only as ``flash_rc.eval``: ``discovery`` finds flash_rc / verl / HF
checkpoints, ``sweep`` evaluates them through one rollout engine (weights streamed in, never a restart per checkpoint)
into a resumable ``gsm8k.csv`` and per-checkpoint generations, ``report`` draws ``gsm8k.png`` and ``report.html``,
``cli`` is ``flash-rc eval``."""
