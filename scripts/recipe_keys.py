"""The reference of every key a ``flash-rc train`` recipe accepts, rendered from its schema into README.md.

Why generated: the schema (:class:`~flash_rc.backends.local.config.TrainRecipe`, nested pydantic Sections) already
declares each key once, with its type, bounds, default and docstring; a table kept by hand would drift from it. So
the README's reference is this script's output, and ``--check`` (run by tests/test_recipe_keys.py) fails when the
two differ. One row per leaf key: dotted path, type (with bounds), default, the docstring's first sentences; keys
pinned to verl's default (a ``Literal`` of one value) are marked as fixed.

    python scripts/recipe_keys.py                    # print the reference
    python scripts/recipe_keys.py --check README.md  # exit 1 when the README's block is stale
    python scripts/recipe_keys.py --write README.md  # replace the README's block
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from flash_rc.backends.local.config import TrainRecipe

BEGIN, END = "<!-- recipe-keys:begin -->", "<!-- recipe-keys:end -->"
PINNED = "fixed locally (verl default only)"
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
SUMMARY_CHARS = 240
"""A row's description: the docstring's first sentence, plus the next ones while they fit in this many characters."""


def leaf_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted path, field) of every leaf key of ``model``, in declaration order; nested Sections are walked."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from leaf_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def yaml_value(value) -> str:
    """A value as a recipe writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(yaml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {yaml_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def type_name(annotation) -> str:
    """``int``, ``str | list[str]``, a Literal as its choices ``bf16 | int8 | fp8``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(map(yaml_value, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(type_name, args))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(map(type_name, args))}]"
    return "null" if annotation is type(None) else annotation.__name__


def summary(docstring: str) -> str:
    """The first sentence of ``docstring`` on one line, and the next ones while the whole fits in SUMMARY_CHARS."""
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z`])", " ".join(docstring.split()))
    kept = sentences[:1]
    for sentence in sentences[1:]:
        if len(" ".join([*kept, sentence])) > SUMMARY_CHARS:
            break
        kept.append(sentence)
    return re.sub(r"``(.+?)``", r"`\1`", " ".join(kept))  # reST literals -> markdown


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def row(path: str, field) -> str:
    if not field.description:
        sys.exit(f"recipe_keys.py: {path} has no docstring (write one under the field in its Section)")
    args = typing.get_args(field.annotation)
    pinned = typing.get_origin(field.annotation) is typing.Literal and len(args) == 1
    kind = type(args[0]).__name__ if pinned else type_name(field.annotation)
    bounds = ", ".join(f"{symbol} {getattr(rule, name)}" for rule in field.metadata
                       for name, symbol in BOUNDS.items() if hasattr(rule, name))
    value = field.get_default(call_default_factory=True)
    default = "required" if field.is_required() else f"`{cell(yaml_value(value))}`"
    meaning = (f"*{PINNED}.* " if pinned else "") + cell(summary(field.description))
    return f"| `{path}` | `{cell(kind)}`{' ' + bounds if bounds else ''} | {default} | {meaning} |"


def render(schema: type[BaseModel] = TrainRecipe) -> str:
    """The markdown reference: one table per top-level section, one row per leaf key."""
    lines = []
    for section, field in schema.model_fields.items():
        lines += [f"#### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [row(path, leaf) for path, leaf in leaf_fields(field.annotation, f"{section}.")]
        lines.append("")
    return "\n".join(lines)


def replace_block(text: str, block: str, name: str) -> str:
    """``text`` with what lies between the BEGIN and END markers replaced by ``block``."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        sys.exit(f"recipe_keys.py: {name} has no {BEGIN} ... {END} block")
    return text[:begin + len(BEGIN)] + "\n" + block + "\n" + text[end:]  # a blank line ends the last table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", metavar="README", type=Path, help="exit 1 if README's recipe-key block is stale")
    mode.add_argument("--write", metavar="README", type=Path, help="replace README's recipe-key block")
    args = parser.parse_args(argv)
    reference = render()
    if args.check is None and args.write is None:
        print(reference, end="")
        return
    path = args.check or args.write
    text = path.read_text(encoding="utf-8")
    updated = replace_block(text, reference, str(path))
    if args.write:
        path.write_text(updated, encoding="utf-8")
    elif updated != text:
        sys.exit(f"{path}: the recipe-key reference is stale; run `python scripts/recipe_keys.py --write {path}`")


if __name__ == "__main__":
    main()
