"""The FSDP2 learner: log-probs, the TIS-corrected PPO update, the weight sync into the engine, and its own state.

Why one class per rank: under ``torchrun`` every rank builds the same :class:`Learner`, receives the same global batch
(a list of :class:`~flash_rc.learner.batch.TrainSequence`) and works on its share; every method is collective (all
ranks call it, in the same order). Rank 0 on CPU — every rank on GPU — may also host a rollout engine.

One training step, as verl's actor does it:

1. ``log_probs`` (no grad) of the batch under the current policy — π_old, the PPO anchor — and, with the KL loss,
   under the frozen reference;
2. ``update``: for each of ``ppo_epochs`` passes, each mini-batch (``ppo_mini_batch_size × n`` sequences), each
   micro-batch: log π_θ, the loss ``fused_tis_loss`` (PPO clip × rollout-IS weights) − entropy bonus + KL loss, all
   aggregated with the mini-batch's *global* token / sequence counts and scaled by the rank count, backward; then the
   pre-clip gradient norm, clipping, and an AdamW step — skipped (gradients dropped) when the norm is not finite;
   the learning-rate schedule advances once per step;
3. ``sync``: the learner's weights into the engine(s) — validated collectively, gathered one tensor at a time in the
   engine's layer order by every rank.

Ranks whose share of a mini-batch has fewer micro-batches than another's run zero-weighted ones, so FSDP's
collectives always pair up.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from flash_rc.algo.kl import kl_penalty
from flash_rc.algo.losses import GlobalBatchInfo, PolicyLossConfig, PolicyLossInputs, agg_loss
from flash_rc.algo.rollout_correction import RolloutCorrectionConfig
from flash_rc.errors import WeightUpdateError
from flash_rc.kernels import fused_tis_loss
from flash_rc.learner.batch import TrainSequence, make_micro_batch, pad_rows, split_micro_batches
from flash_rc.learner.config import ActorModelKeys, ActorSection
from flash_rc.learner.distributed import World
from flash_rc.learner.model import build_policy, checkpoint_dtype
from flash_rc.learner.schedule import make_lr_scheduler, resolve_warmup_steps


@dataclass(frozen=True)
class LearnerSettings:
    """What the learner needs from a recipe (see ``flash_rc.learner.config`` for each key)."""

    actor: ActorSection
    """``actor_rollout_ref.actor``."""
    model: ActorModelKeys
    """``actor_rollout_ref.model``'s learner keys."""
    correction: RolloutCorrectionConfig
    total_steps: int
    """Optimizer schedule length (training steps)."""


def _reduce_op(key: str) -> str:
    return "max" if key.endswith("_max") else "min" if key.endswith("_min") else "mean"


