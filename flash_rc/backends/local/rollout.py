"""Where a training step's sequences come from: plain outcome-RL rollouts (GRPO / RLOO, DAPO's options).

Why a source object: the loop asks ``source.collect(step)`` for a list of :class:`~flash_rc.learner.batch.
TrainSequence` and the step's rollout metrics, and does not care how they were made. :class:`OutcomeRollout` samples
``rollout.n`` responses per prompt on the engine, scores them through the reward router, and turns rewards into
advantages; RC training replaces it with a source that runs reason → summarize chains.

One collection:

1. draw ``data.train_batch_size`` prompts; sample ``n`` responses per prompt on the engine (per-request seeds derived
   from ``flash_rc.train.rollout_seed``, the step, the generation batch and the prompt: a resumed run samples what an
   uninterrupted one would); a request the engine fails drops its group and is counted;
2. score every response by its row's ``data_source`` in the reward pool: a scorer that times out or crashes scores 0
   (``reward/failed``), never stopping the step;
3. add DAPO's overlong penalty when on; advantages per group (GRPO or RLOO);
4. with ``algorithm.filter_groups.enable`` (DAPO dynamic sampling), keep only groups whose metric differs between
   samples and draw further generation batches until ``train_batch_size`` groups are kept or
   ``max_num_gen_batches`` is reached (then the step trains on the groups it has: reported, not fatal).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flash_rc.algo.advantages import (
    GRPOConfig,
    OverlongConfig,
    dapo_keep_mask,
    grpo_advantages,
    overlong_penalty,
    rloo_advantages,
)
from flash_rc.data.prompts import PromptSampler, TrainPrompt
from flash_rc.learner.batch import TrainSequence
from flash_rc.rewards.router import score_batch
from flash_rc.rewards.types import ScoreRequest
from flash_rc.types import Completion, SamplingConfig


@dataclass
class RolloutBatch:
    """A step's training sequences (groups kept whole, in order) and the rollout's metrics."""

    sequences: list[TrainSequence]
    metrics: dict[str, float] = field(default_factory=dict)
    generated_tokens: int = 0


class RolloutSource(Protocol):
    """What the loop trains on; its state is saved in every checkpoint."""

    def collect(self, step: int) -> RolloutBatch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class OutcomeSettings:
    """The recipe keys an outcome rollout reads."""

    train_batch_size: int
    n: int
    temperature: float
    max_response_length: int
    adv_estimator: str
    norm_adv_by_std: bool
    filter_groups: bool
    filter_metric: str
    max_num_gen_batches: int
    overlong: OverlongConfig | None
    rollout_seed: int


def request_seed(*parts: object) -> int:
    """A stable 31-bit sampling seed from any parts (blake2b of their text; Python's hash() is salted per process)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def submit_prompts(engine, prompts: Sequence[TrainPrompt], sampling: SamplingConfig, seeds: Sequence[int | None]
                   ) -> list[concurrent.futures.Future]:  # fmt: skip
    """Put every prompt in flight (``sampling.n`` samples each, its own seed); the futures resolve to completions."""
    return [engine.submit(list(prompt.prompt_token_ids), SamplingConfig(**{**vars(sampling), "seed": seed}),
                          request_id=prompt.uid) for prompt, seed in zip(prompts, seeds)]


def wait_all(futures: Sequence[concurrent.futures.Future]) -> list[list[Completion] | BaseException]:
    """Each future's completions, or its error: one failed request must not stop the step."""
    results: list[list[Completion] | BaseException] = []
    for future in futures:
        try:
            results.append(future.result())
        except Exception as error:  # noqa: BLE001
            results.append(error)
    return results


def sample_prompts(engine, prompts: Sequence[TrainPrompt], sampling: SamplingConfig, seeds: Sequence[int | None]
                   ) -> list[list[Completion] | BaseException]:  # fmt: skip
    """``sampling.n`` completions per prompt, all requests in flight together; a failed request gives its error."""
    return wait_all(submit_prompts(engine, prompts, sampling, seeds))


