"""Truth on the live pages (issue 10): what Run detail and Runs say about a run is what the database says.

Runs are written into the database the way the worker writes them (status, progress, summary), then the pages
are opened with AppTest and read as a user reads them. The real-browser half (the badge changing while the
page stays open) is in test_browser_live.py.
"""

from __future__ import annotations

import time

import yaml

from tests.ui_apptest import TINY_YAML, app, env, no_dispatch, open_page, texts  # noqa: F401 - fixtures

CONFIG = yaml.safe_load(TINY_YAML)
TRAINING = {"phase": "student", "phase_index": 2, "phases": 4, "epoch": 3, "epochs": 8, "step": 100, "steps": 456,
            "images_per_s": 512.3, "eta_s": 95.0, "eta_includes_analysis": False, "teacher_outputs": "cached",
            "teacher_outputs_reason": None, "trained_s": 42.0}


def make_run(store, status: str, progress: dict | None = None, summary: dict | None = None, **fields) -> int:
    run_id = store.create_run("live run", CONFIG, status=status)
    store.update_run(run_id, progress=progress or {}, summary=summary or {}, heartbeat_at=time.time(), **fields)
    return run_id


def run_detail(run_id: int):
    return open_page("pages/run_detail.py", run=str(run_id))


def test_a_running_run_says_where_it_is_and_that_the_eta_excludes_the_analysis(env, no_dispatch):
    run_id = make_run(env, "running", TRAINING, {"teacher_acc": 97.6}, started_at=time.time() - 50)
    shown = texts(run_detail(run_id))
    assert ":blue-badge[:material/sync: running]" in shown
    assert "student (phase 2/4) · epoch 3/8 · step 100/456 · 512 images/s · about 1m 35s left" in shown
    assert "training only: the end-of-run analysis comes on top" in shown
    assert "trained 42s so far (across resumes)" in shown and "teacher outputs cached" in shown
    assert "Teacher 97.6 %" in shown  # known since the teacher phase ended, before the run finished


def test_the_analysis_phase_shows_its_stage_and_a_measured_eta(env, no_dispatch):
    progress = {**TRAINING, "phase": "analysis", "phase_index": 4, "stage": "t-SNE 2/3", "eta_s": 12.0, "eta_includes_analysis": True}
    shown = texts(run_detail(make_run(env, "running", progress)))
    assert "analysis (phase 4/4) · t-SNE 2/3 · about 12s left" in shown
    assert "training only" not in shown and "epoch 3/8" not in shown


def test_a_reused_teacher_has_its_accuracy_at_the_start(env, no_dispatch):
    config = {**CONFIG, "teacher": {**CONFIG["teacher"], "source": "run:7"}}
    run_id = env.create_run("reuses a teacher", config, status="running")
    env.update_run(run_id, summary={"teacher_acc": 98.3}, progress={**TRAINING, "phase_index": 1, "phases": 3}, heartbeat_at=time.time())
    at = run_detail(run_id)
    assert "Teacher 98.3 %" in texts(at) and "(run:7)" in texts(at)


def test_a_finished_run_reads_finished(env, no_dispatch):
    stale = {**TRAINING, "epoch": 8, "epochs": 10, "step": 449, "steps": 570, "eta_s": 3.0, "finished": True,
             "ended": "completed, normally"}
    summary = {"student_acc": 91.5, "baseline_acc": 90.0, "kd_gain": 1.5, "teacher_acc": 97.0, "trained_s": 600.0, "analysis_s": 19.0}
    run_id = make_run(env, "completed", stale, summary, started_at=time.time() - 65, finished_at=time.time())
    shown = texts(run_detail(run_id))
    assert ":green-badge[:material/check_circle: completed]" in shown
    assert "epoch 8/10" not in shown and "left" not in shown and "step 449" not in shown
    assert "trained 10m 00s (summed across resumes) + analysis 19s" in shown  # not the 65 s since the last resume
    at = app()
    row = at.dataframe[0].value.iloc[0]
    assert row["progress"] == 100 and row["time"] == "10m 00s" and list(row["status"]) == ["completed"]


def test_the_runs_grid_shows_time_left_while_active(env, no_dispatch):
    make_run(env, "running", TRAINING, started_at=time.time() - 50)
    row = app().dataframe[0].value.iloc[0]
    assert row["time"] == "≈ 1m 35s left" and 25 < row["progress"] < 50


def test_a_cancelled_run_says_how_it_ended(env, no_dispatch):
    ended = {**TRAINING, "finished": True, "ended": "cancelled, on request (received SIGTERM)"}
    shown = texts(run_detail(make_run(env, "cancelled", ended, {"trained_s": 30.0})))
    assert ":gray-badge[:material/cancel: cancelled]" in shown and "Resume" in shown
    assert "left" not in shown and "epoch 3/8" not in shown


# --------------------------------------------------------------------------- a database that cannot be opened


def _opened_with(url: str, monkeypatch):
    import streamlit as st

    monkeypatch.setenv("DISTILLERY_DB_URL", url)
    st.cache_resource.clear()
    return app()


def test_a_missing_postgres_database_is_named_on_the_page(env, monkeypatch, _storage_pg_admin):
    from tests.ui_apptest import errors

    at = _opened_with("postgresql+psycopg://distillery:distillery@127.0.0.1:5432/no_such_db", monkeypatch)
    assert at.title[0].value == "The database cannot be opened"
    shown = errors(at)
    assert "cannot open the database postgresql+psycopg://distillery:***@127.0.0.1:5432/no_such_db" in shown
    assert "the database does not exist: create it" in shown and "distillery:distillery@" not in shown


def test_a_read_only_sqlite_file_is_named_on_the_page(env, monkeypatch, tmp_path):
    from tests.ui_apptest import errors

    (tmp_path / "ro.db").write_bytes(b"")
    at = _opened_with(f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true", monkeypatch)
    shown = errors(at)
    assert at.title[0].value == "The database cannot be opened"
    assert "cannot open the database sqlite:///" in shown and "ro.db?mode=ro" in shown
    assert "the SQLite file or its folder is read-only" in shown


# --------------------------------------------------------------------------- the live intervals


def _intervals_with(**env: str):
    import os
    import subprocess
    import sys

    code = "from ui import state; print(state.LIVE_REFRESH_S, state.CHART_REFRESH_S)"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_the_live_intervals_are_configurable_and_a_bad_value_is_refused_by_name():
    assert _intervals_with(DISTILLERY_LIVE_REFRESH_S="2.5", DISTILLERY_CHART_REFRESH_S="60").stdout.split() == ["2.5", "60.0"]
    bad = _intervals_with(DISTILLERY_CHART_REFRESH_S="0")
    assert bad.returncode != 0
    assert "DISTILLERY_CHART_REFRESH_S must be a positive float (seconds between a live page's chart redraws), got '0'" in bad.stderr
