"""A checkpoint sweep: every checkpoint of one or more runs on GSM8K test, through ONE rollout engine.

Why one engine: starting vLLM costs seconds on a tiny model and minutes on a real one (load, profile, compile), and a
sweep evaluates tens of checkpoints of the same architecture. The engine starts on the first checkpoint; every next
one is streamed into it with the weight-sync path the learner uses (``engine.load(CheckpointTensors(path))``: one
decoder layer at a time, validated before any engine weight changes). The summary reports the measured start-up time
against the sync time, i.e. what a restart per checkpoint would have cost.

What is measured per checkpoint, over ``n`` samples of each problem (greedy when ``n`` is 1):

* ``strict`` / ``flexible``: mean accuracy (mean@n) with GSM8K's strict (last ``#### n``) and flexible (last number)
  extraction, through the reward router (``flash_rc.rewards.gsm8k``'s ``method``). Rows of other data sources are
  scored by their own scorer, whose verdict then fills both columns;
* ``pass_at_1`` / ``pass_at_k``: the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` per problem with c strict-correct
  samples, averaged (``flash_rc.rewards.pass_at_k``); ``pass_at_k`` is empty when ``n < k``;
* RC mode (``cycles`` = T_test): each sample is a chain of T reason -> summarize cycles (``CycleScheduler``); every
  reasoning turn is scored, ``accuracy_per_cycle[t]`` is the strict accuracy of turn t+1 (a chain that failed earlier
  counts as wrong) and the columns above use the last turn.

Prompts: single mode asks verl's GSM8K prompt (the row's own prompt for verl rows, else the question followed by
``flash_rc.data.gsm8k.INSTRUCTION``); RC mode uses RC's reasoning prompt with the same ``####`` answer instruction in
place of its ``\\boxed{}`` one (the scorers here read ``####``), and RC's summarization prompt.

Files (the contract shared with ``flash_rc.eval.report``): ``gsm8k.csv`` gets one row per (checkpoint, settings),
appended whole (one write, flushed, fsynced) after the checkpoint's generations file was renamed into place, so Ctrl-C
loses at most the checkpoint in flight; a rerun skips checkpoints that have a row without error for the same
``settings_hash`` (error rows are retried). A corrupt, incomplete or mismatched checkpoint gets an error row and the
sweep goes on: the tensors the engine starts on are checked as a sync checks them (readable, finite), a refused sync
leaves the engine's weights untouched, and one that failed mid-stream is repaired by the next checkpoint's full sync.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from flash_rc.data.gsm8k import INSTRUCTION
from flash_rc.data.problems import Problem, problem_from_row
from flash_rc.data.rows import read_records
from flash_rc.errors import ConfigError, FlashRCError, RowError, UnknownDataSourceError, WeightUpdateError
from flash_rc.eval import report
from flash_rc.eval.discovery import Checkpoint, hf_weights_problem
from flash_rc.outputs import atomic_write, output_error, prepare_output_dir
from flash_rc.rc import prompts as P
from flash_rc.rewards.pass_at_k import mean_pass_at_k
from flash_rc.rewards.router import GSM8K, compute_score_async, resolve_route
from flash_rc.schema import FrozenSection
from flash_rc.types import Precision

DEFAULT_DATA = "../shared/data/gsm8k/test.jsonl"
CSV_NAME = "gsm8k.csv"
GENERATIONS_DIR = "generations"
COLUMNS = ("run", "step", "checkpoint", "precision", "mode", "strict", "flexible", "pass_at_1", "pass_at_k", "k", "n",
           "cycles", "accuracy_per_cycle", "problems", "seconds", "error", "settings_hash", "generations")
RC_REASONING_PROMPT = P.REASONING_PROMPT.replace("give your final answer in \\boxed{{}}.",
                                                 'output the final answer after "####".')
"""RC's I_R asking for GSM8K's ``#### n`` answer instead of ``\\boxed{}``."""
SINGLE_PROMPT = f"the row's prompt (verl rows), else {{question}} {INSTRUCTION}"
"""What single mode asks (hashed into the settings)."""
PROMPT_ROOM = 1024
"""Context tokens reserved for a prompt (template + problem) when the engine's ``max_model_len`` is derived."""


