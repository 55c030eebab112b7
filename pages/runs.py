"""Runs: every experiment in the database as a table you filter, sort and select; actions act on the selected rows.

Status always comes from the database. ``kd_core.runner.reconcile`` runs on every render (it marks runs whose worker
died as failed and starts queued runs), and the table refreshes itself every 2 s while any run is active.
One ``list_runs`` query per render builds the whole table (no per-run queries), so 1,000 runs render in well under 1 s.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from ui.badges import STATUS_BADGE, STATUS_HELP, duration_text, progress_fraction, recipe_text, status_badge
from ui.state import ACTIVE, delete_run_files, ensure_app, flash, get_store, reconcile, runner, show_flash

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
    "Longest": ("duration_s", False),
    "Name": ("name", True),
}


def build_frame(runs: list) -> pd.DataFrame:
    """One row per run, built in one pass over ``list_runs`` (no further queries)."""
    now = time.time()
    rows = []
    for r in runs:
        cfg = r.config or {}
        summary = r.summary or {}
        teacher = cfg.get("teacher") or {}
        student = cfg.get("student") or {}
        started = r.started_at
        if summary.get("duration_s") is not None:
            duration = summary.get("duration_s")
        elif started:
            duration = (r.finished_at or (now if r.status in ACTIVE else r.heartbeat_at or now)) - started
        else:
            duration = None
        frac = progress_fraction(r.status, r.progress)
        eta = (r.progress or {}).get("eta_s") if r.status in ("running", "starting") else None
        rows.append({
            "id": r.id,
            "status": status_badge(r.status),
            "name": r.name,
            "progress": None if frac is None else round(100 * frac, 1),
            "eta": duration_text(eta) if eta else "",
            "dataset": (cfg.get("dataset") or {}).get("name", ""),
            "models": f"{teacher.get('arch', '?')} → {student.get('arch', '?')}",
            "recipe": recipe_text(cfg.get("recipe")),
            "best_acc": summary.get("student_acc"),
            "last_acc": summary.get("student_last_acc"),
            "teacher_acc": summary.get("teacher_acc"),
            "kd_gain": summary.get("kd_gain"),
            "duration": duration_text(duration),
            "duration_s": duration,
            "created": datetime.fromtimestamp(r.created_at),
            "tags": ", ".join(r.tags or []),
            "hidden": bool(r.hidden),
            "_status": r.status,
        })
    columns = ["id", "status", "name", "progress", "eta", "dataset", "models", "recipe", "best_acc", "last_acc",
               "teacher_acc", "kd_gain", "duration", "duration_s", "created", "tags", "hidden", "_status"]
    df = pd.DataFrame(rows, columns=columns)
    for col in ("progress", "best_acc", "last_acc", "teacher_acc", "kd_gain", "duration_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


COLUMN_CONFIG = {
    "id": st.column_config.NumberColumn("#", width=44, format="%d"),
    "status": st.column_config.TextColumn("Status", width=118, help=STATUS_HELP),
    "name": st.column_config.TextColumn("Name", width=210),
    "progress": st.column_config.ProgressColumn("Progress", width=110, min_value=0, max_value=100, format="%.0f%%",
                                                help="Over all phases: teacher, student, baseline."),
    "eta": st.column_config.TextColumn("ETA", width=64, help="Estimated time left (while running)."),
    "dataset": st.column_config.TextColumn("Dataset", width=80),
    "models": st.column_config.TextColumn("Teacher → student"),
    "recipe": st.column_config.TextColumn("Recipe", help="Weighted loss terms, e.g. 0.1·ce + 0.9·kd(T=4): "
                                          "10% true labels, 90% the teacher's softened predictions at temperature 4."),
    "best_acc": st.column_config.NumberColumn("Best acc", width=76, format="%.2f%%",
                                              help="Student test accuracy of its best checkpoint (picked on validation)."),
    "kd_gain": st.column_config.NumberColumn("KD gain", width=70, format="%+.2f",
                                             help="Student accuracy minus the CE-only baseline student (points): "
                                             "what distillation added."),
    "last_acc": st.column_config.NumberColumn("Last acc", width=76, format="%.2f%%", help="Student test accuracy after the last epoch."),
    "teacher_acc": st.column_config.NumberColumn("Teacher acc", width=86, format="%.2f%%", help="Test accuracy of the teacher."),
    "duration": st.column_config.TextColumn("Duration", width=76),
    "created": st.column_config.DatetimeColumn("Created", format="YYYY-MM-DD HH:mm"),
    "tags": st.column_config.TextColumn("Tags"),
    "hidden": st.column_config.CheckboxColumn("Hidden", width="small"),
}


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

st.title("Runs")
top = st.columns([4, 1], vertical_alignment="center")
top[0].caption("Every experiment, newest first. Click rows (the boxes on the left) to select them, then use the "
               "buttons below the table. Click a column header to sort.")
if (PAGES_DIR / "new_experiment.py").exists():
    top[1].page_link("pages/new_experiment.py", label="New experiment", icon="🧪")

live = _any_active()


@st.fragment(run_every=2 if live else None)
def runs_view() -> None:
    reconcile(store)
    show_flash()
    show_hidden = ss.get("runs_show_hidden", False)
    runs = store.list_runs(include_hidden=show_hidden)
    active_now = any(r.status in ACTIVE for r in runs) or _any_active()
    if active_now != live:
        st.rerun()  # start or stop the 2 s refresh
    if not runs and not ss.get("runs_search") and not ss.get("runs_status"):
        st.info("No runs yet. Start one on **New experiment** — the preset “MNIST-5k KD in one minute” trains on a "
                "laptop CPU in about a minute.")
        st.checkbox("Show hidden runs", key="runs_show_hidden")
        return
    df = build_frame(runs)

    f = st.columns([2, 2, 3, 2, 1.3], vertical_alignment="bottom")
    f[0].multiselect("Status", list(STATUS_BADGE), key="runs_status", placeholder="any")
    datasets = sorted({d for d in df["dataset"] if d})
    f[1].multiselect("Dataset", datasets, key="runs_dataset", placeholder="any")
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
    view = view.sort_values([col, "id"], ascending=[ascending, ascending], na_position="last").reset_index(drop=True)

    shown = [c for c in COLUMN_CONFIG if c != "hidden" or show_hidden]
    event = st.dataframe(
        view, key=TABLE_KEY, on_select="rerun", selection_mode="multi-row", hide_index=True,
        column_order=shown, column_config=COLUMN_CONFIG, placeholder="–", height=min(38 + 35 * max(len(view), 3), 560),
    )
    rows = [i for i in (event.selection.rows if event is not None else []) if i < len(view)]
    ids = [int(view["id"].iloc[i]) for i in rows]
    by_id = {r.id: r for r in runs}
    statuses = {rid: by_id[rid].status for rid in ids if rid in by_id}
    note = f"{len(view)} of {len(df)} runs shown"
    if live:
        note += " · refreshing every 2 s while runs are active"
    st.caption(note)

    if not ids:
        st.caption("Select one or more rows to open, compare, cancel, resume, rerun, hide, tag or delete them.")
        return
    st.markdown(f"**Selected:** {', '.join(f'#{i}' for i in ids)}")
    b = st.columns(8)
    one = len(ids) == 1
    if b[0].button("Open", disabled=not one, width="stretch", help="Curves and results of this run"):
        _switch("pages/run_detail.py", run=str(ids[0]))
    if b[1].button("Compare", disabled=len(ids) < 2, width="stretch", help="Overlay the selected runs"):
        _switch("pages/compare.py", runs=",".join(str(i) for i in sorted(ids)))
    can_cancel = [i for i, s in statuses.items() if s in ACTIVE and s != "cancelling"]
    if b[2].button("Cancel", disabled=not can_cancel, width="stretch",
                   help="Stop the selected queued or running runs (they checkpoint first, so they can resume)"):
        _act(can_cancel, "Cancelled", lambda rid: runner.cancel(store, rid))
        st.rerun()
    can_resume = [i for i, s in statuses.items() if s in ("failed", "cancelled")]
    if b[3].button("Resume", disabled=not can_resume, width="stretch",
                   help="Continue failed or cancelled runs from their last checkpoint"):
        _act(can_resume, "Resumed", lambda rid: runner.resume(store, rid))
        st.rerun()
    if b[4].button("Rerun as is", width="stretch", help="Start a new run with exactly the same config"):
        _act(ids, "Rerun", lambda rid: runner.rerun(store, rid))
        st.rerun()
    if b[5].button("Edit and rerun", disabled=not one, width="stretch",
                   help="Open this run's config in the New experiment form to change it before launching"):
        ss["prefill_config"] = dict(by_id[ids[0]].config)
        ss["prefill_parent_id"] = ids[0]
        _switch("pages/new_experiment.py")
    any_hidden = any(by_id[i].hidden for i in ids if i in by_id)
    if b[6].button("Unhide" if any_hidden else "Hide", width="stretch",
                   help="Hidden runs stay in the database but leave the default list (tick 'Show hidden' to see them)"):
        for rid in ids:
            store.update_run(rid, hidden=not any_hidden)
        flash(f"{'Unhid' if any_hidden else 'Hid'} {', '.join(f'#{i}' for i in ids)}.")
        st.rerun()
    if b[7].button("Delete…", width="stretch", help="Remove the runs with their metrics and files (asks first)"):
        ss["runs_confirm_delete"] = ids

    t = st.columns([3, 1, 1, 3], vertical_alignment="bottom")
    t[0].text_input("Tag", key="runs_tag", placeholder="e.g. baseline-sweep", label_visibility="collapsed")
    if t[1].button("Add tag", width="stretch"):
        _set_tags(ids, ss.get("runs_tag", ""), True, by_id)
        st.rerun()
    if t[2].button("Remove tag", width="stretch"):
        _set_tags(ids, ss.get("runs_tag", ""), False, by_id)
        st.rerun()

    pending = ss.get("runs_confirm_delete")
    if pending:
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


runs_view()
