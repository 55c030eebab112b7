"""Pre-aggregated metric buckets: written with every batch of metric rows, read by charts of long series.

For each (run, key, phase) and each width in :data:`WIDTHS`, a row holds the aggregates of the steps
``[start, start + width)``: first step, epoch and time, the sum/min/max of the values and the counts.
Buckets of any power-of-two width ≥ 16 are exact merges of these (aligned power-of-two buckets nest), so
a chart of a 2M-step series reads at most ``16 × max_points`` rows instead of aggregating 2M.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from storage.schema import metric_rollups

WIDTHS = (16, 256, 4096)
MERGED_COLUMNS = ["start", "step", "epoch", "value", "min", "max", "count", "n_values", "time"]


def finest_width(width: int) -> int | None:
    """The widest stored width that divides ``width`` (None when ``width`` is below the finest)."""
    usable = [w for w in WIDTHS if w <= width]
    return usable[-1] if usable else None


def _aggregate(run_id: int, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The batch's contribution to every bucket it touches, one dict per (phase, key, width, start)."""
    acc: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for row in rows:  # values arrive as stored: a non-finite one is already None
        value = row["value"]
        for width in WIDTHS:
            start = row["step"] - row["step"] % width
            a = acc.get((row["phase"], row["key"], width, start))
            if a is None:
                acc[(row["phase"], row["key"], width, start)] = {
                    "run_id": run_id, "phase": row["phase"], "key": row["key"], "width": width, "start": start,
                    "step": row["step"], "epoch": row["epoch"], "time": row["time"], "vsum": value or 0.0,
                    "vmin": value, "vmax": value, "n_rows": 1, "n_values": int(value is not None)}
                continue
            a["step"] = min(a["step"], row["step"])
            a["time"] = min(a["time"], row["time"])
            if row["epoch"] is not None:
                a["epoch"] = row["epoch"] if a["epoch"] is None else min(a["epoch"], row["epoch"])
            if value is not None:
                a["vsum"] += value
                a["vmin"] = value if a["vmin"] is None else min(a["vmin"], value)
                a["vmax"] = value if a["vmax"] is None else max(a["vmax"], value)
                a["n_values"] += 1
            a["n_rows"] += 1
    return list(acc.values())


def add_rows(conn: Connection, run_id: int, rows: list[dict[str, Any]]) -> None:
    """Merge a batch of metric rows into the stored buckets, in the caller's transaction."""
    values = _aggregate(run_id, rows)
    if not values:
        return
    postgres = conn.dialect.name == "postgresql"
    insert = (postgresql.insert if postgres else sqlite.insert)(metric_rollups)
    new, old = insert.excluded, metric_rollups.c
    least, greatest = (func.least, func.greatest) if postgres else (func.min, func.max)  # SQLite's 2-argument min/max

    def nullable(pick: Any, a: Any, b: Any) -> Any:  # NULL means "no value yet", never the answer
        return pick(func.coalesce(a, b), func.coalesce(b, a))

    stmt = insert.on_conflict_do_update(
        index_elements=[old.run_id, old.key, old.phase, old.width, old.start],
        set_={
            "step": least(old.step, new.step), "epoch": nullable(least, old.epoch, new.epoch), "time": least(old.time, new.time),
            "vsum": old.vsum + new.vsum, "vmin": nullable(least, old.vmin, new.vmin), "vmax": nullable(greatest, old.vmax, new.vmax),
            "n_rows": old.n_rows + new.n_rows, "n_values": old.n_values + new.n_values,
        },
    )
    conn.execute(stmt, values)


def _insert_aggregates(conn: Connection, width: int, where: str = "", **params: Any) -> None:
    """Aggregate raw rows (those ``where`` selects) into buckets of ``width``.

    The width is an int rendered into the SQL (not a bound parameter), so the bucket expression in SELECT
    and GROUP BY is textually the same, as PostgreSQL requires.
    """
    w = int(width)
    conn.execute(text(
        "INSERT INTO metric_rollups (run_id, key, phase, width, start, step, epoch, time, vsum, vmin, vmax, n_rows, n_values) "
        f"SELECT run_id, key, phase, {w}, step - step % {w}, min(step), min(epoch), min(time), coalesce(sum(value), 0), "
        f"min(value), max(value), count(*), count(value) FROM metrics {where} GROUP BY run_id, key, phase, step - step % {w}"
    ), params)


def rebuild_after(conn: Connection, run_id: int, phase: str, step: int) -> None:
    """After the rows of ``phase`` past ``step`` were deleted: drop the buckets that held them and
    re-aggregate the part of each that remains from the raw rows."""
    c = metric_rollups.c
    for width in WIDTHS:
        start = step - step % width
        conn.execute(delete(metric_rollups).where(c.run_id == run_id, c.phase == phase, c.width == width, c.start >= start))
        _insert_aggregates(conn, width, "WHERE run_id = :run AND phase = :phase AND step >= :start", run=run_id, phase=phase, start=start)


def read_buckets(conn: Connection, run_id: int, key: str, phase: str, width: int, first: int) -> pd.DataFrame:
    """Buckets of ``width`` (a power of two ≥ the finest stored width) from step ``first`` on, merged
    from the stored buckets; columns :data:`MERGED_COLUMNS`, empty buckets left out."""
    stored = finest_width(width)
    assert stored is not None, f"no stored buckets divide width {width}"
    c = metric_rollups.c
    stmt = (select(c.start, c.step, c.epoch, c.vsum, c.vmin, c.vmax, c.n_rows, c.n_values, c.time)
            .where(c.run_id == run_id, c.key == key, c.phase == phase, c.width == stored, c.start >= first)
            .order_by(c.start))
    df = pd.DataFrame([tuple(r) for r in conn.execute(stmt)], columns=["start", "step", "epoch", "vsum", "min", "max", "count", "n_values", "time"])
    if df.empty:
        return pd.DataFrame(columns=MERGED_COLUMNS)
    df["start"] = df["start"] - df["start"] % width
    merged = df.groupby("start", sort=True).agg(
        step=("step", "min"), epoch=("epoch", "min"), vsum=("vsum", "sum"), min=("min", "min"), max=("max", "max"),
        count=("count", "sum"), n_values=("n_values", "sum"), time=("time", "min"),
    ).reset_index()
    merged["value"] = merged["vsum"].where(merged["n_values"] > 0) / merged["n_values"].where(merged["n_values"] > 0)
    return merged[MERGED_COLUMNS]


def backfill(engine: Engine) -> None:
    """Aggregate every existing metric row into buckets (for databases filled without the Store, e.g. benchmarks)."""
    with engine.begin() as conn:
        conn.execute(delete(metric_rollups))
        for width in WIDTHS:
            _insert_aggregates(conn, width)