class MetricAccumulator:
    """Token-weighted means (and max / min for ``*_max`` / ``*_min`` keys) of per-micro-batch metrics, reduced over
    ranks by :meth:`result`."""

    TOTALS = ("actor/pg_loss", "actor/entropy", "actor/kl_loss")
    """Parts of the loss: summed over micro-batches and ranks (each is already normalised by the mini-batch's global
    counts), then averaged over the optimizer steps."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.extremes: dict[str, float] = {}
        self.totals: dict[str, float] = dict.fromkeys(self.TOTALS, 0.0)

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            op = _reduce_op(key)
            if key in self.totals:
                self.totals[key] += value
            elif op == "mean":
                self.sums[key] = self.sums.get(key, 0.0) + value * weight
                self.weights[key] = self.weights.get(key, 0.0) + weight
            else:
                pick = max if op == "max" else min
                self.extremes[key] = pick(self.extremes.get(key, value), value)

    def result(self, world: World, optimizer_steps: int) -> dict[str, float]:
        keys = sorted(self.sums)
        sums = torch.tensor([[self.sums[k], self.weights[k]] for k in keys] or [[0.0, 0.0]], dtype=torch.float64)
        totals = torch.tensor(list(self.totals.values()), dtype=torch.float64)
        maxima = sorted(k for k in self.extremes if _reduce_op(k) == "max")
        minima = sorted(k for k in self.extremes if _reduce_op(k) == "min")
        high = torch.tensor([self.extremes[k] for k in maxima] or [0.0], dtype=torch.float64)
        low = torch.tensor([self.extremes[k] for k in minima] or [0.0], dtype=torch.float64)
        if world.size > 1:
            for tensor, op in ((sums, dist.ReduceOp.SUM), (totals, dist.ReduceOp.SUM), (high, dist.ReduceOp.MAX),
                               (low, dist.ReduceOp.MIN)):
                dist.all_reduce(tensor, op=op)
        out = {k: (s / w if w > 0 else 0.0) for k, (s, w) in zip(keys, sums.tolist())}
        out.update((k, total / max(optimizer_steps, 1)) for k, total in zip(self.totals, totals.tolist()))
        out.update(zip(maxima, high.tolist()))
        out.update(zip(minima, low.tolist()))
        return out


class Learner:
    """See the module docstring."""

    def __init__(self, model_path: Path, settings: LearnerSettings, world: World):
        self.model_path = Path(model_path)
        self.settings = settings
        self.world = world
        actor, model = settings.actor, settings.model
        mixed = actor.fsdp_config.mixed_precision
        self.policy, self.layout = build_policy(
            self.model_path, world.device, world.mesh, mixed.param_dtype, actor.fsdp_config.reshard_after_forward,
            model.enable_gradient_checkpointing, model.use_remove_padding,
        )
        self.reference = None
        if actor.use_kl_loss:
            self.reference, _ = build_policy(self.model_path, world.device, world.mesh, mixed.param_dtype,
                                             True, False, model.use_remove_padding, trainable=False)
        self.loss_config = PolicyLossConfig(**{k: getattr(actor, k) for k in PolicyLossConfig.model_fields})
        optim = actor.optim
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        warmup = resolve_warmup_steps(optim.lr_warmup_steps, optim.lr_warmup_steps_ratio, settings.total_steps)
        self.scheduler = make_lr_scheduler(self.optimizer, settings.total_steps, warmup, optim.schedule,
                                           min_lr_ratio=optim.min_lr_ratio, num_cycles=optim.num_cycles)
        pad_token_id = self.policy.causal_lm.config.pad_token_id
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id  # padding is masked: any id will do

    # ------------------------------------------------------------------ shares of a batch

    def _share(self, indices: Sequence[int]) -> list[int]:
        return [i for k, i in enumerate(indices) if k % self.world.size == self.world.rank]

    def _micro_batches(self, sequences: Sequence[TrainSequence], indices: Sequence[int], budget_scale: int = 1
                       ) -> list[list[int]]:
        """This rank's micro-batches of ``indices``, padded with empty ones to the count of the busiest rank."""
        actor = self.settings.actor
        mine = self._share(indices)
        if actor.use_dynamic_bsz:
            groups = split_micro_batches(sequences, mine, micro_batch_size=None,
                                         max_tokens=actor.ppo_max_token_len_per_gpu * budget_scale, layout=self.layout)
        else:
            groups = split_micro_batches(sequences, mine, micro_batch_size=actor.ppo_micro_batch_size_per_gpu
                                         * budget_scale, max_tokens=None, layout=self.layout)
        count = torch.tensor([len(groups)])
        if self.world.size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return groups + [[] for _ in range(int(count) - len(groups))]

    def _forward(self, module, sequences: Sequence[TrainSequence], group: list[int], fallback: int,
                 temperature: float, with_entropy: bool):
        """Per-token log-probs (and entropy) of ``group``'s responses; an empty group runs ``fallback`` instead so
        the collectives match (its result must be weighted by zero)."""
        batch = make_micro_batch(sequences, group or [fallback], self.layout, self.pad_token_id)
        out = module(batch.to(self.world.device), temperature, with_entropy)
        return batch, out

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def log_probs(self, sequences: Sequence[TrainSequence], temperature: float, reference: bool = False
                  ) -> list[torch.Tensor | None]:
        """log π(response token) per sequence (float32, on this device) for this rank's share of the batch; None
        for the sequences other ranks hold. ``reference``: under the frozen reference model."""
        module = self.reference if reference else self.policy
        if module is None:
            raise RuntimeError("no reference model: actor_rollout_ref.actor.use_kl_loss is off")
        module.eval()
        results: list[torch.Tensor | None] = [None] * len(sequences)
        for group in self._micro_batches(sequences, range(len(sequences)), budget_scale=2):
            batch, out = self._forward(module, sequences, group, 0, temperature, False)
            if group:
                for index, values in zip(batch.indices, out.log_prob.split(batch.response_lengths)):
                    results[index] = values.float()
        return results

    # ------------------------------------------------------------------ update

    def update(self, sequences: Sequence[TrainSequence], old_log_probs: Sequence[torch.Tensor | None],
               ref_log_probs: Sequence[torch.Tensor | None] | None, temperature: float, mini_batch_sequences: int
               ) -> dict[str, float]:  # fmt: skip
        """One training step's optimizer updates over ``sequences`` (the global batch, the same on every rank)."""
        actor = self.settings.actor
        self.policy.train()
        metrics = MetricAccumulator()
        steps = skipped = 0
        for _ in range(actor.ppo_epochs):
            for start in range(0, len(sequences), mini_batch_sequences):
                mini = list(range(start, min(start + mini_batch_sequences, len(sequences))))
                self.optimizer.zero_grad(set_to_none=True)
                self.backward(sequences, mini, old_log_probs, ref_log_probs, temperature, metrics)
                grad_norm = self._clip_gradients()
                steps += 1
                if math.isfinite(grad_norm):
                    self.optimizer.step()
                    metrics.add({"actor/grad_norm": grad_norm}, 1.0)
                else:  # the update is dropped; the run goes on (counted below)
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # the schedule follows training steps, also when a step's update was skipped
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        result = metrics.result(self.world, steps)
        result.update({"actor/lr": lr, "actor/optimizer_steps": float(steps),
                       "actor/nonfinite_grad_skipped_steps": float(skipped)})
        return result

    def backward(self, sequences: Sequence[TrainSequence], mini: Sequence[int],
                 old_log_probs: Sequence[torch.Tensor | None], ref_log_probs: Sequence[torch.Tensor | None] | None,
                 temperature: float, metrics: MetricAccumulator) -> None:
        """Accumulate the gradient of one mini-batch (``mini``: indices into the global batch) into ``.grad``, over
        this rank's micro-batches, normalised by the mini-batch's global token / sequence counts."""
        info = GlobalBatchInfo(dp_size=self.world.size, global_batch_size=len(mini),
                               batch_num_tokens=max(1, sum(len(sequences[i].response_token_ids) for i in mini)))
        for group in self._micro_batches(sequences, mini):
            loss_metrics, tokens = self._micro_step(sequences, group, mini[0], old_log_probs, ref_log_probs,
                                                    temperature, info)
            if group:
                metrics.add(loss_metrics, tokens)

    def _micro_step(self, sequences, group, fallback, old_log_probs, ref_log_probs, temperature, info
                    ) -> tuple[dict[str, float], float]:  # fmt: skip
        actor = self.settings.actor
        with_entropy = actor.entropy_coeff != 0
        batch, out = self._forward(self.policy, sequences, group, fallback, temperature, with_entropy)
        lengths = batch.response_lengths
        device = out.log_prob.device
        log_prob = pad_rows(list(out.log_prob.split(lengths)))
        mask = pad_rows([torch.ones(n, device=device) for n in lengths]).bool()
        if group:
            old = pad_rows([old_log_probs[i].to(device) for i in batch.indices], log_prob.shape[1])
            rollout = pad_rows([torch.tensor(sequences[i].rollout_log_probs, device=device) for i in batch.indices],
                               log_prob.shape[1])
        else:  # a zero-weighted stand-in: old = current (ratio 1), mask empty
            old = rollout = log_prob.detach()
            mask = torch.zeros_like(mask)
        advantages = pad_rows([torch.full((n,), sequences[i].advantage, device=device)
                               for i, n in zip(batch.indices, lengths)], log_prob.shape[1])
        loss_out = fused_tis_loss(PolicyLossInputs(log_prob, old, rollout, advantages, mask), self.loss_config,
                                  self.settings.correction, info)
        loss = loss_out.loss
        metrics = {key: float(value) for key, value in loss_out.metrics.items()}
        metrics["actor/pg_loss"] = float(loss.detach()) / info.dp_size  # summed over micro-batches and ranks
        if with_entropy:
            entropy = agg_loss(pad_rows(list(out.entropy.split(lengths))), mask, self.loss_config.loss_agg_mode, info)
            loss = loss - actor.entropy_coeff * entropy
            metrics["actor/entropy"] = float(entropy.detach()) / info.dp_size
        if actor.use_kl_loss:
            ref = pad_rows([ref_log_probs[i].to(device) for i in batch.indices], log_prob.shape[1]) if group \
                else log_prob.detach()
            kl = agg_loss(kl_penalty(log_prob, ref, actor.kl_loss_type), mask, self.loss_config.loss_agg_mode, info)
            loss = loss + actor.kl_loss_coef * kl
            metrics["actor/kl_loss"] = float(kl.detach()) / info.dp_size
        if not group:
            loss = loss * 0.0
        loss.backward()
        return metrics, float(mask.sum())

    def _clip_gradients(self) -> float:
        """The global pre-clip gradient norm (all ranks agree); gradients are scaled to ``grad_clip`` when finite."""
        parameters = [p for p in self.policy.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.settings.actor.grad_clip, error_if_nonfinite=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------ weights out

    def state_source(self) -> torch.nn.Module:
        """The HF module whose state dict (DTensors, HF checkpoint names) the engine and checkpoints read."""
        return self.policy.causal_lm

    def sync(self, engine=None):
        """Push the weights into ``engine`` (a ``WeightSink``; None on ranks that host none): collective.

        1. The engine ranks' stream order (the engine's names in layer order) and value limits go to every rank;
        2. every rank checks its own shards (finite, within the engine dtype's range) and all agree: one bad shard
           refuses the sync on every rank, nothing gathered or loaded;
        3. engine ranks stream (``engine.load``, which gathers each tensor as its layer comes); the other ranks make
           the same gathers in the same order; an engine that fails midway finishes the gathers it did not make, so
           no rank waits forever; the outcome is agreed (one failure raises on every rank).
        Returns the engine's ``SyncReport`` where there is an engine, else None.
        """
        from flash_rc.rollout.checkpoint import full_tensor, layer_key, local_tensor, within_range
        from flash_rc.rollout.reload import SyncStats, named_weights

        source = self.state_source()
        plan = [None]
        if engine is not None and self.world.is_main:
            names = sorted(named_weights(source, engine.checkpoint_shapes), key=layer_key)
            plan = [[(name, engine.weight_format.max_abs(name)) for name in names]]
        if self.world.size > 1:
            dist.broadcast_object_list(plan, src=0)
        (order,) = plan
        if order is None:  # no engine anywhere: nothing to sync
            return None
        state = source.state_dict()
        flags = [within_range(local_tensor(state[name]).detach(), limit) for name, limit in order]
        bad = [name for (name, _), ok in zip(order, torch.stack(flags).tolist()) if not ok] if flags else []
        problems = self._all_gather(bad)
        if any(problems):
            names = sorted({name for part in problems for name in part})
            raise WeightUpdateError(f"learner weights are not finite / out of the engine's range, sync refused on "
                                    f"every rank (engine unchanged): {names[:8]}")
        report, error, stats = None, None, SyncStats()
        if engine is not None:
            try:
                report = engine.load(source, stats=stats)
            except WeightUpdateError as failure:
                error = failure
        for name, _ in order[stats.tensors:]:
            full_tensor(state[name])
        failures = self._all_gather(None if error is None else str(error))
        if any(failures):
            raise WeightUpdateError(next(f for f in failures if f)) from error
        return report

    def _all_gather(self, value):
        if self.world.size == 1:
            return [value]
        gathered = [None] * self.world.size
        dist.all_gather_object(gathered, value)
        return gathered

    # ------------------------------------------------------------------ state

    def save(self, directory: Path, tokenizer_source: Path) -> None:
        """Write the model as an HF folder (float32 master weights, the source's declared dtype, tokenizer) on the
        main rank and the optimizer (sharded, ``torch.distributed.checkpoint``) and schedule from every rank."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        from transformers import AutoTokenizer

        from flash_rc.rollout.checkpoint import full_tensor

        directory = Path(directory)
        full, seen = {}, set()
        for name, tensor in self.state_source().state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue  # a tied alias (lm_head.weight of a tied-embedding model): stored once, as HF does
            seen.add(id(tensor))
            gathered = full_tensor(tensor.detach())  # every rank joins the gather; only the main rank keeps a copy
            if self.world.is_main:
                full[name] = gathered.to("cpu", copy=True)
        if self.world.is_main:
            causal_lm = self.state_source()
            dtype = checkpoint_dtype(self.model_path)
            if dtype is not None:
                causal_lm.config.dtype = dtype
            causal_lm.config.use_cache = True
            causal_lm.save_pretrained(directory, state_dict=full, safe_serialization=True)
            causal_lm.config.use_cache = False
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(directory)
        del full
        optimizer_state = get_optimizer_state_dict(self.policy, self.optimizer)
        dcp.save({"optimizer": optimizer_state}, checkpoint_id=str(directory / "optimizer"))
        if self.world.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, directory / "learner_state.pt")

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (same world size); the weights are read from the HF folder in float32."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        from torch.distributed.tensor import DTensor, distribute_tensor

        from flash_rc.rollout.checkpoint import CheckpointTensors

        directory = Path(directory)
        weights = CheckpointTensors(directory)  # read one tensor at a time
        with torch.no_grad():
            for name, tensor in self.state_source().state_dict(keep_vars=True).items():
                if name not in weights:
                    continue  # a tied alias the checkpoint does not store
                value = weights[name].to(self.world.device, torch.float32)
                if isinstance(tensor, DTensor):
                    value = distribute_tensor(value, tensor.device_mesh, tensor.placements)
                    tensor.to_local().copy_(value.to_local())
                else:
                    tensor.copy_(value)
        template = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)}
        dcp.load(template, checkpoint_id=str(directory / "optimizer"))
        set_optimizer_state_dict(self.policy, self.optimizer, optim_state_dict=template["optimizer"])
        state = torch.load(directory / "learner_state.pt", weights_only=False)
        self.scheduler.load_state_dict(state["scheduler"])
