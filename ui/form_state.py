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

from collections.abc import Mapping
from typing import Any

from ui.form_fields import (
    FIELDS,
    INT,
    MAX_INT,
    MISSING,
    NOT_IN_FORM,
    OPT_INT,
    ROLES,
    SECTIONS,
    SOURCES,
    P,
    fit,
    lookup,
    put,
    whole,
)
from ui.form_teachers import teachers_from_state, teachers_to_state
from ui.form_recipe import (
    method_from_state,
    method_to_state,
    recipe_from_state,
    recipe_to_state,
)


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


def _normalised(config: Mapping[str, Any]) -> dict[str, Any]:
    """``scheduler: cosine`` written as ``scheduler: {name: cosine}`` (both are valid YAML for the schema)."""
    out = dict(config)
    for role in ROLES:
        section = out.get(role)
        if isinstance(section, Mapping) and isinstance(section.get("scheduler"), str):
            out[role] = {**section, "scheduler": {"name": section["scheduler"]}}
    return out


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
        if lookup(config, path) is not MISSING and not isinstance(lookup(config, path), Mapping)
    ]
    state: dict[str, Any] = {}
    for f in FIELDS:
        value = lookup(config, f.path)
        if value is MISSING:
            value = lookup(defaults, f.path)
        if value is MISSING:
            problems.append((f.path, "missing: the config must name it"))
            continue
        ok, held, why = fit(f.kind, value)
        if ok:
            state[P + f.key] = held
        else:
            problems.append((f.path, why))
    for role, p in ROLES.items():
        milestones = lookup(config, f"{role}.scheduler.milestones")
        text, why = _milestones_text([] if milestones is MISSING else milestones)
        if why:
            problems.append((f"{role}.scheduler.milestones", why))
        state[f"{P}{p}milestones"] = text
    source = lookup(config, "teacher.source")
    source_state, why = source_to_state("train" if source is MISSING else source)
    if why:
        problems.append(("teacher.source", why))
    state.update(source_state)
    method_state, method_problems = method_to_state(config.get("method"))
    recipe_state, recipe_problems = recipe_to_state(config.get("recipe", MISSING))
    ensemble_state, ensemble_problems = teachers_to_state(config.get("teachers"))
    return {**state, **method_state, **recipe_state, **ensemble_state}, problems + method_problems + recipe_problems + ensemble_problems


def _not_in_form(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(key, why) for key, why in NOT_IN_FORM.items() if config.get(key) not in (None, [], {})]


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
        return state, f"{source!r} is not a teacher source; allowed: train, random, torchvision, timm, run:<id>, file:<path>"
    return state, ""


def state_to_config(s: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The config the widgets describe, values as they are, plus what the form itself cannot parse."""
    config: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    defaults = default_values()
    for f in FIELDS:
        value = s.get(P + f.key, MISSING)
        value = lookup(defaults, f.path) if value is MISSING else value
        put(config, f.path, whole(value) if f.kind in (INT, OPT_INT) else value)
    for role, p in ROLES.items():
        milestones, why = parse_milestones(s.get(f"{P}{p}milestones", ""))
        if why:
            problems.append((f"{role}.scheduler.milestones", why))
        put(config, f"{role}.scheduler.milestones", milestones)
    config["teacher"] = {"arch": config["teacher"].pop("arch"), "source": teacher_source(s), **config["teacher"]}
    config["recipe"], recipe_problems = recipe_from_state(s)
    config["method"], method_problems = method_from_state(s)
    config["teachers"], ensemble_problems = teachers_from_state(s)
    return config, problems + recipe_problems + method_problems + ensemble_problems


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
