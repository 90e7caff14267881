"""Summary replay buffer of RC training: the texts a problem's next online chains start from, so training reaches
cycles deeper than the T_train cycles one step runs.

Why. An RC training step runs T_train reason → summarize cycles per problem and trains on states drawn from them
(``../shared/docs/reasoning-cache.md`` §2.1). With the buffer, the summaries a chain produced are kept per problem,
and when the problem comes up again its online chain *starts from* one of them instead of from scratch: it resumes
at that depth, so over epochs the trained states reach depths far beyond T_train at the cost of T_train cycles.

Depth. An entry's ``starting_step`` is the number of cycles behind its text. A chain started from an entry begins
with ``ChainState.starting_step = entry.starting_step`` and ``curr_summary = entry.text``; its i-th summary
(i = 0..T-1) goes back into the buffer with ``starting_step = chain.starting_step + i + 1`` (the caller computes it).
The buffer does not look at the texts: in the summary-free baselines they are reasoning traces (RC §2.5).

Semantics are RC's ``ReplayBuffer`` (§2.4), with its flaws (§6, item 4) fixed:

* keyed by the **problem id** (the loop's stable prompt uid), not the problem text (RC keyed by text while its ids
  were fresh uuids every step);
* ``purge_on_add``: a problem's old entries are cleared before a new chain's are added, so the buffer holds only
  the latest chain's (RC's ``buffer_purge_existing_on_add``); otherwise they accumulate;
* empty (or whitespace-only) texts are never stored, and a chain with no non-empty text leaves the problem's
  entries as they were (no purge). So every problem in the buffer has at least one entry, and :meth:`sample`
  returns ``[]`` only for a problem the buffer does not hold — which then starts from scratch. (RC purged and
  stored an empty list, and such a problem yielded zero states that step.)
* ``sample``: up to ``sample_per_problem`` distinct entries, uniform without replacement
  (RC's ``buffer_sample_summaries_per_problem``), drawn from one ``random.Random`` whose state is saved with the
  entries, so the draws after a resume equal those of an uninterrupted run (given the same order of calls);
* bounded (RC grew without bound when not purging): per problem the newest ``max_entries_per_problem`` entries are
  kept (the oldest dropped first; within a chain the later, deeper ones count as newer); over ``max_problems``
  the problems *added* least recently are evicted (adding refreshes a problem, sampling does not);
* a preloaded file naming problems not in the dataset is reported (``unknown_problems``), not fatal, and a corrupt
  one is a :class:`~flash_rc.errors.RowError` naming ``file:line`` and the field.

File format (``.jsonl``, UTF-8, written atomically by :meth:`save`)::

    {"format": "flash_rc.rc.replay", "version": 1, "rng_state": [3, [625 ints], null], "config": {...}}
    {"problem_id": "17", "entries": [{"text": "...", "starting_step": 3, "added_at_step": 40}, ...]}
    ...

The first line is the header (``rng_state`` is ``random.Random.getstate()`` as lists; ``config`` is the saving
buffer's :class:`ReplayConfig`, for reference — the loading buffer's own config governs). Then one line per
problem, least recently added first, entries oldest first; a problem appears at most once. :meth:`load` requires
the header and restores entries, order and RNG exactly; :meth:`load_initial` (a buffer preloaded from
``initial_path``) takes the same file — a buffer saved by another run — or one without the header, and keeps this
buffer's RNG. :meth:`state_dict` is the same content as one JSON object (the header's keys plus ``problems``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from flash_rc.data.rows import read_records
from flash_rc.errors import ConfigError, RowError
from flash_rc.outputs import atomic_write
from flash_rc.schema import Section

FORMAT = "flash_rc.rc.replay"
VERSION = 1
DEPTH_HISTOGRAM_CAP = 8
"""Depths >= this share the histogram bucket ``rc/buffer/depth_{DEPTH_HISTOGRAM_CAP}plus``."""


class ReplayConfig(Section):
    """The summary replay buffer of RC training (the ``flash_rc.rc.replay`` section of a recipe)."""

    enable: bool = False
    """Keep each online chain's summaries and start a problem's next online chains from them (RC's
    ``use_replay_buffer``); off: every online chain starts from scratch."""
    initial_path: str | None = None
    """A ``.jsonl`` buffer to preload (the format :meth:`SummaryReplayBuffer.save` writes, header optional; RC's
    ``buffer_initial_path``). Problems not in the training data are counted and skipped."""
    sample_per_problem: int = Field(1, ge=1)
    """Entries a buffered problem's next online chains start from: this many distinct ones, drawn uniformly without
    replacement (all of them when the problem has fewer; RC's ``buffer_sample_summaries_per_problem``)."""
    purge_on_add: bool = True
    """Clear a problem's old entries before a new chain's are added, so the buffer holds only the latest chain's
    (RC's ``buffer_purge_existing_on_add``); off: entries accumulate up to ``max_entries_per_problem``."""
    max_entries_per_problem: int = Field(16, ge=1)
    """Entries kept per problem: the newest this many (the oldest are dropped first; within one chain the later,
    deeper summaries count as newer)."""
    max_problems: int | None = Field(None, ge=1)
    """Problems kept: over this many, the problems added least recently are evicted (adding a chain refreshes a
    problem, sampling does not); None: no bound."""


@dataclass(frozen=True)
class ReplayEntry:
    """One buffered text a chain can start from."""

    text: str
    """A summary (or, in the summary-free baselines, a reasoning trace)."""
    starting_step: int
    """Cycles behind this text: a chain started from it resumes at this depth."""
    added_at_step: int
    """The training step whose online chain produced it."""


class SummaryReplayBuffer:
    """Per-problem replay entries with the purge, bound and sampling rules of the module docstring."""

    def __init__(self, config: ReplayConfig, seed: int = 0) -> None:
        self.config = config
        self._rng = random.Random(seed)
        # entries per problem id, oldest first; dict order is add order, least recently added first
        self._problems: dict[str, list[ReplayEntry]] = {}

    def __len__(self) -> int:
        return len(self._problems)

    def __contains__(self, problem_id: str) -> bool:
        return problem_id in self._problems

    def entries(self, problem_id: str) -> list[ReplayEntry]:
        """The entries held for ``problem_id``, oldest first ([] for a problem the buffer does not hold)."""
        return list(self._problems.get(problem_id, ()))

    # ------------------------------------------------------------------ adding and sampling

    def add_chain(self, problem_id: str, entries: Sequence[tuple[str, int]], step: int) -> int:
        """Add one online chain's ``(text, starting_step)`` pairs, in cycle order, produced at training ``step``.

        Empty texts are dropped; if none is left the problem is untouched. Otherwise the problem's old entries are
        purged first (``purge_on_add``) and the bounds applied. Returns the number of entries added.
        """
        usable = [ReplayEntry(text, starting_step, step) for text, starting_step in entries if text.strip()]
        if usable:
            self._store(problem_id, usable)
        return len(usable)

    def _store(self, problem_id: str, entries: list[ReplayEntry]) -> None:
        old = self._problems.pop(problem_id, [])  # re-inserted last: the most recently added problem
        kept = entries if self.config.purge_on_add else old + entries
        self._problems[problem_id] = kept[-self.config.max_entries_per_problem:]
        self._evict()

    def _evict(self) -> None:
        limit = self.config.max_problems
        while limit is not None and len(self._problems) > limit:
            del self._problems[next(iter(self._problems))]

    def sample(self, problem_id: str) -> list[ReplayEntry]:
        """Up to ``sample_per_problem`` distinct entries of ``problem_id``, uniform without replacement, in draw
        order; [] for a problem the buffer does not hold (its chains start from scratch)."""
        entries = self._problems.get(problem_id)
        if entries is None:
            return []
        return self._rng.sample(entries, min(self.config.sample_per_problem, len(entries)))

    # ------------------------------------------------------------------ state

    def _header(self) -> dict[str, Any]:
        version, internal, gauss_next = self._rng.getstate()
        return {"format": FORMAT, "version": VERSION, "rng_state": [version, list(internal), gauss_next],
                "config": self.config.model_dump()}

    def _problem_records(self) -> list[dict[str, Any]]:
        return [{"problem_id": problem_id, "entries": [asdict(entry) for entry in entries]}
                for problem_id, entries in self._problems.items()]

    def state_dict(self) -> dict[str, Any]:
        """Entries, their order and the RNG state as one JSON-serialisable object (see the module docstring)."""
        return {**self._header(), "problems": self._problem_records()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; RowError if it is not such a state."""
        where = "replay buffer state"
        rng_state = _parse_header(state, where)
        if not isinstance(state.get("problems"), list):
            raise RowError(f"{where}: field 'problems' must be a list")
        records = ((f"{where} problems[{index}]", record) for index, record in enumerate(state["problems"]))
        self._restore(rng_state, _parse_problems(records))

    def _restore(self, rng_state: tuple, problems: list[tuple[str, list[ReplayEntry]]]) -> None:
        self._rng.setstate(rng_state)
        self._problems = {}
        for problem_id, entries in problems:
            if entries:
                self._store(problem_id, entries)

    def save(self, path: str | Path) -> Path:
        """Write the buffer to ``path`` (``.jsonl``) atomically: the old file or the complete new one, never half."""
        path = _jsonl_path(path)
        with atomic_write(path, "w") as f:
            for record in (self._header(), *self._problem_records()):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path

    def load(self, path: str | Path) -> None:
        """Restore a buffer :meth:`save` wrote (entries, order and RNG state); InputNotFoundError if ``path`` is
        missing, RowError naming ``file:line`` if it is not such a file."""
        path = _jsonl_path(path)
        records = list(read_records(path))
        if not records:
            raise RowError(f"{path}: empty, expected a replay buffer header line")
        where, header = records[0]
        self._restore(_parse_header(header, where), _parse_problems(records[1:]))

    def load_initial(self, path: str | Path, known_problem_ids: Collection[str]) -> dict[str, int]:
        """Preload the problems of ``path`` that are in ``known_problem_ids`` (a saved buffer's header is skipped,
        its RNG state not taken), with the bounds applied.

        Returns ``loaded`` (problems with at least one non-empty entry), ``entries`` (their non-empty entries) and
        ``unknown_problems`` (ids not in the dataset — a buffer from another dataset — skipped, not fatal); the
        bounds may keep fewer (see :meth:`metrics`). Errors as :meth:`load`.
        """
        path = _jsonl_path(path)
        known = set(known_problem_ids)
        records = list(read_records(path))
        if records and "format" in records[0][1]:
            where, header = records[0]
            _parse_header(header, where)
            records = records[1:]
        counts = {"loaded": 0, "unknown_problems": 0, "entries": 0}
        for problem_id, entries in _parse_problems(records):
            if problem_id not in known:
                counts["unknown_problems"] += 1
            elif entries:
                self._store(problem_id, entries)
                counts["loaded"] += 1
                counts["entries"] += len(entries)
        return counts

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, float]:
        """``rc/buffer/{problems, entries, depth_mean, depth_max}`` and the depth histogram ``rc/buffer/depth_{d}``
        (entries with ``starting_step == d``, every d < DEPTH_HISTOGRAM_CAP, zeros included so the keys are the same
        every step) plus ``rc/buffer/depth_{DEPTH_HISTOGRAM_CAP}plus``."""
        depths = [entry.starting_step for entries in self._problems.values() for entry in entries]
        histogram = [0] * (DEPTH_HISTOGRAM_CAP + 1)
        for depth in depths:
            histogram[min(depth, DEPTH_HISTOGRAM_CAP)] += 1
        metrics = {"rc/buffer/problems": float(len(self._problems)), "rc/buffer/entries": float(len(depths)),
                   "rc/buffer/depth_mean": sum(depths) / len(depths) if depths else 0.0,
                   "rc/buffer/depth_max": float(max(depths, default=0))}
        for depth, count in enumerate(histogram[:-1]):
            metrics[f"rc/buffer/depth_{depth}"] = float(count)
        metrics[f"rc/buffer/depth_{DEPTH_HISTOGRAM_CAP}plus"] = float(histogram[-1])
        return metrics


# ---------------------------------------------------------------------- reading


def _jsonl_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.suffix != ".jsonl":
        raise ConfigError(f"replay buffer file must be .jsonl, got {path}")
    return path


def _parse_header(header: dict[str, Any], where: str) -> tuple:
    """The ``random.Random`` state of a header (or state dict); RowError naming ``where`` if it is not one."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RowError(f"{where}: not a replay buffer header (expected field 'format' = {FORMAT!r})")
    if header.get("version") != VERSION:
        raise RowError(f"{where}: unsupported replay buffer version {header.get('version')!r} (expected {VERSION})")
    rng_state = header.get("rng_state")
    try:
        version, internal, gauss_next = rng_state
        state = (version, tuple(internal), gauss_next)
        random.Random().setstate(state)
    except (TypeError, ValueError):
        raise RowError(f"{where}: field 'rng_state' is not a random.Random state, got {rng_state!r:.80}") from None
    return state


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(entry: Any, where: str, field: str) -> ReplayEntry:
    if not isinstance(entry, dict):
        raise RowError(f"{where}: field '{field}' must be an object, got {entry!r:.80}")
    if not isinstance(entry.get("text"), str):
        raise RowError(f"{where}: field '{field}.text' must be a string, got {entry.get('text')!r:.80}")
    for key in ("starting_step", "added_at_step"):
        if not _is_step(entry.get(key)):
            raise RowError(f"{where}: field '{field}.{key}' must be an int >= 0, got {entry.get(key)!r:.80}")
    return ReplayEntry(entry["text"], entry["starting_step"], entry["added_at_step"])


def _parse_problems(records: Iterable[tuple[str, Any]]) -> list[tuple[str, list[ReplayEntry]]]:
    """``(problem_id, non-empty entries)`` of each ``(where, record)``; RowError naming ``where`` and the field of
    the first malformed record, or of a problem id seen before."""
    problems, seen = [], {}
    for where, record in records:
        if not isinstance(record, dict):
            raise RowError(f"{where}: expected a JSON object, got {type(record).__name__}")
        problem_id, entries = record.get("problem_id"), record.get("entries")
        if not isinstance(problem_id, str) or not problem_id:
            raise RowError(f"{where}: field 'problem_id' must be a non-empty string, got {problem_id!r:.80}")
        if problem_id in seen:
            raise RowError(f"{where}: problem_id {problem_id!r} already appears at {seen[problem_id]}")
        seen[problem_id] = where
        if not isinstance(entries, list):
            raise RowError(f"{where}: field 'entries' must be a list, got {entries!r:.80}")
        parsed = [_parse_entry(entry, where, f"entries[{index}]") for index, entry in enumerate(entries)]
        problems.append((problem_id, [entry for entry in parsed if entry.text.strip()]))
    return problems
