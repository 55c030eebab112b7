"""Pre-aggregated metric buckets (``metric_rollups``), backfilled from the existing rows.

Revision ID: 0003_metric_rollups
Revises: 0002_run_uid
Create Date: 2026-11-29

The first view of a long run's curves aggregated millions of rows; with buckets of 16, 256 and 4,096
steps written as rows arrive, a chart reads at most a few thousand rows. The SQL is spelled out here so
the revision stays frozen when storage.rollups evolves.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_metric_rollups"
down_revision: str | Sequence[str] | None = "0002_run_uid"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WIDTHS = (16, 256, 4096)


def upgrade() -> None:
    op.create_table(
        "metric_rollups",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", name="fk_metric_rollups_run_id_runs", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("phase", sa.String(32), primary_key=True),
        sa.Column("width", sa.Integer(), primary_key=True),
        sa.Column("start", sa.Integer(), primary_key=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("vsum", sa.Float(), nullable=False),
        sa.Column("vmin", sa.Float(), nullable=True),
        sa.Column("vmax", sa.Float(), nullable=True),
        sa.Column("n_rows", sa.Integer(), nullable=False),
        sa.Column("n_values", sa.Integer(), nullable=False),
    )
    for width in WIDTHS:
        op.execute(
            "INSERT INTO metric_rollups (run_id, key, phase, width, start, step, epoch, time, vsum, vmin, vmax, n_rows, n_values) "
            f"SELECT run_id, key, phase, {width}, step - step % {width}, min(step), min(epoch), min(time), coalesce(sum(value), 0), "
            "min(value), max(value), count(*), count(value) "
            f"FROM metrics GROUP BY run_id, key, phase, step - step % {width}"
        )


def downgrade() -> None:
    op.drop_table("metric_rollups")
