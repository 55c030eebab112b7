"""SQLAlchemy Core table definitions used by :class:`storage.store.Store`.

This mirrors the Alembic revisions (the migrations create the tables; this
module is only used to build queries and as Alembic's ``target_metadata`` for
autogenerate).  Keep both in sync when adding a revision.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

# SQLite only autoincrements "INTEGER PRIMARY KEY"; PostgreSQL gets BIGINT for >2^31 rows.
BIG_ID = BigInteger().with_variant(Integer(), "sqlite")

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # unique across databases: keys the run's artifact folder (ids are reused, see 0002_run_uid)
    Column("uid", String(32), nullable=True),
    Column("name", String(256), nullable=False),
    Column("status", String(32), nullable=False),
    Column("config", JSON, nullable=False),
    Column(
        "parent_id",
        Integer,
        ForeignKey("runs.id", name="fk_runs_parent_id_runs", ondelete="SET NULL"),
        nullable=True,
    ),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("host", String(256), nullable=True),
    Column("pid", Integer, nullable=True),
    Column("executor", String(64), nullable=True),
    Column("executor_ref", String(256), nullable=True),
    Column("error", Text, nullable=True),
    Column("log_path", Text, nullable=True),
    Column("summary", JSON, nullable=False),
    Column("progress", JSON, nullable=False),
    Column("tags", JSON, nullable=False),
    Column("hidden", Boolean, nullable=False, server_default=false()),
    Column("sweep_id", Integer, nullable=True),  # the sweep that launched the run (see 0004_sweeps)
    Index("ix_runs_status", "status"),
    Index("ix_runs_created_at", "created_at"),
    Index("ix_runs_parent_id", "parent_id"),
    Index("ux_runs_uid", "uid", unique=True),
    Index("ix_runs_sweep_id", "sweep_id"),
)

# One launch of a grid of configs: the base config and the swept values (kd_core.sweeps).
sweeps = Table(
    "sweeps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(32), nullable=False, unique=True),
    Column("name", String(256), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", BIG_ID, primary_key=True, autoincrement=True),
    Column(
        "run_id",
        Integer,
        ForeignKey("runs.id", name="fk_metrics_run_id_runs", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("phase", String(32), nullable=False),
    Column("step", Integer, nullable=False),
    Column("epoch", Integer, nullable=True),
    Column("key", String(128), nullable=False),
    Column("value", Float, nullable=True),
    Column("time", Float, nullable=False),
    Index("ix_metrics_run_key_phase_step", "run_id", "key", "phase", "step"),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "run_id",
        Integer,
        ForeignKey("runs.id", name="fk_artifacts_run_id_runs", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("kind", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("meta", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_artifacts_run_kind", "run_id", "kind"),
)

# Pre-aggregated buckets of ``metrics``, written with every batch of rows (see storage.rollups): a chart
# of a long series reads at most a few thousand of these instead of aggregating millions of rows.
metric_rollups = Table(
    "metric_rollups",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", name="fk_metric_rollups_run_id_runs", ondelete="CASCADE"), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("phase", String(32), primary_key=True),
    Column("width", Integer, primary_key=True),  # steps per bucket: 16, 256 or 4096
    Column("start", Integer, primary_key=True),  # first step of the bucket, a multiple of width
    Column("step", Integer, nullable=False),  # first logged step in the bucket
    Column("epoch", Integer, nullable=True),
    Column("time", Float, nullable=False),
    Column("vsum", Float, nullable=False),  # sum of the non-NULL values
    Column("vmin", Float, nullable=True),
    Column("vmax", Float, nullable=True),
    Column("n_rows", Integer, nullable=False),
    Column("n_values", Integer, nullable=False),
)

