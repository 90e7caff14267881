"""The one path a weight update takes into a vLLM model: flash_rc's in-process engine and the verl worker alike.

Why one path: a sync runs once per RL step for thousands of steps, so it must be as fast as vLLM's own reload and
must never leave the engine unable to serve. Both properties live here, once. An update arrives in *groups* — a
decoder layer of the engine's layer-ordered stream, or a bucket of verl's transfer — and each group goes through:

1. **convert** — each learner tensor becomes what the engine stores: cast to the engine dtype, or INT8/FP8 codes
   plus scales (:class:`~flash_rc.rollout.formats.WeightFormat`);
2. **check what will be loaded** — every converted tensor finite (after the cast and the quantization, so a float32
   value beyond bf16's range or a lazy source that turned NaN after validation is caught), with its name; a refused
   group has touched nothing;
3. **reload** — only the vLLM modules this group feeds are re-materialized, loaded and re-processed (vLLM's layerwise
   reload, scoped by :func:`~flash_rc.rollout.vllm_compat.layerwise_reload`); modules the update does not feed keep
   their weights, so partial updates and updates that stop midway leave every module whole;
4. **commit** — frozen scales and update-visibility rows are recorded only for tensors that were loaded.

A partial update must feed each module all of its tensors (q, k and v together: vLLM loads them into one fused
``qkv_proj``); :meth:`ModelReloader.partial_update_problems` names what is missing before anything is touched.
:class:`SyncStats` splits a sync's time into the phases ``bench/engine_overhead.py`` reports.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flash_rc.errors import WeightUpdateError
from flash_rc.rollout import vllm_compat
from flash_rc.rollout.checkpoint import full_tensor, layer_key, local_tensor, within_range
from flash_rc.rollout.formats import WeightFormat

Group = Sequence[tuple[str, torch.Tensor]]
"""One group of learner tensors, loaded together (whole vLLM modules)."""

PHASES = ("validation", "transfer", "quantization", "load", "visibility")
"""Where a sync's time goes: checks before and after conversion; reading / gathering the source tensors; casting and
quantizing; vLLM's loading and post-processing (oneDNN repacking on CPU) and finalizing; update-visibility rows."""


@dataclass
class SyncStats:
    """What one sync streamed, and its seconds per phase (phases nest: an inner phase's time is not counted in the
    outer one)."""

    tensors: int = 0
    source_bytes: int = 0
    """Bytes of the learner tensors streamed (full, unsharded sizes)."""
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _stack: list[str] = field(default_factory=list)
    _since: float = 0.0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._stack.append(name)
        self._since = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[self._stack.pop()] += now - self._since
            self._since = now

    def count(self, tensor: torch.Tensor) -> None:
        self.tensors += 1
        self.source_bytes += tensor.numel() * tensor.element_size()

    def metrics(self, seconds: float, weight_format: WeightFormat) -> dict[str, float]:
        """The metrics every sync reports (taking the visibility metrics accumulated since the last sync)."""
        return {"sync/seconds": seconds,
                "sync/gb_per_s": self.source_bytes / 1e9 / seconds if seconds > 0 else 0.0,
                "sync/tensors": float(self.tensors),
                **{f"sync/{name}_seconds": phase_seconds for name, phase_seconds in self.seconds.items()},
                **weight_format.take_visibility()}


@dataclass
class SyncReport:
    """What one sync did."""

    model_version: int
    seconds: float
    tensors: int
    source_bytes: int
    """Bytes of the learner tensors streamed (full, unsharded sizes)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``sync/seconds``, ``sync/gb_per_s``, the seconds of each phase (``sync/<phase>_seconds``) and the visibility
    metrics (``sync/codes_changed_fraction``, ...)."""


class WeightSink(Protocol):
    """Where the learner syncs its weights: the in-process engine now, a remote inference server (weights over NCCL)
    in the disaggregated mode. ``load`` validates before touching anything and raises ``WeightUpdateError``."""

    @property
    def model_version(self) -> int: ...

    def load(self, source, strict: bool = True) -> SyncReport: ...


WeightSource = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | torch.nn.Module
"""A state dict, ``(name, tensor)`` pairs, or the learner module itself (plain or FSDP2: DTensors are gathered one
at a time while streaming)."""


