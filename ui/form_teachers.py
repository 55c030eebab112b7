"""Further teachers of an ensemble (``teachers:`` in a config, for methods such as meal_v2) in the New-experiment form.

Each further teacher is an architecture, a source of weights (trained here, an earlier run's teacher, a file,
random, torchvision) and, for one trained here, its training settings as a YAML mapping (epochs, batch size,
optimizer, schedule). Widget keys: ``nx_ens_ids`` lists the teachers' ids; teacher ``u`` has ``nx_e<u>_arch``,
``nx_e<u>_src``, ``nx_e<u>_src_run``, ``nx_e<u>_src_file`` and ``nx_e<u>_train``. Values go to validation as
typed, like the rest of the form; the weights named by a file or a run get the first teacher's checks.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import yaml

from ui.form_fields import MAX_INT, P, yaml_line

IDS = f"{P}ens_ids"
KINDS = {  # the first teacher's upload is left out: a file on this machine does the same for an ensemble
    "train": "Train it here first",
    "run": "Reuse the teacher of an earlier run",
    "file": "A checkpoint file on this machine",
    "random": "Random weights (for testing only)",
    "torchvision": "Torchvision ImageNet weights",
    "timm": "timm ImageNet weights (timm: architectures)",
}
TRAINING_KEYS = ("epochs", "batch_size", "optimizer", "scheduler")
ensemble_ids = itertools.count(1)


def key(uid: int, name: str) -> str:
    return f"{P}e{uid}_{name}"


def split_source(source: Any) -> tuple[str, int | None, str, str]:
    """(kind, run id, file path, why not) for a ``source`` string such as train, run:3 or file:/x.safetensors."""
    if not isinstance(source, str):
        return "train", None, "", f"expected text such as train, random, run:<id> or file:<path>, got {source!r}"
    if source.startswith("run:") and source[4:].isdigit() and int(source[4:]) <= MAX_INT:
        return "run", int(source[4:]), "", ""
    if source.startswith("file:"):
        return "file", None, source[5:], ""
    if source in ("train", "random", "torchvision", "timm"):
        return source, None, "", ""
    return "train", None, "", f"{source!r} is not a teacher source; allowed: train, random, torchvision, timm, run:<id>, file:<path>"


def join_source(kind: Any, run_id: Any, path: Any) -> str:
    if kind == "run":
        return f"run:{run_id}" if run_id is not None else "run:"
    if kind == "file":
        return f"file:{path or ''}"
    return str(kind)


# --------------------------------------------------------------------------- config <-> widget state


def teachers_to_state(teachers: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Widget values for the config's ``teachers:`` list, and the entries no widget can hold as they are."""
    if teachers is None:
        teachers = []
    if not isinstance(teachers, list):
        return {}, [("teachers", f"expected a list of teachers, e.g. [{{arch: lenet5}}], got {teachers!r}")]
    state: dict[str, Any] = {IDS: []}
    problems: list[tuple[str, str]] = []
    for i, teacher in enumerate(teachers):
        where = f"teachers[{i}]"
        if not isinstance(teacher, Mapping):
            problems.append((where, f"expected a teacher such as {{arch: lenet5, source: train}}, got {teacher!r}"))
            continue
        uid = next(ensemble_ids)
        state[IDS].append(uid)
        arch = teacher.get("arch")
        if not isinstance(arch, str):
            problems.append((f"{where}.arch", "missing: name the teacher's architecture" if arch is None else f"expected a name, got {arch!r}"))
        kind, run_id, path, why = split_source(teacher.get("source", "train"))
        if why:
            problems.append((f"{where}.source", why))
        training = {k: v for k, v in teacher.items() if k not in ("arch", "source")}
        state.update({key(uid, "arch"): arch, key(uid, "src"): kind, key(uid, "src_run"): run_id, key(uid, "src_file"): path,
                      key(uid, "train"): yaml_line(training) if training else ""})
    return state, problems


def teachers_from_state(s: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The ``teachers:`` list the widgets describe, values as typed, plus the settings text that does not parse."""
    teachers, problems = [], []
    for i, uid in enumerate(s.get(IDS) or []):
        text = str(s.get(key(uid, "train")) or "").strip()
        try:
            training = yaml.safe_load(text) if text else {}
        except yaml.YAMLError:
            training = None
        if not isinstance(training, dict):
            problems.append((f"teachers[{i}]", "write the training settings as a YAML mapping, e.g. {epochs: 10, batch_size: 64}"))
            training = {}
        source = join_source(s.get(key(uid, "src"), "train"), s.get(key(uid, "src_run")), s.get(key(uid, "src_file")))
        teachers.append({"arch": s.get(key(uid, "arch")), "source": source, **{str(k): v for k, v in training.items()}})
    return teachers, problems


def new_teacher_state(s: dict[str, Any]) -> int:
    """Add a further teacher: the first teacher's architecture, trained here with the first teacher's settings (shown, editable)."""
    from ui.form_state import state_to_config

    first = state_to_config(s)[0]["teacher"]
    uid = next(ensemble_ids)
    s.update({key(uid, "arch"): first.get("arch"), key(uid, "src"): "train", key(uid, "src_run"): None, key(uid, "src_file"): "",
              key(uid, "train"): yaml_line({k: first[k] for k in TRAINING_KEYS if k in first})})
    s[IDS] = [*s.get(IDS, []), uid]
    return uid


def remove_teacher(s: dict[str, Any], uid: int) -> None:
    s[IDS] = [u for u in s.get(IDS, []) if u != uid]


# --------------------------------------------------------------------------- checks (the first teacher's, per further teacher)


def source_problems(s: Mapping[str, Any]) -> tuple[list[tuple[str, str]], dict[int, Any]]:
    """Problems with each further teacher's source, and the weights to check by position (a path or a run id)."""
    from kd_core.settings import path_error, resolve_path

    problems: list[tuple[str, str]] = []
    weights: dict[int, Any] = {}
    for i, uid in enumerate(s.get(IDS) or []):
        where, kind = f"teachers[{i}].source", s.get(key(uid, "src"), "train")
        if kind == "run":
            rid = s.get(key(uid, "src_run"))
            if isinstance(rid, int):
                weights[i] = rid
            else:
                problems.append((where, "choose the run whose teacher to reuse"))
        elif kind == "file":
            typed = str(s.get(key(uid, "src_file")) or "")
            error = path_error(where, typed) if typed.strip() else "type the path of a checkpoint file (.safetensors or .pt)"
            if error:
                problems.append((where, error))
            elif not resolve_path(typed).is_file():
                problems.append((where, f"no file at {typed!r}"))
            else:
                weights[i] = resolve_path(typed)
    return problems, weights


def borrowed(s: Mapping[str, Any]) -> set[int]:
    """Positions of the further teachers whose weights come from a run or a file (checked here, not by the schema)."""
    return {i for i, uid in enumerate(s.get(IDS) or []) if s.get(key(uid, "src")) in ("run", "file")}
