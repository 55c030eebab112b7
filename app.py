"""Distillery dashboard: `streamlit run app.py` (or `make run`)."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="Distillery", page_icon=":material/science:", layout="wide")

from kd_core.runner.supervisor import ensure_supervisor  # noqa: E402
from storage import StoreUnavailable, masked_url  # noqa: E402
from ui.state import app_frame, follow_nav_intent, get_store  # noqa: E402 - after set_page_config

PAGES = [
    ("pages/new_experiment.py", "New experiment", ":material/science:", False),
    ("pages/runs.py", "Runs", ":material/list_alt:", True),
    ("pages/run_detail.py", "Run detail", ":material/monitoring:", False),
    ("pages/analysis.py", "Analysis", ":material/biotech:", False),
    ("pages/compare.py", "Compare", ":material/compare_arrows:", False),
    ("pages/playground.py", "Playground", ":material/tune:", False),
    ("pages/sweep.py", "Sweeps", ":material/grid_view:", False),
]

page = st.navigation([st.Page(path, title=title, icon=icon, default=default) for path, title, icon, default in PAGES])
follow_nav_intent()  # a deep link that reached a page before st.navigation ran (see ui.state.ensure_app)

with st.sidebar:
    st.markdown("**Distillery** trains a small *student* network to imitate a big *teacher* "
                "(knowledge distillation) and shows what it learned.")
try:
    url = get_store().url
except StoreUnavailable as exc:  # the page says what is wrong and how to fix it, instead of a traceback
    st.title("The database cannot be opened")
    st.error(str(exc), icon=":material/database:")
    st.caption("Fix it and reload this page. The database is chosen with DISTILLERY_DB_URL "
               "(default: SQLite in the data folder); see the README's Configuration section.")
    st.stop()
ensure_supervisor(url)  # one reconcile loop per server process: recovery does not wait for a page to be open
st.sidebar.caption(f"Database: `{masked_url(url)}`")

with app_frame():
    page.run()