def named_weights(source: WeightSource, checkpoint_names: Iterable[str] = ()) -> Mapping[str, torch.Tensor]:
    """A name → tensor mapping for any supported source; anything else is a :class:`WeightUpdateError` naming it.

    A module's state dict may hold tied aliases the checkpoint does not store (``lm_head.weight`` tied to
    ``model.embed_tokens.weight``): an alias of a tensor already present under a checkpoint name is dropped. Pairs
    are collected into a dict (they must be validated before anything is loaded).
    """
    if isinstance(source, torch.nn.Module):
        state = source.state_dict()
        known = set(checkpoint_names)
        kept_storage = {_storage_key(t) for name, t in state.items() if name in known}
        return {name: t for name, t in state.items() if name in known or _storage_key(t) not in kept_storage}
    if isinstance(source, Mapping):
        return source
    if source is None or isinstance(source, (str, bytes, torch.Tensor)) or not isinstance(source, Iterable):
        raise WeightUpdateError(f"a weight source must be a state dict, (name, tensor) pairs or a module, got "
                                f"{type(source).__name__}")
    weights = {}
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise WeightUpdateError(f"a weight source given as pairs must yield (name, tensor) tuples, got "
                                    f"{type(item).__name__}")
        weights[item[0]] = item[1]
    return weights


def _storage_key(tensor: torch.Tensor) -> tuple:
    local = local_tensor(tensor)
    return (local.device, local.untyped_storage().data_ptr(), local.storage_offset())


