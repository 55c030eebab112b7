"""The New-experiment form's state: a config dict <-> the widget values in Session State.

Every widget key starts with ``nx_``. ``FIELDS`` maps each plain config field to its widget key and the kind of
value the widget holds; the teacher source, the LR milestones and the recipe have their own code. Both
directions keep values as they are: ``state_to_config`` passes what the widgets hold straight to validation
(a negative learning rate stays negative and is refused there, next to its field), and ``config_to_state``
refuses, naming the field, a value no widget can hold (a word where a number goes, a missing architecture, a
field the schema does not have) instead of replacing it. ``state_to_config(config_to_state(c))`` gives ``c``
back with its defaults filled in.
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
MAX_INT = 2**53 - 1  # the largest whole number a browser's number field holds exactly
ROLES = {"teacher": "t_", "student": "s_"}
TERM_KEYS = ("loss", "weight", "params", "warmup_epochs")
_MISSING = object()


@dataclass(frozen=True)
class Field:
    path: str  # dotted config path, e.g. "dataset.val_fraction"
    key: str  # widget key without the prefix
    kind: str


def _model_fields(role: str) -> tuple[Field, ...]:
    p = ROLES[role]
    return (
        Field(f"{role}.arch", f"{p}arch", TEXT), Field(f"{role}.epochs", f"{p}epochs", INT),
        Field(f"{role}.batch_size", f"{p}bs", INT), Field(f"{role}.optimizer.name", f"{p}opt", TEXT),
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
    *_model_fields("teacher"), *_model_fields("student"),
    Field("baseline", "baseline", BOOL), Field("cache_teacher", "cache_teacher", BOOL),
    Field("checkpoint_every_s", "ckpt_s", FLOAT),
    Field("analysis.enabled", "an_enabled", BOOL), Field("analysis.cka_checkpoints", "an_cka", INT),
    Field("analysis.samples", "an_samples", INT), Field("analysis.attribution_images", "an_attr", INT),
    Field("analysis.projections", "an_proj", TEXT_LIST),
)
SECTIONS = ("dataset", "teacher", "student", "analysis", "teacher.optimizer", "teacher.scheduler", "student.optimizer",
            "student.scheduler")
NO_METHOD = "none"
NOT_IN_FORM = {  # fields the form cannot edit: a config that uses them is refused by name, never loaded without them
    "teachers": "ensembles of teachers are not in the form yet: launch this config with `python -m kd_core run FILE`",
    "sweep": "this config is a sweep (several runs): launch it with `python -m kd_core sweep FILE`",
}
TEXT_KEYS = tuple(f.key for f in FIELDS if f.kind == TEXT) + ("t_src_file", "t_milestones", "s_milestones")
SOURCES = {
    "train": "Train it here first",
    "run": "Reuse the teacher of an earlier run",
    "upload": "Upload a checkpoint",
    "file": "A checkpoint file on this machine",
    "torchvision": "Torchvision ImageNet weights",
    "random": "Random weights (for testing only)",
}
term_ids = itertools.count(1)


def loss_params(name: Any) -> dict[str, Any]:
    """The parameters of loss ``name`` with their defaults ({} for a name that is not a loss)."""
    from kd_core.losses import LOSSES, describe_loss

    return dict(describe_loss(name)["params"]) if isinstance(name, str) and name in LOSSES else {}


# --------------------------------------------------------------------------- defaults and paths


def default_values() -> dict[str, Any]:
    """Every field's default, from the schema itself (a minimal config validated and written out).

    Called per use: ``dataset.root`` defaults to the data folder of the moment (``DISTILLERY_HOME``).
    """
    from kd_core.config import validate_config

    minimal = {"teacher": {"arch": "cnn_small"}, "student": {"arch": "cnn_tiny"}, "recipe": [{"loss": "kd"}]}
    values = validate_config(minimal).model_dump(mode="json")
    for role in ROLES:
        del values[role]["arch"]  # required: a config must name its architectures
    return values


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``_MISSING`` when a part is absent or not a mapping)."""
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _normalised(config: Mapping[str, Any]) -> dict[str, Any]:
    """``scheduler: cosine`` written as ``scheduler: {name: cosine}`` (both are valid YAML for the schema)."""
    out = dict(config)
    for role in ROLES:
        section = out.get(role)
        if isinstance(section, Mapping) and isinstance(section.get("scheduler"), str):
            out[role] = {**section, "scheduler": {"name": section["scheduler"]}}
    return out


