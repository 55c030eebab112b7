"""A config trained the way a user's run is: submitted to the queue, trained by a detached worker process,
its metrics read back from the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kd_core.config import ExperimentConfig
from kd_core.runner import submit
from storage import RunRecord, Store
from tests.polling import wait_for

FINISH_TIMEOUT_S = 420.0  # a busy 2-core machine starts and trains torch processes slowly


def train_in_worker(config: ExperimentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, RunRecord]:
    """Submit ``config`` to a fresh SQLite queue in ``tmp_path``; return the store and the finished run."""
    monkeypatch.setenv("DISTILLERY_DB_URL", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DISTILLERY_EXECUTOR", "local")
    monkeypatch.setenv("DISTILLERY_SLOTS", "1")
    store = Store(None)
    run_id = submit(store, config)
    wait_for(store, f"run {run_id} to finish", lambda: store.get_run(run_id).status in ("completed", "failed", "cancelled"), FINISH_TIMEOUT_S)
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    return store, run


def metric(store: Store, run: RunRecord, key: str, phase: str = "student") -> list[Any]:
    return store.metric_series(run.id, key, phase)["value"].tolist()


def train_many_in_worker(configs: list[ExperimentConfig | dict[str, Any]], home: Path, mp: pytest.MonkeyPatch,
                         slots: int = 1) -> tuple[Store, list[RunRecord]]:
    """Queue every config on one SQLite queue under ``home`` (the layout ``tests.test_browser.serve`` uses, so a
    server can show the runs afterwards); ``slots`` workers at a time train them. Returns the finished runs."""
    mp.setenv("DISTILLERY_DB_URL", f"sqlite:///{home / 'distillery.db'}")
    mp.setenv("DISTILLERY_HOME", str(home))
    mp.setenv("DISTILLERY_ARTIFACTS", str(home / "artifacts"))
    mp.setenv("DISTILLERY_EXECUTOR", "local")
    mp.setenv("DISTILLERY_SLOTS", str(slots))
    store = Store(None)
    ids = [submit(store, config) for config in configs]
    done = ("completed", "failed", "cancelled")
    wait_for(store, f"runs {ids} to finish", lambda: all(store.get_run(i).status in done for i in ids), FINISH_TIMEOUT_S * 2)
    runs = [store.get_run(i) for i in ids]
    failed = [(r.name, r.error) for r in runs if r.status != "completed"]
    assert not failed, failed
    return store, runs
