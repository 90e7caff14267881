"""``flash-rc decode``: RC decoding over a file of problems, with accuracy per cycle.

Reads problems (GSM8K JSONL ``{question, answer}``, verl parquet/JSONL rows, or ``{problem, answer}`` rows), runs
every (problem, sample) chain through the async scheduler on one rollout engine, grades every reasoning turn on its
own final answer, writes one JSON line per chain *as soon as the chain ends* (flushed, so an interrupted run keeps
what it produced), and prints pass@1 after each cycle.

The parts are reusable on their own: problems come from ``flash_rc.data.problems``, grading and per-cycle accuracy
from ``flash_rc.rc.grading``, the cycles from ``flash_rc.rc.scheduler``; this module is the recipe schema and the CLI.

Config: a recipe YAML in verl's key names (``data.val_files``, ``actor_rollout_ref.model.path``,
``actor_rollout_ref.rollout.val_kwargs.*``) plus ``flash_rc.rc`` (the cycle) and ``flash_rc.decode`` (this command).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from pydantic import Field

from flash_rc.config import ActorRolloutRefSection, EngineExtras, Section, engine_config, load_recipe
from flash_rc.data.problems import load_problems
from flash_rc.errors import ConfigError, RunFailedError
from flash_rc.outputs import output_error, prepare_output_file
from flash_rc.rc.grading import CycleAccuracy, Grading, make_grader
from flash_rc.rc.scheduler import CycleConfig, CyclePrompts, CycleScheduler
from flash_rc.rc.state import ChainState


class DataSection(Section):
    """verl's ``data`` keys decode reads."""

    val_files: str | list[str]
    """Problem file(s): .jsonl, .json or .parquet (required)."""
    val_max_samples: int = Field(-1, ge=-1)
    """Use at most this many problems (-1: all)."""


class DecodeOptions(Section):
    """``flash_rc.decode``: what this command does with the chains."""

    output: str = "outputs/rc_decode.jsonl"
    """Where to write one JSON line per chain (overwritten at start, appended as chains finish)."""
    offset: int = Field(0, ge=0)
    """Skip this many problems first."""
    grading: Grading = "answer"
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


# ---------------------------------------------------------------------- run


def run_decode(recipe: DecodeRecipe, progress: bool = True) -> dict[str, Any]:
    """Decode every chain of the recipe; returns a summary (accuracy per cycle, timings, counts)."""
    from tqdm import tqdm

    from flash_rc.rollout.engine import RolloutEngine

    options, cycle = recipe.flash_rc.decode, recipe.flash_rc.rc
    val_kwargs = recipe.actor_rollout_ref.rollout.val_kwargs
    # a bad template, bad data or an unwritable output fails here, before the engine starts
    CyclePrompts.from_config(cycle)
    grader = make_grader(options.grading)
    problems = load_problems(recipe.data.val_files, options.offset, recipe.data.val_max_samples)
    if not problems:
        raise ConfigError(f"no problems to decode in {recipe.data.val_files} with flash_rc.decode.offset="
                          f"{options.offset} and data.val_max_samples={recipe.data.val_max_samples}")
    output = prepare_output_file(options.output)
    chains = [
        ChainState(problem_id=p.problem_id, sample_id=s, problem=p.problem, ground_truth=p.ground_truth,
                   data_source=p.data_source)
        for p in problems
        for s in range(val_kwargs.n)
    ]
    accuracy = CycleAccuracy(cycle.num_cycles)
    with RolloutEngine(engine_config(recipe)) as engine, _open_output(output) as sink, \
            tqdm(total=len(chains), desc="chains", disable=not progress) as bar:
        scheduler = CycleScheduler(engine, cycle, val_kwargs.sampling(), grader=grader)
        runnable = [c for c in chains if c.problem.strip()]

        def on_chain_done(chain: ChainState) -> None:
            try:
                sink.write(json.dumps(chain.to_record()) + "\n")
                sink.flush()
            except OSError as error:  # e.g. the disk filled up: what was flushed before stays
                raise output_error(output, error) from None
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
        "first_error": next((c.error for c in chains if c.status == "failed"), None),
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


def _open_output(path):
    try:
        return path.open("w")
    except OSError as error:
        raise output_error(path, error) from None


def main(argv: list[str]) -> int:
    from flash_rc.cli import recipe_arguments

    args = recipe_arguments("flash-rc decode", __doc__.split("\n\n")[0], "flash_rc.rc.num_cycles=4", argv)
    recipe = load_recipe(DecodeRecipe, args.config, args.overrides)
    summary = run_decode(recipe, progress=not args.no_progress)
    print(format_summary(summary))
    if summary["chains"] and summary["failed"] == summary["chains"]:
        first_error = summary["first_error"]
        raise RunFailedError(f"every chain failed (first: {first_error}); the records are in {summary['output']}")
    return 0
