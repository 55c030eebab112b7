"""Tests for the storage package against real SQLite and PostgreSQL databases (no mocks).

PostgreSQL: run `scripts/start_postgres.sh` first (skipped locally if it is down,
a failure when CI=true).  See the `store` / `store_url` fixtures in conftest.py.
"""

from __future__ import annotations

import math
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from storage import ArtifactRecord, RunRecord, RunSink, Store, default_db_url
from storage.db import forget_migrations, run_migrations
from storage.metrics import bucket_width

HEAD_REVISION = "0004_sweeps"  # the newest file in storage/migrations/versions

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int, *, phase: str = "train", key: str = "loss", start: int = 0, stride: int = 1,
          epoch_len: int = 100, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "phase": phase,
            "step": start + i * stride,
            "epoch": (start + i * stride) // epoch_len,
            "key": key,
            "value": rng.uniform(-5.0, 5.0),
            "time": 1_700_000_000.0 + i,
        }
        for i in range(n)
    ]


def _python_subprocess(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# --------------------------------------------------------------------------- runs
def test_run_crud_round_trip(store: Store) -> None:
    config = {"teacher": {"arch": "resnet18", "layers": [1, 2, 3]}, "lr": 1e-3, "amp": True,
              "np_scalar": np.float32(0.5), "count": np.int64(3)}
    run_id = store.create_run("kd-1", config)
    run = store.get_run(run_id)
    assert isinstance(run, RunRecord)
    assert run.id == run_id and run.name == "kd-1" and run.status == "queued"
    assert run.config == {"teacher": {"arch": "resnet18", "layers": [1, 2, 3]}, "lr": 1e-3,
                          "amp": True, "np_scalar": 0.5, "count": 3}
    assert run.parent_id is None and run.hidden is False
    assert run.summary == {} and run.progress == {} and run.tags == []
    assert abs(run.created_at - time.time()) < 60
    assert run.started_at is run.finished_at is run.heartbeat_at is None

    store.update_run(
        run_id, status="running", started_at=123.5, host="node1", pid=4242, executor="local",
        executor_ref="job-7", log_path="/tmp/x.log", tags=["a", "b"], hidden=True,
        summary={"best": {"acc": 0.9}}, progress={"epoch": 1, "of": 10}, config={"lr": 2e-3},
        error=None, name="kd-1b",
    )
    run = store.get_run(run_id)
    assert (run.status, run.started_at, run.host, run.pid) == ("running", 123.5, "node1", 4242)
    assert (run.executor, run.executor_ref, run.log_path) == ("local", "job-7", "/tmp/x.log")
    assert run.tags == ["a", "b"] and run.hidden is True and run.name == "kd-1b"
    assert run.summary == {"best": {"acc": 0.9}} and run.progress == {"epoch": 1, "of": 10}
    assert run.config == {"lr": 2e-3}

    child = store.create_run("kd-1-resume", {}, status="paused", parent_id=run_id)
    assert store.get_run(child).parent_id == run_id
    assert store.get_run(child).status == "paused"


def test_get_run_missing_raises_keyerror(store: Store) -> None:
    with pytest.raises(KeyError, match="run 999 not found"):
        store.get_run(999)
    with pytest.raises(KeyError, match="run 999 not found"):
        store.update_run(999, status="failed")
    with pytest.raises(KeyError, match="run 999 not found"):
        store.heartbeat(999)
    with pytest.raises(KeyError, match="run 999 not found"):
        store.merge_summary(999, {"a": 1})
    with pytest.raises(KeyError, match="run 999 not found"):
        store.delete_run(999)


def test_list_runs_filters_hidden_and_newest_first(store: Store) -> None:
    ids = [store.create_run(f"r{i}", {"i": i}, status=s)
           for i, s in enumerate(["queued", "running", "done", "failed", "done"])]
    store.update_run(ids[2], hidden=True)

    listed = store.list_runs()
    assert [r.id for r in listed] == [ids[4], ids[3], ids[1], ids[0]]  # newest first, no hidden
    assert [r.id for r in store.list_runs(include_hidden=True)] == ids[::-1]
    assert [r.id for r in store.list_runs(status=["done"])] == [ids[4]]
    assert [r.id for r in store.list_runs(status=["done"], include_hidden=True)] == [ids[4], ids[2]]
    assert [r.id for r in store.list_runs(status="queued")] == [ids[0]]  # a bare string works too
    assert [r.id for r in store.list_runs(status=["queued", "failed"])] == [ids[3], ids[0]]
    assert [r.id for r in store.list_runs(limit=2)] == [ids[4], ids[3]]
    assert store.list_runs(status=[]) == []


def test_update_run_rejects_unknown_field(store: Store) -> None:
    run_id = store.create_run("r", {})
    with pytest.raises(ValueError, match="bogus"):
        store.update_run(run_id, status="done", bogus=1)
    with pytest.raises(ValueError, match="created_at"):
        store.update_run(run_id, created_at=1.0)
    with pytest.raises(ValueError, match="bogus"):
        store.transition(run_id, ["queued"], "running", bogus=1)
    assert store.get_run(run_id).status == "queued"  # nothing was written


def test_transition_compare_and_set(store: Store) -> None:
    run_id = store.create_run("r", {})
    assert store.transition(run_id, ["running"], "done") is False
    assert store.transition(run_id, ["queued", "paused"], "running", started_at=10.0, pid=1) is True
    run = store.get_run(run_id)
    assert (run.status, run.started_at, run.pid) == ("running", 10.0, 1)
    assert store.transition(run_id, "queued", "running") is False
    assert store.transition(12345, ["queued"], "running") is False


def test_transition_race_exactly_one_winner(store_url: str) -> None:
    """8 threads, each with its own Store (own pool), race to claim the same queued runs."""
    n_threads, n_runs = 8, 5
    setup = Store(store_url)
    run_ids = [setup.create_run(f"race{i}", {}) for i in range(n_runs)]
    stores = [Store(store_url) for _ in range(n_threads)]
    for s in stores:  # open a connection each so the race is not about connecting
        s.count_metrics(run_ids[0])
    wins: dict[int, list[int]] = {rid: [] for rid in run_ids}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def claim(worker: int) -> None:
        try:
            for rid in run_ids:
                barrier.wait()
                if stores[worker].transition(rid, ["queued"], "running", pid=worker):
                    wins[rid].append(worker)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=claim, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        for rid in run_ids:
            assert len(wins[rid]) == 1, f"run {rid} claimed by {wins[rid]}"
            run = setup.get_run(rid)
            assert run.status == "running" and run.pid == wins[rid][0]
    finally:
        for s in [setup, *stores]:
            s.dispose()


def test_merge_summary_and_heartbeat(store: Store) -> None:
    run_id = store.create_run("r", {})
    store.merge_summary(run_id, {"best_acc": 0.5, "epochs": 1})
    store.merge_summary(run_id, {"best_acc": np.float64(0.7), "final_loss": float("nan")})
    assert store.get_run(run_id).summary == {"best_acc": 0.7, "epochs": 1, "final_loss": None}

    before = time.time()
    store.heartbeat(run_id)
    run = store.get_run(run_id)
    assert run.heartbeat_at is not None and run.heartbeat_at >= before - 1
    assert run.progress == {}
    store.heartbeat(run_id, {"step": 5})
    store.heartbeat(run_id, {"step": 6, "eta_s": 3.5})
    assert store.get_run(run_id).progress == {"step": 6, "eta_s": 3.5}
    store.heartbeat(run_id)  # progress untouched when not given
    assert store.get_run(run_id).progress == {"step": 6, "eta_s": 3.5}


def test_merge_summary_concurrent_merges_lose_nothing(store_url: str) -> None:
    setup = Store(store_url)
    run_id = setup.create_run("r", {})
    stores = [Store(store_url) for _ in range(4)]
    errors: list[BaseException] = []

    def merge(w: int) -> None:
        try:
            for i in range(10):
                stores[w].merge_summary(run_id, {f"w{w}_{i}": i})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=merge, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(setup.get_run(run_id).summary) == 40
    for s in [setup, *stores]:
        s.dispose()


# ------------------------------------------------------------------------ metrics
def test_append_and_series(store: Store) -> None:
    run_id = store.create_run("r", {})
    other = store.create_run("other", {})
    store.append_metrics(run_id, _rows(50, key="loss"))
    store.append_metrics(run_id, _rows(5, phase="val", key="loss", stride=10))
    store.append_metrics(run_id, _rows(50, key="acc", seed=1))
    store.append_metrics(other, _rows(7, key="loss"))
    store.append_metrics(run_id, [])  # no-op

    assert store.count_metrics(run_id) == 105
    assert store.count_metrics(other) == 7
    assert store.metric_keys(run_id) == [("train", "acc"), ("train", "loss"), ("val", "loss")]

    series = store.metric_series(run_id, "loss")
    assert list(series.columns) == ["phase", "step", "epoch", "value", "time"]
    assert len(series) == 55
    assert list(series["phase"]) == ["train"] * 50 + ["val"] * 5
    assert list(series[series.phase == "train"]["step"]) == list(range(50))
    expected = [r["value"] for r in _rows(50, key="loss")]
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
    store.append_metrics(run_id, _rows(10, key="loss") + _rows(10, key="acc", seed=2)
                         + _rows(3, phase="val", key="acc", stride=5))
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
    train = _rows(9000, start=100, stride=3, seed=3) + _rows(1000, start=5000, stride=1, seed=4)
    val = _rows(300, phase="val", start=0, stride=97, seed=5)
    store.append_metrics(run_id, train + val)
    store.append_metrics(run_id, _rows(100, key="acc"))
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
        store.append_metrics(run_id, rows + _rows(5, key="other", start=step))
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
    store.append_metrics(run_id, _rows(40) + _rows(4, phase="val", stride=10))
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
    store.append_metrics(run_id, _rows(100) + _rows(10, phase="val", stride=10)
                         + _rows(100, key="acc"))
    removed = store.delete_metrics_after(run_id, "train", 59)
    assert removed == 80  # steps 60..99 for both loss and acc
    assert store.last_metric_step(run_id, "train") == 59
    assert store.last_metric_step(run_id, "val") == 90  # other phase untouched
    assert store.delete_metrics_after(run_id, "train", 59) == 0
    # resume: appending after the checkpoint leaves no duplicates
    store.append_metrics(run_id, _rows(40, start=60, seed=9))
    steps = store.metric_series(run_id, "loss", phase="train")["step"]
    assert list(steps) == list(range(100))


# ---------------------------------------------------------------------- artifacts
def test_artifacts_newest_first_and_kind_filter(store: Store) -> None:
    run_id = store.create_run("r", {})
    a1 = store.add_artifact(run_id, "checkpoint", "/ckpt/e1.pt", {"epoch": 1})
    a2 = store.add_artifact(run_id, "export", "/exp/model.onnx")
    a3 = store.add_artifact(run_id, "checkpoint", "/ckpt/e2.pt", {"epoch": 2, "acc": np.float32(0.25)})
    arts = store.artifacts(run_id)
    assert [a.id for a in arts] == [a3, a2, a1]
    assert isinstance(arts[0], ArtifactRecord)
    assert arts[0].meta == {"epoch": 2, "acc": 0.25} and arts[1].meta == {}
    assert arts[0].run_id == run_id and arts[0].path == "/ckpt/e2.pt"
    assert [a.id for a in store.artifacts(run_id, kind="checkpoint")] == [a3, a1]
    assert store.artifacts(run_id, kind="plot") == []


def test_delete_run_cascades(store: Store) -> None:
    run_id = store.create_run("r", {})
    keep = store.create_run("keep", {})
    child = store.create_run("child", {}, parent_id=run_id)
    store.append_metrics(run_id, _rows(30))
    store.append_metrics(keep, _rows(5))
    store.add_artifact(run_id, "checkpoint", "/a.pt")
    store.add_artifact(run_id, "export", "/b.onnx")
    store.add_artifact(keep, "checkpoint", "/keep.pt")

    paths = store.delete_run(run_id)
    assert sorted(paths) == ["/a.pt", "/b.onnx"]
    with pytest.raises(KeyError):
        store.get_run(run_id)
    assert store.count_metrics(run_id) == 0 and store.artifacts(run_id) == []
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM metrics WHERE run_id = :r"), {"r": run_id}).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM artifacts WHERE run_id = :r"), {"r": run_id}).scalar() == 0
    assert store.count_metrics(keep) == 5 and len(store.artifacts(keep)) == 1
    assert store.get_run(child).parent_id is None


