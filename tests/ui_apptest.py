"""Shared by the dashboard's AppTest modules: a fresh database per test, the app, and what a user reads.

Import the fixtures into a test module (``from tests.ui_apptest import env, no_dispatch``). ``env`` points the
app at its own SQLite file, artifacts and data folder; ``no_dispatch`` keeps the runner from starting worker
processes, so runs stay where the test put them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60
TINY_YAML = """
name: tiny digits
seed: 3
device: cpu
dataset: {name: digits, val_fraction: 0.0, subset: 200}
teacher: {arch: cnn_tiny, source: random, epochs: 1}
student:
  arch: cnn_tiny
  epochs: 1
  batch_size: 64
  optimizer: {name: adamw, lr: 0.003, weight_decay: 0.0001}
  scheduler: none
recipe:
  - {loss: ce, weight: 0.5}
  - {loss: kd, weight: 0.5, params: {temperature: 2}}
baseline: false
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh database, artifacts and data folder for the app; Streamlit's caches cleared around the test."""
    import streamlit as st

    from storage import Store

    url = f"sqlite:///{tmp_path / 'dash.db'}"
    monkeypatch.setenv("DISTILLERY_DB_URL", url)
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("DISTILLERY_ALLOWED_ROOTS", raising=False)
    st.cache_resource.clear()
    st.cache_data.clear()
    store = Store(url)
    yield store
    stop_runs(store)
    store.dispose()
    st.cache_resource.clear()


def stop_runs(store) -> None:
    """Cancel what a test left queued or running: the server's supervisor thread outlives the test and would
    otherwise start workers for it (training in the background, writing into the next test's folders)."""
    from kd_core import runner

    for run in store.list_runs(status=sorted(runner.ACTIVE_STATUSES), include_hidden=True):
        runner.cancel(store, run.id)


@pytest.fixture
def no_dispatch(monkeypatch):
    import kd_core.runner as runner

    monkeypatch.setattr(runner, "dispatch", lambda store, executor: [])


def app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def open_page(page: str, **query: str) -> AppTest:
    at = app()
    at.switch_page(page)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def new_experiment() -> AppTest:
    return open_page("pages/new_experiment.py")


def errors(at: AppTest) -> str:
    return "\n".join(e.value for e in at.error)


def warnings(at: AppTest) -> str:
    return "\n".join(w.value for w in at.warning)


def launch_button(at: AppTest):
    return next(b for b in at.button if b.label == "Launch")


def paste_yaml(at: AppTest, text: str) -> None:
    at.text_area(key="nx_import_text").set_value(text)
    at.button(key="nx_import_btn").click().run()
    assert not at.exception, at.exception


def shown_yaml(at: AppTest) -> dict:
    return yaml.safe_load(at.code[-1].value)


def texts(at: AppTest) -> str:
    """Everything a user reads on the page: markdown, captions, alerts, progress bars, metric labels and values."""
    parts = [e.proto.text for e in at.get("progress")] + [e.value for kind in ("markdown", "caption", "info", "success", "warning", "error", "title", "subheader")
             for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(str(p) for p in parts)
