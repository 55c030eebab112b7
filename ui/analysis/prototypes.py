"""The prototypes view: class means (prototypes) of each model's embedding, their norms and geometry, then the
2-D embedding maps (``ui.analysis.embeddings``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui.analysis.common import HELP, keep, need_analysis, plot, restore
from ui.analysis.data import RunData, model_label
from ui.analysis.embeddings import embedding_view
from ui.charts import role_label, style

RUN_PAGE_ACCURACY = {"teacher": "teacher_acc", "student": "student_acc", "baseline": "baseline_acc"}


def prototype_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model: accuracy, NCM accuracy, mean norm, norm ratio, spread, cosine to prototype."""
    protos = summary.get("prototypes") or {}
    acc = summary.get("accuracy") or {}
    ratio = summary.get("norm_ratio") or {}
    rows = []
    for m in summary.get("models") or list(protos):
        p = protos.get(m)
        if not p:
            continue
        rows.append({
            "model": role_label(m),
            "top-1 on these images (%)": acc.get(m),
            "NCM accuracy (%)": p.get("ncm_accuracy"),
            "mean norm": p.get("norm_mean"),
            "norm ÷ teacher's": 1.0 if m == "teacher" else ratio.get(m),
            "spread": p.get("spread_mean"),
            "cosine to prototype": p.get("cosine_to_prototype_mean"),
        })
    return pd.DataFrame(rows)


def prototype_cosine_figure(matrix: Sequence[Sequence[float]], class_names: Sequence[str], *, title: str,
                            diff: bool = False, height: int = 420) -> go.Figure:
    """Cosine similarity between class prototypes (C×C); ``diff``: a difference matrix on a red/blue scale."""
    m = np.asarray(matrix, dtype=float)
    names = [str(c) for c in class_names]
    small = len(names) <= 8  # numbers in the cells only while they fit; hover always gives them
    if diff:
        lim = max(0.05, float(np.nanmax(np.abs(m))) if m.size else 1.0)
        kw = {"colorscale": "RdBu_r", "zmin": -lim, "zmax": lim, "zmid": 0}
    else:
        kw = {"colorscale": "Viridis", "zmin": -1 if np.nanmin(m) < 0 else 0, "zmax": 1}
    fig = go.Figure(go.Heatmap(
        z=m, x=names, y=names, text=np.round(m, 2) if small else None, texttemplate="%{text:.2f}" if small else None,
        textfont={"size": 12},
        hovertemplate="class %{y} vs class %{x}<br>" + ("difference" if diff else "cosine") + " %{z:.3f}<extra></extra>",
        colorbar={"title": "Δ cos" if diff else "cos", "thickness": 12}, **kw,
    ))
    style(fig, title, height=height, x_title="class", y_title="class")
    fig.update_layout(margin={"b": 60})
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def prototypes_view(data: RunData, side: str, compact: bool) -> None:
    if not need_analysis(data):
        return
    st.caption("A **prototype** is the average embedding of one class — the class's centre in the model's feature "
               "space. Distillation should make the student's classes sit like the teacher's.", help=HELP["prototype"])
    _table(data, side)
    _norms(data.summary)
    others = [m for m in data.models if m != "teacher"]
    other = others[0] if others else None
    if len(others) > 1:
        k = f"an_{side}_proto_model"
        other = keep(k, st.segmented_control("Compare the teacher with", others, default=restore(k, others[0], others),
                                             key=k, format_func=role_label) or others[0])
    _similarity(data, other, side, compact)
    embedding_view(data, side, compact, other)


def _table(data: RunData, side: str) -> None:
    s = data.summary
    table = prototype_table(s)
    if table.empty:
        return
    nc = st.column_config.NumberColumn
    st.dataframe(table, hide_index=True, key=f"an_{side}_proto_table", column_config={
        "top-1 on these images (%)": nc(format="%.1f", help="Accuracy of the model's own classifier on the analysis images."),
        "NCM accuracy (%)": nc(format="%.1f", help=HELP["ncm"]),
        "mean norm": nc(format="%.3f", help=HELP["norm"]),
        "norm ÷ teacher's": nc(format="%.2f×", help=HELP["norm"]),
        "spread": nc(format="%.3f", help=HELP["spread"]),
        "cosine to prototype": nc(format="%.3f", help=HELP["cos"]),
    })
    st.caption(sample_note(s, data.run.summary or {}))


def sample_note(analysis: Mapping[str, Any], run_summary: Mapping[str, Any]) -> str:
    """Where these numbers come from, and the run page's whole-test-split accuracies where they differ."""
    n, split = analysis.get("n", "?"), analysis.get("split", "test")
    note = f"Computed on {n} {split} images (the run's `analysis.samples`)."
    here = analysis.get("accuracy") or {}
    differ = [(m, run_summary[key], here[m]) for m, key in RUN_PAGE_ACCURACY.items()
              if isinstance(run_summary.get(key), (int, float)) and isinstance(here.get(m), (int, float))
              and round(run_summary[key], 1) != round(here[m], 1)]
    if differ:
        note += (" The Run detail page measures the whole test split, so its accuracies differ: "
                 + ", ".join(f"{model_label(m).lower()} {whole:.1f} % there, {sample:.1f} % here" for m, whole, sample in differ) + ".")
    return note


def _norms(s: Mapping[str, Any]) -> None:
    ratio = s.get("norm_ratio") or {}
    if not ratio:
        return
    cols = st.columns(len(ratio) + 1)
    for col, (m, r) in zip(cols, ratio.items()):
        col.metric(f"{model_label(m)} norm ÷ teacher norm", f"{r:.2f}×", help=HELP["norm"])
    if "student" in ratio:
        cols[-1].caption(norm_sentence(ratio["student"]))


def norm_sentence(ratio: float) -> str:
    """What the student's norm ratio says, judged on the value as shown (two decimals), so text and number agree."""
    shown = round(ratio, 2)
    if shown < 1:
        return "The distilled student's embeddings are shorter than the teacher's, as the ND paper observed for distilled students."
    if shown > 1:
        return "The distilled student's embeddings are longer than the teacher's: the ND paper's observation (shorter) does not hold here."
    return "The distilled student's embeddings are as long as the teacher's (to two decimals): neither shorter, as the ND paper observed, nor longer."


def _similarity(data: RunData, other: str | None, side: str, compact: bool) -> None:
    st.markdown("#### Prototype similarity")
    st.caption("Cosine similarity between every pair of class prototypes. Similar patterns in teacher and student "
               "= the student learned the teacher's class geometry (which classes are close).")
    pc = data.summary.get("prototype_cosine") or {}
    if "teacher" not in pc or other not in pc:
        return
    mats = [("Teacher", np.asarray(pc["teacher"]), False), (model_label(other), np.asarray(pc[other]), False),
            (f"{model_label(other)} − teacher", np.asarray(pc[other]) - np.asarray(pc["teacher"]), True)]
    cols = st.columns(1 if compact else 3)
    for i, (title, m, diff) in enumerate(mats):
        with cols[i % len(cols)]:
            plot(prototype_cosine_figure(m, data.class_names, title=title, diff=diff, height=420),
                 f"run{data.run.id}_prototype_cosine_{title.split()[0].lower()}", f"an_{side}_pcos_{i}")
    st.caption("Difference: red = the student puts these two classes closer together than the teacher does, "
               "blue = further apart.")
