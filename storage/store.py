"""The :class:`Store`: every database access of Distillery goes through here.

It is split by table into mixins a newcomer finds by name: :mod:`storage.runs` (runs and the queue),
:mod:`storage.metrics` (metric rows and downsampling), :mod:`storage.artifacts`, :mod:`storage.sweeps`;
:mod:`storage.sink` is
the adapter kd_core reports through. Design notes (why it looks like this):

* Metric writes are batched: :meth:`Store.append_metrics` inserts a whole batch
  with one ``executemany`` in one transaction.  One commit per row is ~25x
  slower on SQLite.
* Writers avoid read-then-write transactions on SQLite.  Where one is needed
  (:meth:`Store.merge_summary`) it starts with ``BEGIN IMMEDIATE``; on
  PostgreSQL it uses ``SELECT ... FOR UPDATE``.
* Claiming a queued run is a single conditional ``UPDATE`` (:meth:`Store.transition`),
  so two schedulers can never both start the same run.
* Plot downsampling happens in SQL (:meth:`Store.metric_series_bucketed`).
"""

from __future__ import annotations

from sqlalchemy import Engine

from storage.artifacts import ArtifactsMixin
from storage.db import StoreUnavailable, default_db_url, describe_open_error, make_engine, masked_url, run_migrations
from storage.metrics import MetricsMixin
from storage.runs import RunsMixin
from storage.sweeps import SweepsMixin


class Store(RunsMixin, MetricsMixin, ArtifactsMixin, SweepsMixin):
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