class ModelReloader:
    """Loads weight updates into one vLLM model, group by group (see the module docstring).

    ``copy_unconverted`` copies tensors that pass through unconverted: needed when the caller reuses their storage
    before the layer completes (verl's receiver refills its bucket buffer).
    """

    def __init__(self, model: torch.nn.Module, vllm_config, weight_format: WeightFormat,
                 checkpoint_names: Iterable[str], copy_unconverted: bool = False):  # fmt: skip
        self.model = model
        self.vllm_config = vllm_config
        self.weight_format = weight_format
        self.copy_unconverted = copy_unconverted
        self.module_of = vllm_compat.checkpoint_modules(model, checkpoint_names)
        self.scoped = all(module is not None for module in self.module_of.values())
        self.members: dict[str, set[str]] = {}
        for name, module in self.module_of.items():
            self.members.setdefault(module, set()).add(name)
        self.groups_loaded = 0
        """Groups loaded by the current (or last) session: 0 after a refusal means nothing was touched."""

    def partial_update_problems(self, names: Iterable[str]) -> list[str]:
        """Why an update of only ``names`` cannot be applied: a module fed only some of its tensors."""
        names = set(names)
        if not self.scoped:
            unplaced = sorted(n for n, m in self.module_of.items() if m is None)
            return [f"this model's tensors cannot all be placed in engine modules ({unplaced[:3]}): send a full update"]
        problems = []
        for module in sorted({self.module_of[n] for n in names if n in self.module_of}):
            missing = sorted(self.members[module] - names)
            if missing:
                problems.append(f"{module} is loaded as one unit: the update has {sorted(self.members[module] & names)}"
                                f" but not {missing}")
        return problems

    def complete_modules(self, names: Iterable[str], everything: bool = False) -> tuple[list[str], list[str]]:
        """``names`` split into those whose engine module has all its tensors among them (or that no module claims),
        and those of modules still waiting for more; ``everything`` moves all to the first list (the stream ended)."""
        names = list(names)
        if everything:
            return names, []
        present = set(names)
        waiting = [n for n in names
                   if self.module_of.get(n) is not None and not self.members[self.module_of[n]] <= present]
        held = set(waiting)
        return [n for n in names if n not in held], waiting

    @contextlib.contextmanager
    def session(self, stats: SyncStats, checked: TensorSet | None = None
                ) -> Iterator[Callable[[Iterable[Group]], None]]:  # fmt: skip
        """One update. The block calls the yielded ``load(groups)`` any number of times — the engine once, with the
        whole layer-ordered stream (vLLM's loader then runs once), verl's worker once per bucket — and the prepared
        modules are finalized on exit. ``checked`` holds source tensors already found within the engine's range:
        those that reach the engine unconverted (same object) are not checked again."""
        self.groups_loaded = 0
        with stats.phase("load"), vllm_compat.layerwise_reload(self.model, self.vllm_config, self.scoped) as prepare:
            yield lambda groups: self.model.load_weights(self._stream(groups, prepare, stats, checked))

    def _stream(self, groups: Iterable[Group], prepare: Callable[[Iterable[str]], None], stats: SyncStats,
                checked: TensorSet | None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        """The engine tensors of each group, converted and checked before its modules are prepared; a group's
        records are committed once vLLM's loader asks for the next group (it has taken all of this one's)."""
        for group in groups:
            converted, commits = self._convert(group, stats, checked)
            prepare({self.module_of.get(name) for name, _ in group} - {None})
            yield from (tensor for tensors in converted for tensor in tensors)
            self.groups_loaded += 1
            with stats.phase("visibility"):
                for commit in commits:
                    commit()
            del group, converted, commits  # let this layer go before the next one is read: one layer in memory

    def _convert(self, group: Group, stats: SyncStats, checked: TensorSet | None
                 ) -> tuple[list[list[tuple[str, torch.Tensor]]], list[Callable[[], None]]]:  # fmt: skip
        """The group's engine tensors and their commits, after checking what will be loaded (raises if refused)."""
        converted, unchecked, commits = [], [], []
        with stats.phase("quantization"):
            for name, tensor in group:
                tensors, commit = self.weight_format.convert_staged(name, tensor)
                if self.copy_unconverted:
                    tensors = [(n, t.clone() if t is tensor else t) for n, t in tensors]
                skip = tensor if checked is not None and checked.holds(tensor) else None
                converted.append(tensors)
                unchecked.append((name, [(n, t) for n, t in tensors if t is not skip]))
                commits.append(commit)
        with stats.phase("validation"):
            problems = loaded_value_problems(unchecked, self.weight_format)
        if problems:
            raise WeightUpdateError("refused before loading: " + "; ".join(problems))
        return converted, commits


class TensorSet:
    """Tensors by identity, without keeping them alive (a tensor freed and another allocated at its address is not a
    member): what validation saw, so the same objects need no second pass."""

    def __init__(self):
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        self._refs[id(tensor)] = weakref.ref(tensor)

    def holds(self, tensor: torch.Tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor


def loaded_value_problems(converted: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]],
                          weight_format: WeightFormat) -> list[str]:  # fmt: skip
    """Tensors of a converted group the engine must not load: non-finite after the cast or the quantization.

    One host sync per device for the whole group. Quantized tensors are judged by their scales (finite) and by the
    quantizers' count of non-finite inputs (a NaN input under frozen scales still gives finite codes and scales).
    """
    flags: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for source_name, tensors in converted:
        for name, tensor in tensors:
            if tensor.dtype.is_floating_point and tensor.element_size() > 1:  # not INT8/FP8 codes
                names, values = flags.setdefault(tensor.device, ([], []))
                names.append(source_name)
                values.append(within_range(tensor, torch.finfo(tensor.dtype).max))
    problems = [f"{name}: non-finite values after conversion to the engine format"
                for names, values in flags.values() for name, ok in zip(names, torch.stack(values).tolist()) if not ok]
    try:
        weight_format.raise_if_nonfinite()
    except ValueError as error:
        problems.append(f"{[name for name, _ in converted if name in weight_format.quantized_names]}: {error}")
    return problems


def layer_groups(weights: Mapping[str, torch.Tensor], stats: SyncStats) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The update's tensors one decoder layer at a time, in ``layer_key`` order (layers, then norm, head and
    embeddings), each read or gathered (:func:`~flash_rc.rollout.checkpoint.full_tensor`) only when its layer comes:
    names are grouped before any tensor is read, so no tensor of the next layer is held early."""
    for _, names in itertools.groupby(sorted(weights, key=layer_key), key=lambda name: layer_key(name)[0]):
        group = []
        for name in names:
            with stats.phase("transfer"):
                tensor = full_tensor(weights[name])
            stats.count(tensor)
            group.append((name, tensor))
        yield group
