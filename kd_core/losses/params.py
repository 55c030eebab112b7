"""Checks of a recipe term's ``params`` before anything trains: types follow each parameter's default,
ranges follow what the formula allows (a temperature of 0 divides by zero; a negative weight of a
distance term rewards the opposite of what it means)."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

Check = tuple[Callable[[float], bool], str]

POSITIVE: Check = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
FRACTION: Check = (lambda v: 0 <= v < 1, "must be in [0, 1)")
UNIT: Check = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
AT_LEAST_ONE: Check = (lambda v: v >= 1, "must be >= 1")

# by parameter name; every loss that has the parameter means the same by it
RANGES: dict[str, Check] = {
    "temperature": POSITIVE, "eps": POSITIVE, "p": POSITIVE,
    "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE,
    "distance_weight": NON_NEGATIVE, "angle_weight": NON_NEGATIVE,
    "label_smoothing": FRACTION, "dropout": FRACTION, "momentum": UNIT,
    "t_start": UNIT, "t_end": UNIT,
    "embed_dim": AT_LEAST_ONE, "num_negatives": AT_LEAST_ONE, "stage": NON_NEGATIVE,
}
# (loss, parameter) where the generic meaning does not hold
OVERRIDES: dict[tuple[str, str], Check] = {
    ("taid", "beta"): FRACTION,  # a momentum coefficient
    ("ofa", "eps"): NON_NEGATIVE,  # OFA's γ is an exponent; 0 switches the target enhancement off
}


def constructor_params(cls: type) -> dict[str, Any]:
    """The keyword arguments a config's ``params:`` may set for a registered class, with their defaults."""
    signature = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _type_error(value: Any, default: Any) -> str | None:
    """Values follow the type of the default: numbers for floats, whole numbers for ints, true/false for flags."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number" if default is None or isinstance(default, (int, float)) else None
    if isinstance(default, int) or default is None:
        return None if isinstance(value, int) or float(value).is_integer() else "must be a whole number"
    return None if math.isfinite(value) else "must be a finite number"


def param_errors(loss: str, params: dict[str, Any], defaults: dict[str, Any]) -> list[tuple[str, str]]:
    """``(parameter, message)`` for each value in ``params`` that the loss cannot use."""
    errors: list[tuple[str, str]] = []
    for name, value in params.items():
        if name not in defaults or (value is None and defaults[name] is None):
            continue
        default = defaults[name]
        problem = _type_error(value, None if default is inspect.Parameter.empty else default)
        check = OVERRIDES.get((loss, name), RANGES.get(name))
        if problem is None and check is not None and not isinstance(value, bool) and not check[0](value):
            problem = check[1]
        if problem:
            errors.append((name, f"{problem}, got {value!r}"))
    if loss == "taid" and not errors and params.get("t_start", 0.4) > params.get("t_end", 1.0):
        errors.append(("t_start", f"must not exceed t_end ({params.get('t_end', 1.0)}), got {params['t_start']}"))
    return errors
