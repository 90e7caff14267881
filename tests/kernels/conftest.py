"""Run the Triton kernels on this CPU-only machine through Triton's interpreter.

`@triton.jit` decides between compiled and interpreted kernels when the kernel module is imported, so TRITON_INTERPRET
must be set before `flash_rc.kernels` is first imported; if another test directory imported it earlier, the kernel
modules are reloaded here. On a CUDA machine nothing changes: the same tests run the compiled kernels on the GPU.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("flash_rc.kernels.tis_loss", "flash_rc.kernels.linear_logprob", "flash_rc.kernels.quant",
                 "flash_rc.kernels"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the Triton path runs: the GPU when there is one, else the CPU under the interpreter."""
    return DEVICE
