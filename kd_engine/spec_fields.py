"""Rules every part of a job spec obeys, and the field types they share.

Every string anywhere in a job spec (references, column names, method settings) is refused when
it holds a control character (Unicode category ``Cc``: U+0000..U+001F, U+007F..U+009F, the tab
and newlines included) or a lone surrogate (``Cs``, which no UTF-8 store can hold), and when it
is longer than :data:`MAX_TEXT_CHARS`; column names are capped at :data:`MAX_NAME_CHARS`.
Seeds are ``0 <= seed < 2**32`` (what NumPy and scikit-learn accept). Spec sections derive from
:class:`SpecModel`, which applies the string rule to each of their fields, so a bad value is
reported under its own field.
"""

from __future__ import annotations

import types
import typing
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_TEXT_CHARS = 2048
"""Length cap (characters) of any string in a job spec: references, free text."""
MAX_NAME_CHARS = 256
"""Length cap (characters) of a column name."""
MAX_SEED = 2**32 - 1
"""Largest seed: NumPy's ``np.random.seed`` and scikit-learn's ``random_state`` take
``0 <= seed < 2**32`` (torch takes more)."""


def control_character(value: str) -> int | None:
    """Index of the first control character or lone surrogate in ``value`` (None if clean)."""
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return i
    return None


def check_text(value: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``value`` if it is at most ``max_chars`` characters without control characters.

    Raises:
        ValueError: naming the offending character (as U+XXXX) and its position, or the cap.
    """
    at = control_character(value)
    if at is not None:
        raise ValueError(
            f"must not contain control characters; found U+{ord(value[at]):04X} at character {at}"
        )
    if len(value) > max_chars:
        raise ValueError(f"is {len(value)} characters long; at most {max_chars} are allowed")
    return value


def check_strings(value: Any) -> Any:
    """Apply :func:`check_text` to ``value`` and to every string inside its lists, tuples and
    dicts (keys too); other values are returned as they are.

    Raises:
        ValueError: as :func:`check_text`.
    """
    if isinstance(value, str):
        return check_text(value)
    if isinstance(value, list | tuple):
        for item in value:
            check_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key)
            check_strings(item)
    return value


def _check_seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be between 0 and {MAX_SEED} (2**32 - 1); got {value}")
    return value


Seed = Annotated[int, AfterValidator(_check_seed)]
"""A random seed, ``0 <= seed <= 2**32 - 1``."""
ColumnName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
"""A column of a dataset file (at most 256 characters)."""


class SpecModel(BaseModel):
    """Base of every job spec section: unknown fields are refused, instances are frozen, and
    every string field obeys :func:`check_text`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _safe_strings(cls, value: Any) -> Any:
        return check_strings(value)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        if isinstance(arg, type | types.UnionType) or typing.get_origin(arg) is not None:
            out += _models_in(arg)
    return out


def _tag(model: type[BaseModel]) -> str | None:
    """The discriminator value of a union member (its ``name`` or ``type`` default)."""
    for key in ("name", "type"):
        field = model.model_fields.get(key)
        if field is not None and isinstance(field.default, str):
            return field.default
    return None


def model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model that validates the object at ``loc`` (pydantic error location parts, list
    indices and union tags included) under ``root``; None when it is not one model."""
    models = [root]
    for part in loc:
        if isinstance(part, int) or part.isdigit():
            continue  # an index into a list of models
        tagged = [m for m in models if _tag(m) == part and part not in m.model_fields]
        if tagged:
            models = tagged
            continue
        found: list[type[BaseModel]] = []
        for m in models:
            field = m.model_fields.get(part)
            if field is not None:
                found += _models_in(field.annotation)
        if not found:
            return None
        models = found
    return models[0] if len(models) == 1 else None


def unknown_field_reason(root: type[BaseModel], loc: Sequence[str | int]) -> str | None:
    """The message for an unknown field at ``loc`` (its last part is the unknown name) under
    ``root``, listing the valid ones: ``unknown setting 'alpah' for vanilla_kd; valid settings:
    alpha, temperature`` for a method's settings, ``unknown field 'epoch' in training; valid
    fields: ...`` elsewhere. None when the enclosing model cannot be told."""
    if not loc:
        return None
    model = model_at(root, loc[:-1])
    if model is None:
        return None
    name = str(loc[-1])
    if "name" in model.model_fields and _tag(model) and "method" in loc[:-1]:
        valid = [f for f in model.model_fields if f != "name"]
        return f"unknown setting {name!r} for {_tag(model)}; valid settings: " + (
            ", ".join(valid) or "(none)"
        )
    where = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int) and p != _tag(model))
    return (
        f"unknown field {name!r}"
        + (f" in {where}" if where else "")
        + "; valid fields: "
        + ", ".join(model.model_fields)
    )
