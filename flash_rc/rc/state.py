"""State of one RC chain: a (problem, sample) pair moving through reason → summarize cycles.

A chain only changes when a turn has *completed*: :meth:`ChainState.record_turn` appends the turn, bumps the counters
and updates the current summary / reasoning in one step. A failed or retried generation therefore never duplicates a
store entry or advances a counter (PipelineRL's RC actor re-ran a cycle after half-updating the state, and its turn
counters drifted). Every turn carries its own metadata, including the engine weight version that *generated that
turn* (not the version the chain started with), so lag accounting stays right under in-flight weight updates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TurnType = Literal["reasoning", "summarization"]
ChainMode = Literal["rc", "self_refine", "self_verify"]
SummaryMode = Literal["replace", "append"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Turn:
    """One completed generation of a chain."""

    turn_type: TurnType
    turn_number: int
    """1-based index among turns of the same type."""
    cycle_step: int
    """0-based index among all turns of the chain (reasoning 1 = 0, summary 1 = 1, reasoning 2 = 2, ...)."""
    prompt: str
    """The filled template (the user message content)."""
    prompt_token_ids: list[int]
    raw_text: str
    """The text as generated."""
    text: str
    """The processed text the cycle uses (think tags handled)."""
    token_ids: list[int]
    logprobs: list[float]
    """Rollout (processed) logprob of each generated token."""
    finish_reason: str
    model_version: int
    """Engine weight version that generated the end of this turn."""
    model_version_start: int
    """Engine weight version when this turn was admitted (differs only under in-flight updates)."""
    pred: str | None = None
    """Extracted answer (reasoning turns, once graded)."""
    score: float | None = None
    correct: bool | None = None


@dataclass
class ChainState:
    """Everything known about one chain; serialisable with :meth:`to_record`."""

    problem_id: str
    sample_id: int
    problem: str
    ground_truth: str | None = None
    data_source: str = "openai/gsm8k"
    curr_summary: str = ""
    curr_reasoning: str = ""
    starting_step: int = 0
    """Cycles already behind the initial summary (non-zero when a chain resumes from a replayed summary)."""
    turns: list[Turn] = field(default_factory=list)
    reasoning_turn_number: int = 0
    summarization_turn_number: int = 0
    overall_cycle_step: int = 0
    status: Literal["pending", "running", "done", "failed"] = "pending"
    error: str | None = None

    # ------------------------------------------------------------------ stores

    @property
    def reasoning_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.turn_type == "reasoning"]

    # ------------------------------------------------------------------ prompts

    def prompt_values(self, turn_type: TurnType) -> dict[str, str]:
        """The template fields for the next turn of ``turn_type``."""
        if turn_type == "reasoning":
            return {"problem": self.problem, "curr_summary": self.curr_summary, "curr_reasoning": self.curr_reasoning}
        return {"problem": self.problem, "existing_summary": self.curr_summary, "reasoning": self.curr_reasoning}

    # ------------------------------------------------------------------ updates

    def record_turn(self, turn_type: TurnType, prompt: str, completion: Any,
                    summary_mode: SummaryMode = "replace", use_think_tags: bool = False) -> Turn:
        """Append a completed turn (a ``rollout.engine.Completion``) and advance the chain in one step.

        ``summary_mode``: a new summary ``replace``s the current one (RC) or is ``append``ed to it.
        ``use_think_tags``: only the thinking before ``</think>`` of a reasoning turn is carried to the summarizer.
        """
        if turn_type == "reasoning":
            self.reasoning_turn_number += 1
            number, text = self.reasoning_turn_number, reasoning_for_summary(completion.text, use_think_tags)
            self.curr_reasoning = text
        else:
            self.summarization_turn_number += 1
            number, text = self.summarization_turn_number, clean_summary(completion.text)
            if summary_mode == "append" and self.curr_summary:
                self.curr_summary = f"{self.curr_summary}\n\n{text}"
            else:
                self.curr_summary = text
        turn = Turn(
            turn_type=turn_type,
            turn_number=number,
            cycle_step=self.overall_cycle_step,
            prompt=prompt,
            prompt_token_ids=list(completion.prompt_token_ids),
            raw_text=completion.text,
            text=text,
            token_ids=list(completion.token_ids),
            logprobs=list(completion.logprobs),
            finish_reason=completion.finish_reason,
            model_version=completion.model_version,
            model_version_start=completion.model_version_start,
        )
        self.turns.append(turn)
        self.overall_cycle_step += 1
        return turn

    def turn_metadata(self, turn: Turn) -> dict[str, Any]:
        """The per-turn metadata contract shared with the learner and the verl agent loop."""
        return {
            "problem_id": self.problem_id,
            "sample_id": self.sample_id,
            "cycle_step": turn.cycle_step,
            "turn_type": turn.turn_type,
            "turn_number": turn.turn_number,
            "model_version": turn.model_version,
        }

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole chain (one line of ``flash-rc decode`` output)."""
        record = asdict(self)
        record["turns"] = [{**asdict(turn), "metadata": self.turn_metadata(turn)} for turn in self.turns]
        return record


def reasoning_for_summary(text: str, use_think_tags: bool) -> str:
    """What of a reasoning turn reaches the summarizer: with think tags, only the thinking before ``</think>``."""
    if use_think_tags:
        text = text.split(THINK_CLOSE, 1)[0].replace(THINK_OPEN, "")
    return text.strip()


def clean_summary(text: str) -> str:
    """A summary without think tags: if the summarizer thought first, keep only what follows ``</think>``."""
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    return text.replace(THINK_OPEN, "").strip()
