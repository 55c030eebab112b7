"""Sweeps: a grid of configs launched together (the runs point back with ``runs.sweep_id``)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.engine import Row

from storage.records import SweepRecord, to_jsonable
from storage.schema import runs, sweeps


def _row_to_sweep(row: Row) -> SweepRecord:
    m = row._mapping
    return SweepRecord(id=int(m["id"]), uid=m["uid"], name=m["name"], spec=dict(m["spec"] or {}), created_at=float(m["created_at"]))


class SweepsMixin:
    """The ``sweeps`` table of :class:`storage.Store`."""

    engine: Engine

    def create_sweep(self, name: str, spec: dict[str, Any]) -> int:
        values = {"uid": uuid.uuid4().hex, "name": str(name), "spec": to_jsonable(spec), "created_at": time.time()}
        with self.engine.begin() as conn:
            return int(conn.execute(insert(sweeps).values(**values)).inserted_primary_key[0])

    def get_sweep(self, sweep_id: int) -> SweepRecord:
        """One sweep; ``KeyError`` if it does not exist."""
        with self.engine.connect() as conn:
            row = conn.execute(select(sweeps).where(sweeps.c.id == sweep_id)).first()
        if row is None:
            raise KeyError(f"sweep {sweep_id} not found")
        return _row_to_sweep(row)

    def list_sweeps(self) -> list[SweepRecord]:
        """Sweeps, newest first."""
        with self.engine.connect() as conn:
            return [_row_to_sweep(r) for r in conn.execute(select(sweeps).order_by(sweeps.c.created_at.desc(), sweeps.c.id.desc()))]

    def delete_sweep(self, sweep_id: int) -> None:
        """Forget the sweep; its runs stay, no longer grouped."""
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.sweep_id == sweep_id).values(sweep_id=None))
            if conn.execute(delete(sweeps).where(sweeps.c.id == sweep_id)).rowcount == 0:
                raise KeyError(f"sweep {sweep_id} not found")
