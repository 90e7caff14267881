"""Prompts to token ids, and the context-window rule, shared by the engine and by callers that send token ids.

Why here and not in the engine: the RC scheduler must be able to drive an engine that only takes token ids (verl's
server manager), so it renders chat messages itself; the in-process engine renders them too. Both must produce the
same ids and refuse the same too-long prompts, so both call these functions. Only a tokenizer is needed (no vLLM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flash_rc.errors import PromptTooLongError
from flash_rc.types import Prompt


def prompt_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids for a raw text prompt, a chat (template applied, generation prompt added) or ids as given."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt).input_ids
    elif len(prompt) > 0 and isinstance(prompt[0], Mapping):
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt: a prompt must contain at least one token")
    bad = [t for t in ids if not 0 <= t < len(tokenizer)]
    if bad:
        raise ValueError(f"prompt token ids out of vocabulary (size {len(tokenizer)}): {bad[:8]}")
    return list(ids)


def generation_room(prompt_len: int, max_model_len: int) -> int:
    """Tokens left to generate after a prompt of ``prompt_len``; a prompt that leaves none is refused."""
    room = max_model_len - prompt_len
    if room < 1:
        raise PromptTooLongError(
            f"prompt has {prompt_len} tokens but the context window (max_model_len) is {max_model_len}: "
            "no room to generate"
        )
    return room


class ChatRenderer:
    """Turns a turn's chat messages into prompt token ids for an engine that takes ids (chat template, length check).

    The RC scheduler uses one when its engine does not apply chat templates itself; the ids are exactly what the
    in-process engine would have produced from the same messages.
    """

    def __init__(self, tokenizer: Any, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def __call__(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        ids = prompt_token_ids(self.tokenizer, messages)
        generation_room(len(ids), self.max_model_len)
        return ids
