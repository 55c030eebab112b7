"""Methods that change the training loop (see :mod:`kd_core.methods.base`); importing registers them all."""

from __future__ import annotations

from typing import Any

from kd_core.losses.params import constructor_params
from kd_core.methods.base import METHODS, Batch, Method, MethodContext, StudentOutputs, create_method, register_method
from kd_core.methods import dho  # noqa: F401  (registers)
from kd_core.methods import ofa  # noqa: F401  (registers)
from kd_core.methods import tgeo_kd  # noqa: F401  (registers)
from kd_core.methods import lelp  # noqa: F401  (registers)
from kd_core.methods import meal_v2  # noqa: F401  (registers)
from kd_core.methods import mixup_kd  # noqa: F401  (registers)
from kd_core.methods import random_teacher  # noqa: F401  (registers)
from kd_core.methods import reviewkd  # noqa: F401  (registers)


def describe_method(name: str) -> dict[str, Any]:
    """What the form and ``python -m kd_core methods`` show: summary, paper, caveat and parameters with defaults."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
    return {"name": name, "summary": cls.summary, "paper": cls.paper, "paper_url": cls.paper_url, "caveat": cls.caveat,
            "params": constructor_params(cls)}


__all__ = ["METHODS", "Batch", "Method", "MethodContext", "StudentOutputs", "create_method", "describe_method", "register_method"]
