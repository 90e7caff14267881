"""Where a kernel runs: the one `backend="auto" | "triton" | "torch"` rule shared by every kernel in this package.

Why one place: the rule has a trap. `@triton.jit` builds compiled or interpreted kernels once, when the kernel module
is imported, from `TRITON_INTERPRET`; a CPU tensor can only go through interpreted kernels. `INTERPRET` is read here
through Triton's own knob at import time (this module is imported by every kernel module), so it always agrees with
how the kernels were built -- setting the variable later cannot make a compiled kernel accept CPU tensors. Tests that
switch the interpreter on reload this module with the kernel modules (tests/kernels/conftest.py).
"""

import torch
import triton

BACKENDS = ("auto", "triton", "torch")

INTERPRET: bool = triton.knobs.runtime.interpret
"""Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when they were imported)."""


def use_triton(tensor: torch.Tensor, backend: str, what: str) -> bool:
    """Whether to run the Triton kernel for an input living where `tensor` lives.

    "auto": Triton on CUDA tensors, the torch reference anywhere else (also under the interpreter: it is a test
    tool, far slower than the reference). "torch": never. "triton": always; a CPU tensor then needs the interpreter,
    else ValueError naming `what` (the input checked, e.g. "fused_tis_loss: log_prob").
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return tensor.is_cuda
    if backend == "triton" and not tensor.is_cuda and not INTERPRET:
        raise ValueError(f"{what} is on {tensor.device}, but the Triton kernel needs CUDA tensors; "
                         "use backend='torch' or set TRITON_INTERPRET=1 before importing flash_rc.kernels")  # fmt: skip
    return backend == "triton"
