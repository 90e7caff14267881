"""Per-turn rewards for Reasoning-Cache chains: every reasoning turn is scored on its own final answer.

Why per turn: an RC chain reasons, summarises, and reasons again from the summary. Scoring only the last turn (what
verl's reward managers do for multi-output trajectories) hides whether a cycle helped or hurt; per-turn scores let
training credit each turn and let evals measure accuracy as a function of the number of cycles.

One scoring path, two ways in: :func:`turn_score_request` builds the router request for one turn, which
:func:`make_grader` awaits as each turn finishes (decoding, so slow scorers never block other chains) and
:func:`score_rc_chains` scores in one parallel batch for chains given as plain turn texts. Both go through the
time-limited reward router, so every turn gets its data source's time limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flash_rc.rc.state import ChainState, Turn
from flash_rc.rewards.router import ScoreRequest, compute_score_async, score_batch
from flash_rc.rewards.types import RewardResult

Grading = Literal["answer", "data_source"]
"""``answer``: each turn's last ``\\boxed{}`` answer (what the RC prompt asks for; GSM8K's ``#### n`` when there is
no box) against the ground truth with math-verify; ``data_source``: the row's own scorer."""

RC_ANSWER_SOURCE = "flash_rc/rc_answer"
"""The router's data source for ``grading="answer"``."""


def turn_score_request(text: str, ground_truth: Any, data_source: str, grading: Grading = "data_source",
                       extra_info: dict | None = None, **scorer_kwargs: Any) -> ScoreRequest:
    """The router request that scores one reasoning turn's text."""
    source = RC_ANSWER_SOURCE if grading == "answer" else data_source
    return ScoreRequest(source, text, ground_truth, extra_info, scorer_kwargs)


def make_grader(grading: Grading):
    """A scheduler grader: score each reasoning turn as it finishes, in the reward pool, and record the verdict."""

    async def grade(chain: ChainState, turn: Turn) -> None:
        if chain.ground_truth is None:
            return
        request = turn_score_request(turn.raw_text, chain.ground_truth, chain.data_source, grading)
        result = await compute_score_async(request.data_source, request.solution_str, request.ground_truth,
                                           request.extra_info, **request.kwargs)
        turn.pred, turn.score, turn.correct = result["pred"], float(result["score"]), bool(result["acc"])

    return grade


class CycleAccuracy:
    """Running pass@1 per cycle: turn t correct / chains counted (a chain that failed before turn t counts as wrong)."""

    def __init__(self, num_cycles: int):
        self.correct = [0] * num_cycles
        self.chains = 0

    def add(self, chain: ChainState) -> None:
        self.chains += 1
        for turn in chain.reasoning_turns[: len(self.correct)]:
            self.correct[turn.turn_number - 1] += bool(turn.correct)

    def per_cycle(self) -> list[float]:
        return [c / self.chains if self.chains else 0.0 for c in self.correct]


@dataclass(frozen=True)
class RcChain:
    """One RC rollout to score, as plain strings (e.g. turns from another system's rollouts)."""

    turns: Sequence[str]
    """Text of each reasoning turn, in order (each should end with its own final answer)."""
    ground_truth: Any
    """The row's ``reward_model.ground_truth``."""
    data_source: str
    """The row's ``data_source``; picks the scorer exactly as for single-turn rollouts."""
    extra_info: dict | None = None


def score_rc_chains(chains: Sequence[RcChain], pool=None, grading: Grading = "data_source",
                    **scorer_kwargs: Any) -> list[list[RewardResult]]:
    """Per-turn results for each chain (``result[i][t]`` is turn t of chain i), scored in one batch."""
    requests = []
    for index, chain in enumerate(chains):
        if isinstance(chain.turns, str) or not chain.turns:
            raise ValueError(f"RC chain {index} must hold a non-empty sequence of turn texts, got {chain.turns!r:.80}")
        requests += [turn_score_request(turn, chain.ground_truth, chain.data_source, grading, chain.extra_info,
                                        **scorer_kwargs) for turn in chain.turns]
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
