"""The one config idiom: pydantic sections whose fields carry their own type, bounds and docstring.

Why one idiom: every knob a user can set — a recipe key, an engine setting, a loss coefficient — is declared once,
as a field of a :class:`Section`, and everything else (the recipe reader, the engine, the losses, the README) reads
that declaration. Sections refuse unknown keys (``extra="forbid"``), so a key a reader cannot honour is an error
naming its path, never silently ignored; their field docstrings are the documentation (``use_attribute_docstrings``).

When two schemas expose the same knob under different names (a verl recipe key and the engine's own field),
:func:`fields_of` copies the field — annotation, default, bounds and docstring — instead of restating it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config: unknown keys are errors, field docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class FrozenSection(Section):
    """A config that is a value (hashable, never mutated after validation), e.g. the loss settings."""

    model_config = ConfigDict(frozen=True)


def fields_of(model: type[BaseModel], names: Mapping[str, str], **defaults: Any) -> dict[str, tuple[Any, Any]]:
    """``create_model`` field definitions copied from ``model``: ``{new_name: model_field_name}``.

    Each copy keeps the source field's annotation, bounds and docstring; ``defaults`` overrides the default of a
    copied field by its new name (e.g. a recipe that defaults to another model than the engine does).
    """
    fields: dict[str, tuple[Any, Any]] = {}
    for new_name, source_name in names.items():
        info = copy.copy(model.model_fields[source_name])
        if new_name in defaults:
            info.default, info.default_factory = defaults[new_name], None
        fields[new_name] = (info.annotation, info)
    unknown = set(defaults) - set(names)
    if unknown:
        raise KeyError(f"defaults for fields not copied: {sorted(unknown)}")
    return fields
