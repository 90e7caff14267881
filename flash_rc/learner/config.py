"""The learner's recipe keys: verl's ``actor_rollout_ref.actor`` / ``.model`` / ``.ref`` spelling, verl's defaults.

Why verl's names and defaults: one recipe runs on both backends, and a user who knows verl's knobs knows these. A verl
key the local learner cannot honour is declared pinned to verl's default (``Literal[default]``), so a recipe that
leaves it alone validates and one that changes it fails naming the key, before any process group or engine starts.

verl's batch units (``ppo_mini_batch_size`` counts *prompts*; micro-batch sizes count *sequences per rank*) are kept:
a global mini-batch is ``ppo_mini_batch_size × rollout.n`` sequences split over the data-parallel ranks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model

from flash_rc.algo.kl import KLType
from flash_rc.algo.losses import PolicyLossConfig
from flash_rc.schema import Section, fields_of


class OptimSection(Section):
    """verl's ``actor.optim``: AdamW with warmup and a constant or cosine schedule."""

    lr: float = Field(1e-6, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW β1, β2."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay."""
    lr_warmup_steps: int = -1
    """Linear warmup steps; ≤ 0 uses ``lr_warmup_steps_ratio``."""
    lr_warmup_steps_ratio: float = Field(0.0, ge=0, le=1)
    """Warmup as a share of the total training steps (when ``lr_warmup_steps`` ≤ 0)."""
    lr_scheduler_type: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to ``min_lr_ratio × lr``."""
    warmup_style: Literal["constant", "cosine"] | None = None
    """verl's older name for ``lr_scheduler_type`` (wins when set)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine floor as a share of ``lr``."""
    num_cycles: float = Field(0.5, gt=0)
    """Cosine half-waves over the decay (0.5: one decay from lr to the floor)."""
    total_training_steps: int = -1
    """Filled in by the trainer (``trainer.total_training_steps`` or the data's steps × epochs); -1: not set."""

    @property
    def schedule(self) -> Literal["constant", "cosine"]:
        return self.warmup_style or self.lr_scheduler_type


class MixedPrecisionSection(Section):
    """verl's ``actor.fsdp_config.mixed_precision``: the FSDP2 compute and reduction dtypes (master weights and
    optimizer state are always float32)."""

    param_dtype: Literal["bf16", "fp32"] = "bf16"
    """Dtype of the gathered parameters forward and backward run in (``fp32``: exact, slower; for tests)."""
    reduce_dtype: Literal["fp32"] = "fp32"
    """Dtype of the gradient reduce-scatter (float32 only)."""
    buffer_dtype: Literal["fp32"] = "fp32"
    """Dtype of buffers (float32 only)."""


class FSDPSection(Section):
    """verl's ``actor.fsdp_config`` keys the local FSDP2 learner honours."""

    mixed_precision: MixedPrecisionSection = MixedPrecisionSection()
    reshard_after_forward: bool = True
    """Free gathered parameters after each layer's forward (ZeRO-3) instead of keeping them for backward."""
    param_offload: Literal[False] = False
    """CPU offload of parameters: not supported by the local learner."""
    optimizer_offload: Literal[False] = False
    """CPU offload of the optimizer state: not supported by the local learner."""
    offload_policy: Literal[False] = False
    """FSDP2 CPU offload policy: not supported by the local learner."""
    fsdp_size: Literal[-1] = -1
    """Sharding group size (-1: all ranks); hybrid sharding is not supported locally."""


ActorLossFields = fields_of(PolicyLossConfig, {name: name for name in PolicyLossConfig.model_fields})


class _ActorKeys(Section):
    strategy: Literal["fsdp", "fsdp2"] = "fsdp2"
    """verl's ``actor.strategy``; the local learner is always FSDP2 (``fsdp`` is accepted as its alias)."""
    ppo_mini_batch_size: int = Field(256, ge=1)
    """Prompts per optimizer step (× ``rollout.n`` sequences, split over the ranks)."""
    ppo_micro_batch_size_per_gpu: int | None = Field(None, ge=1)
    """Sequences per micro-batch on each rank (when ``use_dynamic_bsz`` is off)."""
    use_dynamic_bsz: bool = False
    """Cut micro-batches by a token budget (``ppo_max_token_len_per_gpu``) instead of a sequence count."""
    ppo_max_token_len_per_gpu: int = Field(16384, ge=1)
    """Token budget of one micro-batch on one rank (prompt + response tokens; padded size when padding)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each step's batch."""
    shuffle: Literal[False] = False
    """verl's mini-batch shuffling across epochs: not supported locally (mini-batches keep the batch order)."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global gradient norm; the pre-clip norm is reported as ``actor/grad_norm``."""
    entropy_coeff: float = 0.0
    """Entropy bonus: the loss is ``pg_loss − entropy_coeff × entropy``."""
    use_kl_loss: bool = False
    """Add ``kl_loss_coef × KL(π_θ ‖ π_ref)`` to the loss, against a frozen copy of the initial model."""
    kl_loss_coef: float = Field(0.001, ge=0)
    """Weight of the KL loss."""
    kl_loss_type: KLType = "low_var_kl"
    """KL estimator (verl's names: ``low_var_kl``/``k3``, ``kl``/``k1``, ``mse``/``k2``, ``abs``)."""
    ulysses_sequence_parallel_size: Literal[1] = 1
    """Sequence parallelism: not supported locally."""
    use_torch_compile: Literal[False] = False
    """torch.compile of the actor: not supported locally."""
    optim: OptimSection = OptimSection()
    fsdp_config: FSDPSection = FSDPSection()


ActorSection = create_model(
    "ActorSection", __base__=_ActorKeys, __doc__="verl's ``actor_rollout_ref.actor``.", **ActorLossFields,
)


class ActorModelKeys(Section):
    """The learner's share of verl's ``actor_rollout_ref.model`` (the path is the engine's key)."""

    enable_gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~30% more compute)."""
    use_remove_padding: bool = True
    """Pack micro-batches without padding where the attention backend supports it (flash-attention), else pad."""


class RefSection(Section):
    """verl's ``actor_rollout_ref.ref``: the frozen reference policy of the KL loss."""

    fsdp_config: FSDPSection = FSDPSection()


def check_actor(actor, sequences_per_prompt: int, train_batch_size: int, world_size: int) -> list[str]:
    """Why the batch settings cannot be split as verl splits them (one line each), before anything starts."""
    problems = []
    if train_batch_size % actor.ppo_mini_batch_size:
        problems.append(f"data.train_batch_size={train_batch_size} is not a multiple of "
                        f"actor_rollout_ref.actor.ppo_mini_batch_size={actor.ppo_mini_batch_size}")
    mini_sequences = actor.ppo_mini_batch_size * sequences_per_prompt
    if mini_sequences % world_size:
        problems.append(f"a mini-batch of {mini_sequences} sequences (actor_rollout_ref.actor.ppo_mini_batch_size × "
                        f"the sequences per prompt: rollout.n, or flash_rc.rc.n_summ × k) does not split over "
                        f"{world_size} ranks")
        return problems
    per_rank = mini_sequences // world_size
    if not actor.use_dynamic_bsz:
        if actor.ppo_micro_batch_size_per_gpu is None:
            problems.append("set actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu, or use_dynamic_bsz=true")
        elif per_rank % actor.ppo_micro_batch_size_per_gpu:
            problems.append(f"{per_rank} sequences per rank per mini-batch is not a multiple of "
                            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={actor.ppo_micro_batch_size_per_gpu}")
    return problems
