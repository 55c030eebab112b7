"""Analysis: what the student learned from the teacher, beyond accuracy.

Five views of one run (or two runs side by side with "Compare with"), one module each under ``ui/analysis/``:
layer similarity (CKA) during training, class prototypes and 2-D embeddings, attribution maps, teacher-vs-student
agreement and calibration, and a disagreement explorer that links them (pick a bucket or lasso points in the
embedding → see those images, the models' predictions and their attribution maps).

Everything is read from the artifacts the run wrote (ANALYSIS_ARTIFACTS.md); the page computes nothing itself.
Only the open tab is drawn, and it reads only what it shows (the first tab never loads the tensors). The run comes
from ``?run=<id>`` (selectbox fallback), the second run from ``?with=<id>``.
"""

from __future__ import annotations

import streamlit as st

from ui import results
from ui import state as ui_state
from ui.analysis.agreement import agreement_view
from ui.analysis.attribution import attribution_view
from ui.analysis.cka import cka_view
from ui.analysis.common import TAB_KEY, TABS, side_by_side
from ui.analysis.data import RunData, missing_message
from ui.analysis.explorer import explorer_view
from ui.analysis.prototypes import prototypes_view

VIEWS = {"cka": cka_view, "prototypes": prototypes_view, "attribution": attribution_view, "agreement": agreement_view,
         "explorer": explorer_view}


def _label(run) -> str:
    return f"#{run.id} {run.name} — {run.status}"


def pick_runs(store):
    """The run from ?run= (selectbox fallback) and an optional second run from ?with=."""
    runs = store.list_runs(limit=500)
    by_id = {r.id: r for r in runs}
    wanted = results.parse_run_ids(st.query_params.get("run"))
    other = results.parse_run_ids(st.query_params.get("with"))
    for rid in wanted[:1] + other[:1]:
        if rid not in by_id:
            try:
                by_id[rid] = store.get_run(rid)
            except KeyError:
                st.warning(f"Run #{rid} does not exist (deleted?). Pick another one below.")
    if not by_id:
        st.info("No runs yet. Start one on the **New experiment** page; its analysis appears here when it finishes.")
        return None, None
    ids = sorted(by_id, reverse=True)
    first = wanted[0] if wanted and wanted[0] in by_id else ids[0]
    c1, c2 = st.columns([3, 2])
    chosen = c1.selectbox("Run", ids, index=ids.index(first), format_func=lambda i: _label(by_id[i]), key="an_run",
                          help="The run analysed on this page. The address bar (?run=…) keeps it, so you can share the link.")
    options = [None] + [i for i in ids if i != chosen]
    second = other[0] if other and other[0] in options else None
    versus = c2.selectbox("Compare with (optional)", options, index=options.index(second),
                          format_func=lambda i: "— nobody —" if i is None else _label(by_id[i]), key="an_with",
                          help="Show the same views for a second run side by side (e.g. another loss or temperature).")
    _keep_in_address(chosen, versus)
    return by_id[chosen], (by_id[versus] if versus is not None else None)


def _keep_in_address(run_id: int, versus: int | None) -> None:
    if st.query_params.get("run") != str(run_id):
        st.query_params["run"] = str(run_id)
    if versus is None:
        st.query_params.pop("with", None)
    elif st.query_params.get("with") != str(versus):
        st.query_params["with"] = str(versus)


def status_notes(datas: list[RunData], run) -> bool:
    """Say why a run has no (or not yet its full) analysis; False when there is nothing at all to show."""
    for d in datas:
        if not d.complete:
            (st.info if d.cka or d.run.status in ui_state.ACTIVE else st.warning)(f"**{d.label}:** {d.error or missing_message(d)}")
        if d.run.status in ui_state.ACTIVE:
            st.button("Refresh", key=f"an_refresh_{d.run.id}", icon=":material/refresh:", help="Load the checkpoints written since.")
    if any(d.complete or d.cka for d in datas):
        return True
    st.page_link("pages/run_detail.py", label="Open the run's detail page", icon=":material/monitoring:", query_params={"run": str(run.id)})
    return False


def main() -> None:
    st.title("Analysis")
    st.caption("What did the student learn from the teacher, beyond accuracy? Layer similarity during training, "
               "class geometry of the embeddings, where the models look, and where they disagree — all computed "
               "by the run itself on held-out test images.")
    store = ui_state.get_store()
    run, versus = pick_runs(store)
    if run is None:
        return
    datas = [RunData(store, r) for r in (run, versus) if r is not None]
    if not status_notes(datas, run):
        return
    tabs = st.tabs(list(TABS.values()), key=TAB_KEY, on_change="rerun")
    for tab, view in zip(tabs, VIEWS.values()):
        if tab.open is not False:
            with tab:
                side_by_side(datas, view)


ui_state.ensure_app(__file__)  # a deep link on a fresh server: hand over to app.py (navigation, page config)
main()