def score_completions(prompts: Sequence[TrainPrompt], completions: Sequence[Sequence[Completion]]
                      ) -> list[list[dict]]:  # fmt: skip
    """The reward result of every completion (router + pool: time-limited, failures score 0)."""
    requests = [ScoreRequest(p.data_source, c.text, p.ground_truth, p.extra_info)
                for p, group in zip(prompts, completions) for c in group]
    results = iter(score_batch(requests))
    return [[next(results) for _ in group] for group in completions]


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {f"{prefix}/mean": 0.0, f"{prefix}/max": 0.0, f"{prefix}/min": 0.0}
    return {f"{prefix}/mean": float(values.mean()), f"{prefix}/max": float(values.max()),
            f"{prefix}/min": float(values.min())}


def length_metrics(prefix: str, lengths: Sequence[int], limit: int) -> dict[str, float]:
    """Mean / max / min of response lengths and the share that hit the budget ``limit``."""
    values = torch.tensor(lengths, dtype=torch.float64)
    clipped = float((values >= limit).double().mean()) if lengths else 0.0
    return {**_stats(prefix, values), f"{prefix}/clip_ratio": clipped}


class RolloutShards:
    """Which prompts of a generation batch this rank's engine samples, and how the ranks' results are merged.

    With one engine (``world`` None) it samples everything. With an engine on every rank (data-parallel rollouts on
    GPU), rank r samples and scores prompts r, r + D, ...; the per-prompt results are all-gathered and put back in
    batch order, so every rank ends with the same batch and the same decisions (dynamic sampling included).
    """

    def __init__(self, world=None):
        self.world = world

    def mine(self, count: int) -> list[int]:
        if self.world is None or self.world.size == 1:
            return list(range(count))
        return list(range(self.world.rank, count, self.world.size))

    def merge(self, entries: list[tuple[object, object]]) -> list[tuple[object, object]]:
        """Every rank's ``(key, value)`` entries, sorted by key (keys must be comparable and unique)."""
        if self.world is not None and self.world.size > 1:
            import torch.distributed as dist

            parts: list = [None] * self.world.size
            dist.all_gather_object(parts, entries)
            entries = [entry for part in parts for entry in part]
        return sorted(entries, key=lambda entry: entry[0])


@dataclass
class Group:
    """The samples that share a baseline (one prompt's ``n`` samples), scored, with their advantages."""

    prompt: TrainPrompt
    completions: list[Completion]
    results: list[dict]
    rewards: torch.Tensor
    advantages: torch.Tensor
    info: object = None
    """What the source attached to the prompt (RC: its training state)."""


