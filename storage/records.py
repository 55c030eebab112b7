"""Plain snapshots of database rows (runs, artifacts) and the conversions into column values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Row

UPDATABLE_RUN_FIELDS: frozenset[str] = frozenset(
    {
        "name", "status", "config", "started_at", "finished_at", "heartbeat_at", "host",
        "pid", "executor", "executor_ref", "error", "log_path", "summary", "progress",
        "tags", "hidden",
    }
)
_JSON_DICT_FIELDS = frozenset({"config", "summary", "progress"})
_TIME_FIELDS = frozenset({"started_at", "finished_at", "heartbeat_at"})

@dataclass(frozen=True)
class RunRecord:
    """Immutable snapshot of one row of ``runs``; timestamps are unix seconds."""

    id: int
    uid: str  # unique across databases; names the run's artifact folder
    name: str
    status: str
    config: dict[str, Any]
    parent_id: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    host: str | None
    pid: int | None
    executor: str | None
    executor_ref: str | None
    error: str | None
    log_path: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    hidden: bool = False
    sweep_id: int | None = None  # the sweep that launched the run


@dataclass(frozen=True)
class SweepRecord:
    """Immutable snapshot of one row of ``sweeps``: ``spec`` holds the base config and the swept values."""

    id: int
    uid: str
    name: str
    spec: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class ArtifactRecord:
    """Immutable snapshot of one row of ``artifacts`` (a file a run produced)."""

    id: int
    run_id: int
    kind: str
    path: str
    meta: dict[str, Any]
    created_at: float


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON types.

    Callers hand us numpy/torch scalars and NaN losses; PostgreSQL's ``json``
    type rejects ``NaN``/``Infinity`` and ``json.dumps`` rejects numpy types, so
    non-finite floats become ``None`` and scalars are unwrapped via ``.item()``.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "__fspath__"):
        return str(obj.__fspath__())
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def _as_str_list(values: Sequence[str] | str) -> list[str]:
    """Accept a single string where a sequence is expected ('queued' is not ['q','u',...])."""
    if isinstance(values, str):
        return [values]
    return [str(v) for v in values]


def _row_to_run(row: Row) -> RunRecord:
    m = row._mapping
    return RunRecord(
        id=int(m["id"]),
        uid=m["uid"],
        name=m["name"],
        status=m["status"],
        config=dict(m["config"] or {}),
        parent_id=m["parent_id"],
        created_at=float(m["created_at"]),
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        heartbeat_at=m["heartbeat_at"],
        host=m["host"],
        pid=m["pid"],
        executor=m["executor"],
        executor_ref=m["executor_ref"],
        error=m["error"],
        log_path=m["log_path"],
        summary=dict(m["summary"] or {}),
        progress=dict(m["progress"] or {}),
        tags=list(m["tags"] or []),
        hidden=bool(m["hidden"]),
        sweep_id=m["sweep_id"],
    )


def _row_to_artifact(row: Row) -> ArtifactRecord:
    m = row._mapping
    return ArtifactRecord(
        id=int(m["id"]),
        run_id=int(m["run_id"]),
        kind=m["kind"],
        path=m["path"],
        meta=dict(m["meta"] or {}),
        created_at=float(m["created_at"]),
    )


def _normalise_run_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``update_run``-style keyword fields and coerce them to column values."""
    unknown = sorted(set(fields) - UPDATABLE_RUN_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown run field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(UPDATABLE_RUN_FIELDS))}"
        )
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _JSON_DICT_FIELDS:
            value = to_jsonable(dict(value or {}))
        elif name == "tags":
            value = [str(t) for t in (value or [])]
        elif name == "hidden":
            value = bool(value)
        elif name in _TIME_FIELDS and value is not None:
            value = float(value)
        elif name == "pid" and value is not None:
            value = int(value)
        values[name] = value
    return values
