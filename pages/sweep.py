"""Sweeps: a grid of runs launched together (from the form's "Sweep over" section, a YAML file with a ``sweep:``
section, or ``python -m kd_core sweep FILE``), followed and summarised on one page.

The sweep comes from ``?sweep=ID`` (kept in sync with the picker, so a sweep can be bookmarked). Everything shown is
read from the database on each render (``kd_core.sweeps.sweep_runs``). While any run of the sweep is active, a small
fragment reads the sweep's rows again every LIVE_REFRESH_S (10 s by default) and redraws the page only when one of
them changed (a run started, finished or failed): its results change with nothing else, and every redraw of its
tables and plots costs the browser, on the machine that trains when it is the same one.
"""

from __future__ import annotations

import time

import streamlit as st
import yaml

from kd_core.config import ConfigError
from kd_core.sweeps import cancel_sweep, resume_sweep, submit_sweep, sweep_runs
from ui import charts
from ui import sweep_view as sv
from ui.png_button import png_button
from ui.state import ACTIVE, LIVE_REFRESH_S, PROJECT_ROOT, ensure_app, flash, get_store, show_flash

ensure_app(__file__)
store = get_store()
ss = st.session_state
PRESET = "configs/sweeps/mnist5k_temperature.yaml"
PICK_KEY = "sw_pick"


# --------------------------------------------------------------------------- the temperature preset


def _launch_preset() -> None:
    """Button callback: queue the shipped temperature sweep and select it."""
    last = ss.get("_sw_preset_at", 0.0)
    if time.time() - last < 3:
        return  # a double click: the first one launched it
    try:
        sweep_id = submit_sweep(store, yaml.safe_load((PROJECT_ROOT / PRESET).read_text()))
    except ConfigError as exc:
        flash("The preset was not launched:\n" + "\n".join(f"- `{p}`: {m}" for p, m in exc.errors), "error")
        return
    ss["_sw_preset_at"] = time.time()
    ss[PICK_KEY] = sweep_id
    st.query_params["sweep"] = str(sweep_id)
    flash(f"Launched sweep #{sweep_id} from {PRESET}.")


def preset_box() -> None:
    with st.container(border=True):
        c = st.columns([5, 2], vertical_alignment="center")
        c[0].markdown("**What does temperature do?** KD on mnist5k (cnn_small → cnn_tiny) at T = 1, 2, 4, 8 and 16, two "
                      "seeds each: a lecturer sees student accuracy and KD gain rise and fall with T, next to the CE-only "
                      "baseline, with the spread over seeds.")
        c[0].caption(f"`{PRESET}` · 10 student runs; the teacher is trained once and the baseline once per seed.")
        c[1].button("Launch the temperature preset", on_click=_launch_preset, key="sw_preset", icon=":material/rocket_launch:",
                    width="stretch", help="Queues the runs now; they start as worker slots free up.")


# --------------------------------------------------------------------------- picking a sweep


def pick_sweep(sweeps: list):
    by_id = {s.id: s for s in sweeps}
    asked = st.query_params.get("sweep")
    if PICK_KEY not in ss or ss[PICK_KEY] not in by_id:
        wanted = int(asked) if asked and asked.isdigit() else None
        if asked and wanted not in by_id:
            st.warning(f"Sweep {asked} does not exist (deleted?); showing the newest one.")
        ss[PICK_KEY] = wanted if wanted in by_id else sweeps[0].id
    chosen = st.selectbox("Sweep", list(by_id), key=PICK_KEY, help="The address bar (?sweep=…) remembers the choice.",
                          format_func=lambda i: f"#{i} {by_id[i].name} — {', '.join(by_id[i].spec.get('axes', {}))}")
    if st.query_params.get("sweep") != str(chosen):
        st.query_params["sweep"] = str(chosen)
    return by_id[chosen]


def overview(sweeps: list) -> None:
    """Every sweep with the progress of its grid, from one query over the runs."""
    import pandas as pd

    statuses: dict[int, list[str]] = {}
    for run in store.list_runs(include_hidden=True):
        if run.sweep_id is not None:
            statuses.setdefault(run.sweep_id, []).append(run.status)
    rows = [{"sweep": f"#{s.id}", "name": s.name, "swept": ", ".join(f"{k}: {v}" for k, v in s.spec.get("axes", {}).items()),
             "progress": sv.progress_line(sv.progress_counts(pd.DataFrame({"status": statuses.get(s.id, [])})))} for s in sweeps]
    with st.expander(f"All sweeps ({len(sweeps)})"):
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="sw_overview")


# --------------------------------------------------------------------------- one sweep


def progress_section(sweep, runs) -> None:
    counts = sv.progress_counts(runs)
    total = max(len(runs), 1)
    st.progress(counts["done"] / total, text=f"**Grid progress:** {sv.progress_line(counts)}")
    m = st.columns(5)
    for col, key in zip(m, ("done", "running", "queued", "failed", "cancelled")):
        col.metric(key.capitalize(), counts[key])
    b = st.columns([1, 1, 3], vertical_alignment="center")
    if b[0].button("Cancel the sweep", disabled=not (counts["running"] or counts["queued"]), icon=":material/stop:", key="sw_cancel",
                   width="stretch", help="Stop every queued or running run of this sweep (they checkpoint first, so Resume continues them)."):
        flash(f"Cancelled {len(cancel_sweep(store, sweep.id))} run(s).")
        st.rerun()
    if b[1].button("Resume the sweep", disabled=not (counts["failed"] or counts["cancelled"]), icon=":material/play_arrow:",
                   key="sw_resume", width="stretch", help="Queue every failed or cancelled run again, from its last checkpoint."):
        flash(f"Resumed {len(resume_sweep(store, sweep.id))} run(s).")
        st.rerun()
    failed = runs[runs["status"] == "failed"]
    if len(failed):
        with b[2].expander(f"Why {len(failed)} run(s) failed"):
            for rid in failed["run"]:
                st.markdown(f"**#{rid}**: {(store.get_run(int(rid)).error or 'no error recorded').splitlines()[-1]}")


