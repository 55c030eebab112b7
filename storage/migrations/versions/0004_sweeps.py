"""Sweeps: one launch of a grid of configs; runs record the sweep that launched them.

Revision ID: 0004_sweeps
Revises: 0003_metric_rollups
Create Date: 2026-11-29

``runs.sweep_id`` is a plain indexed column (SQLite cannot add a foreign key to an existing table
without rebuilding it); deleting a sweep clears it on its runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_sweeps"
down_revision: str | Sequence[str] | None = "0003_metric_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(32), nullable=False, unique=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.add_column("runs", sa.Column("sweep_id", sa.Integer(), nullable=True))
    op.create_index("ix_runs_sweep_id", "runs", ["sweep_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_sweep_id", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("sweep_id")
    op.drop_table("sweeps")
