"""Incremental bucketing of a running run's curves (ui.metrics.live_bucketed_series), on SQLite and PostgreSQL.

Every poll must equal a from-scratch computation (pandas over Store.metric_series, and
Store.metric_series_bucketed), while only the tail from the first incomplete bucket is read again.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pandas as pd
import pytest

from storage import Store
from storage.metrics import BUCKET_COLUMNS, bucket_width
from ui import metrics

MAX_POINTS = 64


def _append(store: Store, run_id: int, phase: str, steps: range, rng: random.Random, *, key: str = "loss",
            offset: float = 0.0) -> None:
    rows = [{"phase": phase, "step": s, "epoch": s // 100, "key": key,
             "value": None if s % 41 == 0 else offset + rng.uniform(-1, 1), "time": 1e9 + s}
            for s in steps]
    rows += [{"phase": phase, "step": s, "epoch": s // 100, "key": "other", "value": 1.0, "time": 1e9} for s in steps[::7]]
    store.append_metrics(run_id, rows)


def _expected(store: Store, run_id: int, key: str, phase: str | None, max_points: int) -> pd.DataFrame:
    """From scratch in pandas: power-of-two buckets aligned at step 0, per phase."""
    series = store.metric_series(run_id, key, phase)
    if len(series) <= max_points:
        out = series.assign(min=series["value"], max=series["value"], count=1)
        return out[["phase", "step", "epoch", "value", "min", "max", "count", "time"]]
    parts = []
    for ph, grp in series.groupby("phase", sort=True):
        w = bucket_width(int(grp["step"].min()), int(grp["step"].max()), max_points)
        agg = grp.groupby(grp["step"] // w).agg(
            step=("step", "min"), epoch=("epoch", "min"), value=("value", "mean"), min=("value", "min"),
            max=("value", "max"), count=("value", "size"), time=("time", "min"))
        parts.append(agg.reset_index(drop=True).assign(phase=ph))
    return pd.concat(parts, ignore_index=True)[["phase", "step", "epoch", "value", "min", "max", "count", "time"]]


def _assert_equal(got: pd.DataFrame, exp: pd.DataFrame) -> None:
    assert list(got.columns) == ["phase", "step", "epoch", "value", "min", "max", "count", "time"]
    assert len(got) == len(exp)
    assert list(got["phase"]) == list(exp["phase"])
    for col in ("step", "epoch", "count"):
        assert list(got[col]) == list(exp[col]), col
    for col in ("value", "min", "max", "time"):
        assert np.allclose(got[col], exp[col], rtol=1e-12, atol=1e-12, equal_nan=True), col


class _Spy:
    """Wraps a Store and records the since_step of every metric_buckets call."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.since: list[int | None] = []
        self.url = store.url

    def metric_buckets(self, run_id, key, phase, width, since_step=None):  # noqa: ANN001 - same as Store
        self.since.append(since_step)
        return self._store.metric_buckets(run_id, key, phase, width, since_step)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._store, name)


def _running(store: Store) -> int:
    run_id = store.create_run("live", {}, status="running")
    store.update_run(run_id, started_at=time.time())
    return run_id