def test_foreign_key_cascade_in_database(store: Store) -> None:
    """The FK itself cascades (not just Store.delete_run), on SQLite too (foreign_keys=ON)."""
    run_id = store.create_run("r", {})
    store.append_metrics(run_id, _rows(3))
    store.add_artifact(run_id, "checkpoint", "/a.pt")
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM runs WHERE id = :r"), {"r": run_id})
    assert store.count_metrics(run_id) == 0 and store.artifacts(run_id) == []


def test_run_sink_adapter(store: Store) -> None:
    run_id = store.create_run("r", {})
    sink = RunSink(store, run_id)
    sink.log_metrics(_rows(12))
    sink.update_progress({"step": 12})
    sink.update_summary({"best": 1.0})
    sink.update_summary({"last": 2.0})
    sink.add_artifact("checkpoint", "/c.pt", {"step": 12})
    run = store.get_run(run_id)
    assert store.count_metrics(run_id) == 12
    assert run.progress == {"step": 12} and run.heartbeat_at is not None
    assert run.summary == {"best": 1.0, "last": 2.0}
    assert store.artifacts(run_id)[0].meta == {"step": 12}
    sink.discard_metrics_after("train", 7)
    assert store.last_metric_step(run_id, "train") == 7 and store.count_metrics(run_id) == 8


