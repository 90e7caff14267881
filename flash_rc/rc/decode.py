"""``flash-rc decode``: RC decoding over a file of problems, with accuracy per cycle.

Reads problems (GSM8K JSONL ``{question, answer}``, verl parquet/JSONL rows, or ``{problem, answer}`` rows), runs
every (problem, sample) chain through the async scheduler on one rollout engine, grades every reasoning turn on its
own final answer, writes one JSON line per chain *as soon as the chain ends* (flushed, so an interrupted run keeps
what it produced), and prints pass@1 after each cycle.

Config: a recipe YAML in verl's key names (``data.val_files``, ``actor_rollout_ref.model.path``,
``actor_rollout_ref.rollout.val_kwargs.*``) plus ``flash_rc.rc`` (the cycle) and ``flash_rc.decode`` (this command).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from flash_rc.config import ActorRolloutRefSection, EngineExtras, Section, engine_config, load_recipe
from flash_rc.data.gsm8k import ground_truth_from_answer
from flash_rc.data.rows import read_records
from flash_rc.rc.scheduler import CycleConfig, CyclePrompts, CycleScheduler
from flash_rc.rc.state import ChainState, Turn


class DataSection(Section):
    """verl's ``data`` keys decode reads."""

    val_files: str | list[str]
    """Problem file(s): .jsonl, .json or .parquet (required)."""
    val_max_samples: int = -1
    """Use at most this many problems (-1: all)."""


class DecodeOptions(Section):
    """``flash_rc.decode``: what this command does with the chains."""

    output: str = "outputs/rc_decode.jsonl"
    """Where to write one JSON line per chain (overwritten at start, appended as chains finish)."""
    offset: int = Field(0, ge=0)
    """Skip this many problems first."""
    grading: Literal["answer", "data_source"] = "answer"
    """``answer``: grade each reasoning turn's last \\boxed{} answer (what the RC prompt asks for; GSM8K's
    ``#### n`` when there is no box) against the ground truth with math-verify; ``data_source``: the row's own
    scorer (e.g. GSM8K strict ``####``)."""


class FlashRCDecodeSection(Section):
    rc: CycleConfig = CycleConfig()
    engine: EngineExtras = EngineExtras()
    decode: DecodeOptions = DecodeOptions()


class DecodeRecipe(Section):
    data: DataSection
    actor_rollout_ref: ActorRolloutRefSection = ActorRolloutRefSection()
    flash_rc: FlashRCDecodeSection = FlashRCDecodeSection()


# ---------------------------------------------------------------------- problems


@dataclass
class Problem:
    problem_id: str
    problem: str
    ground_truth: str | None
    data_source: str


def problem_from_row(row: dict[str, Any], index: int, where: str) -> Problem:
    """One problem from a verl, GSM8K or ``{problem, answer}`` row: the raw problem text, not a prompt."""
    extra = row.get("extra_info") or {}
    data_source = row.get("data_source", "openai/gsm8k")
    if "reward_model" in row or "prompt" in row:  # verl row: the raw question lives in extra_info when present
        text = extra.get("question") or _last_user_message(row.get("prompt"))
        truth = (row.get("reward_model") or {}).get("ground_truth")
    else:
        text = row.get("problem", row.get("question"))
        truth = row.get("answer", row.get("ground_truth"))
        if isinstance(truth, str) and "####" in truth:  # a GSM8K solution: its final number, verl's rule
            truth = ground_truth_from_answer(truth, where)
    if text is None:
        raise ValueError(f"{where}: no problem text (expected 'question', 'problem' or 'prompt')")
    problem_id = str(extra.get("index", row.get("id", index)))
    return Problem(problem_id, str(text), None if truth is None else str(truth), data_source)


def _last_user_message(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else None


def load_problems(files: str | list[str], offset: int = 0, limit: int = -1) -> list[Problem]:
    files = [files] if isinstance(files, str) else list(files)
    problems: list[Problem] = []
    for file in files:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"problem file not found: {path}")
        from_file = [problem_from_row(row, i, where) for i, (where, row) in enumerate(read_records(path))]
        if len(files) > 1:  # ids (row numbers, extra_info.index) are per file: keep them unique across files
            for problem in from_file:
                problem.problem_id = f"{path.stem}/{problem.problem_id}"
        problems += from_file
    problems = problems[offset:]
    return problems if limit < 0 else problems[:limit]


