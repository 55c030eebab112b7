"""Everything the New-experiment form checks before Launch is enabled, as one function of the widget state.

``check_form`` turns the widget values into a config and reports each problem under its field path. It runs on
every rerun, so it stays cheap: checkpoint files are read once per (path, modification time). Typed paths are
checked lexically (``kd_core.settings.path_error``) before anything opens or even stats them. Nothing here
writes: not to the database, not to disk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from kd_core.settings import path_error, resolve_path
from ui import form_teachers
from ui.form_fields import FIELDS, FLOAT, INT, MAX_INT, OPT_INT, TEXT_KEYS, P, lookup
from ui.form_state import state_to_config

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class FormCheck:
    config: dict[str, Any]  # what the widgets describe, values as typed
    valid: Any = None  # the validated ExperimentConfig, None while anything is wrong
    errors: dict[str, list[str]] = field(default_factory=dict)  # field path -> messages
    notes: dict[str, list[str]] = field(default_factory=dict)  # field path -> warnings that do not block Launch

    def add(self, problems: list[tuple[str, str]], into: dict[str, list[str]] | None = None) -> None:
        target = self.errors if into is None else into
        for path, message in problems:
            text = message.removeprefix(f"{path}: ")
            if text not in target.setdefault(path, []):
                target[path].append(text)


def check_form(s: Mapping[str, Any], store: Any, upload_error: str | None = None) -> FormCheck:
    """The config the widgets describe and every problem with it, by field."""
    from kd_core.config import ConfigError, validate_config

    config, problems = state_to_config(s)
    check = FormCheck(config)
    check.add(problems + value_problems(s))
    source_problems, weights = teacher_source_problems(s, upload_error)
    check.add(source_problems)
    root_problems = root_path_problems(config)
    check.add(root_problems)
    ensemble_problems, ensemble_weights = form_teachers.source_problems(s)
    check.add(ensemble_problems)
    try:  # weights named by a file or a run are checked below, cached and after the path checks: a stand-in here
        borrowed = s.get(f"{P}t_src") in ("file", "upload", "run")
        stand_in = {**config, "teacher": {**config["teacher"], "source": "random"}} if borrowed else dict(config)
        stand_ins = form_teachers.borrowed(s)
        stand_in["teachers"] = [{**t, "source": "random"} if i in stand_ins else t for i, t in enumerate(config["teachers"])]
        check.valid = validate_config(stand_in)
    except ConfigError as exc:
        check.add(exc.errors)
    if weights is not None and not any(p.startswith(("teacher.arch", "dataset.")) for p in check.errors):
        check.add(weight_problems(weights, config, store))
    for i, found in ensemble_weights.items():
        if not any(p.startswith((f"teachers[{i}].arch", "dataset.")) for p in check.errors):
            check.add(weight_problems(found, config, store, where=f"teachers[{i}]"))
    if not root_problems:
        check.add(dataset_file_notes(config), into=check.notes)
    if check.errors:
        check.valid = None
    elif check.valid is not None:
        check.valid.teacher.source = config["teacher"]["source"]
        for teacher, typed in zip(check.valid.teachers, config["teachers"]):
            teacher.source = typed["source"]
    return check


# --------------------------------------------------------------------------- values the schema cannot judge


def value_problems(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What a form field must hold before the schema sees it: finite numbers, whole numbers a browser keeps
    exactly, text without control characters (PostgreSQL refuses NUL; paths with them cannot be checked)."""
    problems = []
    for f in FIELDS:
        problems += _number_problems(f.path, f.kind, s.get(P + f.key))
    for key in TEXT_KEYS:
        value = s.get(P + key)
        if isinstance(value, str) and _CONTROL.search(value):
            problems.append((_path_of(key), "contains a control character (a tab, newline or NUL); type it without"))
    for i, uid in enumerate(s.get(f"{P}recipe_ids") or []):
        problems += _number_problems(f"recipe[{i}].weight", FLOAT, s.get(f"{P}r{uid}_weight"))
        problems += _number_problems(f"recipe[{i}].warmup_epochs", INT, s.get(f"{P}r{uid}_warmup_epochs"))
    return problems


def _number_problems(path: str, kind: str, value: Any) -> list[tuple[str, str]]:
    if kind == FLOAT and isinstance(value, float) and not math.isfinite(value):
        return [(path, f"must be a finite number, got {value!r}")]
    if kind in (INT, OPT_INT) and isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return [(path, f"{value!r} is larger than the form can hold ({MAX_INT:,})")]
    return []


def _path_of(key: str) -> str:
    special = {"t_src_file": "teacher.source", "t_milestones": "teacher.scheduler.milestones",
               "s_milestones": "student.scheduler.milestones"}
    return special.get(key) or next(f.path for f in FIELDS if f.key == key)


# --------------------------------------------------------------------------- paths


def root_path_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    root = lookup(config, "dataset.root")
    if not isinstance(root, str) or _CONTROL.search(root):
        return [("dataset.root", "give a folder path")] if not isinstance(root, str) else []
    error = path_error("dataset.root", root)
    return [("dataset.root", error)] if error else []


