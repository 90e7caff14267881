"""The training loop's prompts: verl rows (or raw GSM8K) as chat-templated token ids, drawn in verl's batch order.

Why verl's semantics throughout: a flash_rc run and a verl run of the same recipe should train on the same prompts in
the same order, so their curves can be compared step by step; and everything a bad dataset can get wrong (an unknown
``data_source``, a prompt longer than ``data.max_prompt_length``, a malformed row) must fail here, at load, naming the
file and row -- not in a reward worker or the engine once the run is under way.

Loading (verl's ``RLHFDataset``, in its order):

1. Every file (``data.train_files``: .parquet, .jsonl or .json) is read in order. A row with ``prompt`` is a verl row
   (``flash_rc.data.rows``); a raw GSM8K row ``{question, answer}`` becomes verl's GSM8K row
   (``flash_rc.data.gsm8k``, data_source ``openai/gsm8k``); any other row is refused. Every row is checked: its
   ``data_source`` has a scorer, ``prompt`` is a list of ``{role, content}`` messages, ``reward_model.ground_truth``
   is present, ``extra_info`` is an object, and its uid ``<file stem>/<extra_info.index or row number>`` is unique.
2. ``data.train_max_samples = k > 0`` keeps k of the N rows: the first k when ``data.shuffle`` is false, else
   ``numpy.random.default_rng(data.seed).choice(N, k, replace=False)`` in that order, as verl does.
3. The chat template is applied (``flash_rc.chat.prompt_token_ids``, generation prompt added, as verl's length check
   does). A prompt of more than ``data.max_prompt_length`` tokens is dropped when ``data.filter_overlong_prompts``
   is true (the count is reported), else refused: verl's default ``data.truncation: error``.

Sampling (verl's train dataloader: torchdata's ``RandomSampler`` with ``drop_last=True``), N prompts, batch size B::

    g = torch.Generator();  g.manual_seed(data.seed) unless data.seed is null (then g keeps torch's default seed)
    order_e = the (2e + 1)-th torch.randperm(N, generator=g)          (identity order when data.shuffle is false)
    step s of epoch e draws prompts order_e[s·B : (s+1)·B],  0 <= s < N // B   (the last N mod B wait a turn)

Two permutations per epoch because torch's ``RandomSampler`` draws a second one (sliced to nothing) when an epoch's
iterator runs out. The order of epoch e depends only on the seed and e, so a resumed sampler (``load_state_dict``)
replays the 2e draws and continues exactly where the interrupted run stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flash_rc.chat import prompt_token_ids
from flash_rc.data.gsm8k import gsm8k_row
from flash_rc.data.rows import check_scorer, read_records
from flash_rc.errors import ConfigError, InputNotFoundError, RowError

UNSEEDED_SUBSET_SEED = 0
"""Seed of the ``data.train_max_samples`` subset when ``data.seed`` is null. verl draws that subset from fresh OS
entropy, so a resumed verl run trains on other prompts than it started with; a fixed seed keeps resumes exact."""


@dataclass(frozen=True)
class TrainPrompt:
    """One prompt of the training set, with everything its samples are scored with."""

    uid: str
    """``<file stem>/<extra_info.index or row number>``: the same in every run over the same files."""
    prompt_token_ids: tuple[int, ...]
    """The chat messages with the tokenizer's chat template applied and the generation prompt added."""
    data_source: str
    """Picks the scorer (``flash_rc.rewards.router``)."""
    ground_truth: Any
    """``reward_model.ground_truth`` as the row holds it (a string, or e.g. a code task's tests)."""
    extra_info: dict
    """The row's ``extra_info`` (``{}`` when it has none), passed to the scorer."""
    messages: list[dict]
    """The chat messages the ids were rendered from (for logging)."""


@dataclass(frozen=True)
class PromptSet:
    """The loaded prompts and what loading left out."""

    prompts: tuple[TrainPrompt, ...]
    rows_read: int
    """Rows in the files, before ``data.train_max_samples`` and the overlong filter."""
    overlong_dropped: int
    """Prompts longer than ``data.max_prompt_length`` that ``data.filter_overlong_prompts`` dropped."""

    def __len__(self) -> int:
        return len(self.prompts)


def _scorable_row(record: dict, row_number: int, where: str) -> dict:
    """The verl row of ``record`` (a raw GSM8K row is converted); RowError naming ``where`` unless it can be scored."""
    if "prompt" not in record:
        if "question" in record and "answer" in record:
            return gsm8k_row(record, "train", row_number, where)
        raise RowError(f"{where}: expected a verl row (with 'prompt') or a GSM8K row {{question, answer}}, "
                       f"got fields {sorted(record)}")
    data_source, prompt, reward_model = record.get("data_source"), record["prompt"], record.get("reward_model")
    if not isinstance(data_source, str) or not data_source:
        raise RowError(f"{where}: field 'data_source' must be a non-empty string")
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str) for message in prompt):
        raise RowError(f"{where}: field 'prompt' must be a non-empty list of {{role, content}} messages")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise RowError(f"{where}: field 'reward_model.ground_truth' is missing")
    extra_info = record.get("extra_info") or {}
    if not isinstance(extra_info, dict):
        raise RowError(f"{where}: field 'extra_info' must be an object")
    row = {**record, "extra_info": extra_info}
    check_scorer(row, where)
    return row


def _read_rows(files: list[Path]) -> list[tuple[str, str, dict]]:
    """``(uid, where, row)`` of every row of every file, each checked."""
    rows, first_seen = [], {}
    for path in files:
        for row_number, (where, record) in enumerate(read_records(path)):
            row = _scorable_row(record, row_number, where)
            index = row["extra_info"].get("index")
            uid = f"{path.stem}/{row_number if index is None else index}"
            if uid in first_seen:
                raise RowError(f"{where}: uid {uid!r} was already given to {first_seen[uid]}; extra_info.index "
                               "must be unique within a file, and file names (stems) unique across files")
            first_seen[uid] = where
            rows.append((uid, where, row))
    return rows


