"""What a rollout engine stores for each learner tensor: bf16 as is, or INT8 / FP8 codes plus scales.

A quantized engine is a vLLM engine built from a *compressed-tensors W8A8* description (weights quantized
per channel / per tensor / per 128x128 block, activations quantized dynamically per token by the engine's kernels)
that we hand to vLLM as ``hf_overrides["quantization_config"]`` over the bf16 model folder, with ``load_format=
"dummy"``. No quantized checkpoint is ever written to disk: the first weight sync streams the bf16 weights in and
:class:`WeightFormat` quantizes them on the way, exactly as every later sync from the learner does.

Scales are ``frozen`` (computed at the first sync and reused: Flash RL's semantics, codes change only when an update
crosses a rounding boundary) or ``refresh`` (recomputed from each new weight). Frozen scales make small RL updates
round away; :class:`UpdateVisibility` measures how much: the fraction of codes that changed and the fraction of the
learner's update (L2) that the engine did not receive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flash_rc.algo.quant import FP8_BLOCK_SIZE, check_update, count_changed_codes, update_sums
from flash_rc.kernels.quant import quantize_fp8, quantize_int8_per_channel  # Triton on CUDA, the reference elsewhere
from flash_rc.types import FP8Granularity, Precision, ScaleMode


def compressed_tensors_config(precision: Precision, fp8_granularity: FP8Granularity) -> dict[str, Any]:
    """The ``quantization_config`` vLLM builds a W8A8 engine from (lm_head and embeddings stay unquantized)."""
    if precision == "int8":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        quant_format = "int-quantized"
    elif precision == "fp8":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": fp8_granularity, "dynamic": False}
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
        if fp8_granularity == "block":  # DeepSeek-style: 128x128 weight blocks, 1x128 activation groups
            weights["block_structure"] = list(FP8_BLOCK_SIZE)
            activations.update(strategy="group", group_size=FP8_BLOCK_SIZE[1])
        quant_format = "float-quantized"
    else:
        raise ValueError(f"precision {precision!r} has no quantization config")
    return {
        "quant_method": "compressed-tensors",
        "format": quant_format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None}},
        "ignore": ["lm_head"],
    }


@dataclass
class _TrackedRows:
    """The last synced values of a tensor's sampled rows (what the visibility metric compares against)."""

    rows: torch.Tensor
    weight: torch.Tensor
    """float32 copy of the learner's rows."""
    dequant: torch.Tensor
    """float32 rows as the engine holds them (codes x scales)."""
    codes: torch.Tensor


@dataclass
class UpdateVisibility:
    """How much of one learner update reached the quantized engine, summed over the sampled rows of a sync.

    With Δw the learner's update and Δŵ the change of the engine's dequantized weights (same entries):

    - ``codes_changed_fraction`` = changed codes / sampled codes;
    - ``update_lost_fraction`` = 1 − α clipped to [0, 1], where α = ⟨Δw, Δŵ⟩ / ||Δw||² is how much of the learner's
      update the engine's change carries (1: all of it arrived, 0: none — every change was smaller than half a
      quantization step and rounded away);
    - ``update_relative_error`` = ||Δw − Δŵ|| / ||Δw||: rounding noise relative to the update. It exceeds 1 when
      updates are far below the quantization step: the few codes that flip move a whole step.
    """

    pending: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    """Per tensor: (old codes, new codes, old weight, new weight, old dequant, new dequant) of its sampled rows,
    flattened. Summed once in :meth:`metrics` (a handful of reductions and host syncs per sync, not per tensor)."""

    def add(self, old_codes, new_codes, old_weight, new_weight, old_dequant, new_dequant) -> None:
        """Account one tensor's (or sampled rows') change between two syncs (checked now, summed in metrics)."""
        check_update(old_codes, new_codes, old_weight, new_weight, old_dequant, new_dequant)
        self.pending.append(tuple(t.reshape(-1) for t in (old_codes, new_codes, old_weight, new_weight, old_dequant,
                                                            new_dequant)))

    def metrics(self) -> dict[str, float]:
        if not self.pending:
            return {}
        old_codes, new_codes, *values = (torch.cat(column) for column in zip(*self.pending))
        update_sq, received_dot, error_sq = update_sums(*values)
        metrics = {"sync/codes_changed_fraction": count_changed_codes(old_codes, new_codes) / old_codes.numel(),
                   "sync/update_norm_sampled": update_sq**0.5}
        if update_sq > 0:
            received = received_dot / update_sq
            metrics["sync/update_lost_fraction"] = min(1.0, max(0.0, 1.0 - received))
            metrics["sync/update_relative_error"] = (error_sq / update_sq) ** 0.5
        return metrics


