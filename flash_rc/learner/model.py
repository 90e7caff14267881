"""An HF causal LM under FSDP2 whose forward returns log-probs of given tokens, never the [tokens × vocab] logits.

Why a wrapper module: the log-probs come from the final hidden states through ``flash_rc.kernels``'
``fused_linear_logprob`` (the streaming Triton kernel on CUDA, its chunked torch reference elsewhere), not through the
model's ``lm_head`` forward that would materialise every logit. The wrapper is the FSDP2 root, so the embeddings, final
norm and ``lm_head`` weight (the root's parameters) are gathered for the whole forward and their gradients reduced
after backward; each decoder layer is its own FSDP2 unit (gathered just in time, freed after use).

Master weights and AdamW state are float32; forward/backward run in ``param_dtype`` (bf16 by default) and gradients
are reduced in float32 (``MixedPrecisionPolicy``), as in verl's FSDP2 actor.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from flash_rc.kernels import LinearLogProbOutput, fused_linear_logprob
from flash_rc.learner.batch import Layout, MicroBatch

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def attention_backend(device: torch.device, use_remove_padding: bool) -> tuple[str, Layout]:
    """The attention implementation and micro-batch layout: packed sequences need flash-attention (it reads sequence
    boundaries from position ids); everywhere else sequences are padded and SDPA runs."""
    if use_remove_padding and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", "packed"
    return "sdpa", "padded"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.model.layers`` for Llama/Qwen/Mistral-style models)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: cannot find its decoder layers (expected model.layers)")
    return layers


class PolicyModel(nn.Module):
    """``forward(micro_batch)`` → log π(target) per response token (and entropy) at a temperature."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, batch: MicroBatch, temperature: float, with_entropy: bool = False) -> LinearLogProbOutput:
        hidden = self.causal_lm.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.flatten(0, 1).index_select(0, batch.logit_index)
        head = self.causal_lm.get_output_embeddings().weight
        return fused_linear_logprob(hidden, head.to(hidden.dtype), batch.targets, temperature, with_entropy,
                                    exact_logits=False)


def checkpoint_dtype(model_path: Path) -> str | None:
    """The dtype an HF folder's config declares (``dtype`` or the older ``torch_dtype``)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def build_policy(model_path: Path, device: torch.device, mesh, param_dtype: str, reshard_after_forward: bool,
                 gradient_checkpointing: bool, use_remove_padding: bool, trainable: bool = True
                 ) -> tuple[PolicyModel, Layout]:  # fmt: skip
    """Load the model in float32 and shard it: each decoder layer, then the wrapper as the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    attn_implementation, layout = attention_backend(device, use_remove_padding)
    causal_lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                     attn_implementation=attn_implementation).to(device)
    causal_lm.config.use_cache = False
    if gradient_checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    causal_lm.requires_grad_(trainable)
    policy = PolicyModel(causal_lm)
    mp_policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32)
    for layer in decoder_layers(causal_lm):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(policy, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return policy, layout