def results_section(sweep, runs, axes: list[str]) -> None:
    st.header("Results")
    cells = sv.cells_frame(runs, axes)
    table = sv.results_table(cells, axes)
    st.caption("One row per cell of the grid, over its seeds: mean, sample standard deviation and the 95 % confidence "
               "interval of the mean (± half-width, Student's t). Only finished runs count; KD gain is each run's accuracy "
               "minus the CE-only baseline of its own seed.")
    st.dataframe(table, hide_index=True, key="sw_table", column_config={
        c: st.column_config.NumberColumn(c, format="%.2f") for c in table.columns if c.endswith((" mean", " std", " ±"))
        and not c.endswith("± std")})
    st.download_button("Results (CSV)", sv.csv_bytes(table), file_name=f"sweep_{sweep.id}_results.csv", mime="text/csv",
                       icon=":material/download:", key="sw_dl_results")
    compare_links(cells, axes)
    with st.expander("Every run of the sweep"):
        st.dataframe(runs, hide_index=True, key="sw_runs")
        st.download_button("Runs (CSV)", sv.csv_bytes(runs), file_name=f"sweep_{sweep.id}_runs.csv", mime="text/csv",
                           icon=":material/download:", key="sw_dl_runs")
    plots_section(sweep, cells, axes)


def compare_links(cells, axes: list[str]) -> None:
    st.markdown("**Open a cell's runs in Compare** (curves, configs and results side by side):")
    cols = st.columns(min(len(cells), 5) or 1)
    for i, (_, cell) in enumerate(cells.iterrows()):
        ids = ",".join(str(r) for r in cell["run_ids"])
        cols[i % len(cols)].page_link("pages/compare.py", label=f"{sv.cell_label(cell, axes)} ({len(cell['run_ids'])} runs)",
                                      query_params={"runs": ids}, icon=":material/compare_arrows:")


def plots_section(sweep, cells, axes: list[str]) -> None:
    grid = sv.grid_axes(axes)
    if not (cells["finished"] > 0).any():
        st.info("The plots appear when the first run of the sweep has finished.")
        return
    if not grid:
        st.caption("This sweep varies only the seed: the table above is its result.")
        return
    bars = st.segmented_control("Error bars", list(sv.ERROR_BARS), default="ci95", key="sw_bars",
                                format_func=lambda b: {"ci95": "95 % CI", "std": "std"}[b],
                                help="95 % CI: where the mean over seeds would fall 95 % of the time. std: how much single seeds vary.") or "ci95"
    x, by = grid[0], (grid[1] if len(grid) > 1 else None)
    c = st.columns(2)
    for col, what in zip(c, ("student_acc", "kd_gain")):
        with col:
            chart(sv.value_figure(cells, x, what, bars, by=by), f"sw_{what}", f"sweep_{sweep.id}_{what}")
    st.caption(f"Points: the mean over seeds of each value's finished runs; error bars: the {sv.ERROR_BARS[bars]} (none where "
               "a value has one finished seed). The orange band is the CE-only baseline (same student, no teacher), its mean "
               "± the same spread; KD gain is measured from it, so there it is the dashed zero line.")
    if len(grid) == 2:
        what = st.segmented_control("Heatmap of", ["student_acc", "kd_gain"], default="student_acc", key="sw_heat_what",
                                    format_func=lambda w: {"student_acc": "student accuracy", "kd_gain": "KD gain"}[w]) or "student_acc"
        chart(sv.heatmap_figure(cells, grid[0], grid[1], what), "sw_heatmap", f"sweep_{sweep.id}_heatmap_{what}")
    elif len(grid) > 2:
        st.caption("No heatmap for more than two swept axes (besides the seed): the table lists every cell.")


def chart(fig, key: str, filename: str) -> None:
    st.plotly_chart(fig, config=charts.plotly_config(filename), key=key, theme=None)
    png_button(key)


def main() -> None:
    st.title("Sweeps")
    st.caption("A sweep launches every combination of a few values as separate runs, with the teacher trained once and "
               "the CE-only baseline once per seed. Start one from **New experiment → Sweep over**, a YAML file with a "
               "`sweep:` section, or the preset below.")
    show_flash()
    preset_box()
    sweeps = store.list_sweeps()
    if not sweeps:
        st.info("No sweeps yet.")
        return
    overview(sweeps)
    sweep = pick_sweep(sweeps)
    axes = list(sweep.spec.get("axes", {}))
    runs = sweep_runs(store, sweep.id)
    if runs.empty:
        st.info("This sweep has no runs (they were deleted).")
        return
    if runs["status"].isin(ACTIVE).any():
        redraw_on_change(sweep.id, runs)
    st.caption(f"Swept: {', '.join(f'`{a}` = {v}' for a, v in sweep.spec.get('axes', {}).items())}")
    progress_section(sweep, runs)
    results_section(sweep, runs, axes)


def redraw_on_change(sweep_id: int, shown) -> None:
    """Every LIVE_REFRESH_S, read the sweep's rows and rerun the page if they differ from the ``shown`` ones."""

    @st.fragment(run_every=LIVE_REFRESH_S)
    def sweep_watch() -> None:
        if not sweep_runs(store, sweep_id).equals(shown):
            st.rerun()

    sweep_watch()

main()
