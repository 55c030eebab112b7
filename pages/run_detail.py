"""Run detail: live curves while a run trains, then its results (accuracy, per class, confusion, config, log).

The run comes from ``?run=<id>`` (or the selectbox). Below the picker, two fragments read the run from the
database while it is active: the status (badge, actions, progress) every ui.state.LIVE_REFRESH_S (10 s by default), the
results (metric tiles and tabs, the curves among them) every ui.state.CHART_REFRESH_S (30 s). The timers stop
once the run has finished (a full rerun then draws the final page without them).
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st
import yaml

from ui import artifacts, charts, metrics, method_view, results
from ui import state as ui_state
from ui.badges import (
    duration_text,
    progress_fraction,
    progress_text,
    recipe_text,
    status_badge,
    trained_seconds,
)

ACTIVE = ui_state.ACTIVE
RUN_DETAIL_PAGE = "pages/run_detail.py"


def _label(run) -> str:
    return f"#{run.id} {run.name}"  # status is shown live below; a keyed selectbox would keep a stale one


def pick_run(store):
    """The run from ?run=, else a selectbox over the newest runs; None when there is nothing to show."""
    runs = store.list_runs(limit=500)
    wanted = results.parse_run_ids(st.query_params.get("run"))
    by_id = {r.id: r for r in runs}
    if wanted and wanted[0] not in by_id:
        try:
            run = store.get_run(wanted[0])  # hidden or older than the list
            by_id[run.id] = run
            runs = [run, *runs]
        except KeyError:
            st.warning(f"Run #{wanted[0]} does not exist (deleted?). Pick another one below.")
            wanted = []
    if not runs:
        st.info("No runs yet. Start one on the **New experiment** page; its curves will appear here live.")
        _link("pages/new_experiment.py", "New experiment", icon=":material/science:")
        return None
    ids = [r.id for r in runs]
    index = ids.index(wanted[0]) if wanted else 0
    chosen = st.selectbox("Run", ids, index=index, format_func=lambda i: _label(by_id[i]), key="rd_run",
                          help="The run shown on this page. The address bar (?run=…) keeps it, so you can bookmark or share it.")
    if st.query_params.get("run") != str(chosen):
        st.query_params["run"] = str(chosen)
    return by_id[chosen]


def _link(page: str, label: str, **kw) -> None:
    try:
        st.page_link(page, label=label, **kw)
    except Exception:  # noqa: BLE001 - page not registered (page run on its own)
        pass


# --------------------------------------------------------------------------- header and actions


def header(store, run) -> None:
    cfg = run.config
    teacher, student, data = cfg.get("teacher", {}), cfg.get("student", {}), cfg.get("dataset", {})
    source = teacher.get("source", "train")
    st.markdown(
        f"{status_badge(run.status)} · dataset **{data.get('name', '?')}** · teacher **{teacher.get('arch', '?')}**"
        f" ({'trained here' if source == 'train' else source}) → student **{student.get('arch', '?')}** · "
        f"recipe `{recipe_text(cfg.get('recipe'))}`" + (f" · seed {cfg.get('seed')}" if "seed" in cfg else "")
    )
    cols = st.columns([2, 2, 2, 3])
    with cols[0]:
        if run.status in ACTIVE:
            _action("Cancel run", "Stops after saving a checkpoint; you can resume it later.", ":material/stop:",
                    lambda: ui_state.runner.cancel(store, run.id), f"Cancelling run #{run.id}…", disabled=run.status == "cancelling")
        elif run.status in ("failed", "cancelled"):
            _action("Resume", "Queue the run again; it continues from its last checkpoint.", ":material/play_arrow:",
                    lambda: ui_state.runner.resume(store, run.id), f"Run #{run.id} queued again")
    if cols[1].button("Clone into form", help="Open New experiment with this run's config filled in.", key="rd_clone",
                      icon=":material/content_copy:"):
        st.session_state["prefill_config"] = dict(run.config)
        st.switch_page("pages/new_experiment.py")
    if cols[2].button("Compare…", help="Open Compare with this run selected.", key="rd_compare", icon=":material/compare_arrows:"):
        st.switch_page("pages/compare.py", query_params={"runs": str(run.id)})


def _action(label: str, help_text: str, icon: str, act, done: str, disabled: bool = False) -> None:
    if st.button(label, help=help_text, icon=icon, disabled=disabled, key=f"rd_{label.split()[0].lower()}"):
        try:
            act()
            st.toast(done)
        except Exception as exc:  # noqa: BLE001 - say why instead of a traceback
            st.error(f"Could not {label.lower()}: {exc}")
        st.rerun()


def progress_block(run) -> None:
    """The live progress bar of an active run (finished runs show their summary instead)."""
    p = run.progress or {}
    frac = progress_fraction(run.status, p)
    st.progress(min(max(frac or 0.0, 0.0), 1.0), text=progress_text(run.status, p))
    detail = []
    trained = trained_seconds(None, p)
    if trained is not None:
        detail.append(f"trained {duration_text(trained)} so far (across resumes)")
    teacher_line = method_view.teacher_outputs_line(p)
    if teacher_line:
        detail.append(teacher_line)
    if run.heartbeat_at:
        detail.append(f"last heartbeat {time.time() - run.heartbeat_at:.0f} s ago · refreshes every {ui_state.LIVE_REFRESH_S:g} s, "
                      f"the results below every {ui_state.CHART_REFRESH_S:g} s")
    if detail:
        st.caption(" · ".join(detail))


def log_tail(store, run, lines: int = 200) -> str:
    try:
        return ui_state.runner.read_log(store, run.id, tail_lines=lines) or ""
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable log must not break the page
        return f"(could not read the log: {exc})"


def summary_block(run) -> None:
    s = run.summary or {}

    def pct(v):
        return "—" if v is None else f"{v:.1f} %"

    def pts(v):
        return None if v is None else f"{v:+.2f} pts"

    student, last, base, base_last = s.get("student_acc"), s.get("student_last_acc"), s.get("baseline_acc"), s.get("baseline_last_acc")
    cols = st.columns(5)
    cols[0].metric("Teacher", pct(s.get("teacher_acc")), help="Teacher's top-1 accuracy on the test split.")
    cols[1].metric("Student (best)", pct(student), delta=pts(None if student is None or base is None else student - base),
                   help="Distilled student, checkpoint with the best validation accuracy, on the test split. "
                        "The delta is against the baseline (same student trained without the teacher).")
    cols[2].metric("Student (last)", pct(last), delta=pts(None if last is None or base_last is None else last - base_last),
                   help="Distilled student after the last epoch; delta against the baseline's last epoch.")
    cols[3].metric("Baseline (best)", pct(base), help="The same student architecture trained with cross-entropy only, same seed.")
    gain = s.get("kd_gain")
    cols[4].metric("KD gain", "—" if gain is None else f"{gain:+.2f} pts",
                   delta=None if gain is None else ("distillation helped" if gain > 0 else "no gain"),
                   delta_color="normal" if gain is None or gain > 0 else "inverse", delta_arrow="off",
                   help="Student (best) minus baseline (best), in percentage points: what distillation added.")
    ensemble = method_view.teacher_ensemble_line(s)
    if ensemble:
        st.caption(ensemble)
    comp = s.get("compression")
    if s.get("student_params"):
        st.caption(f"Student: {s['student_params']:,} parameters, teacher: {s.get('teacher_params', 0):,}"
                   + (f" ({comp:g}× smaller)" if comp else ""))
    facts = [f"device {s['device']}" if s.get("device") else "", f"precision {s['precision']}" if s.get("precision") else ""]
    trained = trained_seconds(s, None)
    if trained is not None:
        facts.append(f"trained {duration_text(trained)} (summed across resumes)"
                     + (f" + analysis {duration_text(s['analysis_s'])}" if s.get("analysis_s") else ""))
    if s.get("data_loader"):
        facts.append(f"data {s['data_loader']}" + (f" ({s['data_loader_reason']})" if s.get("data_loader_reason") else ""))
    if s.get("selection_split"):
        facts.append(f"'best' = best epoch on the {s['selection_split']} split")
    facts.append(method_view.teacher_outputs_line(s) or "")
    if any(facts):
        st.caption(" · ".join(f for f in facts if f))


# --------------------------------------------------------------------------- tabs


def curves_tab(store, run) -> None:
    st.caption("Every value logged per training step. Long series are averaged into buckets on the server; "
               "the shaded band shows each bucket's min–max, so spikes are never hidden."
               + (f" While the run trains, the curves are redrawn every {ui_state.CHART_REFRESH_S:g} s." if run.status in ACTIVE else ""))
    x = st.segmented_control("x-axis", ["step", "epoch", "time"], default="step", key="rd_x",
                             format_func=lambda v: {"step": "step", "epoch": "epoch", "time": "wall time"}[v],
                             help="Steps restart at 0 for each model (teacher, student, baseline).") or "step"
    groups = metrics.curve_figures(store, run, x=x)
    if not groups:
        st.info("No training steps logged yet.")
        return
    for group, figs in groups.items():
        st.subheader(group)
        cols = st.columns(2)
        for i, (key, fig) in enumerate(figs):
            with cols[i % 2]:
                st.plotly_chart(fig, config=charts.plotly_config(f"run{run.id}_{key}"), key=f"rd_curve_{key}")


def accuracy_tab(store, run) -> None:
    pairs = metrics.metric_keys(store, run)
    split = metrics.eval_split(pairs)
    table = metrics.epoch_table(store, run)
    if table.empty:
        st.info("Accuracy appears after the first epoch ends.")
        return
    top1 = metrics.epoch_series(table, f"{split}/top1")
    fig = charts.accuracy_figure(top1, title=f"Top-1 accuracy per epoch ({split} split): teacher vs student vs baseline")
    st.plotly_chart(fig, config=charts.plotly_config(f"run{run.id}_accuracy"), key="rd_acc")
    st.caption("The student should climb above the dotted baseline line if distillation helps. "
               "A teacher loaded from a file or another run is drawn as a dashed horizontal line.")
    agree = {k: v for k, v in metrics.epoch_series(table, f"{split}/agreement").items() if k != "teacher"}
    kl = {k: v for k, v in metrics.epoch_series(table, f"{split}/kl_teacher_student").items() if k != "teacher"}
    if agree or kl:
        c1, c2 = st.columns(2)
        with c1:
            f = charts.accuracy_figure(agree, title="Agreement with the teacher", y_title="same top-1 class as teacher (%)", height=380)
            st.plotly_chart(f, config=charts.plotly_config(f"run{run.id}_agreement"), key="rd_agree")
            st.caption("How often the student predicts the same class as the teacher (right or wrong).")
        with c2:
            f = charts.accuracy_figure(kl, title="KL(teacher ‖ student)", y_title="KL divergence (nats)", height=380)
            st.plotly_chart(f, config=charts.plotly_config(f"run{run.id}_kl"), key="rd_kl")
            st.caption("How far the student's predicted probabilities are from the teacher's (lower = closer).")
    with st.expander("Per-epoch numbers"):
        st.dataframe(metrics.epoch_wide(table), hide_index=True)


def per_class_tab(store, run) -> None:
    reps = artifacts.reports(store, run)
    teacher = artifacts.teacher_report(reps)
    per_role: dict[str, list[float]] = {}
    names = None
    if teacher:
        per_role["teacher"] = teacher[1]["class_acc"]
        names = teacher[1].get("class_names")
    for name in ("student_best", "baseline_best"):
        if name in reps:
            per_role[name.split("_")[0]] = reps[name]["class_acc"]
            names = names or reps[name].get("class_names")
    source = "test split, final models"
    if not per_role:
        per_role = metrics.last_class_acc(store, run)
        source = "last evaluated epoch"
    if not per_role:
        st.info("Per-class accuracy appears after the first epoch ends.")
        return
    n = max(len(v) for v in per_role.values())
    names = names or [str(i) for i in range(n)]
    fig = charts.class_bars_figure(names, per_role, title=f"Accuracy per class ({source})")
    st.plotly_chart(fig, config=charts.plotly_config(f"run{run.id}_per_class"), key="rd_classes")
    st.caption("Classes where the student falls far below the teacher are where distillation has the most to give.")


def confusion_tab(store, run) -> None:
    reps = artifacts.reports(store, run)
    wanted = []
    t = artifacts.teacher_report(reps)
    if t:
        wanted.append(("Teacher", t[1]))
    for name, title in (("student_best", "Student (distilled, best)"), ("baseline_best", "Baseline (best)")):
        if name in reps:
            wanted.append((title, reps[name]))
    if not wanted:
        st.info("Confusion matrices are computed on the test split when each model finishes training.")
        return
    st.caption("Rows: true class; columns: predicted class. Colour = share of the true class; numbers = images. "
               "A perfect model has a dark diagonal.")
    cols = st.columns(len(wanted))
    for col, (title, rep) in zip(cols, wanted):
        with col:
            fig = charts.confusion_figure(rep["confusion"], rep.get("class_names") or range(len(rep["confusion"])),
                                          title=f"{title}: {rep['top1']:.1f} %", height=440)
            st.plotly_chart(fig, config=charts.plotly_config(f"run{run.id}_confusion_{title.split()[0].lower()}"),
                            key=f"rd_conf_{title.split()[0]}")


def downloads_tab(store, run) -> None:
    c1, c2, c3 = st.columns(3)
    with c1:
        st.download_button("Metrics (CSV)", icon=":material/download:", data=lambda: artifacts.metrics_csv(store, run.id),
                           file_name=f"run{run.id}_metrics.csv", mime="text/csv", key="rd_dl_csv",
                           help="Every logged value, one row per (phase, step, key).")
    with c2:
        st.download_button("Config (YAML)", icon=":material/download:", data=yaml.safe_dump(run.config, sort_keys=False),
                           file_name=f"run{run.id}_config.yaml", mime="application/x-yaml", key="rd_dl_yaml",
                           help="Load it on the New experiment page or with the CLI to run it again.")
    ckpts = artifacts.checkpoint_paths(store, run.id)
    path = ckpts.get(("student", "best")) or ckpts.get(("student", "last"))
    with c3:
        if path:
            st.download_button("Student weights (safetensors)", icon=":material/download:", data=lambda: Path(path).read_bytes(),
                               file_name=f"run{run.id}_{Path(path).name}", mime="application/octet-stream",
                               key="rd_dl_ckpt", help=f"{Path(path).name}: load with safetensors into kd_core.models.create_model.")
        else:
            st.caption("The student checkpoint appears when the student finishes training.")
    others = {f"{m} ({w})": p for (m, w), p in ckpts.items()}
    if others:
        st.caption("Files: " + " · ".join(f"{k}: `{p}`" for k, p in sorted(others.items())))


def config_tab(store, run) -> None:
    st.code(yaml.safe_dump(run.config, sort_keys=False), language="yaml")


def log_tab(store, run) -> None:
    st.code(log_tail(store, run) or "(no log yet)", language="text")


# label -> view; only the open tab is drawn (st.tabs with a key reruns on a switch and says which one is open)
TABS = {
    ":material/show_chart: Curves": curves_tab, ":material/target: Accuracy": accuracy_tab,
    ":material/bar_chart: Per class": per_class_tab, ":material/grid_on: Confusion": confusion_tab,
    ":material/settings: Config": config_tab, ":material/description: Log": log_tab, ":material/download: Downloads": downloads_tab,
}

METHOD_TAB = ":material/school: Method"  # only for runs whose config has a method


def status_block(store, run) -> None:
    header(store, run)
    if run.status in ACTIVE:
        progress_block(run)
    if run.status == "failed":
        st.error(f"**This run failed.** {run.error or 'No error message was recorded.'}")
        tail = log_tail(store, run, 40)
        if tail:
            st.code(tail, language="text")
    elif run.status == "cancelled":
        st.warning("This run was cancelled. **Resume** continues from its last checkpoint.")


def results_block(store, run) -> None:
    summary_block(run)
    tabs = dict(TABS)
    if (run.config or {}).get("method"):
        tabs = {**dict(list(TABS.items())[:2]), METHOD_TAB: method_view.method_tab, **dict(list(TABS.items())[2:])}
    for tab, render in zip(st.tabs(list(tabs), key="rd_tab", on_change="rerun"), tabs.values()):
        if tab.open is not False:
            with tab:
                render(store, run)


def main() -> None:
    store = ui_state.get_store()
    run = pick_run(store)
    if run is None:
        return
    st.title(f"#{run.id} {run.name}")
    first_status = run.status
    live = first_status in ACTIVE

    # Two timers while the run is live: each rerun of a fragment is redrawn by the browser, and a tab's results
    # (several charts) cost it far more than the status line (bench/server_cpu.py: Chromium's share of the cores)
    @st.fragment(run_every=ui_state.LIVE_REFRESH_S if live else None)
    def live_status() -> None:
        try:
            current = store.get_run(run.id)  # status always from the database
        except KeyError:
            st.warning(f"Run #{run.id} was deleted.")
            return
        if current.status != first_status and (current.status not in ACTIVE) == live:
            st.rerun()  # started or finished: redraw the page (and stop or start the timers)
        status_block(store, current)

    @st.fragment(run_every=ui_state.CHART_REFRESH_S if live else None)
    def live_results() -> None:
        try:
            current = store.get_run(run.id)
        except KeyError:
            return  # the status above says so
        results_block(store, current)

    live_status()
    live_results()


ui_state.ensure_app(__file__)  # a deep link on a fresh server: hand over to app.py (navigation, page config)
main()
