"""The :class:`Store`: every database access of Distillery goes through here.

Design notes (why it looks like this):

* Metric writes are batched: :meth:`Store.append_metrics` inserts a whole batch
  with one ``executemany`` in one transaction.  One commit per row is ~25x
  slower on SQLite (infra.md section 5).
* Writers avoid read-then-write transactions on SQLite.  Where one is needed
  (:meth:`Store.merge_summary`) it starts with ``BEGIN IMMEDIATE``; on
  PostgreSQL it uses ``SELECT ... FOR UPDATE``.
* Claiming a queued run is a single conditional ``UPDATE`` (:meth:`Store.transition`),
  so two schedulers can never both start the same run.
* Plot downsampling happens in SQL (:meth:`Store.metric_series_bucketed`) so the
  dashboard never pulls millions of rows into pandas.  Buckets are power-of-two
  wide and aligned at step 0 (:func:`bucket_width`), so a bucket ``[k*w, (k+1)*w)``
  never changes once a later step was logged: a live chart can keep the complete
  buckets and fetch only the tail (:meth:`Store.metric_buckets` with ``since_step``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import Engine, Integer, Select, delete, func, insert, literal_column, select, text, update
from sqlalchemy.engine import Connection, Row

from storage.db import SQLITE_BEGIN_OPTION, StoreUnavailable, default_db_url, describe_open_error, make_engine, masked_url, run_migrations
from storage.schema import artifacts, metrics, runs

UPDATABLE_RUN_FIELDS: frozenset[str] = frozenset(
    {
        "name", "status", "config", "started_at", "finished_at", "heartbeat_at", "host",
        "pid", "executor", "executor_ref", "error", "log_path", "summary", "progress",
        "tags", "hidden",
    }
)
_JSON_DICT_FIELDS = frozenset({"config", "summary", "progress"})
_TIME_FIELDS = frozenset({"started_at", "finished_at", "heartbeat_at"})

SERIES_COLUMNS = ["phase", "step", "epoch", "value", "time"]
BUCKETED_COLUMNS = ["phase", "step", "epoch", "value", "min", "max", "count", "time"]
FRAME_COLUMNS = ["phase", "step", "epoch", "key", "value", "time"]
# metric_buckets: ``start`` is the bucket's first step (a multiple of the width), ``n_values``
# the non-NULL values the mean is over (needed to merge buckets exactly)
BUCKET_COLUMNS = ["start", "step", "epoch", "value", "min", "max", "count", "n_values", "time"]
# above this many buckets one tail query uses GROUP BY instead of one index probe per bucket
_PROBE_MAX_BUCKETS = 20_000


def bucket_width(min_step: int, max_step: int, max_points: int) -> int:
    """Smallest power of two ``w`` such that ``[min_step, max_step]`` spans at most ``max_points``
    buckets ``[k*w, (k+1)*w)`` aligned at step 0 (``max_step//w - min_step//w + 1 <= max_points``).

    Aligned power-of-two buckets only ever split into/merge from halves: when a growing run
    doubles the width, bucket ``j`` at ``2w`` is exactly buckets ``2j`` and ``2j+1`` at ``w``.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    lo, hi = int(min_step), int(max_step)
    if hi < lo:
        raise ValueError(f"max_step {hi} < min_step {lo}")
    w = 1
    while hi // w - lo // w + 1 > max_points:
        w *= 2
    return w


def _parse_packed(packed: str) -> tuple[Any, ...]:
    """One bucket packed by SQLite's ``quote(..)||','||..`` (exact: quote() prints reals with 20 digits)."""
    out: list[Any] = []
    for i, part in enumerate(packed.split(",")):
        if part == "NULL":
            out.append(None)
        elif i in (0, 1, 5, 6):  # step, epoch, count, n_values
            out.append(int(part))
        else:
            out.append(float(part))
    return tuple(out)


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


def _metric_row(run_id: int, row: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Coerce one metrics-sink row into column values (numpy/torch scalars -> float)."""
    try:
        value = row["value"]
        epoch = row.get("epoch")
        t = row.get("time")
        return {
            "run_id": run_id,
            "phase": str(row["phase"]),
            "step": int(row["step"]),
            "epoch": None if epoch is None else int(epoch),
            "key": str(row["key"]),
            "value": None if value is None else float(value),
            "time": now if t is None else float(t),
        }
    except KeyError as exc:
        raise ValueError(
            f"metric row is missing {exc.args[0]!r} (need phase, step, key, value; "
            f"epoch and time optional): {dict(row)!r}"
        ) from None


def _typed_frame(records: Iterable[Sequence[Any]], columns: list[str]) -> pd.DataFrame:
    """Build a DataFrame with stable dtypes, including when there are no rows.

    Rows are converted to plain tuples first: ``DataFrame.from_records`` on
    SQLAlchemy ``Row`` objects is ~10x slower (13 s vs 1.3 s for 1M rows).
    """
    rows = [tuple(r) for r in records]
    if rows:
        df = pd.DataFrame(rows, columns=columns)
    else:
        df = pd.DataFrame({c: [] for c in columns}, columns=columns)
    for col in ("start", "step", "count", "n_values"):
        if col in df:
            df[col] = df[col].astype("int64")
    for col in ("value", "min", "max", "time"):
        if col in df:
            df[col] = pd.to_numeric(df[col]).astype("float64")
    if "epoch" in df:
        epoch = pd.to_numeric(df["epoch"])
        df["epoch"] = epoch.astype("int64") if not epoch.isna().any() else epoch.astype("float64")
    for col in ("phase", "key"):
        if col in df:
            df[col] = df[col].astype("object")
    return df


class Store:
    """Typed access to Distillery's database (SQLite file or PostgreSQL).

    Safe to use from several threads (SQLAlchemy pools connections) and from
    several processes (WAL on SQLite, MVCC on PostgreSQL).  Each method is one
    short transaction; no connection is held between calls, so a long-lived
    dashboard never blocks SQLite checkpoints.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url: str = url or default_db_url()
        try:
            self.engine: Engine = make_engine(self.url)
            run_migrations(self.engine, self.url)
        except Exception as exc:  # noqa: BLE001 - driver, URL, server and file errors all mean "unavailable"
            raise StoreUnavailable(describe_open_error(self.url, exc)) from exc

    def __repr__(self) -> str:
        return f"Store({masked_url(self.url)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    # ------------------------------------------------------------------ helpers
    def _write_conn_immediate(self) -> Connection:
        """A connection whose next transaction locks for writing up front (SQLite)."""
        conn = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        return conn

    @staticmethod
    def _require_one(rowcount: int, run_id: int) -> None:
        if rowcount == 0:
            raise KeyError(f"run {run_id} not found")

    # --------------------------------------------------------------------- runs
    def create_run(
        self,
        name: str,
        config: dict,
        status: str = "queued",
        parent_id: int | None = None,
    ) -> int:
        """Insert a run and return its id; ``created_at`` is now and ``uid`` a fresh UUID."""
        values = {
            "uid": uuid.uuid4().hex,
            "name": str(name),
            "status": str(status),
            "config": to_jsonable(dict(config or {})),
            "parent_id": parent_id,
            "created_at": time.time(),
            "summary": {},
            "progress": {},
            "tags": [],
            "hidden": False,
        }
        with self.engine.begin() as conn:
            result = conn.execute(insert(runs).values(**values))
            return int(result.inserted_primary_key[0])

    def get_run(self, run_id: int) -> RunRecord:
        """Return one run; ``KeyError`` if it does not exist (e.g. deleted meanwhile)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise KeyError(f"run {run_id} not found")
        return _row_to_run(row)

    def list_runs(
        self,
        *,
        status: Sequence[str] | None = None,
        include_hidden: bool = False,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs newest first, optionally filtered by status; hidden runs only on request."""
        stmt = select(runs)
        if status is not None:
            stmt = stmt.where(runs.c.status.in_(_as_str_list(status)))
        if not include_hidden:
            stmt = stmt.where(runs.c.hidden == False)  # noqa: E712 - SQL expression
        stmt = stmt.order_by(runs.c.created_at.desc(), runs.c.id.desc())
        if limit is not None:
            stmt = stmt.limit(int(limit))
        with self.engine.connect() as conn:
            return [_row_to_run(r) for r in conn.execute(stmt)]

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set the given columns; ``ValueError`` for an unknown field, ``KeyError`` if absent."""
        values = _normalise_run_fields(fields)
        if not values:
            self.get_run(run_id)  # still report a missing run
            return
        with self.engine.begin() as conn:
            result = conn.execute(update(runs).where(runs.c.id == run_id).values(**values))
        self._require_one(result.rowcount, run_id)

    def transition(
        self, run_id: int, from_status: Sequence[str], to_status: str, **fields: Any
    ) -> bool:
        """Atomically move a run from one of ``from_status`` to ``to_status``.

        A single ``UPDATE ... WHERE id = :id AND status IN (...)``: the database
        serialises concurrent callers, so exactly one of several processes
        claiming the same queued run gets ``True``.  Extra ``fields`` (e.g.
        ``started_at``, ``host``, ``pid``) are set in the same statement.
        """
        if "status" in fields:
            raise ValueError("pass the new status as to_status, not as a field")
        values = _normalise_run_fields(fields)
        values["status"] = str(to_status)
        stmt = (
            update(runs)
            .where(runs.c.id == run_id, runs.c.status.in_(_as_str_list(from_status)))
            .values(**values)
        )
        with self.engine.begin() as conn:
            result = conn.execute(stmt)
        return result.rowcount == 1

    def merge_summary(self, run_id: int, values: dict) -> None:
        """Shallow-merge ``values`` into the run's summary (top-level keys replaced).

        Read-modify-write, so it locks first (``BEGIN IMMEDIATE`` / ``FOR UPDATE``)
        to not lose a concurrent merge.
        """
        patch = to_jsonable(dict(values))
        with self._write_conn_immediate() as conn, conn.begin():
            current = conn.execute(
                select(runs.c.summary).where(runs.c.id == run_id).with_for_update()
            ).first()
            if current is None:
                raise KeyError(f"run {run_id} not found")
            merged = {**(current[0] or {}), **patch}
            conn.execute(update(runs).where(runs.c.id == run_id).values(summary=merged))

    def heartbeat(self, run_id: int, progress: dict | None = None) -> None:
        """Mark the run alive now; replace ``progress`` when given."""
        values: dict[str, Any] = {"heartbeat_at": time.time()}
        if progress is not None:
            values["progress"] = to_jsonable(dict(progress))
        with self.engine.begin() as conn:
            result = conn.execute(update(runs).where(runs.c.id == run_id).values(**values))
        self._require_one(result.rowcount, run_id)

    def delete_run(self, run_id: int) -> list[str]:
        """Delete a run with its metrics and artifact rows; return the artifact paths.

        Deletes children explicitly as well as relying on ``ON DELETE CASCADE``,
        so a SQLite connection opened without ``foreign_keys=ON`` cannot leave
        orphans.  Child runs keep existing with ``parent_id`` cleared.  The
        caller removes the files.
        """
        with self.engine.begin() as conn:
            paths = [
                r[0]
                for r in conn.execute(
                    select(artifacts.c.path).where(artifacts.c.run_id == run_id).order_by(artifacts.c.id)
                )
            ]
            conn.execute(delete(metrics).where(metrics.c.run_id == run_id))
            conn.execute(delete(artifacts).where(artifacts.c.run_id == run_id))
            conn.execute(update(runs).where(runs.c.parent_id == run_id).values(parent_id=None))
            result = conn.execute(delete(runs).where(runs.c.id == run_id))
            self._require_one(result.rowcount, run_id)  # raising rolls back
        return paths

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, run_id: int, rows: Sequence[Mapping]) -> None:
        """Insert a batch of metric rows in one transaction (executemany)."""
        if not rows:
            return
        now = time.time()
        params = [_metric_row(run_id, r, now) for r in rows]
        with self.engine.begin() as conn:
            conn.execute(insert(metrics), params)

    def metric_keys(self, run_id: int) -> list[tuple[str, str]]:
        """Distinct ``(phase, key)`` pairs logged for the run, sorted."""
        stmt = (
            select(metrics.c.phase, metrics.c.key)
            .where(metrics.c.run_id == run_id)
            .distinct()
            .order_by(metrics.c.phase, metrics.c.key)
        )
        with self.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(stmt)]

    def _series_filter(self, stmt: Select, run_id: int, key: str, phase: str | None) -> Select:
        stmt = stmt.where(metrics.c.run_id == run_id, metrics.c.key == key)
        if phase is not None:
            stmt = stmt.where(metrics.c.phase == phase)
        return stmt

    def metric_series(self, run_id: int, key: str, phase: str | None = None) -> pd.DataFrame:
        """All points of one metric: columns phase, step, epoch, value, time; by phase, step."""
        stmt = self._series_filter(
            select(metrics.c.phase, metrics.c.step, metrics.c.epoch, metrics.c.value, metrics.c.time),
            run_id, key, phase,
        ).order_by(metrics.c.phase, metrics.c.step, metrics.c.id)
        with self.engine.connect() as conn:
            records = conn.execute(stmt).all()
        return _typed_frame(records, SERIES_COLUMNS)

    def metric_series_bucketed(
        self, run_id: int, key: str, phase: str | None = None, max_points: int = 2000
    ) -> pd.DataFrame:
        """Downsampled series for plotting, aggregated in SQL.

        Per phase, steps are split into buckets ``[k*w, (k+1)*w)`` aligned at step 0,
        ``w = bucket_width(min_step, max_step, max_points)`` the smallest power of two
        that gives at most ``max_points`` buckets.  Each bucket reports its first
        step/epoch/time, mean ``value``, ``min``, ``max`` and ``count`` (sum of counts
        == rows).  Series with at most ``max_points`` rows in total come back
        unbucketed (min = max = value, count = 1).  Everything is read in one
        transaction (one snapshot).
        """
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        parts: list[pd.DataFrame] = []
        with self.engine.connect() as conn:
            phases = [phase] if phase is not None else self._phases(conn, run_id, key)
            for ph in phases:
                rng = self._step_range(conn, run_id, key, ph)
                if rng is None:
                    continue
                width = bucket_width(rng[0], rng[1], max_points)
                df = self._buckets(conn, run_id, key, ph, width, None, rng)
                df.insert(0, "phase", ph)
                parts.append(df)
            if sum(int(p["count"].sum()) for p in parts) <= max_points:
                return self._unbucketed(conn, run_id, key, phase)
        out = pd.concat(parts, ignore_index=True)
        out["phase"] = out["phase"].astype("object")
        return out[BUCKETED_COLUMNS]

    def metric_phases(self, run_id: int, key: str) -> list[str]:
        """Phases in which ``key`` was logged, sorted."""
        with self.engine.connect() as conn:
            return self._phases(conn, run_id, key)

    def metric_step_range(self, run_id: int, key: str, phase: str) -> tuple[int, int] | None:
        """``(min step, max step)`` of one phase of one metric, or None; two index probes."""
        with self.engine.connect() as conn:
            return self._step_range(conn, run_id, key, phase)

    def metric_buckets(
        self, run_id: int, key: str, phase: str, width: int, since_step: int | None = None
    ) -> pd.DataFrame:
        """Buckets ``[k*width, (k+1)*width)`` of one phase of one metric, from ``since_step`` on.

        ``width`` is a power of two (see :func:`bucket_width`); ``since_step`` is rounded
        down to its bucket's start, so only whole buckets are returned and the rows read
        are an index range on ``step``.  Columns: start (the bucket's first possible
        step), step/epoch/time (firsts), value (mean of the non-NULL values), min, max,
        count (rows), n_values (non-NULL values); empty buckets are left out.
        """
        width = int(width)
        if width < 1 or width & (width - 1):
            raise ValueError(f"width must be a power of two, got {width}")
        with self.engine.connect() as conn:
            return self._buckets(conn, run_id, key, phase, width, since_step, None)

    def _phases(self, conn: Connection, run_id: int, key: str) -> list[str]:
        stmt = (
            select(metrics.c.phase)
            .where(metrics.c.run_id == run_id, metrics.c.key == key)
            .distinct()
            .order_by(metrics.c.phase)
        )
        return [r[0] for r in conn.execute(stmt)]

    def _step_range(self, conn: Connection, run_id: int, key: str, phase: str) -> tuple[int, int] | None:
        """Separate MIN and MAX queries: each is one index probe (together they scan)."""
        lo = conn.execute(
            self._series_filter(select(func.min(metrics.c.step)), run_id, key, phase)
        ).scalar_one()
        if lo is None:
            return None
        hi = conn.execute(
            self._series_filter(select(func.max(metrics.c.step)), run_id, key, phase)
        ).scalar_one()
        return int(lo), int(hi)

    def _buckets(
        self, conn: Connection, run_id: int, key: str, phase: str, width: int,
        since_step: int | None, rng: tuple[int, int] | None,
    ) -> pd.DataFrame:
        if rng is None:
            rng = self._step_range(conn, run_id, key, phase)
        if rng is None:
            return _typed_frame([], BUCKET_COLUMNS)
        lo, hi = rng
        first = lo if since_step is None else max(lo, int(since_step))
        first -= first % width  # floor to the bucket start (also for negative steps)
        if first > hi:
            return _typed_frame([], BUCKET_COLUMNS)
        n_buckets = (hi - first) // width + 1
        if self.engine.dialect.name == "sqlite" and n_buckets <= _PROBE_MAX_BUCKETS:
            records = self._buckets_probed(conn, run_id, key, phase, width, first, hi)
        else:
            stmt = self._bucket_stmt(run_id, key, phase, width, first)
            records = [tuple(r) for r in conn.execute(stmt)]
        return _typed_frame(records, BUCKET_COLUMNS)

    @staticmethod
    def _buckets_probed(
        conn: Connection, run_id: int, key: str, phase: str, width: int, first: int, hi: int
    ) -> list[tuple[Any, ...]]:
        """SQLite: one index range probe per bucket instead of ``GROUP BY``.

        SQLite has no hash aggregate: ``GROUP BY step / w`` sorts every row in a temp
        B-tree (about 40% of the time for 2M rows).  Walking the bucket starts with a
        recursive CTE and aggregating each ``step`` range in a correlated subquery reads
        the rows in index order with no sort.  The subquery packs its aggregates into
        one text value with ``quote()``, which prints reals with enough digits to
        round-trip exactly.
        """
        sql = text(
            "WITH RECURSIVE b(s) AS (SELECT :first UNION ALL SELECT s + :w FROM b WHERE s + :w <= :hi) "
            "SELECT s, (SELECT quote(min(step)) || ',' || quote(min(epoch)) || ',' || quote(avg(value))"
            " || ',' || quote(min(value)) || ',' || quote(max(value)) || ',' || count(*)"
            " || ',' || count(value) || ',' || quote(min(time))"
            " FROM metrics WHERE run_id = :run AND key = :key AND phase = :phase"
            " AND step >= s AND step < s + :w) FROM b"
        )
        params = {"first": first, "w": width, "hi": hi, "run": run_id, "key": key, "phase": phase}
        out: list[tuple[Any, ...]] = []
        for s, packed in conn.execute(sql, params):
            vals = _parse_packed(packed)
            if vals[5]:  # count > 0
                out.append((int(s), *vals))
        return out

    def _unbucketed(
        self, conn: Connection, run_id: int, key: str, phase: str | None
    ) -> pd.DataFrame:
        stmt = self._series_filter(
            select(metrics.c.phase, metrics.c.step, metrics.c.epoch, metrics.c.value, metrics.c.time),
            run_id, key, phase,
        ).order_by(metrics.c.phase, metrics.c.step, metrics.c.id)
        df = _typed_frame(conn.execute(stmt).all(), SERIES_COLUMNS)
        df["min"] = df["value"]
        df["max"] = df["value"]
        df["count"] = pd.Series(1, index=df.index, dtype="int64")
        return df[BUCKETED_COLUMNS]

    def _bucket_stmt(self, run_id: int, key: str, phase: str, width: int, first: int) -> Select:
        """One phase's ``GROUP BY step & -width`` (the bucket start; floor also for negative steps).

        Grouping by the bucket alone (the phase is fixed by the WHERE clause) keeps
        the sort/hash records small.

        ``width``/``first`` are rendered as integer literals (they are ints we
        computed, so this is injection-safe): identical expressions in SELECT and
        GROUP BY are then textually equal on PostgreSQL, and the planner sees
        constants.  (A CTE/join version made PostgreSQL re-run the aggregate per
        row when table statistics were stale: 40 s for 10k rows.)
        """
        mask = literal_column(f"({-int(width)})", Integer)
        start = metrics.c.step.op("&")(mask).label("start")
        stmt = select(
            start,
            func.min(metrics.c.step).label("step"),
            func.min(metrics.c.epoch).label("epoch"),
            func.avg(metrics.c.value).label("value"),
            func.min(metrics.c.value).label("min"),
            func.max(metrics.c.value).label("max"),
            func.count().label("count"),
            func.count(metrics.c.value).label("n_values"),
            func.min(metrics.c.time).label("time"),
        )
        stmt = self._series_filter(stmt, run_id, key, phase)
        stmt = stmt.where(metrics.c.step >= literal_column(str(int(first)), Integer))
        return stmt.group_by(start).order_by(start)

    def metrics_frame(
        self, run_id: int, phase: str | None = None, keys: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Every metric row of the run (columns phase, step, epoch, key, value, time)."""
        stmt = select(
            metrics.c.phase, metrics.c.step, metrics.c.epoch, metrics.c.key,
            metrics.c.value, metrics.c.time,
        ).where(metrics.c.run_id == run_id)
        if phase is not None:
            stmt = stmt.where(metrics.c.phase == phase)
        if keys is not None:
            stmt = stmt.where(metrics.c.key.in_(_as_str_list(keys)))
        stmt = stmt.order_by(metrics.c.phase, metrics.c.step, metrics.c.key, metrics.c.id)
        with self.engine.connect() as conn:
            records = conn.execute(stmt).all()
        return _typed_frame(records, FRAME_COLUMNS)

    def count_metrics(self, run_id: int) -> int:
        """Number of metric rows stored for the run."""
        stmt = select(func.count()).select_from(metrics).where(metrics.c.run_id == run_id)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def last_metric_step(self, run_id: int, phase: str) -> int | None:
        """Largest step logged for ``phase`` (a resumed run appends after it), or None."""
        stmt = select(func.max(metrics.c.step)).where(
            metrics.c.run_id == run_id, metrics.c.phase == phase
        )
        with self.engine.connect() as conn:
            value = conn.execute(stmt).scalar_one()
        return None if value is None else int(value)

    def delete_metrics_after(self, run_id: int, phase: str, step: int) -> int:
        """Drop rows of ``phase`` with ``step > step`` (resume from an older checkpoint)."""
        stmt = delete(metrics).where(
            metrics.c.run_id == run_id, metrics.c.phase == phase, metrics.c.step > int(step)
        )
        with self.engine.begin() as conn:
            return int(conn.execute(stmt).rowcount)

    # ---------------------------------------------------------------- artifacts
    def add_artifact(self, run_id: int, kind: str, path: str, meta: dict | None = None) -> int:
        """Record a file produced by a run (checkpoint, export, plot...); returns its id."""
        values = {
            "run_id": run_id,
            "kind": str(kind),
            "path": str(path),
            "meta": to_jsonable(dict(meta or {})),
            "created_at": time.time(),
        }
        with self.engine.begin() as conn:
            result = conn.execute(insert(artifacts).values(**values))
            return int(result.inserted_primary_key[0])

    def artifacts(self, run_id: int, kind: str | None = None) -> list[ArtifactRecord]:
        """Artifacts of a run, newest first, optionally of one kind."""
        stmt = select(artifacts).where(artifacts.c.run_id == run_id)
        if kind is not None:
            stmt = stmt.where(artifacts.c.kind == kind)
        stmt = stmt.order_by(artifacts.c.created_at.desc(), artifacts.c.id.desc())
        with self.engine.connect() as conn:
            return [_row_to_artifact(r) for r in conn.execute(stmt)]

    # -------------------------------------------------------------- maintenance
    def checkpoint_wal(self) -> None:
        """Fold the SQLite WAL back into the database file and truncate it.

        Call it when a run finishes: a dashboard polling all the time can starve
        automatic checkpoints and let the -wal file grow without bound.  Runs on
        a raw connection outside any transaction (a checkpoint cannot complete
        past a snapshot its own connection holds).  No-op on other databases.
        """
        if self.engine.dialect.name != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                cursor.fetchall()
            finally:
                cursor.close()
        finally:
            raw.close()

    def dispose(self) -> None:
        """Close all pooled connections (call before fork or at shutdown)."""
        self.engine.dispose()


class RunSink:
    """Adapts ``(Store, run_id)`` to the metrics-sink protocol used by kd_core.

    kd_core only knows this duck-typed interface, which keeps ``storage`` free
    of torch and kd_core free of SQL.
    """

    def __init__(self, store: Store, run_id: int) -> None:
        self.store = store
        self.run_id = run_id

    def log_metrics(self, rows: list[dict]) -> None:
        """Append a batch of metric rows (phase, step, epoch, key, value, time)."""
        self.store.append_metrics(self.run_id, rows)

    def update_progress(self, progress: dict) -> None:
        """Heartbeat and replace the run's progress dict."""
        self.store.heartbeat(self.run_id, progress)

    def update_summary(self, values: dict) -> None:
        """Merge values into the run's summary."""
        self.store.merge_summary(self.run_id, values)

    def add_artifact(self, kind: str, path: str, meta: dict) -> None:
        """Record a file the run produced."""
        self.store.add_artifact(self.run_id, kind, path, meta)

    def discard_metrics_after(self, phase: str, step: int) -> None:
        """Drop rows of ``phase`` past ``step`` (resuming from a checkpoint taken at ``step``)."""
        self.store.delete_metrics_after(self.run_id, phase, step)


__all__ = ["ArtifactRecord", "RunRecord", "RunSink", "Store", "bucket_width", "to_jsonable"]