# --------------------------------------------------------------------------- config -> widgets


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
    if kind == TEXT_LIST:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return (True, list(value), "") if ok else (False, None, f"expected a list of names, got {value!r}")
    return (True, value, "") if isinstance(value, str) else (False, None, f"expected text, got {value!r}")


def _unknown_fields(config: Mapping[str, Any], defaults: Mapping[str, Any], where: str = "") -> list[tuple[str, str]]:
    """Fields ``config`` has and the schema does not (recursing into sections); the recipe is checked per term."""
    problems = []
    for key, value in config.items():
        path = f"{where}{key}"
        if key not in defaults and path not in ("teacher.arch", "student.arch"):
            allowed = ", ".join(sorted(set(defaults) | ({"arch"} if where in ("teacher.", "student.") else set())))
            problems.append((path, f"not a field of the config; allowed here: {allowed}"))
        elif isinstance(value, Mapping) and isinstance(defaults.get(key), Mapping):
            problems += _unknown_fields(value, defaults[key], f"{path}.")
    return problems


def config_to_state(config: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Widget values for ``config`` (defaults filled in), and the fields no widget can hold as they are.

    When the second list is not empty nothing may be loaded: each entry names a field and says why.
    """
    if not isinstance(config, Mapping):
        return {}, [("(top level)", "a config is a mapping of fields, e.g. name:, teacher:, student:, recipe:")]
    config = _normalised(config)
    defaults = default_values()
    problems = _not_in_form(config) + _unknown_fields({k: v for k, v in config.items() if k not in NOT_IN_FORM}, defaults) + [
        (path, f"expected a mapping of fields, got {lookup(config, path)!r}") for path in SECTIONS
        if lookup(config, path) is not _MISSING and not isinstance(lookup(config, path), Mapping)
    ]
    state: dict[str, Any] = {}
    for f in FIELDS:
        value = lookup(config, f.path)
        if value is _MISSING:
            value = lookup(defaults, f.path)
        if value is _MISSING:
            problems.append((f.path, "missing: the config must name it"))
            continue
        ok, held, why = fit(f.kind, value)
        if ok:
            state[P + f.key] = held
        else:
            problems.append((f.path, why))
    for role, p in ROLES.items():
        milestones = lookup(config, f"{role}.scheduler.milestones")
        text, why = _milestones_text([] if milestones is _MISSING else milestones)
        if why:
            problems.append((f"{role}.scheduler.milestones", why))
        state[f"{P}{p}milestones"] = text
    source = lookup(config, "teacher.source")
    source_state, why = source_to_state("train" if source is _MISSING else source)
    if why:
        problems.append(("teacher.source", why))
    state.update(source_state)
    method_state, method_problems = method_to_state(config.get("method"))
    recipe_state, recipe_problems = recipe_to_state(config.get("recipe", _MISSING))
    return {**state, **method_state, **recipe_state}, problems + method_problems + recipe_problems


def _not_in_form(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(key, why) for key, why in NOT_IN_FORM.items() if config.get(key) not in (None, [], {})]


def method_to_state(method: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The Method choice and its parameters (as a YAML mapping) for ``method: {name, params}`` or none."""
    if method is None:
        return {f"{P}method": NO_METHOD, f"{P}method_params": ""}, []
    if not isinstance(method, Mapping):
        return {}, [("method", f"expected {{name: NAME, params: {{...}}}}, got {method!r}")]
    problems = [(f"method.{k}", "not a field of a method; allowed: name, params") for k in method if k not in ("name", "params")]
    name, params = method.get("name"), method.get("params") or {}
    if not isinstance(name, str):
        problems.append(("method.name", f"expected the name of a method, got {name!r}"))
    if not isinstance(params, Mapping):
        problems.append(("method.params", f"expected a mapping of parameters, got {params!r}"))
    return {f"{P}method": name, f"{P}method_params": _yaml_line(dict(params)) if params and not problems else ""}, problems


def _milestones_text(value: Any) -> tuple[str, str]:
    if isinstance(value, list) and all(isinstance(m, int) and not isinstance(m, bool) for m in value):
        return ", ".join(str(m) for m in value), ""
    return "", f"expected a list of whole epoch numbers, got {value!r}"


def source_to_state(source: Any) -> tuple[dict[str, Any], str]:
    """The Weights choice and its detail (run id or file path) for a ``teacher.source`` string."""
    state: dict[str, Any] = {f"{P}t_src": "train", f"{P}t_src_run": None, f"{P}t_src_file": ""}
    if not isinstance(source, str):
        return state, f"expected text such as train, random, run:<id> or file:<path>, got {source!r}"
    if source.startswith("run:") and source[4:].isdigit() and int(source[4:]) <= MAX_INT:
        state.update({f"{P}t_src": "run", f"{P}t_src_run": int(source[4:])})
    elif source.startswith("file:"):
        state.update({f"{P}t_src": "file", f"{P}t_src_file": source[5:]})
    elif source in SOURCES and source not in ("run", "file", "upload"):
        state[f"{P}t_src"] = source
    else:
        return state, f"{source!r} is not a teacher source; allowed: train, random, torchvision, run:<id>, file:<path>"
    return state, ""


def recipe_to_state(recipe: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    if recipe is _MISSING:
        return {}, [("recipe", "missing: the config must list at least one loss term")]
    if not isinstance(recipe, list):
        return {}, [("recipe", f"expected a list of loss terms, e.g. [{{loss: ce}}, {{loss: kd}}], got {recipe!r}")]
    state: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    ids = []
    for i, term in enumerate(recipe):
        uid = next(term_ids)
        ids.append(uid)
        term_state, term_problems = term_to_state(uid, term, f"recipe[{i}]")
        state.update(term_state)
        problems += term_problems
    state[f"{P}recipe_ids"] = ids
    return state, problems


def term_to_state(uid: int, term: Any, where: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """One recipe term's widgets; parameters the loss's widgets cannot hold go to its extra-parameters text."""
    if not isinstance(term, Mapping):
        return {}, [(where, f"expected a loss term such as {{loss: kd, weight: 0.9}}, got {term!r}")]
    problems = [(f"{where}.{k}", f"not a field of a loss term; allowed: {', '.join(TERM_KEYS)}") for k in term if k not in TERM_KEYS]
    state: dict[str, Any] = {}
    for key, kind, default in (("loss", TEXT, _MISSING), ("weight", FLOAT, 1.0), ("warmup_epochs", INT, 0)):
        value = term.get(key, default)
        ok, held, why = fit(kind, value) if value is not _MISSING else (False, None, "missing: name the loss, e.g. kd")
        if ok:
            state[f"{P}r{uid}_{key}"] = held
        else:
            problems.append((f"{where}.{key}", why))
    params = term.get("params", {})
    if not isinstance(params, Mapping):
        return state, problems + [(f"{where}.params", f"expected a mapping of parameters, got {params!r}")]
    extra = dict(params)
    for name, default in loss_params(state.get(f"{P}r{uid}_loss")).items():
        ok, held = param_widget_value(default, extra[name]) if name in extra else param_widget_value(default, default)
        if ok:
            extra.pop(name, None)
            state[f"{P}r{uid}_p_{name}"] = held
    state[f"{P}r{uid}_extra"] = _yaml_line(extra) if extra else ""
    return state, problems


def param_widget_value(default: Any, value: Any) -> tuple[bool, Any]:
    """(the parameter's widget can hold ``value``, the widget value): the widget's kind follows the default's type."""
    if default is None:
        return True, "" if value is None else _yaml_line(value)
    kind = BOOL if isinstance(default, bool) else INT if isinstance(default, int) else FLOAT if isinstance(default, float) else TEXT
    ok, held, _ = fit(kind, value)
    return ok, held


def _yaml_line(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()


# --------------------------------------------------------------------------- widgets -> config


def state_to_config(s: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The config the widgets describe, values as they are, plus what the form itself cannot parse."""
    config: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    defaults = default_values()
    for f in FIELDS:
        value = s.get(P + f.key, _MISSING)
        value = lookup(defaults, f.path) if value is _MISSING else value
        _put(config, f.path, whole(value) if f.kind in (INT, OPT_INT) else value)
    for role, p in ROLES.items():
        milestones, why = parse_milestones(s.get(f"{P}{p}milestones", ""))
        if why:
            problems.append((f"{role}.scheduler.milestones", why))
        _put(config, f"{role}.scheduler.milestones", milestones)
    config["teacher"] = {"arch": config["teacher"].pop("arch"), "source": teacher_source(s), **config["teacher"]}
    config["recipe"], recipe_problems = recipe_from_state(s)
    config["method"], method_problems = method_from_state(s)
    return config, problems + recipe_problems + method_problems


def method_from_state(s: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    name = s.get(f"{P}method", NO_METHOD)
    if name == NO_METHOD:
        return None, []
    text = str(s.get(f"{P}method_params") or "").strip()
    try:
        params = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        params = None
    if not isinstance(params, dict):
        return {"name": name, "params": {}}, [("method.params", "write the parameters as a YAML mapping, e.g. {alphas: [0.5]}")]
    return {"name": name, "params": params}, []


def parse_milestones(text: Any) -> tuple[list[int], str]:
    text = str(text or "").strip().strip("[]")
    try:
        return [int(x) for x in text.replace(";", ",").replace(" ", ",").split(",") if x.strip()], ""
    except ValueError:
        return [], "write whole epoch numbers separated by commas, e.g. 150, 180, 210"


def teacher_source(s: Mapping[str, Any]) -> str:
    kind = s.get(f"{P}t_src", "train")
    if kind == "run":
        rid = s.get(f"{P}t_src_run")
        return f"run:{rid}" if rid is not None else "run:"
    if kind == "upload":
        return f"file:{s.get(f'{P}t_upload_path') or ''}"
    if kind == "file":
        return f"file:{s.get(f'{P}t_src_file', '')}"
    return str(kind)


def recipe_from_state(s: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    recipe, problems = [], []
    for i, uid in enumerate(s.get(f"{P}recipe_ids") or []):
        name = s.get(f"{P}r{uid}_loss", "ce")
        params = {pname: parse_param(default, s.get(f"{P}r{uid}_p_{pname}", default))
                  for pname, default in loss_params(name).items()}
        extra_text = str(s.get(f"{P}r{uid}_extra") or "").strip()
        if extra_text:
            try:
                extra = yaml.safe_load(extra_text)
            except yaml.YAMLError:
                extra = None
            if isinstance(extra, dict):
                params.update({str(k): v for k, v in extra.items()})
            else:
                problems.append((f"recipe[{i}].params", "extra parameters must be a YAML mapping, e.g. {temperature: 4}"))
        recipe.append({"loss": name, "weight": s.get(f"{P}r{uid}_weight", 1.0), "params": params,
                       "warmup_epochs": whole(s.get(f"{P}r{uid}_warmup_epochs", 0))})
    return recipe, problems


def parse_param(default: Any, value: Any) -> Any:
    """A parameter whose default is None has a text widget: empty = None, else the YAML value typed."""
    if isinstance(default, int) and not isinstance(default, bool):
        return whole(value)
    if default is None and isinstance(value, str):
        if not value.strip():
            return None
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


# --------------------------------------------------------------------------- the run name


def auto_name(s: Mapping[str, Any]) -> str:
    """The name the form gives a config: what it trains, e.g. ``mnist5k cnn_small -> cnn_tiny KD``."""
    losses = [str(s.get(f"{P}r{uid}_loss")) for uid in s.get(f"{P}recipe_ids") or []]
    method = "+".join(dict.fromkeys(n.upper() for n in losses if n != "ce")) or "CE"
    return f"{s.get(P + 'ds_name')} {s.get(P + 't_arch')} -> {s.get(P + 's_arch')} {method}"


def follow_config_with_name(s: dict[str, Any]) -> None:
    """Rename the run after what it trains when that changes, until the user types a name of their own.

    ``_nx_auto`` remembers (the name the form last set, the config description it was set for).
    """
    described = auto_name(s)
    given, described_then = s.get("_nx_auto", (None, None))
    if described != described_then and s.get(P + "name") == given:
        s[P + "name"] = described
        s["_nx_auto"] = (described, described)


def remember_loaded_name(s: dict[str, Any]) -> None:
    """A loaded config keeps its own name until the config it describes changes."""
    s["_nx_auto"] = (s.get(P + "name"), auto_name(s))