def _check_whole_number(value: Any, key: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be a whole number >= {low}, got {value!r}")


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"data.seed must be a whole number >= 0 or null, got {seed!r}")


def load_train_prompts(files: str | list[str], tokenizer: Any, max_prompt_length: int, filter_overlong_prompts: bool,
                       max_samples: int = -1, shuffle: bool = True, seed: int | None = None) -> PromptSet:
    """The training prompts of ``files`` (``data.train_files``), tokenized with ``tokenizer``'s chat template.

    ``max_samples`` is ``data.train_max_samples`` (<= 0: every row); ``shuffle`` and ``seed`` (``data.shuffle``,
    ``data.seed``) choose that subset as verl does. A missing file raises InputNotFoundError, a bad row RowError naming
    it, an overlong prompt with the filter off or an empty result ConfigError.
    """
    paths = [Path(file).expanduser() for file in ([files] if isinstance(files, str) else files)]
    if not paths:
        raise ConfigError("data.train_files names no files")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise InputNotFoundError(f"training data not found: {', '.join(missing)}")
    _check_whole_number(max_prompt_length, "data.max_prompt_length", 1)
    _check_whole_number(max_samples, "data.train_max_samples", -1)
    _check_seed(seed)
    rows = _read_rows(paths)
    if not rows:
        raise ConfigError(f"no training prompts: {', '.join(map(str, paths))} hold no rows")
    if 0 < max_samples < len(rows):
        subset_seed = UNSEEDED_SUBSET_SEED if seed is None else seed
        chosen = (np.random.default_rng(subset_seed).choice(len(rows), size=max_samples, replace=False).tolist()
                  if shuffle else range(max_samples))
        selected = [rows[i] for i in chosen]
    else:
        selected = rows
    prompts, overlong = [], []
    for uid, where, row in selected:
        try:
            ids = prompt_token_ids(tokenizer, row["prompt"])
        except ValueError as exc:
            raise RowError(f"{where}: cannot tokenize the prompt ({exc})") from None
        if len(ids) > max_prompt_length:
            overlong.append((where, len(ids)))
            continue
        prompts.append(TrainPrompt(uid, tuple(ids), row["data_source"], row["reward_model"]["ground_truth"],
                                   row["extra_info"], row["prompt"]))
    if overlong and not filter_overlong_prompts:
        where, length = overlong[0]
        raise ConfigError(
            f"{where}: prompt is {length} tokens, longer than data.max_prompt_length={max_prompt_length} "
            f"({len(overlong)} of {len(selected)} prompts are); raise data.max_prompt_length or set "
            "data.filter_overlong_prompts=true to drop them")
    if not prompts:
        raise ConfigError(f"no training prompts left: all {len(selected)} are longer than "
                          f"data.max_prompt_length={max_prompt_length} and data.filter_overlong_prompts dropped them")
    return PromptSet(tuple(prompts), len(rows), len(overlong))


class PromptSampler:
    """Batches of ``batch_size`` prompts (``data.train_batch_size``), epoch after epoch, in verl's order."""

    def __init__(self, prompts: Sequence[TrainPrompt], batch_size: int, shuffle: bool = True,
                 seed: int | None = None):
        _check_whole_number(batch_size, "data.train_batch_size", 1)
        _check_seed(seed)
        if batch_size > len(prompts):
            raise ConfigError(f"data.train_batch_size={batch_size} is more than the {len(prompts)} training "
                              "prompts; lower it or add data")
        self.prompts = tuple(prompts)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of ``epoch`` already drawn
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.prompts) // self.batch_size

    def total_steps(self, epochs: int) -> int:
        """Training steps of ``epochs`` epochs (``trainer.total_epochs``)."""
        _check_whole_number(epochs, "trainer.total_epochs", 1)
        return self.steps_per_epoch * epochs

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            count = len(self.prompts)
            if not self.shuffle:
                order = list(range(count))
            else:
                generator = torch.Generator()
                if self.seed is not None:
                    generator.manual_seed(self.seed)
                for _ in range(2 * epoch):  # earlier epochs' draws (see the module docstring)
                    torch.randperm(count, generator=generator)
                order = torch.randperm(count, generator=generator).tolist()
            self._order = (epoch, order)
        return self._order[1]

    def next_batch(self) -> list[TrainPrompt]:
        start = self.batch_in_epoch * self.batch_size
        batch = [self.prompts[i] for i in self._epoch_order(self.epoch)[start:start + self.batch_size]]
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return batch

    def _settings(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle, "num_prompts": len(self.prompts),
                "batch_size": self.batch_size}

    def state_dict(self) -> dict:
        """Where the sampler is (JSON-serialisable), with the settings that fix its order."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refused unless it was saved with this sampler's seed, data and batch size."""
        saved = {key: state.get(key) for key in self._settings()}
        if saved != self._settings():
            raise ConfigError(f"sampler state was saved with {saved} but this run has {self._settings()}; resume "
                              "with the same data.train_files, data.train_batch_size, data.shuffle and data.seed")
        epoch, batch_in_epoch = state.get("epoch"), state.get("batch_in_epoch")
        _check_whole_number(epoch, "sampler state 'epoch'", 0)
        _check_whole_number(batch_in_epoch, "sampler state 'batch_in_epoch'", 0)
        if batch_in_epoch >= self.steps_per_epoch:
            raise ConfigError(f"sampler state 'batch_in_epoch' must be below {self.steps_per_epoch}, "
                              f"got {batch_in_epoch}")
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
