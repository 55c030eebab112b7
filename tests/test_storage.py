"""Tests for the storage package against real SQLite and PostgreSQL databases (no mocks).

PostgreSQL: run `scripts/start_postgres.sh` first (skipped locally if it is down,
a failure when CI=true).  See the `store` / `store_url` fixtures in conftest.py.
"""

from __future__ import annotations

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
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from storage import ArtifactRecord, RunRecord, RunSink, Store, default_db_url
from storage.db import forget_migrations, run_migrations

HEAD_REVISION = "0004_sweeps"  # the newest file in storage/migrations/versions

REPO_ROOT = Path(__file__).resolve().parents[1]


def metric_rows(n: int, *, phase: str = "train", key: str = "loss", start: int = 0, stride: int = 1,
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
    store.append_metrics(run_id, metric_rows(30))
    store.append_metrics(keep, metric_rows(5))
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
    store.append_metrics(run_id, metric_rows(3))
    store.add_artifact(run_id, "checkpoint", "/a.pt")
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM runs WHERE id = :r"), {"r": run_id})
    assert store.count_metrics(run_id) == 0 and store.artifacts(run_id) == []


def test_run_sink_adapter(store: Store) -> None:
    run_id = store.create_run("r", {})
    sink = RunSink(store, run_id)
    sink.log_metrics(metric_rows(12))
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
        s.append_metrics(run_id, metric_rows(5000, start=i * 5000, seed=i))
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
