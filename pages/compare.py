"""Compare runs: overlaid curves (x = step / epoch / wall time, EMA smoothing with the raw curve kept faint),
results with mean ± std over seeds, the config fields that differ, and hyper-parameters vs accuracy.

Runs come from ``?runs=1,2,3`` (kept in sync with the multiselect, so a comparison can be bookmarked).
"""

from __future__ import annotations

import io

import pandas as pd
import streamlit as st

from ui import charts, metrics, results
from ui import state as ui_state
from ui.png_button import png_button

ACTIVE = ui_state.ACTIVE
SKIP_IN_TABLE = ("name",)


def _csv(df: pd.DataFrame, index: bool = False) -> bytes:
    buf = io.StringIO()
    df.to_csv(buf, index=index)
    return buf.getvalue().encode()


def pick_runs(store):
    runs = store.list_runs(limit=1000)
    by_id = {r.id: r for r in runs}
    wanted = results.parse_run_ids(st.query_params.get("runs"))
    for rid in wanted:
        if rid not in by_id:
            try:
                by_id[rid] = store.get_run(rid)
            except KeyError:
                st.warning(f"Run #{rid} does not exist (deleted?); left out.")
    default = [rid for rid in wanted if rid in by_id]
    if "cmp_runs" in st.session_state:
        default = None  # the widget keeps its own value after the first render
    chosen = st.multiselect(
        "Runs to compare", list(by_id), default=default, key="cmp_runs",
        format_func=lambda i: f"#{i} {by_id[i].name} — {by_id[i].status}",
        help="Each selected run gets its own colour. The address bar (?runs=…) remembers the selection.",
        placeholder="pick two or more runs",
    )
    text = ",".join(str(i) for i in chosen)
    if (st.query_params.get("runs") or "") != text:
        if text:
            st.query_params["runs"] = text
        elif "runs" in st.query_params:
            del st.query_params["runs"]
    return [by_id[i] for i in chosen], runs


def _curves_figure(store, runs, phase: str, key: str, x: str, smoothing: float):
    """(figure, plotted frames) of one metric over the runs; (None, []) when none of them logged it."""
    curves, frames = [], []
    colors = charts.run_colors([r.id for r in runs])
    for r in runs:
        df = metrics.bucketed_series(store, r, key, phase)
        if df.empty:
            continue
        curves.append(charts.Curve(name=f"#{r.id} {r.name}", color=colors[r.id], frame=df))
        frames.append(df.assign(run=r.id, run_name=r.name, key=key))
    if not curves:
        return None, []
    t0 = {f"#{r.id} {r.name}": r.started_at for r in runs if r.started_at}
    fig = charts.curves_figure(curves, x=x, title=f"{charts.role_label(phase)} · {key}", y_title=key,
                               smoothing=smoothing, t0=t0, height=480)
    return fig, frames


def curves_section(store, runs) -> None:
    st.header("Curves")
    keys_by_run = {r.id: metrics.metric_keys(store, r) for r in runs}
    options = sorted({pk for pairs in keys_by_run.values() for pk in pairs if "/class_acc/" not in pk[1]},
                     key=lambda pk: (metrics.ROLES.index(pk[0]) if pk[0] in metrics.ROLES else 9, pk[1]))
    if not options:
        st.info("These runs have not logged anything yet.")
        return
    split = metrics.eval_split(p for pairs in keys_by_run.values() for p in pairs)
    preferred = [("student", f"{split}/top1"), ("student", "loss/total")]
    default = next((options.index(p) for p in preferred if p in options), 0)
    c1, c2, c3 = st.columns([3, 3, 2])
    phase, key = c1.selectbox("Metric", options, index=default, key="cmp_key",
                              format_func=lambda pk: f"{charts.role_label(pk[0])} · {pk[1]}",
                              help="Which model (teacher / distilled student / baseline) and which logged value.")
    x = c2.segmented_control("x-axis", ["step", "epoch", "time"], default="step", key="cmp_x",
                             format_func=lambda v: {"step": "step", "epoch": "epoch", "time": "wall time"}[v],
                             help="Wall time = minutes since the run started.") or "step"
    smoothing = c3.slider("Smoothing", 0.0, 0.99, 0.0 if metrics.is_epoch_key(key) else 0.6, 0.01, key=f"cmp_smooth_{metrics.is_epoch_key(key)}",
                          help="Exponential moving average weight (0 = raw). The raw curve stays visible, faint, behind the smoothed one.")
    fig, frames = _curves_figure(store, runs, phase, key, x, smoothing)
    if fig is None:
        st.info(f"None of the selected runs logged {key} for the {phase}.")
        return
    if any(r.status in ACTIVE for r in runs):
        st.caption(f"While a run trains, the chart is redrawn every {ui_state.CHART_REFRESH_S:g} s.")
    st.plotly_chart(fig, config=charts.plotly_config(f"compare_{phase}_{key}"), key="cmp_chart", theme=None)
    c = st.columns([1, 1, 4], vertical_alignment="center")
    with c[0]:
        png_button("cmp_chart")
    c[1].download_button("Chart data (CSV)", data=_csv(pd.concat(frames, ignore_index=True)), icon=":material/download:",
                         file_name=f"compare_{phase}_{key.replace('/', '_')}.csv", mime="text/csv", key="cmp_dl_chart",
                         help="The plotted points: per run, bucket mean (value), min, max and how many raw points each bucket holds.")
    c[2].caption("The PNG is the chart as shown, at 2× resolution.")