class GroupCollector:
    """Samples groups on the engine(s), scores them, shapes rewards, computes advantages, and keeps the step's
    statistics; :meth:`batch` turns the groups kept into the learner's sequences and the rollout metrics. Shared by
    every rollout source (plain outcome RL here, RC's summary-conditioned states in :mod:`.rc_rollout`)."""

    def __init__(self, engine, settings: OutcomeSettings, shards: RolloutShards):
        self.engine, self.settings, self.shards = engine, settings, shards
        self.reasons: Counter[str] = Counter()
        self.scores: list[float] = []
        self.lengths: list[int] = []
        self.penalties: list[float] = []
        self.acc: list[float] = []
        self.failed_requests = self.groups_seen = self.generated = 0
        self.scoring_seconds = 0.0
        self.started = time.perf_counter()

    def sample(self, prompts: Sequence[TrainPrompt], seeds: Sequence[int], sampling: SamplingConfig) -> list[Group]:
        """One group per prompt that the engine served (in prompt order), ``sampling.n`` samples each; this rank
        samples its share (:class:`RolloutShards`)."""
        mine = self.shards.mine(len(prompts))
        futures = submit_prompts(self.engine, [prompts[i] for i in mine], sampling, [seeds[i] for i in mine])
        return self.gather([(i, prompts[i], None, future) for i, future in zip(mine, futures)])

    def gather(self, pending: Sequence[tuple[object, TrainPrompt, object, concurrent.futures.Future]]) -> list[Group]:
        """Wait for submitted requests ``(key, prompt, info, future)``, score what was served, merge every rank's
        (ordered by key) and make the groups; ``info`` rides along to :attr:`Group.info`."""
        outputs = wait_all([future for *_, future in pending])
        served = [(key, prompt, info, o) for (key, prompt, info, _), o in zip(pending, outputs)
                  if not isinstance(o, BaseException)]
        scoring_started = time.perf_counter()
        results = score_completions([prompt for _, prompt, _, _ in served], [o for *_, o in served])
        self.scoring_seconds += time.perf_counter() - scoring_started
        entries = [(key, (prompt, info, o, r)) for (key, prompt, info, o), r in zip(served, results)]
        failed = [(key, None) for (key, *_), o in zip(pending, outputs) if isinstance(o, BaseException)]
        merged = self.shards.merge(entries + failed)
        self.failed_requests += sum(entry is None for _, entry in merged)
        return [self._group(prompt, completions, group_results, info)
                for _, entry in merged if entry is not None for prompt, info, completions, group_results in [entry]]

    def _group(self, prompt: TrainPrompt, completions: list[Completion], results: list[dict], info=None) -> Group:
        s = self.settings
        self.groups_seen += 1
        lengths = [len(c.token_ids) for c in completions]
        self.generated += sum(lengths)
        scores = torch.tensor([r["score"] for r in results], dtype=torch.float32)
        penalty = overlong_penalty(torch.tensor(lengths), s.overlong) if s.overlong else torch.zeros_like(scores)
        rewards = scores + penalty
        self.reasons.update(r["reason"].split(":")[0] for r in results)
        self.scores += scores.tolist()
        self.penalties += penalty.tolist()
        self.lengths += lengths
        self.acc += [float(r["acc"]) for r in results]
        return Group(prompt, completions, results, rewards, self._advantages(rewards), info)

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        group = [0] * rewards.numel()
        if self.settings.adv_estimator == "rloo":
            return rloo_advantages(rewards, group)
        return grpo_advantages(rewards, group, GRPOConfig(norm_by_std=self.settings.norm_adv_by_std))

    def keeps(self, group: Group) -> bool:
        """DAPO dynamic sampling: whether the group's filter metric differs between its samples (always True when
        filtering is off)."""
        s = self.settings
        if not s.filter_groups:
            return True
        acc = torch.tensor([float(r["acc"]) for r in group.results])
        scores = torch.tensor([float(r["score"]) for r in group.results])
        metric = {"acc": acc, "score": scores}.get(s.filter_metric, group.rewards)
        return bool(dapo_keep_mask(metric, [0] * len(group.completions)).all())

    def batch(self, kept: Sequence[Group], metadata: Sequence[list[dict]] | None = None) -> RolloutBatch:
        """The learner's sequences of ``kept`` (group by group) and the step's rollout metrics."""
        s = self.settings
        sequences = [
            TrainSequence(tuple(c.prompt_token_ids), tuple(c.token_ids), tuple(c.logprobs), float(a),
                          metadata=metadata[g][k] if metadata is not None else {})
            for g, group in enumerate(kept) for k, (c, a) in enumerate(zip(group.completions,
                                                                             group.advantages.tolist()))
        ]
        rewards = torch.cat([g.rewards for g in kept]) if kept else torch.zeros(0)
        advantages = torch.cat([g.advantages for g in kept]) if kept else torch.zeros(0)
        seconds = time.perf_counter() - self.started
        generating = max(seconds - self.scoring_seconds, 1e-9)
        metrics = {
            **_stats("critic/score", torch.tensor(self.scores)),
            **_stats("critic/rewards", rewards),
            **_stats("critic/advantages", advantages),
            **length_metrics("response_length", self.lengths, s.max_response_length),
            "critic/acc/mean": float(torch.tensor(self.acc).mean()) if self.acc else 0.0,
            "reward/overlong_penalty/mean": float(torch.tensor(self.penalties).mean()) if self.penalties else 0.0,
            "reward/failed": float(sum(n for reason, n in self.reasons.items() if reason in SCORING_FAILURES)),
            "reward/timeouts": float(self.reasons.get("timeout", 0)),
            "rollout/failed_requests": float(self.failed_requests),
            "rollout/groups_kept": float(len(kept)),
            "rollout/groups_kept_fraction": len(kept) / max(self.groups_seen, 1),
            "timing_s/reward": self.scoring_seconds,
            "timing_s/generate": generating,
            "perf/rollout_tokens_per_s": self.generated / generating,
        }
        return RolloutBatch(sequences, metrics, self.generated)


