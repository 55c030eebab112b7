"""Artifacts: files a run produced (checkpoints, reports, analysis bundles), recorded with their metadata."""

from __future__ import annotations

import time

from sqlalchemy import Engine, insert, select

from storage.records import ArtifactRecord, _row_to_artifact, to_jsonable
from storage.schema import artifacts


class ArtifactsMixin:
    """The ``artifacts`` table of :class:`storage.Store`."""

    engine: Engine

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
