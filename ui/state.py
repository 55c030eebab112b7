"""App-wide state: the Store, the runner (imported lazily), allowed paths, flash messages.

Everything that must survive a page refresh or be seen by another tab lives in the database; Session State only
holds what one browser tab is doing (form values, a pending confirmation, a one-shot message).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import streamlit as st

from kd_core import runner
from kd_core.runner.base import positive_env
from kd_core.settings import data_home, resolve_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- navigation guard


def ensure_app(page_file: str) -> None:
    """Make a deep link work on a freshly started server.

    Until some session has run app.py (which calls ``st.navigation``), Streamlit treats the ``pages/`` folder as a
    legacy multipage app: a URL like ``/runs`` runs ``pages/runs.py`` alone, without app.py's page config, sidebar
    and navigation. Call this at the top of every page: in that legacy mode it hands over to app.py, which then
    opens the page that was asked for, with its query parameters.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory and not getattr(_APP, "running", False) and not _under_apptest():
        rel = Path(page_file).resolve().relative_to(PROJECT_ROOT).as_posix()
        st.session_state["_nav_intent"] = (rel, st.query_params.to_dict())
        st.switch_page(str(PROJECT_ROOT / "app.py"))


def _under_apptest() -> bool:
    """AppTest routes every run through the legacy pages/ mode; the pages work there, so no hand-over."""
    from unittest.mock import Mock

    from streamlit.runtime import Runtime

    return isinstance(getattr(Runtime, "_instance", None), Mock)


_APP = threading.local()  # app.py sets .running while it runs the page, in the script thread


class app_frame:
    """``with app_frame(): page.run()`` in app.py marks the page as run through the app's navigation."""

    def __enter__(self) -> None:
        _APP.running = True

    def __exit__(self, *exc: object) -> None:
        _APP.running = False


def follow_nav_intent() -> None:
    """Called by app.py after ``st.navigation``: open the page a legacy-routed deep link asked for."""
    intent = st.session_state.pop("_nav_intent", None)
    if intent:
        st.switch_page(intent[0], query_params=intent[1] or None)


# --------------------------------------------------------------------------- store


@st.cache_resource(show_spinner=False)
def _store_for(url: str):
    from storage import Store

    return Store(url)


def get_store():
    """The app's :class:`storage.Store`, one per database URL for the whole server (thread-safe)."""
    from storage.db import default_db_url

    return _store_for(default_db_url())


ACTIVE = runner.ACTIVE_STATUSES
# How often a page showing an active run polls the database for its status (Run detail's badge and progress, the
# Runs grid), and how often the charts of a live page (Run detail's results, Compare's curves) are rebuilt, each in
# its own fragment. Every rerun is drawn again by the browser, on the machine that trains when it is the same one:
# with three tabs on a live run (bench/server_cpu.py, 2 cores) Chromium took 15 % of a core with 5 s / 15 s,
# 11-12 % with 5 s / 30 s and 7-9 % with 10 s / 30 s, and the run trained 0.82x, 0.90x and 0.88-0.97x (three
# bench runs) as fast as with no tab. TensorBoard reloads every 30 s.
LIVE_REFRESH_S: float = positive_env("DISTILLERY_LIVE_REFRESH_S", 10.0, float, "seconds between a live page's status polls")
CHART_REFRESH_S: float = positive_env("DISTILLERY_CHART_REFRESH_S", 30.0, float, "seconds between a live page's chart redraws")


# --------------------------------------------------------------------------- paths


def uploads_dir() -> Path:
    return data_home() / "uploads"


def delete_run_files(run_uid: str, paths: list[str]) -> list[str]:
    """Remove a deleted run's artifact files and its folder; return what could not be removed."""
    from kd_core.settings import artifacts_root, run_dir

    root = Path(artifacts_root()).resolve()
    problems: list[str] = []
    for p in paths:
        target = resolve_path(p)
        if not target.is_relative_to(root):
            problems.append(f"{p} (outside the artifacts folder, left alone)")
            continue
        try:
            target.unlink(missing_ok=True)
        except OSError as exc:
            problems.append(f"{p} ({exc.strerror})")
    folder = run_dir(run_uid)
    if folder.is_relative_to(root) and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            problems.append(str(folder))
    return problems


# --------------------------------------------------------------------------- one-shot messages


def flash(message: str, kind: str = "success") -> None:
    """Show ``message`` once on the next render (survives st.rerun / st.switch_page)."""
    st.session_state.setdefault("_flash", []).append((kind, message))


def show_flash() -> None:
    for kind, message in st.session_state.pop("_flash", []):
        getattr(st, kind, st.info)(message)


def run_label(run: Any) -> str:
    return f"#{run.id} {run.name}"