def dataset_file_notes(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A torchvision dataset whose files are not under the (already allowed) root: where to put them."""
    from kd_core.data import DATASETS, missing_files

    name, root = lookup(config, "dataset.name"), lookup(config, "dataset.root")
    if not isinstance(name, str) or name not in DATASETS or DATASETS[name].offline:
        return []
    missing = missing_files(name, root)
    if not missing:
        return []
    where = resolve_path(root)
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return [("dataset.name", f"{name} is not in {where} yet (missing {shown}). The run downloads it there when this "
                             f"machine is online; offline it fails: place those files under {where} first.")]


def teacher_source_problems(s: Mapping[str, Any], upload_error: str | None) -> tuple[list[tuple[str, str]], Path | int | None]:
    """The one current problem with the Weights choice, and the weights to check (a path, a run id, or None).

    Only what holds for the form as it is now: a refused upload gives its reason, not also "choose a file".
    """
    kind = s.get(f"{P}t_src", "train")
    if kind == "upload":
        if upload_error:
            return [("teacher.source", upload_error)], None
        path = s.get(f"{P}t_upload_path")
        return ([], Path(path)) if path else ([("teacher.source", "upload a checkpoint file (.safetensors or .pt)")], None)
    if kind == "file":
        typed = str(s.get(f"{P}t_src_file") or "")
        if not typed.strip():
            return [("teacher.source", "type the path of a checkpoint file (.safetensors or .pt)")], None
        if _CONTROL.search(typed):
            return [], None  # value_problems names it
        error = path_error("teacher.source", typed)  # lexical: nothing outside the allowed folders is touched
        if error:
            return [("teacher.source", error)], None
        path = resolve_path(typed)
        return ([], path) if path.is_file() else ([("teacher.source", f"no file at {typed!r}")], None)
    if kind == "run":
        rid = s.get(f"{P}t_src_run")
        return ([], rid) if isinstance(rid, int) else ([("teacher.source", "choose the run whose teacher to reuse")], None)
    return [], None


# --------------------------------------------------------------------------- teacher weights


def weight_problems(weights: Path | int, config: Mapping[str, Any], store: Any, where: str = "teacher") -> list[tuple[str, str]]:
    """Weights from a file or an earlier run must load and fit the teacher architecture and the dataset.

    ``where`` is the teacher's config path: "teacher", or "teachers[i]" for a further teacher of an ensemble."""
    from kd_core.teachers import TeacherUnavailable, run_teachers_in

    arch = str(lookup(config, "teacher.arch") if where == "teacher" else config["teachers"][int(where[9:-1])]["arch"])
    problems: list[tuple[str, str]] = []
    path = weights
    if isinstance(weights, int):
        problems = earlier_run_problems(weights, config, store, where, arch)
        if problems:
            return problems
        try:
            path = run_teachers_in(store)(weights)
        except TeacherUnavailable as exc:
            return [(f"{where}.source", str(exc).removeprefix("teacher.source: "))]
    from ui.forms import dataset_shape

    shape = dataset_shape(config["dataset"]["name"], config["dataset"].get("image_size"))
    try:
        mtime = Path(path).stat().st_mtime
    except OSError as exc:
        return [(f"{where}.source", f"cannot read {Path(path).name}: {exc.strerror}")]
    error = checkpoint_problem(str(path), mtime, arch, *shape)
    return [(f"{where}.source", error)] if error else []


def earlier_run_problems(run_id: int, config: Mapping[str, Any], store: Any, where: str = "teacher",
                         arch: str | None = None) -> list[tuple[str, str]]:
    """Friendlier reasons than a shape mismatch: another dataset, another architecture, not finished."""
    arch = config["teacher"]["arch"] if arch is None else arch
    try:
        run = store.get_run(run_id)
    except KeyError:
        return [(f"{where}.source", f"run {run_id} does not exist (any more)")]
    teacher, data = (run.config or {}).get("teacher") or {}, (run.config or {}).get("dataset") or {}
    problems = []
    if run.status != "completed":
        problems.append((f"{where}.source", f"run {run_id} is {run.status}, not completed"))
    if teacher.get("arch") and teacher["arch"] != arch:
        problems.append((f"{where}.arch", f"run {run_id}'s teacher is a {teacher['arch']}; set this teacher's architecture to it"))
    if data.get("name") and data["name"] != config["dataset"]["name"]:
        problems.append((f"{where}.source", f"run {run_id}'s teacher was trained on {data['name']}, not {config['dataset']['name']}"))
    return problems


@st.cache_data(show_spinner=False, max_entries=32)
def checkpoint_problem(path: str, mtime: float, arch: str, num_classes: int, in_channels: int, image_size: int) -> str | None:
    """None when the checkpoint at ``path`` loads and fits ``arch`` for this dataset, else why not."""
    from kd_core.models import MODELS, create_model
    from kd_core.teachers import TeacherUnavailable, check_fits, read_state_dict

    if arch not in MODELS:
        return None  # the schema check names the architecture
    try:
        state = read_state_dict(path)
        check_fits(create_model(arch, num_classes, in_channels, image_size), state, arch, num_classes, Path(path).name)
    except TeacherUnavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else: refuse with the reason
        return f"{Path(path).name} cannot be used ({exc.__class__.__name__}: {exc})"
    return None
