"""What a rollout hands the learner, and how the learner cuts it into micro-batches.

Why a plain, token-aligned contract: the learner must not care where sequences came from — plain GRPO samples, RC
reasoning turns conditioned on a summary, or (later) a verl agent loop. Each :class:`TrainSequence` carries exactly
what the update needs: the prompt and response token ids the engine saw and sampled, one processed rollout log-prob
per response token (log π_rollout, for the rollout-correction weights), and one outcome advantage. Everything else
(rewards, groups, metadata) stays with the rollout source.

Micro-batches. A mini-batch's sequences are split into micro-batches either of a fixed number of sequences
(``actor.ppo_micro_batch_size_per_gpu``) or by a token budget (``actor.use_dynamic_bsz`` with
``actor.ppo_max_token_len_per_gpu``). How they are cut never changes the update: the loss is normalised by the
mini-batch's *global* token / sequence counts (``flash_rc.algo.losses.GlobalBatchInfo``), so gradients summed over
micro-batches and averaged over ranks equal the gradient of one big batch.

Layouts. ``packed``: all sequences of a micro-batch concatenated into one row with per-sequence position ids (no
padding; needs an attention backend that reads sequence boundaries from position ids, i.e. flash-attention).
``padded``: sequences sorted by length and right-padded to the longest of the micro-batch (any backend). Either way
:class:`MicroBatch` says where each response token's logit comes from: the hidden state one position earlier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Layout = Literal["packed", "padded"]


@dataclass(frozen=True)
class TrainSequence:
    """One trained sequence: a prompt and the response sampled for it, with its rollout log-probs and advantage."""

    prompt_token_ids: tuple[int, ...]
    response_token_ids: tuple[int, ...]
    rollout_log_probs: tuple[float, ...]
    """log π_rollout of each response token, as the engine sampled it (processed: after temperature)."""
    advantage: float
    """Outcome advantage, broadcast over the response tokens."""
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Where the sequence came from, for logging and analysis (RC: ``problem_id``, ``sample_id``, ``cycle_step``,
    ``turn_type``, ``turn_number``, ``model_version``); the learner never reads it."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a train sequence needs at least one prompt token")
        if len(self.rollout_log_probs) != len(self.response_token_ids):
            raise ValueError(f"{len(self.rollout_log_probs)} rollout log-probs for {len(self.response_token_ids)} "
                             "response tokens: they must align one to one")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.response_token_ids)


@dataclass
class MicroBatch:
    """Model inputs for some sequences, and where their response tokens sit.

    ``input_ids``/``position_ids``/``attention_mask`` are [rows, length] (one row when packed; no attention mask
    then). ``logit_index`` [N] indexes the flattened [rows × length] hidden states: the position *before* each
    response token, whose hidden state predicts it; ``targets`` [N] are those tokens. ``response_lengths`` splits the
    N tokens back per sequence, in the order of ``indices`` (positions in the mini-batch).
    """

    indices: list[int]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    logit_index: torch.Tensor
    targets: torch.Tensor
    response_lengths: list[int]

    def to(self, device: torch.device) -> MicroBatch:
        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=True)
        return MicroBatch(self.indices, move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                          move(self.logit_index), move(self.targets), self.response_lengths)


def split_micro_batches(sequences: Sequence[TrainSequence], indices: Sequence[int], *, micro_batch_size: int | None,
                        max_tokens: int | None, layout: Layout) -> list[list[int]]:
    """Groups of ``indices`` (into ``sequences``), each one micro-batch.

    Fixed size: consecutive groups of ``micro_batch_size``. Token budget (``max_tokens``): longest first, each
    sequence into the first micro-batch where it fits (packed: the sum of lengths; padded: rows × the longest), a
    new one when none does; a sequence longer than the budget gets a micro-batch of its own.
    """
    if (micro_batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of micro_batch_size and max_tokens")
    if micro_batch_size is not None:
        return [list(indices[i:i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]
    bins: list[list[int]] = []
    cost: list[tuple[int, int]] = []  # (rows, tokens or longest)
    for index in sorted(indices, key=lambda i: -sequences[i].num_tokens):
        length = sequences[index].num_tokens
        for b, (rows, size) in enumerate(cost):
            new = size + length if layout == "packed" else (rows + 1) * max(size, length)
            if new <= max_tokens:
                bins[b].append(index)
                cost[b] = (rows + 1, size + length if layout == "packed" else max(size, length))
                break
        else:
            bins.append([index])
            cost.append((1, length))
    return bins


def make_micro_batch(sequences: Sequence[TrainSequence], indices: Sequence[int], layout: Layout,
                     pad_token_id: int) -> MicroBatch:
    """The model inputs of one micro-batch (see :class:`MicroBatch`); padded rows are sorted longest first."""
    chosen = [sequences[i] for i in indices]
    if layout == "padded":
        order = sorted(range(len(chosen)), key=lambda k: -chosen[k].num_tokens)
        indices, chosen = [indices[k] for k in order], [chosen[k] for k in order]
    ids = [list(s.prompt_token_ids) + list(s.response_token_ids) for s in chosen]
    logit_index: list[int] = []
    if layout == "packed":
        flat = [token for row in ids for token in row]
        positions = [p for row in ids for p in range(len(row))]
        offset = 0
        for seq, row in zip(chosen, ids):
            start = offset + len(seq.prompt_token_ids) - 1
            logit_index += range(start, start + len(seq.response_token_ids))
            offset += len(row)
        input_ids = torch.tensor([flat], dtype=torch.long)
        position_ids = torch.tensor([positions], dtype=torch.long)
        attention_mask = None
    else:
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, (seq, row) in enumerate(zip(chosen, ids)):
            input_ids[r, :len(row)] = torch.tensor(row)
            attention_mask[r, :len(row)] = 1
            start = r * width + len(seq.prompt_token_ids) - 1
            logit_index += range(start, start + len(seq.response_token_ids))
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    targets = [token for s in chosen for token in s.response_token_ids]
    return MicroBatch(list(indices), input_ids, position_ids, attention_mask,
                      torch.tensor(logit_index, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                      [len(s.response_token_ids) for s in chosen])


def pad_rows(values: Sequence[torch.Tensor], width: int | None = None, fill: float = 0.0) -> torch.Tensor:
    """Stack 1-D tensors into [len(values), width] (default: the longest), right-padded with ``fill``."""
    width = max((v.numel() for v in values), default=0) if width is None else width
    out = torch.full((len(values), width), fill, dtype=values[0].dtype if values else torch.float32,
                     device=values[0].device if values else None)
    for row, value in enumerate(values):
        out[row, :value.numel()] = value
    return out