class OutcomeRollout:
    """GRPO / RLOO rollouts with DAPO's dynamic sampling and overlong shaping (see the module docstring)."""

    def __init__(self, engine, sampler: PromptSampler, settings: OutcomeSettings, shards: RolloutShards | None = None):
        self.engine = engine
        self.sampler = sampler
        self.settings = settings
        self.shards = shards or RolloutShards()

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def collect(self, step: int) -> RolloutBatch:
        s = self.settings
        sampling = SamplingConfig(max_tokens=s.max_response_length, n=s.n, temperature=s.temperature)
        collector = GroupCollector(self.engine, s, self.shards)
        kept: list[Group] = []
        gen_batches = 0
        while True:
            prompts = self.sampler.next_batch()
            seeds = [request_seed(s.rollout_seed, step, gen_batches, p.uid) for p in prompts]
            gen_batches += 1
            kept += [group for group in collector.sample(prompts, seeds, sampling) if collector.keeps(group)]
            enough = len(kept) >= s.train_batch_size
            if not s.filter_groups or enough or (s.max_num_gen_batches and gen_batches >= s.max_num_gen_batches):
                break
        batch = collector.batch(kept[:s.train_batch_size])
        batch.metrics.update({"rollout/gen_batches": float(gen_batches),
                              "rollout/short_of_batch": float(max(s.train_batch_size - len(kept), 0))})
        return batch


SCORING_FAILURES = frozenset({"timeout", "worker_crashed", "error", "bad_request"})
"""Reward reasons (their first word) that mean no verdict was reached: counted in ``reward/failed``."""


def validation_metrics(engine, prompts: Sequence[TrainPrompt], sampling: SamplingConfig, seed: int
                       ) -> dict[str, float]:  # fmt: skip
    """Mean score and accuracy of ``sampling.n`` samples per prompt, per ``data_source`` (``val/<source>/...``)."""
    outputs = sample_prompts(engine, prompts, sampling, [request_seed(seed, "val", p.uid) for p in prompts])
    served = [(p, o) for p, o in zip(prompts, outputs) if not isinstance(o, BaseException)]
    results = score_completions([p for p, _ in served], [o for _, o in served])
    by_source: dict[str, list[tuple[float, float]]] = {}
    lengths = []
    for (prompt, group), group_results in zip(served, results):
        by_source.setdefault(prompt.data_source, []).extend((r["score"], float(r["acc"])) for r in group_results)
        lengths += [len(c.token_ids) for c in group]
    metrics = {"val/failed_requests": float(len(prompts) - len(served)),
               "val/response_length/mean": sum(lengths) / max(len(lengths), 1)}
    for source, values in sorted(by_source.items()):
        scores = torch.tensor(values, dtype=torch.float64)
        metrics[f"val/{source}/score/mean@{sampling.n}"] = float(scores[:, 0].mean())
        metrics[f"val/{source}/acc/mean@{sampling.n}"] = float(scores[:, 1].mean())
    return metrics
