"""Runs: every experiment in the database as a table you filter, sort and select; actions act on the selected rows.

Status always comes from the database; the server's supervisor loop (started by app.py) marks runs whose worker
died and starts queued ones, so this page only reads. The table refreshes itself every LIVE_REFRESH_S (10 s by default) while any run is
active. One ``list_runs`` query per render builds the whole table (no per-run queries), so 1,000 runs render in
well under 1 s. The accuracy columns come first so they fit at 1400 px; less used columns are opt-in.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from ui.badges import (
    STATUS_HELP,
    STATUS_STYLE,
    STATUSES,
    duration_text,
    eta_text,
    progress_fraction,
    recipe_text,
    trained_seconds,
)
from ui.state import (
    ACTIVE,
    LIVE_REFRESH_S,
    delete_run_files,
    ensure_app,
    flash,
    get_store,
    runner,
    show_flash,
)
from ui.sweep_view import progress_counts, progress_line

ensure_app(__file__)
store = get_store()
ss = st.session_state
PAGES_DIR = Path(__file__).resolve().parent
TABLE_KEY = "runs_table"
SORTS = {
    "Newest first": ("created", False),
    "Oldest first": ("created", True),
    "Best student accuracy": ("best_acc", False),
    "KD gain": ("kd_gain", False),
    "Longest trained": ("trained_s", False),
    "Name": ("name", True),
}


def _time_cell(run) -> str:
    """Time left while a run is active; afterwards the time it actually trained (across resumes)."""
    if run.status in ACTIVE:
        left = eta_text(run.progress or {})
        return left.split(" (")[0].replace("about ", "≈ ") if left else ""
    return duration_text(trained_seconds(run.summary, run.progress))


def build_frame(runs: list) -> pd.DataFrame:
    """One row per run, built in one pass over ``list_runs`` (no further queries)."""
    rows = []
    for r in runs:
        cfg, summary = r.config or {}, r.summary or {}
        teacher, student = cfg.get("teacher") or {}, cfg.get("student") or {}
        frac = progress_fraction(r.status, r.progress)
        rows.append({
            "id": r.id, "status": [r.status], "name": r.name,
            "best_acc": summary.get("student_acc"), "kd_gain": summary.get("kd_gain"), "teacher_acc": summary.get("teacher_acc"),
            "progress": None if frac is None else round(100 * frac, 1), "time": _time_cell(r),
            "dataset": (cfg.get("dataset") or {}).get("name", ""),
            "models": f"{teacher.get('arch', '?')} → {student.get('arch', '?')}", "recipe": recipe_text(cfg.get("recipe")),
            "last_acc": summary.get("student_last_acc"), "trained_s": trained_seconds(summary, r.progress),
            "created": datetime.fromtimestamp(r.created_at), "tags": ", ".join(r.tags or []), "hidden": bool(r.hidden),
            "_status": r.status, "_sweep": r.sweep_id,
        })
    df = pd.DataFrame(rows, columns=[*COLUMN_CONFIG, "trained_s", "_status", "_sweep"])
    for col in ("progress", "best_acc", "last_acc", "teacher_acc", "kd_gain", "trained_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


COLUMN_CONFIG = {
    "id": st.column_config.NumberColumn("#", width=44, format="%d"),
    "status": st.column_config.MultiselectColumn("Status", width=120, help=STATUS_HELP, options=STATUSES,
                                                 color=[color for color, _ in STATUS_STYLE.values()]),
    "name": st.column_config.TextColumn("Name", width=220),
    "best_acc": st.column_config.NumberColumn("Best acc", width=82, format="%.2f%%",
                                              help="Student test accuracy of its best checkpoint (picked on validation)."),
    "kd_gain": st.column_config.NumberColumn("KD gain", width=74, format="%+.2f",
                                             help="Student accuracy minus the CE-only baseline student (points): "
                                             "what distillation added."),
    "teacher_acc": st.column_config.NumberColumn("Teacher acc", width=92, format="%.2f%%", help="Test accuracy of the teacher."),
    "progress": st.column_config.ProgressColumn("Progress", width=104, min_value=0, max_value=100, format="%.0f%%",
                                                help="Over all phases: teacher, student, baseline, analysis."),
    "time": st.column_config.TextColumn("Time", width=86, help="While a run is active: the estimated time left. "
                                        "Afterwards: the time it actually trained, summed across resumes."),
    "dataset": st.column_config.TextColumn("Dataset", width=80),
    "models": st.column_config.TextColumn("Teacher → student", width=170),
    "recipe": st.column_config.TextColumn("Recipe", width=200, help="Weighted loss terms, e.g. 0.1·ce + 0.9·kd(T=4): "
                                          "10% true labels, 90% the teacher's softened predictions at temperature 4."),
    "last_acc": st.column_config.NumberColumn("Last acc", width=76, format="%.2f%%", help="Student test accuracy after the last epoch."),
    "created": st.column_config.DatetimeColumn("Created", width=130, format="YYYY-MM-DD HH:mm"),
    "tags": st.column_config.TextColumn("Tags", width=120),
    "hidden": st.column_config.CheckboxColumn("Hidden", width="small"),
}
ALWAYS = ("id", "status", "name", "best_acc", "kd_gain", "teacher_acc", "progress", "time", "dataset")
OPTIONAL = {"models": "teacher → student", "recipe": "recipe", "last_acc": "last acc", "created": "created", "tags": "tags"}


def _any_active() -> bool:
    return bool(store.list_runs(status=sorted(ACTIVE), include_hidden=True, limit=1))


def _switch(page: str, **query) -> None:
    if (PAGES_DIR / Path(page).name).exists():
        st.switch_page(page, query_params=query or None)
    st.warning(f"{page} is not available yet.")


# --------------------------------------------------------------------------- actions


def _act(ids: list[int], verb: str, fn) -> None:
    done, failed = [], []
    for rid in ids:
        try:
            result = fn(rid)
            done.append(f"#{rid}" + (f" → #{result}" if isinstance(result, int) and not isinstance(result, bool) else ""))
        except Exception as exc:  # noqa: BLE001 - report per run, keep going
            failed.append(f"#{rid}: {exc}")
    if done:
        flash(f"{verb}: {', '.join(done)}")
    if failed:
        flash(f"Could not {verb.lower()} " + "; ".join(failed), "error")


def _delete(ids: list[int]) -> None:
    notes = []
    for rid in ids:
        try:
            run = store.get_run(rid)
        except KeyError:
            continue
        if run.status in ACTIVE:
            notes.append(f"#{rid} is {run.status}: cancel it first")
            continue
        paths = store.delete_run(rid)
        problems = delete_run_files(run.uid, paths)
        notes.append(f"deleted #{rid}" + (f" (could not remove: {', '.join(problems)})" if problems else ""))
    flash("; ".join(notes) or "Nothing deleted.", "success" if all(n.startswith("deleted") for n in notes) else "warning")


def _set_tags(ids: list[int], tag: str, add: bool, by_id: dict) -> None:
    tag = tag.strip()
    if not tag:
        flash("Type a tag first.", "warning")
        return
    for rid in ids:
        tags = list(by_id[rid].tags or [])
        if add and tag not in tags:
            tags.append(tag)
        elif not add:
            tags = [t for t in tags if t != tag]
        store.update_run(rid, tags=tags)
    flash(f"{'Tagged' if add else 'Untagged'} {', '.join(f'#{i}' for i in ids)} “{tag}”.")


# --------------------------------------------------------------------------- page


def filtered(df: pd.DataFrame) -> pd.DataFrame:
    """The filter row, and the rows it keeps, sorted."""
    f = st.columns([2, 2, 3, 2, 1.3], vertical_alignment="bottom")
    f[0].multiselect("Status", STATUSES, key="runs_status", placeholder="any")
    f[1].multiselect("Dataset", sorted({d for d in df["dataset"] if d}), key="runs_dataset", placeholder="any")
    f[2].text_input("Search", key="runs_search", placeholder="name, tag or #id")
    f[3].selectbox("Sort", list(SORTS), key="runs_sort")
    f[4].checkbox("Show hidden", key="runs_show_hidden")
    view = df
    if ss.get("runs_status"):
        view = view[view["_status"].isin(ss["runs_status"])]
    if ss.get("runs_dataset"):
        view = view[view["dataset"].isin(ss["runs_dataset"])]
    text = (ss.get("runs_search") or "").strip().lower()
    if text:
        hay = view["name"].str.lower() + " " + view["tags"].str.lower() + " #" + view["id"].astype(str)
        view = view[hay.str.contains(text, regex=False)]
    col, ascending = SORTS[ss.get("runs_sort") or "Newest first"]
    return view.sort_values([col, "id"], ascending=[ascending, ascending], na_position="last").reset_index(drop=True)


def table(view: pd.DataFrame, key: str = TABLE_KEY) -> list[int]:
    """The grid; returns the ids of the selected rows."""
    extra = [c for c in ss.get("runs_columns") or [] if c in OPTIONAL]
    shown = [*ALWAYS, *extra] + (["hidden"] if ss.get("runs_show_hidden") else [])
    event = st.dataframe(
        view, key=key, on_select="rerun", selection_mode="multi-row", hide_index=True,
        column_order=shown, column_config=COLUMN_CONFIG, placeholder="–", height=min(38 + 35 * max(len(view), 3), 560),
    )
    rows = [i for i in (event.selection.rows if event is not None else []) if i < len(view)]
    return [int(view["id"].iloc[i]) for i in rows]


def sweep_groups(df: pd.DataFrame, view: pd.DataFrame) -> list[int]:
    """One collapsed expander per sweep with rows in ``view``: its progress, a link to its page and its runs (selectable
    like the main table); returns the ids selected in them."""
    sweeps = {s.id: s for s in store.list_sweeps()} if view["_sweep"].notna().any() else {}
    chosen: list[int] = []
    for sweep_id, part in view[view["_sweep"].notna()].groupby("_sweep", sort=False):
        sweep_id = int(sweep_id)
        sweep = sweeps.get(sweep_id)
        everything = df[df["_sweep"] == sweep_id]  # progress of the whole grid, whatever the filters hide
        line = progress_line(progress_counts(pd.DataFrame({"status": everything["_status"]})))
        with st.expander(f"Sweep #{sweep_id} {sweep.name if sweep else ''} — {line}", icon=":material/grid_view:"):
            st.page_link("pages/sweep.py", label="Open the Sweeps page: results per value, mean ± spread over seeds",
                         query_params={"sweep": str(sweep_id)}, icon=":material/grid_view:")
            chosen += table(part.reset_index(drop=True), key=f"{TABLE_KEY}_sweep_{sweep_id}")
    return chosen


def action_buttons(ids: list[int], by_id: dict) -> None:
    statuses = {rid: by_id[rid].status for rid in ids if rid in by_id}
    b = st.columns(8)
    one = len(ids) == 1
    if b[0].button("Open", disabled=not one, width="stretch", help="Curves and results of this run", icon=":material/open_in_new:"):
        _switch("pages/run_detail.py", run=str(ids[0]))
    if b[1].button("Compare", disabled=len(ids) < 2, width="stretch", help="Overlay the selected runs", icon=":material/compare_arrows:"):
        _switch("pages/compare.py", runs=",".join(str(i) for i in sorted(ids)))
    can_cancel = [i for i, s in statuses.items() if s in ACTIVE and s != "cancelling"]
    if b[2].button("Cancel", disabled=not can_cancel, width="stretch", icon=":material/stop:",
                   help="Stop the selected queued or running runs (they checkpoint first, so they can resume)"):
        _act(can_cancel, "Cancelled", lambda rid: runner.cancel(store, rid))
        st.rerun()
    can_resume = [i for i, s in statuses.items() if s in ("failed", "cancelled")]
    if b[3].button("Resume", disabled=not can_resume, width="stretch", icon=":material/play_arrow:",
                   help="Continue failed or cancelled runs from their last checkpoint"):
        _act(can_resume, "Resumed", lambda rid: runner.resume(store, rid))
        st.rerun()
    if b[4].button("Rerun as is", width="stretch", help="Start a new run with exactly the same config", icon=":material/replay:"):
        _act(ids, "Rerun", lambda rid: runner.rerun(store, rid))
        st.rerun()
    if b[5].button("Edit and rerun", disabled=not one, width="stretch", icon=":material/edit:",
                   help="Open this run's config in the New experiment form to change it before launching"):
        ss["prefill_config"] = dict(by_id[ids[0]].config)
        ss["prefill_parent_id"] = ids[0]
        _switch("pages/new_experiment.py")
    any_hidden = any(by_id[i].hidden for i in ids if i in by_id)
    if b[6].button("Unhide" if any_hidden else "Hide", width="stretch", icon=":material/visibility_off:",
                   help="Hidden runs stay in the database but leave the default list (tick 'Show hidden' to see them)"):
        for rid in ids:
            store.update_run(rid, hidden=not any_hidden)
        flash(f"{'Unhid' if any_hidden else 'Hid'} {', '.join(f'#{i}' for i in ids)}.")
        st.rerun()
    if b[7].button("Delete…", width="stretch", help="Remove the runs with their metrics and files (asks first)", icon=":material/delete:"):
        ss["runs_confirm_delete"] = ids


def tag_row(ids: list[int], by_id: dict) -> None:
    t = st.columns([3, 1, 1, 3], vertical_alignment="bottom")
    t[0].text_input("Tag", key="runs_tag", placeholder="e.g. baseline-sweep", label_visibility="collapsed")
    for col, label, add in ((t[1], "Add tag", True), (t[2], "Remove tag", False)):
        if col.button(label, width="stretch"):
            _set_tags(ids, ss.get("runs_tag", ""), add, by_id)
            st.rerun()


def confirm_delete(by_id: dict) -> None:
    pending = ss.get("runs_confirm_delete")
    if not pending:
        return
    busy = [i for i in pending if by_id.get(i) and by_id[i].status in ACTIVE]
    with st.container(border=True):
        st.warning(f"Delete {', '.join(f'#{i}' for i in pending)} with all their metrics, checkpoints and reports? "
                   "This cannot be undone." + (f" Active runs ({', '.join(f'#{i}' for i in busy)}) are skipped: "
                                               "cancel them first." if busy else ""))
        d = st.columns([1, 1, 4])
        if d[0].button("Yes, delete", type="primary", width="stretch"):
            ss.pop("runs_confirm_delete", None)
            _delete(pending)
            st.rerun()
        if d[1].button("Keep them", width="stretch"):
            ss.pop("runs_confirm_delete", None)
            st.rerun()


st.title("Runs")
top = st.columns([4, 1], vertical_alignment="center")
top[0].caption("Every experiment, newest first. Click rows (the boxes on the left) to select them, then use the "
               "buttons below the table. Click a column header to sort.")
top[1].page_link("pages/new_experiment.py", label="New experiment", icon=":material/science:")
live = _any_active()


@st.fragment(run_every=LIVE_REFRESH_S if live else None)
def runs_view() -> None:
    show_flash()
    runs = store.list_runs(include_hidden=ss.get("runs_show_hidden", False))
    if (any(r.status in ACTIVE for r in runs) or _any_active()) != live:
        st.rerun()  # start or stop the 2 s refresh
    if not runs and not ss.get("runs_search") and not ss.get("runs_status"):
        st.info("No runs yet. Start one on **New experiment**: its presets say what they train and, once they have "
                "run here, how long that took.")
        st.checkbox("Show hidden runs", key="runs_show_hidden")
        return
    df = build_frame(runs)
    view = filtered(df)
    single = view[view["_sweep"].isna()].reset_index(drop=True)
    grouped = view["_sweep"].notna().any()
    ids = table(single) if len(single) or not grouped else []  # runs launched one by one, as before
    ids += sweep_groups(df, view)  # runs of a sweep: grouped under it, collapsed
    c = st.columns([3, 2], vertical_alignment="center")
    c[0].caption(f"{len(view)} of {len(df)} runs shown" + (f" · refreshing every {LIVE_REFRESH_S:g} s while runs are active" if live else ""))
    c[1].multiselect("More columns", list(OPTIONAL), key="runs_columns", format_func=OPTIONAL.get, placeholder="more columns",
                     label_visibility="collapsed", help="Columns left out so that accuracy and KD gain fit without scrolling.")
    if not ids:
        st.caption("Select one or more rows to open, compare, cancel, resume, rerun, hide, tag or delete them.")
        return
    by_id = {r.id: r for r in runs}
    st.markdown(f"**Selected:** {', '.join(f'#{i}' for i in ids)}")
    action_buttons(ids, by_id)
    tag_row(ids, by_id)
    confirm_delete(by_id)


runs_view()