# ---------------------------------------------------------------------- grading


def make_grader(grading: str):
    """A scheduler grader: score each reasoning turn with flash_rc's time-limited reward router."""
    from flash_rc.rewards import compute_score_async

    async def grade(chain: ChainState, turn: Turn) -> None:
        if chain.ground_truth is None:
            return
        data_source = "flash_rc/rc_answer" if grading == "answer" else chain.data_source
        result = await compute_score_async(data_source, turn.raw_text, chain.ground_truth)
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


# ---------------------------------------------------------------------- run


def run_decode(recipe: DecodeRecipe, progress: bool = True) -> dict[str, Any]:
    """Decode every chain of the recipe; returns a summary (accuracy per cycle, timings, counts)."""
    from tqdm import tqdm

    from flash_rc.rollout.engine import RolloutEngine

    options, cycle = recipe.flash_rc.decode, recipe.flash_rc.rc
    val_kwargs = recipe.actor_rollout_ref.rollout.val_kwargs
    CyclePrompts.from_config(cycle)  # fail on a bad template before the engine starts
    grader = make_grader(options.grading)
    problems = load_problems(recipe.data.val_files, options.offset, recipe.data.val_max_samples)
    chains = [
        ChainState(problem_id=p.problem_id, sample_id=s, problem=p.problem, ground_truth=p.ground_truth,
                   data_source=p.data_source)
        for p in problems
        for s in range(val_kwargs.n)
    ]
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    accuracy = CycleAccuracy(cycle.num_cycles)
    with RolloutEngine(engine_config(recipe.actor_rollout_ref, recipe.flash_rc.engine)) as engine, \
            output.open("w") as sink, tqdm(total=len(chains), desc="chains", disable=not progress) as bar:
        scheduler = CycleScheduler(engine, cycle, val_kwargs.sampling(), grader=grader)
        runnable = [c for c in chains if c.problem.strip()]

        def on_chain_done(chain: ChainState) -> None:
            sink.write(json.dumps(chain.to_record()) + "\n")
            sink.flush()
            accuracy.add(chain)
            bar.update(1)
            bar.set_postfix(last_cycle_acc=f"{accuracy.per_cycle()[-1]:.3f}")

        for chain in chains:  # empty problems become failed records, never engine calls
            if not chain.problem.strip():
                chain.status, chain.error = "failed", "empty problem text"
                on_chain_done(chain)
        started = time.perf_counter()  # decoding only: engine start-up is not throughput
        asyncio.run(scheduler.run(runnable, on_chain_done=on_chain_done))
        elapsed = time.perf_counter() - started
    generated = sum(len(t.token_ids) for c in chains for t in c.turns)
    return {
        "chains": len(chains),
        "failed": sum(c.status == "failed" for c in chains),
        "accuracy_per_cycle": accuracy.per_cycle(),
        "generated_tokens": generated,
        "seconds": elapsed,
        "tokens_per_second": generated / elapsed if elapsed else 0.0,
        "output": str(output),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'cycle':>5}  {'pass@1':>7}"]
    lines += [f"{t:>5}  {acc:>7.3f}" for t, acc in enumerate(summary["accuracy_per_cycle"], 1)]
    lines.append(
        f"{summary['chains']} chains ({summary['failed']} failed), {summary['generated_tokens']} tokens in "
        f"{summary['seconds']:.1f}s ({summary['tokens_per_second']:.0f} tok/s) -> {summary['output']}"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="flash-rc decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="recipe YAML (verl key names + flash_rc section)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. flash_rc.rc.num_cycles=4")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    recipe = load_recipe(DecodeRecipe, args.config, args.overrides)
    print(format_summary(run_decode(recipe, progress=not args.no_progress)))
    return 0