def results_section(runs) -> None:
    st.header("Results")
    res = results.results_frame(runs)
    st.dataframe(res, hide_index=True, column_config={
        c: st.column_config.NumberColumn(c, format="%.2f") for c in res.columns if c not in ("run", "status", "seed")
    })
    groups = results.seed_groups_frame(runs)
    if (groups["n"] > 1).any():
        st.subheader("Mean ± std over seeds")
        st.caption("Runs whose configs are identical except for the seed are grouped; ± is the sample standard deviation.")
        st.dataframe(groups, hide_index=True)
    else:
        st.caption("Tip: repeat a config with other seeds (Clone into form, change the seed) to see mean ± std here.")
    st.download_button("Results (CSV)", icon=":material/download:", data=_csv(res), file_name="compare_results.csv", mime="text/csv", key="cmp_dl_res")


def config_section(runs) -> None:
    st.header("Configs")
    only_diff = st.toggle("Only fields that differ", value=True, key="cmp_diff",
                          help="Hide the settings that are the same in every selected run.")
    table = results.config_table(runs, only_differing=only_diff, skip=SKIP_IN_TABLE if only_diff else ())
    if table.empty:
        st.info("The selected runs have identical configs" + (" (apart from their names)." if only_diff else "."))
    else:
        st.caption(f"{len(table)} field(s){' that differ' if only_diff else ''}; one column per run.")
        st.dataframe(table, key="cmp_config_table")
        st.download_button("Config table (CSV)", icon=":material/download:", data=_csv(table, index=True), file_name="compare_configs.csv",
                           mime="text/csv", key="cmp_dl_cfg")


def parcoords_section(runs) -> None:
    st.header("Hyper-parameters vs accuracy")
    done = [r for r in runs if isinstance(r.summary.get("student_acc"), (int, float))]
    numeric = results.numeric_differing(done) if len(done) >= 2 else pd.DataFrame()
    if numeric.empty or numeric.shape[1] == 0:
        st.caption("Needs two or more finished runs that differ in a numeric setting (e.g. learning rate or temperature).")
        return
    df = numeric.copy()
    df["student acc (%)"] = [float(r.summary["student_acc"]) for r in done]
    fig = charts.parcoords_figure(df, list(numeric.columns), "student acc (%)",
                                  title="Each line is a run: its settings on the left axes, its accuracy on the right")
    st.plotly_chart(fig, config=charts.plotly_config("compare_hyperparameters"), key="cmp_parcoords")
    st.caption("Drag along an axis to highlight the runs in a range.")


def main() -> None:
    st.title("Compare runs")
    store = ui_state.get_store()
    chosen, all_runs = pick_runs(store)
    if not all_runs:
        st.info("No runs yet. Start some on the **New experiment** page, then compare them here.")
        return
    if not chosen:
        st.info("Pick runs above (or tick them on the Runs page and press Compare).")
        return
    live = any(r.status in ACTIVE for r in chosen)

    @st.fragment(run_every=ui_state.CHART_REFRESH_S if live else None)
    def live_curves() -> None:
        fresh = []
        for r in chosen:
            try:
                fresh.append(store.get_run(r.id))
            except KeyError:
                continue
        curves_section(store, fresh)

    live_curves()
    results_section(chosen)
    config_section(chosen)
    parcoords_section(chosen)


ui_state.ensure_app(__file__)  # a deep link on a fresh server: hand over to app.py (navigation, page config)
main()
