"""Metric storage against real SQLite and PostgreSQL databases (no mocks): appending and reading series,
bucketed series (from scratch, incrementally, and from the pre-aggregated buckets), per-epoch statistics.
The runs, artifacts, migrations and SQLite behaviour are in tests/test_storage.py."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from storage import Store
from storage.metrics import bucket_width
from tests.test_storage import metric_rows

# ------------------------------------------------------------------------ metrics
def test_append_and_series(store: Store) -> None:
    run_id = store.create_run("r", {})
    other = store.create_run("other", {})
    store.append_metrics(run_id, metric_rows(50, key="loss"))
    store.append_metrics(run_id, metric_rows(5, phase="val", key="loss", stride=10))
    store.append_metrics(run_id, metric_rows(50, key="acc", seed=1))
    store.append_metrics(other, metric_rows(7, key="loss"))
    store.append_metrics(run_id, [])  # no-op

    assert store.count_metrics(run_id) == 105
    assert store.count_metrics(other) == 7
    assert store.metric_keys(run_id) == [("train", "acc"), ("train", "loss"), ("val", "loss")]

    series = store.metric_series(run_id, "loss")
    assert list(series.columns) == ["phase", "step", "epoch", "value", "time"]
    assert len(series) == 55
    assert list(series["phase"]) == ["train"] * 50 + ["val"] * 5
    assert list(series[series.phase == "train"]["step"]) == list(range(50))
    expected = [r["value"] for r in metric_rows(50, key="loss")]
    assert np.allclose(series[series.phase == "train"]["value"], expected)
    assert series["step"].dtype == np.int64 and series["value"].dtype == np.float64

    val = store.metric_series(run_id, "loss", phase="val")
    assert list(val["step"]) == [0, 10, 20, 30, 40] and set(val["phase"]) == {"val"}

    empty = store.metric_series(run_id, "nope")
    assert list(empty.columns) == ["phase", "step", "epoch", "value", "time"] and empty.empty

    assert store.last_metric_step(run_id, "train") == 49
    assert store.last_metric_step(run_id, "val") == 40
    assert store.last_metric_step(run_id, "test") is None


def test_append_metrics_accepts_numpy_and_missing_optional_fields(store: Store) -> None:
    run_id = store.create_run("r", {})
    store.append_metrics(run_id, [
        {"phase": "train", "step": np.int64(3), "key": "loss", "value": np.float32(1.5)},
        {"phase": "train", "step": 4, "epoch": 0, "key": "loss", "value": float("nan"), "time": 5.0},
    ])
    s = store.metric_series(run_id, "loss")
    assert list(s["step"]) == [3, 4] and s["value"].iloc[0] == 1.5
    assert math.isnan(s["value"].iloc[1])  # SQLite stores NaN as NULL -> NaN again
    with pytest.raises(ValueError, match="'key'"):
        store.append_metrics(run_id, [{"phase": "train", "step": 1, "value": 1.0}])


def test_metrics_frame_filters(store: Store) -> None:
    run_id = store.create_run("r", {})
    store.append_metrics(run_id, metric_rows(10, key="loss") + metric_rows(10, key="acc", seed=2)
                         + metric_rows(3, phase="val", key="acc", stride=5))
    frame = store.metrics_frame(run_id)
    assert list(frame.columns) == ["phase", "step", "epoch", "key", "value", "time"]
    assert len(frame) == 23
    assert len(store.metrics_frame(run_id, phase="val")) == 3
    assert set(store.metrics_frame(run_id, keys=["acc"])["key"]) == {"acc"}
    assert len(store.metrics_frame(run_id, phase="train", keys=["acc", "loss"])) == 20
    assert store.metrics_frame(run_id, keys=[]).empty


def _pandas_buckets(grp: pd.DataFrame, width: int) -> pd.DataFrame:
    """Buckets [k*width, (k+1)*width) of one phase by pandas (columns of Store.metric_buckets)."""
    start = grp["step"] // width * width
    agg = grp.groupby(start).agg(
        step=("step", "min"), epoch=("epoch", "min"), value=("value", "mean"),
        min=("value", "min"), max=("value", "max"), count=("value", "size"),
        n_values=("value", "count"), time=("time", "min"),
    )
    return agg.rename_axis("start").reset_index()


def _expected_buckets(series: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """The bucketing rule computed by pandas, to check the SQL against: per phase, the smallest
    power-of-two width giving at most max_points buckets aligned at step 0."""
    parts = []
    for phase, grp in series.groupby("phase", sort=True):
        lo, hi = int(grp["step"].min()), int(grp["step"].max())
        width = 1
        while hi // width - lo // width + 1 > max_points:
            width *= 2
        agg = _pandas_buckets(grp, width)
        agg.insert(0, "phase", phase)
        parts.append(agg)
    return pd.concat(parts).reset_index(drop=True)


def _assert_same_buckets(got: pd.DataFrame, expected: pd.DataFrame, cols_exact=("step", "epoch", "count")) -> None:
    assert len(got) == len(expected)
    for col in cols_exact:
        assert list(got[col]) == list(expected[col]), col
    for col in ("value", "min", "max", "time"):
        assert np.allclose(got[col], expected[col], rtol=1e-12, atol=1e-12), col


def test_bucketed_matches_pandas(store: Store) -> None:
    run_id = store.create_run("r", {})
    # Irregular steps, a resumed segment (duplicate steps), and a sparse val phase.
    train = metric_rows(9000, start=100, stride=3, seed=3) + metric_rows(1000, start=5000, stride=1, seed=4)
    val = metric_rows(300, phase="val", start=0, stride=97, seed=5)
    store.append_metrics(run_id, train + val)
    store.append_metrics(run_id, metric_rows(100, key="acc"))
    max_points = 500

    series = store.metric_series(run_id, "loss")
    got = store.metric_series_bucketed(run_id, "loss", max_points=max_points)
    assert list(got.columns) == ["phase", "step", "epoch", "value", "min", "max", "count", "time"]
    assert int(got["count"].sum()) == len(series) == 10300  # nothing dropped
    for phase in ("train", "val"):
        assert (got.phase == phase).sum() <= max_points

    expected = _expected_buckets(series, max_points)
    assert list(got["phase"]) == list(expected["phase"])
    _assert_same_buckets(got, expected)
    assert (got["min"] <= got["value"] + 1e-9).all() and (got["value"] <= got["max"] + 1e-9).all()
    # power-of-two buckets aligned at step 0: train spans steps 100..27097 -> width 64, one bucket per 64 steps
    assert bucket_width(100, 27097, max_points) == 64
    train_steps = got.loc[got.phase == "train", "step"].to_numpy()
    assert list(train_steps // 64) == list(range(100 // 64, 27097 // 64 + 1))

    only_val = store.metric_series_bucketed(run_id, "loss", phase="val", max_points=100)
    assert set(only_val["phase"]) == {"val"} and int(only_val["count"].sum()) == 300
    exp_val = _expected_buckets(series[series.phase == "val"], 100)
    assert list(only_val["count"]) == list(exp_val["count"])
    assert np.allclose(only_val["value"], exp_val["value"])


def test_bucket_width_is_smallest_aligned_power_of_two() -> None:
    assert bucket_width(0, 1999, 2000) == 1
    assert bucket_width(0, 2000, 2000) == 2
    assert bucket_width(1, 2_000_000, 2000) == 1024  # 2,000,000 // 1024 + 1 = 1954 buckets
    assert bucket_width(3, 6, 1) == 8  # [0, 4) and [4, 8) would be 2 buckets
    assert bucket_width(5, 5, 1) == 1
    assert bucket_width(-10, 10, 3) == 16  # floor alignment below zero: [-16, 0), [0, 16)
    for lo, hi, mp in [(0, 10**6, 500), (123, 98765, 77), (7, 7000, 1), (-500, 500, 10)]:
        w = bucket_width(lo, hi, mp)
        assert w & (w - 1) == 0 and hi // w - lo // w + 1 <= mp
        assert w == 1 or hi // (w // 2) - lo // (w // 2) + 1 > mp
    with pytest.raises(ValueError, match="max_points"):
        bucket_width(0, 10, 0)


def test_metric_buckets_incremental_equals_from_scratch(store: Store) -> None:
    """Complete buckets + a tail read with since_step, over several rounds of appends (the width doubles),
    equal the buckets of the whole series; nothing dropped, the last bucket has the newest rows."""
    run_id = store.create_run("live", {})
    max_points = 50
    cached = None  # (width, end, complete buckets)
    step = 3
    rng = random.Random(7)
    for round_ in range(6):
        n = rng.randint(40, 400)
        rows = [{"phase": "train", "step": step + i, "epoch": (step + i) // 100, "key": "loss",
                 "value": rng.uniform(-1, 1) if (step + i) % 37 else None, "time": 1e9 + step + i}
                for i in range(n)]
        rows += [{"phase": "train", "step": step + n - 1, "epoch": 0, "key": "loss", "value": 5.0, "time": 1e9}]
        step += n
        store.append_metrics(run_id, rows + metric_rows(5, key="other", start=step))
        lo, hi = store.metric_step_range(run_id, "loss", "train")
        assert (lo, hi) == (3, step - 1)
        width = bucket_width(lo, hi, max_points)
        if cached is not None and cached[0] < width:  # widen: merge pairs in pandas
            old_w, old_end, frame = cached
            end = old_end - old_end % width
            frame = frame.assign(start=frame["start"] // width * width)
            frame = frame.assign(_w=frame["value"].fillna(0) * frame["n_values"]).groupby("start").agg(
                step=("step", "min"), epoch=("epoch", "min"), min=("min", "min"), max=("max", "max"),
                count=("count", "sum"), n_values=("n_values", "sum"), _w=("_w", "sum"), time=("time", "min"),
            ).reset_index()
            frame["value"] = frame["_w"] / frame["n_values"]
            cached = (width, end, frame[frame["start"] < end])
        since = cached[1] if cached is not None else None
        tail = store.metric_buckets(run_id, "loss", "train", width, since_step=since)
        assert list(tail.columns) == ["start", "step", "epoch", "value", "min", "max", "count", "n_values", "time"]
        if since is not None:
            assert tail["start"].min() >= since
        full = tail if cached is None else pd.concat([cached[2], tail], ignore_index=True)
        series = store.metric_series(run_id, "loss", "train")
        expected = _pandas_buckets(series, width)
        assert list(full["start"]) == list(expected["start"])
        _assert_same_buckets(full, expected)
        assert list(full["n_values"]) == list(expected["n_values"])
        assert int(full["count"].sum()) == len(series)
        assert len(full) <= max_points
        assert full["max"].iloc[-1] == 5.0 and int(full["step"].iloc[-1]) <= step - 1  # newest rows are in
        scratch = store.metric_series_bucketed(run_id, "loss", "train", max_points)
        _assert_same_buckets(scratch, expected)
        end = hi - hi % width  # buckets entirely below the last step are complete
        cached = (width, end, full[full["start"] < end].reset_index(drop=True))
    assert cached[0] > 1  # the width really changed over the rounds
    # since_step inside a bucket is rounded down to its start; past the end: nothing
    w = cached[0]
    assert store.metric_buckets(run_id, "loss", "train", w, since_step=w * 3 + 1)["start"].iloc[0] == w * 3
    assert store.metric_buckets(run_id, "loss", "train", w, since_step=step + 10 * w).empty
    assert store.metric_buckets(run_id, "nope", "train", w).empty
    with pytest.raises(ValueError, match="power of two"):
        store.metric_buckets(run_id, "loss", "train", 3)


def test_bucketed_small_series_is_unbucketed(store: Store) -> None:
    run_id = store.create_run("r", {})
    store.append_metrics(run_id, metric_rows(40) + metric_rows(4, phase="val", stride=10))
    got = store.metric_series_bucketed(run_id, "loss", max_points=44)
    series = store.metric_series(run_id, "loss")
    assert len(got) == 44 and (got["count"] == 1).all()
    assert list(got["step"]) == list(series["step"])
    assert (got["min"] == got["value"]).all() and (got["max"] == got["value"]).all()
    empty = store.metric_series_bucketed(run_id, "nope")
    assert empty.empty and list(empty.columns) == list(got.columns)
    with pytest.raises(ValueError, match="max_points"):
        store.metric_series_bucketed(run_id, "loss", max_points=0)


def test_delete_metrics_after(store: Store) -> None:
    run_id = store.create_run("r", {})
    store.append_metrics(run_id, metric_rows(100) + metric_rows(10, phase="val", stride=10)
                         + metric_rows(100, key="acc"))
    removed = store.delete_metrics_after(run_id, "train", 59)
    assert removed == 80  # steps 60..99 for both loss and acc
    assert store.last_metric_step(run_id, "train") == 59
    assert store.last_metric_step(run_id, "val") == 90  # other phase untouched
    assert store.delete_metrics_after(run_id, "train", 59) == 0
    # resume: appending after the checkpoint leaves no duplicates
    store.append_metrics(run_id, metric_rows(40, start=60, seed=9))
    steps = store.metric_series(run_id, "loss", phase="train")["step"]
    assert list(steps) == list(range(100))



# --------------------------------------------------------------------- pre-aggregated buckets
def _raw_buckets(frame: pd.DataFrame, width: int) -> pd.DataFrame:
    """The buckets computed from the raw rows in pandas: what the pre-aggregated ones must equal."""
    frame = frame.assign(start=frame["step"] - frame["step"] % width)
    grouped = frame.groupby("start").agg(step=("step", "min"), epoch=("epoch", "min"), value=("value", "mean"), min=("value", "min"),
                                         max=("value", "max"), count=("value", "size"), n_values=("value", "count"), time=("time", "min"))
    return grouped.reset_index()


def test_pre_aggregated_buckets_equal_the_raw_rows_through_appends_and_resumes(store: Store) -> None:
    """Rows arrive in uneven batches, some values are NaN, a resume deletes a tail and rewrites it:
    every bucket width a chart can ask for still equals the aggregation of the raw rows."""
    rng = np.random.default_rng(7)
    run_id = store.create_run("rollups", {})
    steps = np.arange(0, 20_000)
    values = rng.normal(size=len(steps))
    values[rng.choice(len(steps), 300, replace=False)] = np.nan
    rows = [{"phase": "student", "step": int(s), "epoch": int(s) // 5000, "key": "loss/total", "value": float(v), "time": 1000.0 + s}
            for s, v in zip(steps, values)]
    cut = 0
    while cut < len(rows):
        size = int(rng.integers(1, 3000))
        store.append_metrics(run_id, rows[cut:cut + size])
        cut += size
    store.delete_metrics_after(run_id, "student", 12_345)  # a resume from a checkpoint at step 12,345 ...
    store.append_metrics(run_id, [{**r, "value": r["value"] + 1 if r["value"] == r["value"] else r["value"]} for r in rows[12_346:]])  # ... re-logs the rest
    raw = store.metric_series(run_id, "loss/total", "student")
    assert len(raw) == len(rows)
    for width in (1, 8, 16, 32, 256, 1024, 4096, 8192):
        got = store.metric_buckets(run_id, "loss/total", "student", width)
        want = _raw_buckets(raw, width)
        assert got["start"].tolist() == want["start"].tolist(), width
        for col in ("step", "epoch", "count", "n_values"):
            assert got[col].tolist() == want[col].tolist(), (width, col)
        for col in ("value", "min", "max", "time"):
            np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-9, equal_nan=True, err_msg=f"{width} {col}")
    tail = store.metric_buckets(run_id, "loss/total", "student", 256, since_step=15_000)
    assert tail["start"].min() == 14_848 and tail.equals(store.metric_buckets(run_id, "loss/total", "student", 256).iloc[58:].reset_index(drop=True))
    store.delete_run(run_id)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM metric_rollups")).scalar_one() == 0


def test_epoch_stats_aggregate_a_per_step_value_per_epoch(store) -> None:
    """The Method tab's per-epoch view of a per-step value: mean, min, max and count of each epoch's rows."""
    run_id = store.create_run("stats", {})
    rows = [{"phase": "student", "step": s, "epoch": s // 4, "key": "mix", "value": float(s), "time": 1e9 + s} for s in range(8)]
    rows += [{"phase": "student", "step": 3, "epoch": 0, "key": "val/acc", "value": 50.0, "time": 1e9},
             {"phase": "baseline", "step": 3, "epoch": 0, "key": "mix", "value": 99.0, "time": 1e9}]
    store.append_metrics(run_id, rows)
    stats = store.metric_epoch_stats(run_id, ["mix", "val/acc"], "student")
    mix = stats[stats["key"] == "mix"]
    assert mix["epoch"].tolist() == [0, 1] and mix["value"].tolist() == [1.5, 5.5]
    assert mix["min"].tolist() == [0.0, 4.0] and mix["max"].tolist() == [3.0, 7.0] and mix["count"].tolist() == [4, 4]
    assert stats[stats["key"] == "val/acc"][["epoch", "value", "count"]].values.tolist() == [[0, 50.0, 1]]
