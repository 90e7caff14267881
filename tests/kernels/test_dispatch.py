"""The backend rule every kernel shares (kernels/dispatch.py), on the helper itself and through each public kernel."""

import re

import pytest
import torch

from flash_rc.algo.losses import PolicyLossInputs
from flash_rc.kernels import dispatch, fused_linear_logprob, fused_tis_loss, quantize_fp8, quantize_int8_per_channel
from flash_rc.kernels.dispatch import use_triton


def test_cpu_tensors_take_triton_only_when_asked_and_interpreted(monkeypatch):
    cpu = torch.zeros(2)
    for interpret in (True, False):
        monkeypatch.setattr(dispatch, "INTERPRET", interpret)
        assert not use_triton(cpu, "auto", "x")  # "auto" means the reference off CUDA, interpreter or not
        assert not use_triton(cpu, "torch", "x")
    monkeypatch.setattr(dispatch, "INTERPRET", True)
    assert use_triton(cpu, "triton", "x")
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    with pytest.raises(ValueError, match="f: hidden is on cpu, but the Triton kernel needs CUDA tensors"):
        use_triton(cpu, "triton", "f: hidden")


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None])
def test_unknown_backends_are_rejected(backend):
    with pytest.raises(ValueError, match=re.escape(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")):
        use_triton(torch.zeros(2), backend, "x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_take_triton_unless_told_otherwise():
    cuda = torch.zeros(2, device="cuda")
    assert use_triton(cuda, "auto", "x") and use_triton(cuda, "triton", "x") and not use_triton(cuda, "torch", "x")


def tis_loss(backend):
    values = torch.zeros(2, 3)
    return fused_tis_loss(PolicyLossInputs(values, values, values, values, torch.ones(2, 3, dtype=torch.bool)),
                          backend=backend)  # fmt: skip


KERNELS = {  # each public kernel on small CPU inputs, and the name its device error must give
    "quantize_int8_per_channel: q_proj": lambda backend: quantize_int8_per_channel(
        torch.randn(4, 8), name="q_proj", backend=backend),
    "quantize_fp8: q_proj": lambda backend: quantize_fp8(torch.randn(4, 8), "channel", name="q_proj", backend=backend),
    "fused_tis_loss: log_prob": tis_loss,
    "fused_linear_logprob: hidden": lambda backend: fused_linear_logprob(
        torch.randn(4, 8), torch.randn(16, 8), torch.zeros(4, dtype=torch.long), backend=backend),
}


@pytest.mark.parametrize("what", list(KERNELS))
def test_every_kernel_follows_the_rule(monkeypatch, what):
    kernel = KERNELS[what]
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch', got 'cuda'"):
        kernel("cuda")
    monkeypatch.setattr(dispatch, "INTERPRET", False)  # as if the kernels had been built without the interpreter
    with pytest.raises(ValueError, match=f"^{re.escape(what)} is on cpu, but the Triton kernel needs CUDA tensors"):
        kernel("triton")
    kernel("auto")  # the torch reference: no interpreter needed on CPU
