"""What the student learns from, in the form: the recipe's loss terms (each with its parameters) and the
training method, to and from widget state (see ``ui.form_fields`` for the keys and kinds)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from ui.form_fields import (
    BOOL,
    FLOAT,
    INT,
    MISSING,
    NO_METHOD,
    TERM_KEYS,
    TEXT,
    P,
    fit,
    loss_params,
    term_ids,
    whole,
    yaml_line,
)


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
    return {f"{P}method": name, f"{P}method_params": yaml_line(dict(params)) if params and not problems else ""}, problems


def recipe_to_state(recipe: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    if recipe is MISSING:
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
    for key, kind, default in (("loss", TEXT, MISSING), ("weight", FLOAT, 1.0), ("warmup_epochs", INT, 0)):
        value = term.get(key, default)
        ok, held, why = fit(kind, value) if value is not MISSING else (False, None, "missing: name the loss, e.g. kd")
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
    state[f"{P}r{uid}_extra"] = yaml_line(extra) if extra else ""
    return state, problems


def param_widget_value(default: Any, value: Any) -> tuple[bool, Any]:
    """(the parameter's widget can hold ``value``, the widget value): the widget's kind follows the default's type."""
    if default is None:
        return True, "" if value is None else yaml_line(value)
    kind = BOOL if isinstance(default, bool) else INT if isinstance(default, int) else FLOAT if isinstance(default, float) else TEXT
    ok, held, _ = fit(kind, value)
    return ok, held


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
