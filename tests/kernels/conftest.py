"""Kernel tests: the Triton path runs on the GPU when there is one, else on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before anything imports triton: ``@triton.jit`` decides between
compiled and interpreted kernels when a kernel module is imported, and a later reload does not switch Triton's own
helpers over)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the Triton path runs: the GPU when there is one, else the CPU under the interpreter."""
    return DEVICE
