"""Sweeps: one launch for a grid of configs, with the teacher trained once and each baseline once.

A sweep is an experiment config plus a ``sweep:`` section mapping field paths to lists of values::

    sweep:
      recipe[1].params.temperature: [1, 2, 4, 8]
      seed: [0, 1, 2]

Every combination is a run. Runs whose teacher section (with dataset, device and precision) is the same
share one teacher: the first of them trains it, the others reuse it as ``teacher.source: run:<id>`` and
wait in the queue until it exists. Runs with the same student, data and seed share one CE-only baseline:
only the first trains it, and results compare every run with its group's baseline.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kd_core.config import PRETRAINED_SOURCES, ConfigError, ExperimentConfig, validate_config

if TYPE_CHECKING:
    import pandas as pd

    from kd_core.teachers import RunTeachers

MAX_RUNS = 200  # a typo in a list of values should not queue thousands of runs
SEED_AXIS = "seed"
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_path(path: str) -> list[str | int]:
    """``recipe[1].params.temperature`` -> ``["recipe", 1, "params", "temperature"]``."""
    parts: list[str | int] = [int(index) if index else name for name, index in _PART.findall(path)]
    if not parts or "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") != path:
        raise ValueError(f"{path!r} is not a field path like recipe[1].params.temperature")
    return parts


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` in the nested config ``data``; its parent must exist (only the last key may be new)."""
    node: Any = data
    *parents, leaf = parse_path(path)
    for part in parents:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{path!r}: the config has no {part!r} there") from None
    if isinstance(leaf, int) and not (isinstance(node, list) and leaf < len(node)):
        raise ValueError(f"{path!r}: the config has no item [{leaf}] there")
    if isinstance(leaf, str) and not isinstance(node, dict):
        raise ValueError(f"{path!r}: the config has no section there")
    node[leaf] = value


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{str(parse_path(p)[-1])}={v}" for p, v in values.items())


@dataclass
class Cell:
    """One run of the grid."""

    values: dict[str, Any]  # swept path -> value
    config: ExperimentConfig
    trains_teacher: bool = True  # False: reuses the teacher of ``teacher_from`` (a cell index)
    teacher_from: int | None = None
    baseline_from: int | None = None  # the cell whose baseline this one is compared with (itself when it trains one)

    @property
    def label(self) -> str:
        return _label(self.values)


@dataclass
class SweepPlan:
    name: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    cells: list[Cell]

    @property
    def teacher_trainings(self) -> int:
        return sum(c.trains_teacher and c.config.teacher.source in ("train", *PRETRAINED_SOURCES) for c in self.cells)

    @property
    def baseline_trainings(self) -> int:
        return sum(c.config.baseline for c in self.cells)


def _axes_errors(axes: Any) -> list[tuple[str, str]]:
    if not isinstance(axes, dict) or not axes:
        return [("sweep", "give field paths with lists of values, e.g. {recipe[1].params.temperature: [1, 2, 4]}")]
    errors = []
    for path, values in axes.items():
        if not isinstance(values, list) or not values:
            errors.append((f"sweep.{path}", "give a non-empty list of values, e.g. [1, 2, 4]"))
        elif len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
            errors.append((f"sweep.{path}", f"a value is listed twice: {values}"))
    size = math.prod(len(v) for v in axes.values() if isinstance(v, list))
    if not errors and size > MAX_RUNS:
        errors.append(("sweep", f"{size} runs; a sweep may launch at most {MAX_RUNS}: sweep fewer values"))
    return errors


def _teacher_key(config: ExperimentConfig) -> str | None:
    """Configs with equal keys can share one trained teacher (None: nothing is trained for the teacher)."""
    if config.teacher.source not in ("train", *PRETRAINED_SOURCES) or config.teachers:
        return None
    data = config.model_dump(mode="json")
    return json.dumps({k: data[k] for k in ("dataset", "teacher", "device", "precision")}, sort_keys=True)


def _baseline_key(config: dict[str, Any]) -> str:
    """Configs (as stored) with equal keys train the same CE-only baseline."""
    return json.dumps({k: config.get(k) for k in ("dataset", "student", "seed", "device", "precision")}, sort_keys=True)


