"""Runs get an identity no other database can share (``uid``), keying their artifact folders.

Revision ID: 0002_run_uid
Revises: 0001_initial
Create Date: 2026-11-29

Run ids restart at 1 in every fresh database (and SQLite reuses the id of a deleted newest run), so a
folder named after the id could be picked up by an unrelated run. Existing runs get a fresh uid each;
their recorded artifact paths (absolute) stay valid. The column stays nullable at the database level
because SQLite would have to rebuild the table to add NOT NULL; :class:`storage.Store` always sets it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_run_uid"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("uid", sa.String(32), nullable=True))
    conn = op.get_bind()
    for (run_id,) in conn.execute(sa.text("SELECT id FROM runs")).fetchall():
        conn.execute(sa.text("UPDATE runs SET uid = :uid WHERE id = :id"), {"uid": uuid.uuid4().hex, "id": run_id})
    op.create_index("ux_runs_uid", "runs", ["uid"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_runs_uid", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("uid")
