"""Run detail's Method tab: what the run's training method is, and the values it logged, per epoch.

A method (``method: {name, params}`` in the config, see ``kd_core.methods``) logs values of its own next to the
standard ones: per-epoch values (DHO's head accuracies, MEAL V2's teacher accuracies, TGeo-KD's α quantiles) and
per-step ones (a loss, a mixed fraction). Both are drawn per epoch: a per-step value as the mean of the epoch's
logged steps, with its min–max as a band. Methods with a chart made for them get it; every other value they
log, and every value of any other method, is drawn as a plain line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui import charts, metrics

STANDARD_STEP_KEYS = {"loss/total", "lr", "images_per_s"}
SPLITS = ("val/", "test/")
PHASE = "student"  # a method changes the student's training only


def base_key(key: str) -> str:
    """The key without its evaluation split: 'val/dho_blend_top1' -> 'dho_blend_top1'."""
    return key.split("/", 1)[1] if key.startswith(SPLITS) else key


def is_method_key(key: str, method: str) -> bool:
    """True for a value the method logged (not a standard metric, not a recipe term's loss)."""
    if key in STANDARD_STEP_KEYS:
        return False
    if key.startswith("loss/"):
        return key.startswith(f"loss/{method}.")  # the method's own loss terms are named <method>.<term>
    if key.startswith(SPLITS):
        rest = base_key(key)
        return not (rest in metrics.EPOCH_KEYS or rest.startswith("class_acc/"))
    return True


def method_keys(pairs: Iterable[tuple[str, str]], method: str) -> list[str]:
    return sorted({k for phase, k in pairs if phase == PHASE and is_method_key(k, method)})


@st.cache_data(show_spinner=False, max_entries=64)
def _stats_cached(_store: Any, url: str, run_id: int, keys: tuple[str, ...], finished_at: float) -> pd.DataFrame:
    return _store.metric_epoch_stats(run_id, list(keys), PHASE)


def epoch_stats(store: Any, run: Any, keys: list[str]) -> dict[str, pd.DataFrame]:
    """{base key: frame(epoch, value, min, max, count)} of the student phase, one row per epoch."""
    if not keys:
        return {}
    if metrics.is_finished(run):
        frame = _stats_cached(store, metrics._url(store), run.id, tuple(keys), float(run.finished_at))
    else:
        frame = store.metric_epoch_stats(run.id, keys, PHASE)
    return {base_key(str(k)): df.drop(columns="key").reset_index(drop=True) for k, df in frame.groupby("key")}


# --------------------------------------------------------------------------- figures


def lines_figure(lines: list[tuple[str, pd.DataFrame]], *, title: str, y_title: str, subtitle: str | None = None) -> go.Figure:
    """One line per (name, per-epoch frame); a min–max band where an epoch holds several logged steps."""
    fig = go.Figure()
    for i, (name, df) in enumerate(lines):
        color = charts._hue(i / max(len(lines), 1))
        x = df["epoch"].astype(int) + 1
        if (df["count"] > 1).any():
            fig.add_trace(go.Scatter(x=list(x) + list(x[::-1]), y=list(df["max"]) + list(df["min"][::-1]), fill="toself", mode="lines",
                                     fillcolor=charts.rgba(color, charts.FAINT_OPACITY), line={"width": 0}, hoverinfo="skip",
                                     showlegend=False, name=f"{name} min–max"))
        fig.add_trace(go.Scatter(x=x, y=df["value"], mode="lines+markers", name=name,
                                 line={"color": color, "width": charts.LINE_WIDTH}, marker={"size": 8}))
    charts.style(fig, title, subtitle=subtitle, height=400 if len(lines) > 1 else 330, x_title="epoch", y_title=y_title)
    if len(lines) > 1:
        charts.legend_below(fig, [n for n, _ in lines], 400)
    else:
        fig.update_layout(showlegend=False, margin={"b": 60})  # the title names the one line
    return _whole_epochs(fig, max((len(df) for _, df in lines), default=0))


def _whole_epochs(fig: go.Figure, epochs: int) -> go.Figure:
    """Epochs are whole numbers: no 1.5 tick on a short run."""
    fig.update_xaxes(dtick=1 if epochs <= 20 else None)
    return fig


def band_figure(low: pd.DataFrame, mid: pd.DataFrame, high: pd.DataFrame, extra: list[tuple[str, pd.DataFrame]], *,
                title: str, y_title: str, band_name: str, mid_name: str, subtitle: str | None = None) -> go.Figure:
    """A quantile band (low–high) with its median line, plus further lines (e.g. means of subgroups)."""
    fig = go.Figure()
    color = charts.role_color("student")
    x = low["epoch"].astype(int) + 1
    fig.add_trace(go.Scatter(x=list(x) + list(x[::-1]), y=list(high["value"]) + list(low["value"][::-1]), fill="toself", mode="lines",
                             fillcolor=charts.rgba(color, 0.25), line={"width": 0}, name=band_name, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=mid["epoch"].astype(int) + 1, y=mid["value"], mode="lines+markers", name=mid_name,
                             line={"color": color, "width": charts.LINE_WIDTH}, marker={"size": 8}))
    for i, (name, df) in enumerate(extra):
        grey = name in ("lowest", "highest")
        fig.add_trace(go.Scatter(x=df["epoch"].astype(int) + 1, y=df["value"], mode="lines", name=name,
                                 line={"color": "#888888" if grey else charts._hue((i + 1) / (len(extra) + 1)),
                                       "width": 1 if grey else 2, "dash": "dot" if grey else "dash"}))
    charts.style(fig, title, subtitle=subtitle, height=400, x_title="epoch", y_title=y_title)
    charts.legend_below(fig, [band_name, mid_name, *(n for n, _ in extra)], 400)
    return _whole_epochs(fig, len(mid))


# --------------------------------------------------------------------------- charts made for a method
# each takes {base key: per-epoch frame} and returns [(chart id, figure, caption)] and the keys it drew

Chart = tuple[str, go.Figure, str]


def _named(stats: dict[str, pd.DataFrame], names: dict[str, str]) -> list[tuple[str, pd.DataFrame]]:
    return [(label, stats[key]) for key, label in names.items() if key in stats]


def dho_charts(stats: dict[str, pd.DataFrame]) -> tuple[list[Chart], set[str]]:
    heads = {"dho_ce_head_top1": "CE head", "dho_kd_head_top1": "KD head", "dho_blend_top1": "blend (the student's prediction)"}
    knobs = {"dho_alpha": "chosen α", "dho_temperature": "chosen T"}
    out: list[Chart] = []
    if any(k in stats for k in heads):
        out.append(("dho_heads", lines_figure(_named(stats, heads), title="Accuracy of each head and of their blend",
                                              y_title="top-1 accuracy (%)", subtitle="evaluation split, after each epoch"),
                    "The CE head learns from the labels, the KD head from the teacher; the student predicts with their blend "
                    "at the α and T that scored best on the evaluation split."))
    if any(k in stats for k in knobs):
        out.append(("dho_blend", blend_figure(stats.get("dho_alpha"), stats.get("dho_temperature")),
                    "α weighs the CE head (1 − α the KD head) and T softens the KD head before blending; both are chosen "
                    "again after every epoch, on the evaluation split."))
    return out, set(heads) | set(knobs)


def blend_figure(alpha: pd.DataFrame | None, temperature: pd.DataFrame | None) -> go.Figure:
    """DHO's chosen α (left axis) and T (right axis) per epoch."""
    fig = go.Figure()
    for df, name, axis, color in ((alpha, "chosen α", "y", charts._hue(0.0)), (temperature, "chosen T", "y2", charts._hue(0.6))):
        if df is not None:
            fig.add_trace(go.Scatter(x=df["epoch"].astype(int) + 1, y=df["value"], mode="lines+markers", name=name, yaxis=axis,
                                     line={"color": color, "width": charts.LINE_WIDTH, "dash": "dash" if axis == "y2" else None},
                                     marker={"size": 8}))
    charts.style(fig, "The blend chosen after each epoch: α and T", height=360, x_title="epoch", y_title="α")
    fig.update_layout(yaxis2={"title": {"text": "T"}, "overlaying": "y", "side": "right", "showgrid": False})
    return _whole_epochs(fig, max(len(df) for df in (alpha, temperature) if df is not None))


def meal_charts(stats: dict[str, pd.DataFrame]) -> tuple[list[Chart], set[str]]:
    teachers = sorted((k for k in stats if k.startswith("meal_") and k.endswith("_top1") and k != "meal_ensemble_top1"),
                      key=lambda k: (k != "meal_teacher_top1", k))
    lines = [(k.removeprefix("meal_").removesuffix("_top1").replace("_", " "), stats[k]) for k in teachers]
    lines += _named(stats, {"meal_ensemble_top1": "ensemble (what the student learns from)", "top1": "student"})
    if not lines:
        return [], set()
    fig = lines_figure(lines, title="Each teacher, the ensemble and the student", y_title="top-1 accuracy (%)",
                       subtitle="evaluation split; the teachers are frozen, so their lines are flat")
    return [("meal_teachers", fig, "MEAL V2 distils the ensemble's averaged prediction, so the ensemble line is the "
             "student's target.")], {*teachers, "meal_ensemble_top1"}


def tgeo_charts(stats: dict[str, pd.DataFrame]) -> tuple[list[Chart], set[str]]:
    if not all(k in stats for k in ("tgeo_alpha_p10", "tgeo_alpha_p50", "tgeo_alpha_p90")):
        return [], set()
    extra = _named(stats, {"tgeo_alpha_mean_teacher_right": "mean α where the teacher is right",
                           "tgeo_alpha_mean_teacher_wrong": "mean α where the teacher is wrong",
                           "tgeo_alpha_min": "lowest", "tgeo_alpha_max": "highest"})
    fig = band_figure(stats["tgeo_alpha_p10"], stats["tgeo_alpha_p50"], stats["tgeo_alpha_p90"], extra,
                      title="α per training sample over the epochs", y_title="α (weight of the KD term)",
                      band_name="10th–90th percentile", mid_name="median",
                      subtitle="over every training sample seen in the epoch")
    used = {"tgeo_alpha_p10", "tgeo_alpha_p50", "tgeo_alpha_p90", "tgeo_alpha_mean_teacher_right", "tgeo_alpha_mean_teacher_wrong",
            "tgeo_alpha_min", "tgeo_alpha_max"}
    return [("tgeo_alpha", fig, "TGeo-KD learns a per-sample α: each sample's loss is α·KD + (1 − α)·CE. A wide band means "
             "the samples are weighed differently; the dotted grey lines are the lowest and highest α of the epoch.")], used


def ofa_charts(stats: dict[str, pd.DataFrame]) -> tuple[list[Chart], set[str]]:
    accs = sorted(k for k in stats if k.startswith("ofa_stage") and k.endswith("_top1"))
    if not accs:
        return [], set()
    lines = [(f"branch on {k.removeprefix('ofa_').removesuffix('_top1').replace('stage', 'stage ')}", stats[k]) for k in accs]
    lines += _named(stats, {"top1": "student (final logits)"})
    fig = lines_figure(lines, title="Accuracy of each OFA branch and of the student", y_title="top-1 accuracy (%)",
                       subtitle="evaluation split, after each epoch")
    return [("ofa_branches", fig, "Each branch projects one stage of the student to class logits and learns from the teacher; "
             "early stages usually score lower.")], set(accs)


def random_teacher_charts(stats: dict[str, pd.DataFrame]) -> tuple[list[Chart], set[str]]:
    readouts = {"probe_top1": "student, linear probe", "knn_top1": "student, k-NN",
                "teacher_probe_top1": "random teacher, linear probe", "teacher_knn_top1": "random teacher, k-NN"}
    lines = _named(stats, readouts)
    if not lines:
        return [], set()
    fig = lines_figure(lines, title="What the embeddings know: student vs the random teacher", y_title="top-1 accuracy (%)",
                       subtitle="a linear probe and a k-NN classifier on each embedding, evaluation split")
    return [("random_teacher_readouts", fig, "The student never sees a label; these classifiers, fitted on its embedding after "
             "each epoch, show what it learned. The teacher's lines are the same readouts of the frozen random teacher.")], set(readouts)


CHARTS: dict[str, Callable[[dict[str, pd.DataFrame]], tuple[list[Chart], set[str]]]] = {
    "dho": dho_charts, "meal_v2": meal_charts, "tgeo_kd": tgeo_charts, "ofa": ofa_charts, "random_teacher": random_teacher_charts,
}


def generic_charts(stats: dict[str, pd.DataFrame], keys: Iterable[str]) -> list[Chart]:
    """Every other value of the method as its own line."""
    out: list[Chart] = []
    for key in sorted(keys):
        df = stats[key]
        per_step = bool((df["count"] > 1).any())
        subtitle = "per step, averaged over each epoch (band: min–max)" if per_step else "once per epoch"
        out.append((key, lines_figure([(key, df)], title=key, y_title=key.rsplit("/", 1)[-1], subtitle=subtitle), ""))
    return out


# --------------------------------------------------------------------------- the tab


def params_table(name: str, params: dict[str, Any]) -> pd.DataFrame:
    """The method's parameters: the config's values, then the defaults the config left alone."""
    from kd_core.methods import describe_method

    defaults = describe_method(name)["params"]
    rows = [{"parameter": k, "value": str(v), "from": "the run's config"} for k, v in params.items()]
    rows += [{"parameter": k, "value": str(v), "from": "default (not in the config)"} for k, v in defaults.items() if k not in params]
    return pd.DataFrame(rows, columns=["parameter", "value", "from"])


def teacher_outputs_line(reported: dict[str, Any]) -> str | None:
    """Where the student's teacher outputs came from: cached in memory, read from the soft-label store, or live."""
    mode, reason = reported.get("teacher_outputs"), reported.get("teacher_outputs_reason")
    store = reported.get("teacher_outputs_store") if isinstance(reported.get("teacher_outputs_store"), dict) else {}
    key = f"key {str(store.get('key', ''))[:12]}" if store else ""
    if mode == "cached":
        return "teacher outputs cached in memory (computed once before training)"
    if mode == "stored":
        return f"teacher outputs stored: read from the soft-label store, the teacher did not run ({key})"
    if mode != "live":
        return None
    line = "teacher outputs live" + (f" ({reason})" if reason else "")
    epochs = ", ".join(str(e) for e in store.get("written_epochs") or [])
    if store.get("read_epochs"):
        line += f"; epochs {', '.join(str(e) for e in store['read_epochs'])} read from the soft-label store"
    if store:
        line += f"; epochs {epochs} written to the soft-label store for later runs ({key})" if epochs else f"; writing to the soft-label store ({key})"
    if store.get("problems"):
        line += f"; {len(store['problems'])} stored epoch(s) not usable: {store['problems'][0]}"
    return line


def teacher_outputs_note(run: Any, name: str) -> str | None:
    """How the student's teacher ran (live, cached in memory, from the soft-label store), as the run reported it (or the method's reason)."""
    from kd_core.methods import METHODS

    reported = {**(run.summary or {}), **(run.progress or {})} if run.status in metrics.ACTIVE else (run.summary or {})
    if reported.get("teacher_outputs") == "live" and reported.get("teacher_outputs_reason"):
        return f"The teacher ran live for every training step (outputs not cached): {reported['teacher_outputs_reason']}."
    if reported.get("teacher_outputs") == "stored":
        return f"The teacher did not run during training: its outputs were read from the soft-label store ({teacher_outputs_line(reported)})."
    if reported.get("teacher_outputs") == "cached":
        return None
    reason = getattr(METHODS.get(name), "varies_teacher_inputs", None)
    return f"{name} switches teacher-output caching off: {reason}." if reason else None


def describe(run: Any, name: str, params: dict[str, Any]) -> None:
    from kd_core.methods import METHODS, describe_method

    if name not in METHODS:
        st.warning(f"This run used the method **{name}**, which this version of Distillery does not know; its logged values follow.")
        return
    info = describe_method(name)
    paper = f"[{info['paper']}]({info['paper_url']})" if info.get("paper_url") else info.get("paper", "")
    st.markdown(f"**{name}**: {info['summary']}" + (f"  \nPaper: {paper}" if paper else ""))
    if info.get("caveat"):
        st.caption(f"Differs from the paper: {info['caveat']}")
    note = teacher_outputs_note(run, name)
    if note:
        st.info(note, icon=":material/info:")
    with st.expander("Parameters as run", expanded=False):
        st.dataframe(params_table(name, params), hide_index=True)


def method_tab(store: Any, run: Any) -> None:
    method = (run.config or {}).get("method") or {}
    name = str(method.get("name", ""))
    describe(run, name, dict(method.get("params") or {}))
    pairs = metrics.metric_keys(store, run)
    keys = method_keys(pairs, name)
    if not keys:
        st.info("The method's values appear after the student's first epoch.")
        return
    split = metrics.eval_split(pairs)
    stats = epoch_stats(store, run, [*keys, f"{split}/top1"])
    made, used = CHARTS.get(name, lambda s: ([], set()))(stats)
    rest = [k for k in (base_key(k) for k in keys) if k not in used and k in stats]
    for chart_id, fig, caption in made:
        st.plotly_chart(fig, config=charts.plotly_config(f"run{run.id}_{chart_id}"), key=f"rd_method_{chart_id}")
        if caption:
            st.caption(caption)
    if rest:
        st.subheader("Every other value the method logged")
        cols = st.columns(2)
        for i, (chart_id, fig, _) in enumerate(generic_charts(stats, rest)):
            with cols[i % 2]:
                st.plotly_chart(fig, config=charts.plotly_config(f"run{run.id}_{chart_id}"), key=f"rd_method_{chart_id}")


def teacher_ensemble_line(summary: dict[str, Any]) -> str | None:
    """'Teachers: teacher 98.1 %, teacher 2 97.0 % · ensemble 98.4 %' when the run distilled several teachers."""
    accs = summary.get("teacher_accs")
    if not isinstance(accs, dict) or len(accs) < 2:
        return None
    parts = [f"{k.replace('_', ' ')} {v:.1f} %" for k, v in accs.items() if isinstance(v, (int, float))]
    ensemble = summary.get("teacher_ensemble_acc")
    return "Teachers (test split): " + ", ".join(parts) + (f" · ensemble {ensemble:.1f} %" if isinstance(ensemble, (int, float)) else "")