def plan_sweep(raw: dict[str, Any], run_teachers: RunTeachers | None = None) -> SweepPlan:
    """Expand and validate every cell of a sweep file's content; :class:`ConfigError` lists every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", "a sweep is a config with a sweep: section")])
    base = {k: v for k, v in raw.items() if k != "sweep"}
    axes = raw.get("sweep")
    errors = _axes_errors(axes)
    if errors:
        raise ConfigError(errors)
    cells: list[Cell] = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        data = copy.deepcopy(base)
        try:
            for path, value in values.items():
                set_path(data, path, value)
            data["name"] = f"{base.get('name', 'sweep')} [{_label(values)}]"
            cells.append(Cell(values, validate_config(data, run_teachers=run_teachers)))
        except ValueError as exc:  # ConfigError too
            problems = exc.errors if isinstance(exc, ConfigError) else [(f"sweep.{path}", str(exc))]
            errors += [(f"{where} (sweep run {_label(values)})", message) for where, message in problems]
    if errors:
        raise ConfigError(errors)
    _share(cells)
    return SweepPlan(str(base.get("name", "sweep")), base, axes, cells)


def _share(cells: list[Cell]) -> None:
    """First run per teacher group trains the teacher, first per baseline group trains the baseline."""
    teachers: dict[str, int] = {}
    baselines: dict[str, int] = {}
    for i, cell in enumerate(cells):
        key = _teacher_key(cell.config)
        if key is not None:
            first = teachers.setdefault(key, i)
            cell.trains_teacher, cell.teacher_from = first == i, first if first != i else None
        if cell.config.baseline:
            first = baselines.setdefault(_baseline_key(cell.config.model_dump(mode="json")), i)
            cell.baseline_from = first
            if first != i:
                cell.config.baseline = False


def submit_sweep(store: Any, raw: dict[str, Any]) -> int:
    """Validate every run of the sweep, then queue them all (teacher-training runs first); the sweep's id."""
    from kd_core.runner import dispatch, get_executor
    from kd_core.teachers import run_teachers_in

    plan = plan_sweep(raw, run_teachers=run_teachers_in(store))
    sweep_id = store.create_sweep(plan.name, {"base": plan.base, "axes": plan.axes})
    run_ids: dict[int, int] = {}
    for i, cell in enumerate(plan.cells):
        config = cell.config.model_dump(mode="json")
        if cell.teacher_from is not None:
            config["teacher"]["source"] = f"run:{run_ids[cell.teacher_from]}"
        run_ids[i] = store.create_run(config["name"], config, status="queued", sweep_id=sweep_id)
    dispatch(store, get_executor())
    return sweep_id


def cancel_sweep(store: Any, sweep_id: int) -> list[int]:
    """Cancel every queued or running run of the sweep; the ids acted on."""
    from kd_core.runner import ACTIVE_STATUSES, cancel

    active = [r for r in store.list_runs(sweep_id=sweep_id, include_hidden=True) if r.status in ACTIVE_STATUSES]
    for run in sorted(active, key=lambda r: r.id, reverse=True):  # dependants first, so none starts meanwhile
        cancel(store, run.id)
    return [r.id for r in active]


def resume_sweep(store: Any, sweep_id: int) -> list[int]:
    """Queue every failed or cancelled run of the sweep again (teachers first); the ids acted on."""
    from kd_core.runner import resume

    stopped = sorted((r for r in store.list_runs(sweep_id=sweep_id, include_hidden=True) if r.status in ("failed", "cancelled")), key=lambda r: r.id)
    for run in stopped:
        resume(store, run.id)
    return [r.id for r in stopped]


def sweep_runs(store: Any, sweep_id: int) -> pd.DataFrame:
    """One row per run: its swept values, status, accuracies, and the KD gain against its group's baseline."""
    import pandas as pd

    sweep = store.get_sweep(sweep_id)
    axes = sweep.spec.get("axes", {})
    runs = sorted(store.list_runs(sweep_id=sweep_id, include_hidden=True), key=lambda r: r.id)
    baselines = {_baseline_key(r.config): r.summary.get("baseline_acc") for r in runs if r.config.get("baseline")}
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.id, "status": run.status}
        for path in axes:
            row[path] = _get_path(run.config, path)
        baseline = baselines.get(_baseline_key(run.config))
        student = run.summary.get("student_acc")
        row.update(student_acc=student, baseline_acc=baseline, teacher_acc=run.summary.get("teacher_acc"),
                   kd_gain=None if student is None or baseline is None else student - baseline, trained_s=run.summary.get("trained_s"))
        rows.append(row)
    return pd.DataFrame(rows)


def _get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in parse_path(path):
        node = node[part]
    return node


def sweep_summary(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Mean, std and 95 % interval over seeds of student accuracy and KD gain, per combination of the other axes."""
    import pandas as pd
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats took 0.7 s to import on a page's first view

    groups = [a for a in axes if a != SEED_AXIS]
    done = runs[runs["status"] == "completed"]
    rows = []
    for key, part in done.groupby(groups, sort=True, dropna=False) if groups else [((), done)]:
        row = dict(zip(groups, key if isinstance(key, tuple) else (key,)))
        row["runs"] = len(part)
        for col in ("student_acc", "kd_gain", "baseline_acc"):
            values = part[col].dropna().astype(float)
            mean, std = values.mean(), values.std(ddof=1) if len(values) > 1 else float("nan")
            half = float(stdtrit(len(values) - 1, 0.975)) * std / math.sqrt(len(values)) if len(values) > 1 else float("nan")
            row.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_ci95": half})
        rows.append(row)
    return pd.DataFrame(rows)
