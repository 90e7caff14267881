"""Fused lm_head → log-prob (and entropy) of the target token, without materialising [tokens × vocab] logits.

Why this exists. The learner recomputes log π(y_t) for every response token. Done naively, logits = hidden @ W.T is a
[T, V] tensor: at T = 16,384 and Qwen's V = 151,936 that is 10 GB in float32 before log_softmax and its backward make
more copies. The log-prob needs only three numbers per token: the target logit z_y, the log-sum-exp, and (for entropy)
E_p[z]. So this module streams the vocabulary through an online log-sum-exp and keeps [T]-sized state.

With z = h W^T / τ (τ = temperature), per token:

    log π(y) = z_y − LSE(z),   LSE(z) = log Σ_v e^{z_v},   H = LSE(z) − E_p[z],  p = softmax(z)
    ∂ log π(y) / ∂z_v = 1[v = y] − p_v,          ∂H / ∂z_v = −p_v (z_v − E_p[z])
    dz = g_logp (1[v=y] − p) − g_H p (z − E_p[z]),   ∂/∂(hW^T) = dz / τ,   dh = dz_raw W,   dW = dz_raw^T h

Forward (`_lse_partial_kernel`, grid [T/BLOCK_T, S]): each program owns BLOCK_T tokens and one of S vocabulary slices;
it walks its slice in BLOCK_V tiles, computes the logits tile with `tl.dot` over H in BLOCK_H steps (bf16 operands,
float32 accumulator), and updates a running max m, Σ e^{z−m}, Σ e^{z−m} z and the target logit. The S slices
(vocabulary split for parallelism when T is small) are merged in a few [S, T] torch ops. Saved for backward: the
inputs and [T] LSE and entropy.

Backward: tokens are processed in chunks of `chunk_tokens`; `_dlogits_kernel` (grid [chunk/BLOCK_T, V/BLOCK_V])
recomputes each logits tile, turns it into dz in the input dtype, and two cuBLAS GEMMs give dh for the chunk and add
dz^T h into dW (accumulated in the weight dtype: one rounding per chunk). Peak extra memory is the [chunk, V] dz buffer
(≈2 GiB by default) instead of several [T, V] float32 tensors. The price is recomputing the logits once: 8·T·V·H FLOPs
in total against 6·T·V·H for the naive path, traded against its ≈54 bytes of HBM traffic per logit (bf16 logits,
float32 copies, log_softmax and their backward; `python bench/kernels.py --bytes`) versus 6 here (dz: one bf16 write,
two reads).

Under TRITON_INTERPRET=1 (CPU tests) tiles are upcast to float32 before `tl.dot`, because the interpreter's bf16 dot
is wrong; on GPU bf16 operands go to the tensor cores directly.
"""

from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from flash_rc.kernels.dispatch import INTERPRET, use_triton

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DZ_BUFFER_BYTES = 2 << 30  # default size of the backward's [chunk, V] buffer
_MAX_BLOCK_V = 256  # vocabulary slices are multiples of the largest BLOCK_V below


def _tile_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 128, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 128}, num_warps=8, num_stages=2),
    ]


