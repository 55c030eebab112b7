"""The New-experiment form's fields: which config field each widget holds, and what a widget can hold.

Every widget key starts with ``nx_``. ``FIELDS`` maps each plain config field to its widget key and the kind of
value the widget holds; ``fit`` says whether a value from a config fits such a widget, ``whole`` turns a
whole-number widget's value back into an int. ``ui.form_state`` and ``ui.form_recipe`` build on these.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

P = "nx_"  # key prefix of every form widget
TEXT, INT, OPT_INT, FLOAT, BOOL, TEXT_LIST = "text", "int", "optional int", "float", "bool", "text list"
AUTO_BOOL = "true, false or auto"
MAX_INT = 2**53 - 1  # the largest whole number a browser's number field holds exactly
ROLES = {"teacher": "t_", "student": "s_"}
TERM_KEYS = ("loss", "weight", "params", "warmup_epochs")
MISSING = object()


@dataclass(frozen=True)
class Field:
    path: str  # dotted config path, e.g. "dataset.val_fraction"
    key: str  # widget key without the prefix
    kind: str


def _model_fields(role: str) -> tuple[Field, ...]:
    p = ROLES[role]
    return (
        Field(f"{role}.arch", f"{p}arch", TEXT), Field(f"{role}.epochs", f"{p}epochs", INT),
        Field(f"{role}.batch_size", f"{p}bs", INT), Field(f"{role}.devices", f"{p}devices", INT),
        Field(f"{role}.optimizer.name", f"{p}opt", TEXT),
        Field(f"{role}.optimizer.lr", f"{p}lr", FLOAT), Field(f"{role}.optimizer.momentum", f"{p}mom", FLOAT),
        Field(f"{role}.optimizer.weight_decay", f"{p}wd", FLOAT), Field(f"{role}.optimizer.nesterov", f"{p}nesterov", BOOL),
        Field(f"{role}.scheduler.name", f"{p}sched", TEXT), Field(f"{role}.scheduler.gamma", f"{p}gamma", FLOAT),
    )


FIELDS: tuple[Field, ...] = (
    Field("name", "name", TEXT), Field("seed", "seed", INT), Field("device", "device", TEXT),
    Field("precision", "precision", TEXT),
    Field("dataset.name", "ds_name", TEXT), Field("dataset.root", "ds_root", TEXT),
    Field("dataset.val_fraction", "ds_val", FLOAT), Field("dataset.augment", "ds_augment", BOOL),
    Field("dataset.subset", "ds_subset", OPT_INT), Field("dataset.image_size", "ds_image_size", OPT_INT),
    Field("dataset.loader", "ds_loader", TEXT), Field("dataset.workers", "ds_workers", OPT_INT),
    *_model_fields("teacher"), *_model_fields("student"),
    Field("baseline", "baseline", BOOL), Field("cache_teacher", "cache_teacher", BOOL),
    Field("channels_last", "channels_last", AUTO_BOOL), Field("compile", "compile", BOOL),
    Field("soft_labels.store", "sl_store", BOOL), Field("soft_labels.top_k", "sl_top_k", OPT_INT),
    Field("checkpoint_every_s", "ckpt_s", FLOAT),
    Field("analysis.enabled", "an_enabled", BOOL), Field("analysis.cka_checkpoints", "an_cka", INT),
    Field("analysis.samples", "an_samples", INT), Field("analysis.attribution_images", "an_attr", INT),
    Field("analysis.projections", "an_proj", TEXT_LIST),
)
SECTIONS = ("dataset", "teacher", "student", "analysis", "soft_labels", "teacher.optimizer", "teacher.scheduler", "student.optimizer",
            "student.scheduler")
NO_METHOD = "none"
NOT_IN_FORM = {  # fields the form cannot edit: a config that uses them is refused by name, never loaded without them
    "sweep": "this config is a sweep (several runs): launch it with `python -m kd_core sweep FILE`",
}
TEXT_KEYS = tuple(f.key for f in FIELDS if f.kind == TEXT) + ("t_src_file", "t_milestones", "s_milestones")
SOURCES = {
    "train": "Train it here first",
    "run": "Reuse the teacher of an earlier run",
    "upload": "Upload a checkpoint",
    "file": "A checkpoint file on this machine",
    "torchvision": "Torchvision ImageNet weights",
    "timm": "timm ImageNet weights (timm: architectures)",
    "random": "Random weights (for testing only)",
}
term_ids = itertools.count(1)


def loss_params(name: Any) -> dict[str, Any]:
    """The parameters of loss ``name`` with their defaults ({} for a name that is not a loss)."""
    from kd_core.losses import LOSSES, describe_loss

    return dict(describe_loss(name)["params"]) if isinstance(name, str) and name in LOSSES else {}


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``MISSING`` when a part is absent or not a mapping)."""
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return MISSING
        data = data[part]
    return data


def put(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def whole(value: Any) -> Any:
    """A whole-number field's value for the config: 3.0 -> 3, and anything else as it is (2.5 stays 2.5).

    Whole-number fields are float widgets: a browser's integer field truncates a typed 2.5 to 2 without a word,
    a float field keeps it, and validation then says it must be a whole number.
    """
    return int(value) if isinstance(value, float) and value.is_integer() else value


def fit(kind: str, value: Any) -> tuple[bool, Any, str]:
    """(the widget can hold it, the widget value, why not) for a value of a field of ``kind``."""
    if kind == OPT_INT and value is None:
        return True, None, ""
    if kind in (INT, OPT_INT):
        whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
        if isinstance(value, bool) or not whole:
            return False, None, f"expected a whole number, got {value!r}"
        if abs(value) > MAX_INT:
            return False, None, f"{value!r} is larger than a form field can hold ({MAX_INT:,})"
        return True, float(value), ""  # whole numbers sit in float fields too: see whole()
    if kind == FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None, f"expected a number, got {value!r}"
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            return False, None, f"expected a finite number, got {value!r}"
        return True, number, ""
    if kind == BOOL:
        return (True, value, "") if isinstance(value, bool) else (False, None, f"expected true or false, got {value!r}")
    if kind == AUTO_BOOL:
        ok = isinstance(value, bool) or value == "auto"
        return (True, value, "") if ok else (False, None, f"expected true, false or auto, got {value!r}")
    if kind == TEXT_LIST:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return (True, list(value), "") if ok else (False, None, f"expected a list of names, got {value!r}")
    return (True, value, "") if isinstance(value, str) else (False, None, f"expected text, got {value!r}")


def yaml_line(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