@dataclass
class WeightFormat:
    """Turns ``(name, bf16 tensor)`` into the tensors the engine loads, keeping frozen scales and visibility state.

    ``precision``, ``fp8_granularity``, ``scales`` and ``visibility_sample`` mean what the ``EngineConfig`` fields
    of the same names say (documented and bounded there only).
    """

    precision: Precision = "bf16"
    fp8_granularity: FP8Granularity = "channel"
    scales: ScaleMode = "refresh"
    quantized_names: frozenset[str] = frozenset()
    """Checkpoint names of the weights the engine quantizes (read from the engine's modules)."""
    visibility_sample: float = 1 / 64
    dtype: torch.dtype = torch.bfloat16
    """The engine's dtype: unquantized tensors are cast to it on the way (a learner may hold float32 masters)."""
    _frozen: dict[str, torch.Tensor] = field(default_factory=dict)
    _tracked: dict[str, _TrackedRows] = field(default_factory=dict)
    _visibility: UpdateVisibility = field(default_factory=UpdateVisibility)
    _nonfinite: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def max_abs(self, name: str) -> float:
        """The largest magnitude a learner tensor may hold: the engine dtype's range for a tensor loaded as is (a
        float32 1e39 becomes inf in bf16), float32's for one the quantizers read."""
        return torch.finfo(torch.float32 if name in self.quantized_names else self.dtype).max

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The engine-format tensors for one learner tensor: itself, or ``name`` (codes) + ``name_scale``.

        Inputs are expected to be validated (finite); on CUDA the quantizers only count non-finite values on the
        device (no host sync per tensor) and :meth:`raise_if_nonfinite` checks the count once per sync.
        """
        tensors, commit = self.convert_staged(name, tensor)
        commit()
        yield from tensors

    def convert_staged(self, name: str, tensor: torch.Tensor
                       ) -> tuple[list[tuple[str, torch.Tensor]], Callable[[], None]]:  # fmt: skip
        """:meth:`convert`, with what it records (a first frozen scale, the visibility rows) held back until the
        returned ``commit()`` is called — after the engine loaded the tensors, so a refused update records nothing."""
        if name not in self.quantized_names:
            return [(name, tensor.to(self.dtype))], _nothing
        frozen = self._frozen.get(name) if self.scales == "frozen" else None
        if frozen is not None and frozen.device != tensor.device:  # e.g. started from CPU files, synced from GPU
            frozen = self._frozen[name] = frozen.to(tensor.device)
        counter = self._nonfinite.setdefault(tensor.device, torch.zeros(1, dtype=torch.int32, device=tensor.device))
        if self.precision == "int8":
            codes, scale = quantize_int8_per_channel(tensor, scale=frozen, name=name, nonfinite_count=counter)
        else:
            codes, scale = quantize_fp8(tensor, self.fp8_granularity, FP8_BLOCK_SIZE, scale=frozen, name=name,
                                        nonfinite_count=counter)

        def commit() -> None:
            if self.scales == "frozen" and name not in self._frozen:
                self._frozen[name] = scale
            if self.visibility_sample > 0:
                self._track(name, tensor, codes, scale)

        return [(name, codes), (f"{name}_scale", scale)], commit

    def raise_if_nonfinite(self) -> None:
        """Raise if any quantized input since the last call held NaN/inf (one host sync per device), then reset."""
        counts = {device: int(counter.item()) for device, counter in self._nonfinite.items()}
        self._nonfinite.clear()
        bad = {str(device): count for device, count in counts.items() if count}
        if bad:
            raise ValueError(f"non-finite values reached the quantizers: {bad}")

    def take_visibility(self) -> dict[str, float]:
        """Visibility metrics of the updates converted since the last call (empty after the first sync)."""
        metrics, self._visibility = self._visibility.metrics(), UpdateVisibility()
        return metrics

    def _track(self, name: str, weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Keep the sampled rows' learner values and codes — on the CPU, whatever device the sync runs on."""
        previous = self._tracked.get(name)
        rows = previous.rows if previous is not None else _sample_rows(name, weight.shape[0], self.visibility_sample)
        on_device = rows.to(weight.device)
        row_codes = codes[on_device].cpu()
        current = _TrackedRows(
            rows=rows,
            weight=weight[on_device].float().cpu(),
            dequant=self._dequantize_rows(row_codes, scale.cpu(), rows, weight.shape[1]),
            codes=row_codes,
        )
        if previous is not None:
            self._visibility.add(previous.codes, current.codes, previous.weight, current.weight,
                                 previous.dequant, current.dequant)
        self._tracked[name] = current

    def _dequantize_rows(self, codes: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, width: int):
        if self.precision == "int8" or self.fp8_granularity == "channel":
            row_scale = scale[rows]  # [r, 1]
        elif self.fp8_granularity == "tensor":
            row_scale = scale.reshape(1, 1)
        else:  # block: each row's scales over its column blocks
            row_scale = scale[rows // FP8_BLOCK_SIZE[0]].repeat_interleave(FP8_BLOCK_SIZE[1], dim=1)[:, :width]
        return codes.float() * row_scale.float()


def _sample_rows(name: str, num_rows: int, fraction: float) -> torch.Tensor:
    """A fixed, name-seeded set of rows (at least one), so every sync compares the same entries."""
    count = max(1, round(num_rows * fraction))
    seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") & ((1 << 62) - 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[:count].sort().values


def _nothing() -> None:
    """The commit of a tensor that records nothing."""