def test_live_rounds_equal_from_scratch_and_read_only_the_tail(store: Store) -> None:
    run_id = _running(store)
    spy = _Spy(store)
    cache = metrics.LiveBuckets()
    rng = random.Random(1)
    step, widths = 5, []
    for round_ in range(7):
        n = rng.randint(30, 300)
        _append(store, run_id, "student", range(step, step + n), rng)
        step += n
        run = store.get_run(run_id)
        got = metrics.live_bucketed_series(spy, run, "loss", "student", MAX_POINTS, cache=cache)
        _assert_equal(got, _expected(store, run_id, "loss", "student", MAX_POINTS))
        _assert_equal(got, store.metric_series_bucketed(run_id, "loss", "student", MAX_POINTS))
        assert int(got["count"].sum()) == len(store.metric_series(run_id, "loss", "student"))
        if len(got) and int(got["count"].sum()) > MAX_POINTS:
            widths.append(bucket_width(5, step - 1, MAX_POINTS))
            # no stale data: the last bucket holds the newest row
            last = store.metric_series(run_id, "loss", "student").iloc[-1]
            assert int(got["step"].iloc[-1]) <= int(last["step"]) and float(got["time"].iloc[-1]) <= float(last["time"])
            assert got["max"].iloc[-1] >= last["value"] >= got["min"].iloc[-1]
    assert len(set(widths)) >= 3, widths  # the width doubled at least twice: pairs were merged
    # after the first round, every tail read started past the cached complete buckets
    later = [s for s in spy.since[1:] if s is not None]
    assert later and all(s > 5 for s in later)
    entry = next(iter(cache._data.values()))
    assert entry.width == widths[-1] and entry.end <= step - 1 and entry.end % entry.width == 0
    assert len(entry.frame) and (entry.frame["start"] < entry.end).all()

    # a poll with nothing new reads only the (incomplete) last bucket and returns the same thing
    spy.since.clear()
    again = metrics.live_bucketed_series(spy, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    _assert_equal(again, got)
    assert spy.since == [entry.end]


def test_live_last_bucket_is_never_stale(store: Store) -> None:
    run_id = _running(store)
    cache = metrics.LiveBuckets()
    rng = random.Random(2)
    _append(store, run_id, "student", range(0, 1000), rng)
    first = metrics.live_bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    # one more row in the last (incomplete) bucket, with an extreme value: the next poll shows it
    store.append_metrics(run_id, [{"phase": "student", "step": 1000, "epoch": 10, "key": "loss", "value": 99.0,
                                   "time": 2e9}])
    second = metrics.live_bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    assert int(second["count"].sum()) == int(first["count"].sum()) + 1
    assert second["max"].iloc[-1] == 99.0
    _assert_equal(second, _expected(store, run_id, "loss", "student", MAX_POINTS))


def test_live_all_phases_small_series_and_resume(store: Store) -> None:
    run_id = _running(store)
    cache = metrics.LiveBuckets()
    rng = random.Random(3)
    # small: unbucketed rows, like the store
    _append(store, run_id, "teacher", range(0, 20), rng)
    run = store.get_run(run_id)
    small = metrics.live_bucketed_series(store, run, "loss", None, MAX_POINTS, cache=cache)
    assert len(small) == 20 and (small["count"] == 1).all()
    _assert_equal(small, store.metric_series_bucketed(run_id, "loss", None, MAX_POINTS))
    # grows past max_points in two phases
    _append(store, run_id, "teacher", range(20, 700), rng)
    _append(store, run_id, "student", range(0, 2000), rng)
    both = metrics.live_bucketed_series(store, store.get_run(run_id), "loss", None, MAX_POINTS, cache=cache)
    _assert_equal(both, _expected(store, run_id, "loss", None, MAX_POINTS))
    assert set(both["phase"]) == {"teacher", "student"}
    # a resume from a checkpoint at step 999 re-logs different values: the cached buckets must not survive.
    # Polled while it happens: the last step went down, the entry is dropped.
    _append(store, run_id, "student", range(2000, 2600), rng)
    metrics.live_bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    store.delete_metrics_after(run_id, "student", 999)
    mid = metrics.live_bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    _assert_equal(mid, _expected(store, run_id, "loss", "student", MAX_POINTS))
    _append(store, run_id, "student", range(1000, 2700), rng, offset=10.0)  # same steps, new values
    got = metrics.live_bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    _assert_equal(got, _expected(store, run_id, "loss", "student", MAX_POINTS))
    # a resume that is noticed only later: the run's new started_at keys a new cache entry
    metrics.live_bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    store.delete_metrics_after(run_id, "student", 1499)
    store.update_run(run_id, started_at=time.time() + 1)
    _append(store, run_id, "student", range(1500, 3000), rng, offset=-10.0)
    got = metrics.live_bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS, cache=cache)
    _assert_equal(got, _expected(store, run_id, "loss", "student", MAX_POINTS))
    empty = metrics.live_bucketed_series(store, store.get_run(run_id), "nope", None, MAX_POINTS, cache=cache)
    assert empty.empty


def test_merge_buckets_matches_sql_at_the_wider_width(store: Store) -> None:
    run_id = store.create_run("r", {})
    rng = random.Random(4)
    _append(store, run_id, "student", range(3, 3000, 3), rng)
    narrow = store.metric_buckets(run_id, "loss", "student", 8)
    for width in (16, 64, 1024):
        merged = metrics.merge_buckets(narrow, width)
        direct = store.metric_buckets(run_id, "loss", "student", width)
        assert list(merged.columns) == BUCKET_COLUMNS
        for col in ("start", "step", "epoch", "count", "n_values"):
            assert list(merged[col]) == list(direct[col]), col
        for col in ("value", "min", "max", "time"):
            assert np.allclose(merged[col], direct[col], rtol=1e-12, atol=1e-12), col


def test_bucketed_series_uses_live_path_only_while_running(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    run_id = _running(store)
    _append(store, run_id, "student", range(0, 3000), random.Random(5))
    cache = metrics.LiveBuckets()
    monkeypatch.setattr(metrics, "live_cache", lambda: cache)
    live = metrics.bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS)
    assert len(cache) == 1
    _assert_equal(live, store.metric_series_bucketed(run_id, "loss", "student", MAX_POINTS))
    assert store.transition(run_id, ["running"], "completed", finished_at=time.time())
    cache.clear()
    done = metrics.bucketed_series(store, store.get_run(run_id), "loss", "student", MAX_POINTS)
    assert len(cache) == 0
    _assert_equal(done, live)
    store.dispose()
