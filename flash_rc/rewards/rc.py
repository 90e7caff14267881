"""Per-turn rewards for a Reasoning-Cache (RC) chain: every reasoning turn is scored on its own final answer.

Why per turn: an RC rollout reasons, summarises, and reasons again from the summary. Scoring only the last turn
(what verl's reward managers do for multi-output trajectories) hides whether a cycle helped or hurt; per-turn scores
let training credit each turn and let evals measure accuracy as a function of the number of cycles.

The interface takes plain strings -- the turn texts of a chain, in order -- so it does not depend on how
``flash_rc.rc`` stores its chain state: pass each reasoning turn's text (summaries are not scored). All turns of all
chains are scored as one parallel batch through the router, so every turn gets its data source's time limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flash_rc.rewards.router import ScoreRequest, score_batch
from flash_rc.rewards.types import RewardResult


@dataclass(frozen=True)
class RcChain:
    """One RC rollout to score."""

    turns: Sequence[str]
    """Text of each reasoning turn, in order (each should end with its own final answer)."""
    ground_truth: Any
    """The row's ``reward_model.ground_truth``."""
    data_source: str
    """The row's ``data_source``; picks the scorer exactly as for single-turn rollouts."""
    extra_info: dict | None = None


def score_rc_chains(chains: Sequence[RcChain], pool=None, **scorer_kwargs: Any) -> list[list[RewardResult]]:
    """Per-turn results for each chain (``result[i][t]`` is turn t of chain i), scored in one batch."""
    requests = []
    for index, chain in enumerate(chains):
        if isinstance(chain.turns, str) or not chain.turns:
            raise ValueError(f"RC chain {index} must hold a non-empty sequence of turn texts, got {chain.turns!r:.80}")
        requests += [ScoreRequest(chain.data_source, turn, chain.ground_truth, chain.extra_info, scorer_kwargs)
                     for turn in chain.turns]
    results = score_batch(requests, pool=pool)
    per_chain, offset = [], 0
    for chain in chains:
        per_chain.append(results[offset:offset + len(chain.turns)])
        offset += len(chain.turns)
    return per_chain


def score_rc_chain(turns: Sequence[str], ground_truth: Any, data_source: str, extra_info: dict | None = None,
                   pool=None, **scorer_kwargs: Any) -> list[RewardResult]:
    """Per-turn results for one chain."""
    return score_rc_chains([RcChain(turns, ground_truth, data_source, extra_info)], pool, **scorer_kwargs)[0]
