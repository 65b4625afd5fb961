"""Type checks for settings a user hands to a config dataclass (method configs, InferenceConfig).

Dataclasses do not check types, so `--set gaussian_std=abc` used to reach the model as a string
and fail deep inside a forward pass, after the weights had loaded. `check_setting_types` refuses
such a value up front, from the field's annotation, with the type the field wants.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import fields


def check_setting_types(config_class: type, values: Mapping[str, object], owner: str) -> None:
    """Refuse values whose type does not fit their field of dataclass `config_class`.

    An int is accepted where a float is wanted (3 for 3.0); a bool is never taken as a number;
    a list is accepted where a tuple is wanted. Unknown keys are left to the caller.

    Args:
        config_class: the dataclass whose fields the values set.
        values: field name -> value (None values are skipped: they mean "unset").
        owner: named in the message (e.g. "Method 'naclip'", "The inference protocol").

    Raises:
        ValueError: a value of another type, naming the field, the value and the wanted type.
    """
    hints = typing.get_type_hints(config_class)
    for name in (f.name for f in fields(config_class)):
        value = values.get(name)
        if value is not None and not _fits(value, hints[name]):
            raise ValueError(
                f"{owner} setting {name} must be {_describe(hints[name])}, got {value!r} "
                f"({type(value).__name__}); e.g. --set {name}=<a value of that type>."
            )


def check_positive_finite(name: str, value: float) -> None:
    """Refuse a value that is not a finite number > 0 (NaN, infinity, 0, negative).

    Raises:
        ValueError: naming `name` and the value.
    """
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}.")


def _fits(value: object, hint: object) -> bool:
    """Whether `value` is of type `hint` (plain classes, unions, tuple[...] and Optional)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (tuple, list)) and _items_fit(value, typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not model (Any, Callable): the config decides


def _items_fit(items: tuple | list, args: tuple) -> bool:
    """Items of a tuple value against tuple[X, ...] or tuple[X, Y] arguments."""
    if len(args) == 2 and args[1] is Ellipsis:
        return all(_fits(item, args[0]) for item in items)
    return len(items) == len(args) and all(map(_fits, items, args))


def _describe(hint: object) -> str:
    """A type annotation as words for an error message ("a number or None")."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(map(_describe, typing.get_args(hint)))
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return {"float": "a number", "int": "an integer", "bool": "True or False",
                "str": "a string"}.get(hint.__name__, hint.__name__)
    return str(hint)
