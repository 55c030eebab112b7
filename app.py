"""Distillery dashboard: `streamlit run app.py` (or `make run`)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="Distillery", page_icon="⚗️", layout="wide")

from kd_core.runner.supervisor import ensure_supervisor  # noqa: E402
from ui.state import app_frame, follow_nav_intent, get_store, masked_db_url  # noqa: E402 - after set_page_config

PAGES = [
    ("pages/new_experiment.py", "New experiment", "🧪", False),
    ("pages/runs.py", "Runs", "📋", True),
    ("pages/run_detail.py", "Run detail", "📈", False),
    ("pages/analysis.py", "Analysis", "🔬", False),
    ("pages/compare.py", "Compare", "⚖️", False),
    ("pages/playground.py", "Playground", "🎛️", False),
]

pages = [
    st.Page(path, title=title, icon=icon, default=default)
    for path, title, icon, default in PAGES
    if os.path.exists(HERE / path)
]
page = st.navigation(pages)
follow_nav_intent()  # a deep link that reached a page before st.navigation ran (see ui.state.ensure_app)

with st.sidebar:
    st.markdown("**Distillery** trains a small *student* network to imitate a big *teacher* "
                "(knowledge distillation) and shows what it learned.")
    try:
        url = get_store().url
        ensure_supervisor(url)  # one reconcile loop per server process: recovery does not wait for a page to be open
        st.caption(f"Database: `{masked_db_url(url)}`")
    except Exception as exc:  # noqa: BLE001 - say what is wrong instead of a blank app
        st.error(f"Cannot open the database: {exc}")
        st.stop()

with app_frame():
    page.run()
