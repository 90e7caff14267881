"""The memory-bandwidth floor every benchmark here compares against: a large tensor copy, measured in the same run.

Imported by the scripts in this folder (run as ``python bench/<script>.py``, which puts this folder on sys.path).
"""

from __future__ import annotations

import time

import torch


def copy_bandwidth(device: str = "cuda", gib: float = 1.0) -> float:
    """Bytes/s of a ``gib`` GiB tensor copy on ``device``, counting the bytes read and the bytes written.

    CUDA: median of triton's ``do_bench`` (CUDA events). CPU: best of five wall-clock copies.
    """
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    if device == "cuda":
        from triton.testing import do_bench

        seconds = do_bench(lambda: target.copy_(source), warmup=25, rep=100, return_mode="median") / 1e3
    else:
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            target.copy_(source)
            timings.append(time.perf_counter() - start)
        seconds = min(timings)
    return 2 * source.numel() / seconds
