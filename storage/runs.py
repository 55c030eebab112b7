"""Runs and the queue: creating runs, atomic status transitions (claims), summaries and heartbeats."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.engine import Connection

from storage.db import SQLITE_BEGIN_OPTION
from storage.records import RunRecord, _as_str_list, _normalise_run_fields, _row_to_run, to_jsonable
from storage.schema import artifacts, metric_rollups, metrics, runs


class RunsMixin:
    """The ``runs`` table of :class:`storage.Store`."""

    engine: Engine

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

    def create_run(
        self,
        name: str,
        config: dict,
        status: str = "queued",
        parent_id: int | None = None,
        sweep_id: int | None = None,
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
            "sweep_id": sweep_id,
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
        sweep_id: int | None = None,
    ) -> list[RunRecord]:
        """Runs newest first, optionally filtered by status or sweep; hidden runs only on request."""
        stmt = select(runs)
        if sweep_id is not None:
            stmt = stmt.where(runs.c.sweep_id == sweep_id)
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
            conn.execute(delete(metric_rollups).where(metric_rollups.c.run_id == run_id))
            conn.execute(delete(artifacts).where(artifacts.c.run_id == run_id))
            conn.execute(update(runs).where(runs.c.parent_id == run_id).values(parent_id=None))
            result = conn.execute(delete(runs).where(runs.c.id == run_id))
            self._require_one(result.rowcount, run_id)  # raising rolls back
        return paths