# --------------------------------------------------------------------- migrations
def test_migrations_idempotent(store_url: str) -> None:
    first = Store(store_url)
    run_id = first.create_run("survives", {"a": 1})
    second = Store(store_url)  # cached: no second upgrade
    forget_migrations(store_url)
    third = Store(store_url)  # really runs `alembic upgrade head` again: a no-op at head
    run_migrations(third.engine, store_url, force=True)
    assert third.get_run(run_id).config == {"a": 1}
    with third.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        tables = set(inspect(conn).get_table_names())
        indexes = {ix["name"] for ix in inspect(conn).get_indexes("metrics")}
    assert versions == [HEAD_REVISION]
    assert {"runs", "metrics", "artifacts", "alembic_version"} <= tables
    assert "ix_metrics_run_key_phase_step" in indexes
    for s in (first, second, third):
        s.dispose()


def test_runs_of_an_existing_database_get_distinct_identities(store_url: str) -> None:
    """A database made before 0002 keeps its runs and metrics; each run gets its own uid, and new ones too."""
    from alembic import command
    from sqlalchemy import create_engine

    from storage.db import _alembic_config

    engine = create_engine(store_url)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(store_url, conn), "0001_initial")
        for name in ("old-a", "old-b"):
            conn.execute(text("INSERT INTO runs (name, status, config, created_at, summary, progress, tags, hidden) "
                              "VALUES (:n, 'completed', '{}', 1.0, '{}', '{}', '[]', false)"), {"n": name})
        conn.execute(text("INSERT INTO metrics (run_id, phase, step, key, value, time) VALUES (1, 'student', 1, 'loss/total', 0.5, 1.0)"))
    engine.dispose()
    forget_migrations(store_url)
    store = Store(store_url)
    old = store.list_runs(include_hidden=True)
    new = store.get_run(store.create_run("new", {}))
    uids = [r.uid for r in old] + [new.uid]
    assert len(set(uids)) == 3 and all(len(u) == 32 and int(u, 16) >= 0 for u in uids)
    assert store.count_metrics(1) == 1
    with pytest.raises(IntegrityError), store.engine.begin() as conn:  # the database itself refuses a shared identity
        conn.execute(text("UPDATE runs SET uid = :u WHERE id = :i"), {"u": old[0].uid, "i": new.id})
    store.dispose()