class LinearLogProbOutput(NamedTuple):
    """Per-token float32 log π(y_t) [T] and, when requested, entropy H_t [T] of the tempered distribution."""

    log_prob: torch.Tensor
    entropy: torch.Tensor | None


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, offs_t, offs_v, t_ok, v_ok, H, stride_h, stride_w, inv_temp,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """z = h[offs_t] @ w[offs_v]^T / τ as a float32 [BLOCK_T, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h  # 64-bit: V·H exceeds 2^31 for large vocabularies
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_ok = offs_k < H
        h = tl.load(h_rows + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.autotune(configs=_tile_configs(), key=["H", "V"])
@triton.jit
def _lse_partial_kernel(
    h_ptr, w_ptr, target_ptr, partial_ptr, T, V, H, stride_h, stride_w, inv_temp, vocab_per_split, num_splits,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    target = tl.load(target_ptr + offs_t, mask=t_ok, other=-1)
    v_start = split * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, V)
    running_max = tl.full((BLOCK_T,), -float("inf"), tl.float32)
    exp_sum = tl.zeros((BLOCK_T,), tl.float32)  # Σ e^{z − running_max}
    exp_z_sum = tl.zeros((BLOCK_T,), tl.float32)  # Σ e^{z − running_max} z
    target_logit = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        z = _logits_tile(h_ptr, w_ptr, offs_t, offs_v, t_ok, v_ok, H, stride_h, stride_w, inv_temp,
                         BLOCK_T, BLOCK_V, BLOCK_H, UPCAST, PRECISION)  # fmt: skip
        # Columns past the slice have z = 0 (zero-filled weight rows); −inf keeps them out of max and Σe.
        new_max = tl.maximum(running_max, tl.max(tl.where(v_ok[None, :], z, -float("inf")), axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.where(v_ok[None, :], tl.exp(z - new_max[:, None]), 0.0)
        exp_sum = exp_sum * rescale + tl.sum(p, axis=1)
        exp_z_sum = exp_z_sum * rescale + tl.sum(p * z, axis=1)
        target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
        running_max = new_max
    # partial[k, split, t] for k = (max, Σe, Σe·z, target logit)
    out = partial_ptr + split * T + offs_t
    plane = num_splits * T
    tl.store(out, running_max, mask=t_ok)
    tl.store(out + plane, exp_sum, mask=t_ok)
    tl.store(out + 2 * plane, exp_z_sum, mask=t_ok)
    tl.store(out + 3 * plane, target_logit, mask=t_ok)


@triton.autotune(configs=_tile_configs(), key=["H", "V"])
@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, target_ptr, lse_ptr, mean_logit_ptr, grad_lp_ptr, grad_ent_ptr, dz_ptr,
    T, V, H, stride_h, stride_w, stride_dz, inv_temp,
    HAS_LP_GRAD: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    t_ok = offs_t < T
    v_ok = offs_v < V
    z = _logits_tile(h_ptr, w_ptr, offs_t, offs_v, t_ok, v_ok, H, stride_h, stride_w, inv_temp,
                     BLOCK_T, BLOCK_V, BLOCK_H, UPCAST, PRECISION)  # fmt: skip
    lse = tl.load(lse_ptr + offs_t, mask=t_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    if HAS_LP_GRAD:
        target = tl.load(target_ptr + offs_t, mask=t_ok, other=-1)
        grad_lp = tl.load(grad_lp_ptr + offs_t, mask=t_ok, other=0.0).to(tl.float32)
        dz += grad_lp[:, None] * (tl.where(offs_v[None, :] == target[:, None], 1.0, 0.0) - p)
    if HAS_ENT_GRAD:
        mean_logit = tl.load(mean_logit_ptr + offs_t, mask=t_ok, other=0.0)
        grad_ent = tl.load(grad_ent_ptr + offs_t, mask=t_ok, other=0.0).to(tl.float32)
        dz -= grad_ent[:, None] * p * (z - mean_logit[:, None])
    dz = dz * inv_temp
    tl.store(dz_ptr + offs_t.to(tl.int64)[:, None] * stride_dz + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])  # fmt: skip


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Raise a TypeError/ValueError naming the offending argument unless hidden [T, H], weight [V, H] (same float
    dtype and device) and integer targets [T] in [0, V) fit together. The range check syncs with the device once."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden_size], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[1]}] to match hidden, got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [{hidden.shape[0]}] (one per hidden row), got shape {tuple(targets.shape)}")
    if hidden.dtype not in _TRITON_DTYPES + (torch.float64,):
        raise TypeError(f"hidden must be bfloat16/float16/float32/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dtype.is_complex:
        raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    for name, tensor in (("weight", weight), ("targets", targets)):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel() and bool(((targets < 0) | (targets >= weight.shape[0])).any()):
        raise ValueError(f"targets must be token ids in [0, {weight.shape[0]}); got values in "
                         f"[{targets.min().item()}, {targets.max().item()}]")  # fmt: skip


def _num_vocab_splits(num_tokens: int, vocab: int, device: torch.device) -> int:
    """Enough vocabulary slices for ~2 programs per SM when there are few token blocks."""
    max_splits = triton.cdiv(vocab, _MAX_BLOCK_V)
    if INTERPRET or device.type != "cuda":
        return min(2, max_splits)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_splits, triton.cdiv(2 * sms, triton.cdiv(num_tokens, 128))))


def default_chunk_tokens(vocab: int, element_size: int) -> int:
    """Backward token chunk whose [chunk, V] dz buffer is about 2 GiB (a multiple of 128, at least 128)."""
    return max(128, _DZ_BUFFER_BYTES // (vocab * element_size) // 128 * 128)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _LinearLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk_tokens: int | None, vocab_splits: int | None):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        num_tokens, hidden_size = hidden.shape
        vocab = weight.shape[0]
        splits = vocab_splits or _num_vocab_splits(num_tokens, vocab, hidden.device)
        vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), _MAX_BLOCK_V) * _MAX_BLOCK_V
        splits = triton.cdiv(vocab, vocab_per_split)
        partials = torch.empty((4, splits, num_tokens), dtype=torch.float32, device=hidden.device)
        if num_tokens > 0:
            grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), splits)  # noqa: E731
            _lse_partial_kernel[grid](
                hidden, weight, targets, partials, num_tokens, vocab, hidden_size,
                hidden.stride(0), weight.stride(0), 1.0 / temperature, vocab_per_split, splits,
                UPCAST=INTERPRET, PRECISION=_dot_precision(hidden.dtype),
            )  # fmt: skip
        running_max, exp_sum, exp_z_sum, target_logit = partials.unbind(0)
        global_max = running_max.max(dim=0).values
        rescale = torch.exp(running_max - global_max)
        total = (exp_sum * rescale).sum(dim=0)
        lse = global_max + torch.log(total)
        entropy = lse - (exp_z_sum * rescale).sum(dim=0) / total
        log_prob = target_logit.sum(dim=0) - lse
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens or default_chunk_tokens(vocab, hidden.element_size())
        ctx.set_materialize_grads(False)
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        if (grad_log_prob is None and grad_entropy is None) or not (needs_hidden or needs_weight):
            return None, None, None, None, None, None
        grad_log_prob = grad_log_prob.contiguous() if grad_log_prob is not None else None
        grad_entropy = grad_entropy.contiguous() if grad_entropy is not None else None
        num_tokens, hidden_size = hidden.shape
        vocab = weight.shape[0]
        mean_logit = lse - entropy  # E_p[z]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        for start in range(0, num_tokens, ctx.chunk_tokens):
            stop = min(start + ctx.chunk_tokens, num_tokens)
            chunk, rows = slice(start, stop), stop - start
            dz = torch.empty((rows, vocab), dtype=hidden.dtype, device=hidden.device)
            grid = lambda meta, rows=rows: (triton.cdiv(rows, meta["BLOCK_T"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
            _dlogits_kernel[grid](
                hidden[chunk], weight, targets[chunk], lse[chunk], mean_logit[chunk],
                grad_log_prob[chunk] if grad_log_prob is not None else lse,
                grad_entropy[chunk] if grad_entropy is not None else lse, dz,
                rows, vocab, hidden_size, hidden.stride(0), weight.stride(0), dz.stride(0),
                1.0 / ctx.temperature,
                HAS_LP_GRAD=grad_log_prob is not None, HAS_ENT_GRAD=grad_entropy is not None,
                UPCAST=INTERPRET, PRECISION=_dot_precision(hidden.dtype),
            )  # fmt: skip
            if grad_hidden is not None:
                torch.mm(dz, weight, out=grad_hidden[chunk])
            if grad_weight is not None:
                grad_weight.addmm_(dz.t(), hidden[chunk])
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_log_prob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    with_entropy: bool, exact_logits: bool):
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if exact_logits:
        logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    else:  # the GEMM in the input dtype (bf16: ~2.5x faster on CPU), as HF computes logits, then upcast
        logits = (hidden @ weight.T).to(compute_dtype)
    log_probs = (logits / temperature).log_softmax(dim=-1)
    target = log_probs.gather(-1, targets[:, None].long()).squeeze(-1)
    if not with_entropy:
        return target, None
    return target, -(log_probs.exp() * log_probs).sum(dim=-1)


def linear_logprob_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    with_entropy: bool = False, chunk_tokens: int = 1024, exact_logits: bool = True,
) -> LinearLogProbOutput:  # fmt: skip
    """Plain-torch log π(y_t) (and entropy) in float32 (float64 stays float64): logits for `chunk_tokens` tokens at a
    time, each chunk checkpointed so backward recomputes it instead of keeping [T, V] activations alive.

    ``exact_logits``: the logits GEMM runs on float32 copies of the inputs — the kernel's accuracy, what its tests
    compare against. False runs it in the input dtype and upcasts the logits (HF's numerics; the learner's CPU path,
    where a float32 GEMM over a 49k vocabulary cost ~2.5x a bf16 one: ``bench/learner.py``)."""
    check_linear_inputs(hidden, weight, targets, temperature)
    outputs = [
        checkpoint(_chunk_log_prob, hidden[start : start + chunk_tokens], weight,
                   targets[start : start + chunk_tokens], temperature, with_entropy, exact_logits, use_reentrant=False)
        for start in range(0, hidden.shape[0], chunk_tokens)
    ]  # fmt: skip
    if not outputs:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return LinearLogProbOutput(empty, empty if with_entropy else None)
    log_prob = torch.cat([out[0] for out in outputs])
    return LinearLogProbOutput(log_prob, torch.cat([out[1] for out in outputs]) if with_entropy else None)


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
    vocab_splits: int | None = None,
    backend: Literal["auto", "triton", "torch"] = "auto",
    exact_logits: bool = True,
) -> LinearLogProbOutput:
    """log softmax(hidden @ weight.T / temperature)[t, targets[t]] per token (float32), optionally with entropy.

    hidden [T, H] and weight [V, H] (bf16/fp16/fp32, same dtype) get gradients; targets [T] are token ids.
    backend="auto" runs the Triton kernels on CUDA tensors and the reference otherwise ("triton" on CPU needs
    TRITON_INTERPRET=1). chunk_tokens bounds the backward's [chunk, V] buffer (default ≈2 GiB); vocab_splits
    overrides the forward's vocabulary parallelism (default: enough programs for ~2 per SM). ``exact_logits`` only
    concerns the torch path (see :func:`linear_logprob_reference`); the kernel always accumulates in float32.
    """
    if not use_triton(hidden, backend, "fused_linear_logprob: hidden"):
        return linear_logprob_reference(hidden, weight, targets, temperature, with_entropy, chunk_tokens or 1024,
                                        exact_logits)
    check_linear_inputs(hidden, weight, targets, temperature)
    if hidden.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton path takes bfloat16/float16/float32 hidden, got {hidden.dtype}; "
                        "use backend='torch'")  # fmt: skip
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    log_prob, entropy = _LinearLogProb.apply(hidden, weight, targets, float(temperature), chunk_tokens, vocab_splits)
    return LinearLogProbOutput(log_prob, entropy if with_entropy else None)