class SweepSettings(FrozenSection):
    """Everything that changes a checkpoint's numbers (hashed into ``settings_hash``)."""

    data: str = DEFAULT_DATA
    """Problem file: GSM8K JSONL ``{question, answer}`` or verl parquet/JSONL rows (any data_source the router
    knows)."""
    limit: int = Field(-1, ge=-1)
    """Evaluate only the first ``limit`` problems (-1: all)."""
    n: int = Field(1, ge=1)
    """Samples per problem (mean@n, pass@k)."""
    k: int = Field(1, ge=1)
    """k of the ``pass_at_k`` column (empty when ``n < k``)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_tokens: int = Field(1024, ge=1)
    """Generation budget of an answer (a reasoning turn, H_R, in RC mode)."""
    max_summary_tokens: int = Field(512, ge=1)
    """RC mode: budget of a summarization turn (H_S)."""
    mode: Literal["single", "rc"] = "single"
    """``single``: one answer per sample; ``rc``: ``cycles`` reason -> summarize cycles per sample."""
    cycles: int = Field(1, ge=1)
    """T_test: reasoning turns per RC chain (1 in single mode)."""
    precision: Precision = "bf16"
    """Rollout engine weights: ``bf16``, or ``int8`` / ``fp8`` to see what a quantized rollout engine saw."""
    seed: int = 0
    """Seed of every sampling request (RC turns derive theirs from it)."""
    engine: tuple[str, ...] = ()
    """Further ``EngineConfig`` settings as ``key=value`` (e.g. ``kv_cache_gib=0.5``, ``dtype=float32``)."""


def settings_hash(settings: SweepSettings) -> str:
    """12 hex digits of sha256 over the settings, the data file's resolved path, size and mtime, and the prompts."""
    data = Path(settings.data).expanduser().resolve()
    stat = data.stat()
    prompts = [RC_REASONING_PROMPT, P.SUMMARIZATION_PROMPT] if settings.mode == "rc" else [SINGLE_PROMPT]
    payload = {**settings.model_dump(), "data": str(data), "data_size": stat.st_size,
               "data_mtime_ns": stat.st_mtime_ns, "prompts": prompts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def engine_config(settings: SweepSettings, model: Path):
    """The engine for a sweep: the checkpoint as model, the settings' precision and seed, a context that fits the
    longest turn (``--engine max_model_len=...`` wins), and the ``engine`` overrides."""
    from flash_rc.config import load_recipe
    from flash_rc.rollout.engine_config import EngineConfig

    overrides = list(settings.engine)
    given = {override.partition("=")[0] for override in overrides}
    refused = given & {"model", "precision", "seed"}
    if refused:
        raise ConfigError(f"--engine {min(refused)}=... is set by the sweep itself (checkpoint, --precision, "
                          "--seed)")
    if "max_model_len" not in given:
        turn = settings.max_tokens + (2 * settings.max_summary_tokens if settings.mode == "rc" else 0)
        overrides.append(f"max_model_len={turn + PROMPT_ROOM}")
    config = load_recipe(EngineConfig, None, overrides)
    return config.model_copy(update={"model": str(model), "precision": settings.precision, "seed": settings.seed})


# ---------------------------------------------------------------------- problems


@dataclass(frozen=True)
class EvalProblem:
    problem: Problem
    messages: list[dict[str, str]]
    """Single mode's prompt: the verl row's own messages, else the question followed by verl's GSM8K instruction."""
    gsm8k: bool
    """Scored by the GSM8K scorer (which has a ``flexible`` method); other scorers give one verdict."""


def load_eval_problems(path: str, limit: int = -1) -> list[EvalProblem]:
    """Every row of ``path`` checked (text, ground truth, a known scorer), then the first ``limit`` (-1: all).

    A bad row is a RowError naming its file and line, raised before any engine starts.
    """
    problems = []
    for index, (where, row) in enumerate(read_records(Path(path).expanduser())):
        problem = problem_from_row(row, index, where)
        if not problem.problem.strip():
            raise RowError(f"{where}: empty problem text")
        if problem.ground_truth is None or not problem.ground_truth.strip():
            raise RowError(f"{where}: no ground truth (expected 'answer' or 'reward_model.ground_truth')")
        try:
            route = resolve_route(problem.data_source, row.get("extra_info"))
        except UnknownDataSourceError as error:
            raise RowError(f"{where}: {error}") from None
        prompt = row.get("prompt") if "reward_model" in row else None
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = list(prompt) if prompt else [{"role": "user", "content": f"{problem.problem} {INSTRUCTION}"}]
        problems.append(EvalProblem(problem, messages, route.scorer == GSM8K.scorer))
    if not problems:
        raise RowError(f"{path}: no problems")
    return problems if limit < 0 else problems[:limit]


# ---------------------------------------------------------------------- one checkpoint


@dataclass
class CycleResult:
    reasoning: str
    summary: str | None
    pred: str | None = None
    correct: bool = False


@dataclass
class SampleResult:
    problem: EvalProblem
    sample_id: int
    cycles: list[CycleResult]
    flexible_correct: bool = False
    error: str | None = None

    @property
    def correct(self) -> bool:
        """Strict verdict of the last reasoning turn (False when the sample produced none)."""
        return bool(self.cycles) and self.cycles[-1].correct

    def record(self) -> dict[str, Any]:
        """One line of the generations JSONL."""
        p = self.problem.problem
        return {"problem_id": p.problem_id, "sample_id": self.sample_id, "question": p.problem,
                "ground_truth": p.ground_truth, "data_source": p.data_source,
                "cycles": [vars(cycle) for cycle in self.cycles],
                "final_pred": self.cycles[-1].pred if self.cycles else None, "correct": self.correct,
                "error": self.error}


async def _score(problem: EvalProblem, text: str, method: str) -> dict[str, Any]:
    kwargs = {"method": method} if problem.gsm8k else {}
    p = problem.problem
    return await compute_score_async(p.data_source, text, p.ground_truth, **kwargs)


async def _score_sample(sample: SampleResult) -> SampleResult:
    """Strict verdict of every reasoning turn; flexible of the last (the scorer's one verdict for non-GSM8K rows)."""
    verdicts = await asyncio.gather(*(_score(sample.problem, cycle.reasoning, "strict") for cycle in sample.cycles))
    for cycle, verdict in zip(sample.cycles, verdicts):
        cycle.pred, cycle.correct = verdict["pred"], bool(verdict["acc"])
    if sample.cycles:
        sample.flexible_correct = sample.correct if not sample.problem.gsm8k else \
            bool((await _score(sample.problem, sample.cycles[-1].reasoning, "flexible"))["acc"])
    return sample


def _error_text(error: BaseException) -> str:
    """An exception as one line (multi-line sync refusals included), at most 400 characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]


class SampleGenerator:
    """Generates the ``n`` samples of a problem: one request with ``n`` completions (single) or ``n`` RC chains."""

    def __init__(self, engine, settings: SweepSettings):
        from flash_rc.types import SamplingConfig

        self.engine, self.settings = engine, settings
        self.sampling = SamplingConfig(max_tokens=settings.max_tokens, n=settings.n, temperature=settings.temperature,
                                       top_p=settings.top_p, seed=settings.seed)
        self.scheduler = None
        if settings.mode == "rc":
            from flash_rc.rc.scheduler import CycleConfig, CycleScheduler

            cycle = CycleConfig(num_cycles=settings.cycles, max_thinking_tokens=settings.max_tokens,
                                max_summary_tokens=settings.max_summary_tokens, seed=settings.seed,
                                reasoning_prompt=RC_REASONING_PROMPT, summarize_last_cycle=False)
            self.scheduler = CycleScheduler(engine, cycle, SamplingConfig(temperature=settings.temperature,
                                                                          top_p=settings.top_p))
            self.chain_slots = asyncio.Semaphore(cycle.max_concurrent_chains)

    async def samples(self, problem: EvalProblem) -> list[SampleResult]:
        if self.scheduler is None:
            try:
                completions = await self.engine.agenerate(problem.messages, self.sampling)
            except Exception as error:  # e.g. a prompt longer than the context: this problem's samples fail alone
                return [SampleResult(problem, s, [], error=_error_text(error)) for s in range(self.settings.n)]
            return [SampleResult(problem, s, [CycleResult(c.text, None)]) for s, c in enumerate(completions)]
        return list(await asyncio.gather(*(self._chain(problem, s) for s in range(self.settings.n))))

    async def _chain(self, problem: EvalProblem, sample_id: int) -> SampleResult:
        from flash_rc.rc.state import ChainState

        p = problem.problem
        chain = ChainState(problem_id=p.problem_id, sample_id=sample_id, problem=p.problem,
                           ground_truth=p.ground_truth, data_source=p.data_source)
        async with self.chain_slots:
            await self.scheduler.run_chain(chain)  # a failure marks the chain failed, never raises
        cycles: list[CycleResult] = []
        for turn in chain.turns:
            if turn.turn_type == "reasoning":
                cycles.append(CycleResult(turn.raw_text, None))
            else:
                cycles[-1].summary = turn.text
        return SampleResult(problem, sample_id, cycles, error=chain.error)


def evaluate(engine, problems: Sequence[EvalProblem], settings: SweepSettings,
             on_sample: Callable[[SampleResult], None]) -> list[list[SampleResult]]:
    """The scored samples of every problem; ``on_sample`` gets each as soon as it is scored (in completion order)."""

    async def run() -> list[list[SampleResult]]:
        generator = SampleGenerator(engine, settings)

        async def one(problem: EvalProblem) -> list[SampleResult]:
            samples = await asyncio.gather(*map(_score_sample, await generator.samples(problem)))
            for sample in samples:
                on_sample(sample)
            return list(samples)

        return list(await asyncio.gather(*map(one, problems)))

    return asyncio.run(run())


def metrics(results: Sequence[Sequence[SampleResult]], settings: SweepSettings) -> dict[str, Any]:
    """The CSV's metric columns from the scored samples (see the module docstring)."""
    samples = [sample for per_problem in results for sample in per_problem]
    failed = [sample for sample in samples if sample.error is not None]
    if len(failed) == len(samples):
        raise _CheckpointFailed(f"every sample failed (first: {failed[0].error})")
    counts = [(len(per_problem), sum(s.correct for s in per_problem)) for per_problem in results]
    per_cycle = [sum(len(s.cycles) > t and s.cycles[t].correct for s in samples) / len(samples)
                 for t in range(settings.cycles)]
    return {
        "strict": sum(s.correct for s in samples) / len(samples),
        "flexible": sum(s.flexible_correct for s in samples) / len(samples),
        "pass_at_1": mean_pass_at_k(counts, 1),
        "pass_at_k": mean_pass_at_k(counts, settings.k) if settings.n >= settings.k else None,
        "accuracy_per_cycle": json.dumps([round(a, 6) for a in per_cycle]),
        "problems": len(results),
    }


class _CheckpointFailed(Exception):
    """This checkpoint cannot be evaluated; the message becomes its error row."""


# ---------------------------------------------------------------------- the results table


class ResultsTable:
    """``gsm8k.csv``: a header written once, then whole rows appended one at a time (one write, flush, fsync)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, str]] = []
        if not path.exists():
            return
        with path.open(newline="", encoding="utf-8") as handle:
            text = handle.read()
        if text and not text.endswith("\n"):  # a torn last line (power loss mid-append): drop it, keep the rest
            text = text[: text.rfind("\n") + 1]
            with path.open("r+", encoding="utf-8") as handle:
                handle.truncate(len(text.encode()))
        reader = csv.DictReader(io.StringIO(text))
        if text and tuple(reader.fieldnames or ()) != COLUMNS:
            raise ConfigError(f"{path} has another header ({','.join(reader.fieldnames or [])[:120]}...), not a "
                              "flash-rc eval results table of this version; choose another --output")
        self.rows = list(reader)

    def done(self, settings_hash_: str) -> set[str]:
        """Checkpoint paths with a row without error for these settings."""
        return {row["checkpoint"] for row in self.rows if row["settings_hash"] == settings_hash_ and not row["error"]}

    def append(self, row: dict[str, Any]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not self.path.exists() or self.path.stat().st_size == 0:
            writer.writerow(COLUMNS)
        writer.writerow(["" if row.get(column) is None else row[column] for column in COLUMNS])
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(descriptor, buffer.getvalue().encode())
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as error:
            raise output_error(self.path, error) from None
        self.rows.append({column: str(row.get(column) or "") for column in COLUMNS})


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:.6g}"


# ---------------------------------------------------------------------- the sweep


def merge_verl_actor(actor: Path, target: Path) -> Path:
    """HF weights of a verl ``actor`` folder, merged once into ``target`` by verl's model merger."""
    if hf_weights_problem(target) is None:
        return target
    backend = "fsdp" if any(actor.glob("model_world_size_*_rank_*.pt")) else "megatron"
    staging = target.with_name(f".{target.name}.merging")
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", backend, "--local_dir", str(actor),
               "--target_dir", str(staging)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or hf_weights_problem(staging) is not None:
        shutil.rmtree(staging, ignore_errors=True)
        last = (done.stderr.strip().splitlines() or ["no HF weights written"])[-1]
        raise _CheckpointFailed(f"verl's model merger failed on {actor}: {last}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


@dataclass
class SweepSummary:
    output: Path
    evaluated: list[dict[str, Any]] = field(default_factory=list)
    """The rows written by this sweep."""
    skipped: int = 0
    """Checkpoints already in the table with these settings."""
    engine_start_seconds: float | None = None
    """Start-up of the one engine: what every restart would cost."""
    sync_seconds: list[float] = field(default_factory=list)
    """Each streamed-in checkpoint's weight sync."""


def _refresh_report(output: Path) -> None:
    """Redraw ``gsm8k.png`` and ``report.html`` (``flash_rc.eval.report``) after each checkpoint."""
    try:
        report.write_plot(output)
        report.write_report(output)
    except Exception as error:  # a report failure must not cost the evaluations: the rows are written
        print(f"flash-rc eval: warning: report not updated: {_error_text(error)}", file=sys.stderr)


def generations_name(checkpoint: Checkpoint, settings: SweepSettings, hash_: str) -> str:
    step = "na" if checkpoint.step is None else checkpoint.step
    return f"{checkpoint.run}__step{step}__{settings.precision}__{settings.mode}__{hash_}.jsonl"


def run_sweep(checkpoints: Sequence[Checkpoint], settings: SweepSettings, output_dir: Path,
              progress: bool = True) -> SweepSummary:
    """Evaluate every checkpoint not yet in ``output_dir/gsm8k.csv`` with these settings (see the module docstring).

    Bad input (the data file, the settings, the table's header, the output directory) fails before the engine starts.
    """
    from tqdm import tqdm

    problems = load_eval_problems(settings.data, settings.limit)
    hash_ = settings_hash(settings)
    engine_config(settings, Path("."))  # check the engine overrides now
    output = prepare_output_dir(output_dir)
    table = ResultsTable(output / CSV_NAME)
    prepare_output_dir(output / GENERATIONS_DIR)
    done = table.done(hash_)
    pending = [c for c in checkpoints if str(c.path) not in done]
    summary = SweepSummary(output, skipped=len(checkpoints) - len(pending))
    engine = None
    samples_bar = tqdm(total=len(problems) * settings.n, desc="samples", position=1, leave=False,
                       disable=not progress)
    try:
        for checkpoint in tqdm(pending, desc="checkpoints", position=0, disable=not progress):
            started = time.perf_counter()
            row: dict[str, Any] = {"run": checkpoint.run, "step": checkpoint.step, "checkpoint": str(checkpoint.path),
                                   "precision": settings.precision, "mode": settings.mode, "k": settings.k,
                                   "n": settings.n, "cycles": settings.cycles, "settings_hash": hash_}
            try:
                engine = _load(engine, checkpoint, settings, output, summary)
                name = generations_name(checkpoint, settings, hash_)
                samples_bar.reset()
                samples_bar.set_description(f"{checkpoint.run} step {checkpoint.step}")
                with atomic_write(output / GENERATIONS_DIR / name, "w") as sink:
                    def on_sample(sample: SampleResult) -> None:
                        sink.write(json.dumps(sample.record()) + "\n")
                        samples_bar.update(1)

                    results = evaluate(engine, problems, settings, on_sample)
                    scores = metrics(results, settings)
                row.update({key: _number(value) if isinstance(value, float) else value
                            for key, value in scores.items()})
                row["generations"] = f"{GENERATIONS_DIR}/{name}"
            except _CheckpointFailed as error:
                row["error"] = str(error)
            row["seconds"] = f"{time.perf_counter() - started:.2f}"
            table.append(row)
            summary.evaluated.append(row)
            _refresh_report(output)
    finally:
        samples_bar.close()
        if engine is not None:
            engine.close()
    return summary


def _load(engine, checkpoint: Checkpoint, settings: SweepSettings, output: Path, summary: SweepSummary):
    """The engine serving ``checkpoint``: started on it (the sweep's first usable one) or with its weights streamed
    in. Anything wrong with the checkpoint raises _CheckpointFailed; the engine then keeps (or, after a sync that
    failed mid-stream, is repaired by) the next checkpoint's full sync."""
    from flash_rc.rollout.checkpoint import CheckpointTensors, tensor_problems
    from flash_rc.rollout.engine import RolloutEngine

    if checkpoint.problem is not None:
        raise _CheckpointFailed(checkpoint.problem)
    path = checkpoint.path
    if checkpoint.kind == "verl_actor":
        path = merge_verl_actor(path, output / "merged" / f"{checkpoint.run}__step{checkpoint.step}")
    problem = hf_weights_problem(path)
    if problem is not None:
        raise _CheckpointFailed(problem)
    try:
        tensors = CheckpointTensors(path)  # reads every file's header: a truncated file fails here
    except Exception as error:
        raise _CheckpointFailed(f"unreadable weights in {path}: {_error_text(error)}") from None
    if engine is None:  # the engine's own load checks nothing: refuse what a sync would (NaN/inf, unreadable)
        problems = tensor_problems(tensors)
        if problems:
            raise _CheckpointFailed(f"weights refused: {'; '.join(problems[:3])}")
        started = time.perf_counter()
        try:
            engine = RolloutEngine(engine_config(settings, path))
        except FlashRCError:  # bad settings (e.g. a precision this platform cannot run): the sweep cannot go on
            raise
        except Exception as error:
            raise _CheckpointFailed(f"the engine could not start on {path}: {_error_text(error)}") from None
        summary.engine_start_seconds = time.perf_counter() - started
        return engine
    try:
        report = engine.load(tensors)
    except WeightUpdateError as error:
        raise _CheckpointFailed(f"weight sync refused: {_error_text(error)}") from None
    summary.sync_seconds.append(report.seconds)
    return engine


def format_summary(summary: SweepSummary) -> str:
    """What the sweep did, each row's strict accuracy, and the time saved by streaming instead of restarting."""
    header = f"{'run':<24} {'step':>6} {'strict':>7} {'flexible':>8} {'seconds':>8}  error"
    lines = [header] if summary.evaluated else []
    for row in summary.evaluated:
        step = "-" if row["step"] is None else row["step"]
        lines.append(f"{row['run'][:24]:<24} {step!s:>6} "
                     f"{row.get('strict') or '-':>7} {row.get('flexible') or '-':>8} {row['seconds']:>8}  "
                     f"{row.get('error') or ''}"[:200])
    lines.append(f"{len(summary.evaluated)} checkpoint(s) evaluated, {summary.skipped} already done -> "
                 f"{summary.output / CSV_NAME}")
    if summary.engine_start_seconds is not None and summary.sync_seconds:
        mean_sync = sum(summary.sync_seconds) / len(summary.sync_seconds)
        saved = summary.engine_start_seconds - mean_sync
        lines.append(f"engine start-up {summary.engine_start_seconds:.1f}s once; {len(summary.sync_seconds)} "
                     f"checkpoint(s) streamed in at {mean_sync:.2f}s each instead of a restart: {saved:.1f}s saved "
                     f"per checkpoint, {saved * len(summary.sync_seconds):.1f}s in this sweep")
    return "\n".join(lines)