def test_default_db_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLERY_DB_URL", raising=False)
    assert default_db_url() == "sqlite:///distillery-data/distillery.db"
    assert (tmp_path / "distillery-data").is_dir()
    s = Store()
    assert s.url == "sqlite:///distillery-data/distillery.db"
    assert (tmp_path / "distillery-data" / "distillery.db").is_file()
    s.dispose()
    monkeypatch.setenv("DISTILLERY_DB_URL", "postgresql+psycopg://u:p@h/db")
    assert default_db_url() == "postgresql+psycopg://u:p@h/db"


def test_storage_does_not_import_torch() -> None:
    proc = _python_subprocess(
        "import sys, storage, storage.store, storage.db, storage.schema\n"
        "assert 'torch' not in sys.modules, 'storage imported torch'\n"
        "print('ok')\n"
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "ok", err


# ------------------------------------------------------------------- SQLite only
@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'distillery.db'}"


def test_sqlite_pragmas_wal(sqlite_url: str, tmp_path: Path) -> None:
    s = Store(sqlite_url)
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    s.dispose()
    # WAL is persistent in the file: a plain sqlite3 connection sees it too.
    raw = sqlite3.connect(tmp_path / "distillery.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_checkpoint_wal_shrinks_wal_file(sqlite_url: str, tmp_path: Path) -> None:
    s = Store(sqlite_url)
    run_id = s.create_run("r", {})
    for i in range(5):
        s.append_metrics(run_id, _rows(5000, start=i * 5000, seed=i))
    wal = tmp_path / "distillery.db-wal"
    assert wal.exists() and wal.stat().st_size > 100_000
    s.checkpoint_wal()
    assert wal.stat().st_size == 0
    assert s.count_metrics(run_id) == 25_000
    s.dispose()


def test_checkpoint_wal_safe_on_every_backend(store: Store) -> None:
    store.checkpoint_wal()  # must not raise on either backend


_WRITER = """
import sys, time
from storage import Store
url, run_id, writer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = Store(url)
for batch in range(20):
    rows = [{"phase": f"w{writer}", "step": batch * 500 + i, "epoch": batch, "key": "loss",
             "value": float(i), "time": time.time()} for i in range(500)]
    store.append_metrics(run_id, rows)
    store.heartbeat(run_id, {"writer": writer, "batch": batch})
    time.sleep(0.01)
store.dispose()
print("done")
"""


def test_sqlite_concurrent_writer_processes_and_reader(sqlite_url: str) -> None:
    """2 writer processes x 20 batches of 500 rows + a polling reader: no 'database is locked'."""
    s = Store(sqlite_url)
    run_id = s.create_run("r", {})
    procs = [_python_subprocess(_WRITER, sqlite_url, str(run_id), str(w)) for w in range(2)]
    reader_errors: list[BaseException] = []
    polls = 0
    while any(p.poll() is None for p in procs):
        try:
            s.count_metrics(run_id)
            s.metric_series_bucketed(run_id, "loss", max_points=200)
            s.get_run(run_id)
            polls += 1
        except BaseException as exc:  # noqa: BLE001 - collected, asserted below
            reader_errors.append(exc)
        time.sleep(0.02)
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert "database is locked" not in err
        assert p.returncode == 0 and out.strip() == "done", err
    assert not reader_errors, reader_errors
    assert polls > 0
    assert s.count_metrics(run_id) == 2 * 20 * 500
    assert s.metric_series_bucketed(run_id, "loss", max_points=100)["count"].sum() == 20_000
    s.checkpoint_wal()
    s.dispose()


_OPENER = """
import sys
from storage import Store
s = Store(sys.argv[1])
s.create_run("opened", {})
s.dispose()
print("ok")
"""


def test_concurrent_first_open_migrates_once(store_url: str) -> None:
    """Dashboard and workers starting together on a fresh database must not race the migration."""
    procs = [_python_subprocess(_OPENER, store_url) for _ in range(3)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip() == "ok", err
    s = Store(store_url)
    assert len(s.list_runs()) == 3
    with s.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD_REVISION]
    s.dispose()


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
