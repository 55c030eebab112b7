"""Configs and results of several runs, for Compare: dotted config fields, the fields that differ, runs that differ
only by their seed grouped into mean ± std, and run ids from the address bar."""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys: ``student.optimizer.lr``, ``recipe[1].params.temperature``."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in obj):
            out[prefix] = ", ".join(str(v) for v in obj) if obj else "[]"
        else:
            for i, v in enumerate(obj):
                out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def config_table(runs: Sequence[Any], *, only_differing: bool = False, skip: Iterable[str] = ()) -> pd.DataFrame:
    """Configs side by side: one row per dotted field, one column per run ('#id name')."""
    flats = {f"#{r.id} {r.name}": flatten(r.config) for r in runs}
    fields: list[str] = []
    for f in flats.values():
        fields.extend(k for k in f if k not in fields)
    skip = set(skip)
    rows = {}
    for field in fields:
        if field in skip:
            continue
        values = [f.get(field, "—") for f in flats.values()]
        if only_differing and len({json.dumps(v, sort_keys=True, default=str) for v in values}) <= 1:
            continue
        rows[field] = [_cell(v) for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(flats)) if rows else pd.DataFrame(columns=list(flats))


def _cell(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def differing_fields(runs: Sequence[Any]) -> list[str]:
    return list(config_table(runs, only_differing=True).index)


def numeric_differing(runs: Sequence[Any]) -> pd.DataFrame:
    """Numeric config fields that differ between runs, one row per run (for parallel coordinates)."""
    flats = [flatten(r.config) for r in runs]
    cols: dict[str, list[float]] = {}
    for field in differing_fields(runs):
        vals = [f.get(field) for f in flats]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            cols[field] = [float(v) for v in vals]
    return pd.DataFrame(cols, index=[r.id for r in runs])


RESULT_COLUMNS = OrderedDict(
    [
        ("teacher_acc", "teacher (test %)"),
        ("student_acc", "student best (test %)"),
        ("student_last_acc", "student last (test %)"),
        ("baseline_acc", "baseline best (test %)"),
        ("kd_gain", "KD gain (points)"),
    ]
)


def results_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """Best / last / baseline / KD gain of each run (from the run summaries)."""
    rows = []
    for r in runs:
        row = {"run": f"#{r.id} {r.name}", "status": r.status, "seed": r.config.get("seed")}
        for k, label in RESULT_COLUMNS.items():
            v = r.summary.get(k)
            row[label] = float(v) if isinstance(v, (int, float)) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def config_signature(config: Mapping[str, Any]) -> str:
    """The config without seed and name: runs with equal signatures are repeats of one setup."""
    flat = {k: v for k, v in flatten(config).items() if k not in ("seed", "name")}
    return json.dumps(flat, sort_keys=True, default=str)


def seed_groups_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """mean ± std of the results over runs that share a config except the seed (groups of >= 1 run)."""
    groups: OrderedDict[str, list[Any]] = OrderedDict()
    for r in runs:
        groups.setdefault(config_signature(r.config), []).append(r)
    rows = []
    for members in groups.values():
        row: dict[str, Any] = {
            "runs": ", ".join(f"#{r.id}" for r in members),
            "n": len(members),
            "seeds": ", ".join(str(r.config.get("seed")) for r in members),
        }
        for k, label in RESULT_COLUMNS.items():
            vals = [float(r.summary[k]) for r in members if isinstance(r.summary.get(k), (int, float))]
            row[label] = mean_std_text(vals)
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std_text(vals: Sequence[float]) -> str:
    if not vals:
        return "—"
    s = pd.Series(vals, dtype=float)
    if len(vals) == 1:
        return f"{s.iloc[0]:.2f}"
    return f"{s.mean():.2f} ± {s.std(ddof=1):.2f}"


def parse_run_ids(text: str | None) -> list[int]:
    """'1,2, 3' -> [1, 2, 3] (junk ignored)."""
    return [int(t) for t in re.findall(r"\d+", text or "")]
