"""Agreement and calibration: who is right on each analysis image (teacher, the other model, both, neither) and
whether each model is as confident as it is accurate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui import charts
from ui.analysis.common import HELP, need_analysis, plot
from ui.analysis.data import BUCKETS, MODELS, RunData, model_label
from ui.charts import LINE_WIDTH, role_color, role_label, style


def agreement_figure(counts: Mapping[str, Any], model: str, *, title: str, height: int = 360) -> go.Figure:
    """2×2: rows teacher right / wrong, columns model right / wrong; numbers = images (and % of n)."""
    m = np.array([[counts.get("both_right", 0), counts.get("teacher_right_model_wrong", 0)],
                  [counts.get("teacher_wrong_model_right", 0), counts.get("both_wrong", 0)]], dtype=float)
    n = m.sum()
    text = [[f"{int(v)}<br>({100 * v / n:.0f} %)" if n else "0" for v in row] for row in m]
    ml = model_label(model).lower()
    fig = go.Figure(go.Heatmap(
        z=m, x=[f"{ml} right", f"{ml} wrong"], y=["teacher right", "teacher wrong"], text=text,
        texttemplate="%{text}", textfont={"size": 20}, colorscale=[[0, "#F4F6FA"], [1, role_color(model)]],
        showscale=False, hovertemplate="%{y}, %{x}: %{z:.0f} images<extra></extra>",
    ))
    style(fig, title, f"n = {int(n)} test images", height=height)
    fig.update_layout(margin={"b": 30, "l": 130})
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(side="top")
    return fig


def agreement_table(agreement: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    rows = []
    for model, c in agreement.items():
        total = sum(int(c.get(b, 0)) for b in BUCKETS)
        rows.append({"model": role_label(model), "both right": c.get("both_right"),
                     "teacher right, model wrong": c.get("teacher_right_model_wrong"),
                     "teacher wrong, model right": c.get("teacher_wrong_model_right"),
                     "both wrong": c.get("both_wrong"), "total (n)": total,
                     "same prediction as teacher (%)": 100.0 * float(c.get("agreement_rate", np.nan))})
    return pd.DataFrame(rows)


def reliability_figure(calib: Mapping[str, Mapping[str, Any]], *, title: str, height: int = 460,
                       compact: bool = False) -> go.Figure:
    """Reliability diagram: accuracy vs confidence per (non-empty) bin, the diagonal = perfectly calibrated."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"color": "#999999", "width": 2, "dash": "dash"}, hoverinfo="skip"))
    for model in MODELS:
        c = calib.get(model)
        if not c:
            continue
        counts = np.asarray(c.get("counts") or [], float)
        conf = np.asarray(c.get("confidence") or [], float)
        acc = np.asarray(c.get("accuracy") or [], float)
        keep = counts > 0
        size = 8 + 22 * np.sqrt(counts[keep] / max(1.0, counts.max()))
        fig.add_trace(go.Scatter(
            x=conf[keep], y=acc[keep], mode="lines+markers", name=f"{role_label(model)} — ECE {100 * float(c.get('ece', np.nan)):.1f} %",
            line={"color": role_color(model), "width": LINE_WIDTH, "dash": "dot" if model == "baseline" else None},
            marker={"size": size, "color": role_color(model), "line": {"width": 1, "color": "white"}},
            customdata=counts[keep],
            hovertemplate=f"{role_label(model)}<br>confidence %{{x:.2f}}<br>accuracy %{{y:.2f}}<br>%{{customdata:.0f}} images<extra></extra>",
        ))
    style(fig, title, "dot size = images in the confidence bin;" + ("<br>" if compact else " ") + "below the diagonal = over-confident", height=height,
          x_title="confidence (top-1 probability)", y_title="accuracy")
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def agreement_view(data: RunData, side: str, compact: bool) -> None:
    if not need_analysis(data, tensors=False):
        return
    s, rid = data.summary, data.run.id
    agreement = s.get("agreement") or {}
    st.caption(f"Who is right on each of the {s.get('n', '?')} {s.get('split', 'test')} images: the teacher, the student, "
               "both or neither. 'Teacher right, student wrong' is what distillation could still fix; open it in the "
               "Disagreement explorer.")
    if agreement:
        cols = st.columns(1 if compact else len(agreement))
        for i, (m, counts) in enumerate(agreement.items()):
            with cols[i % len(cols)]:
                plot(agreement_figure(counts, m, title=f"Teacher vs {charts.role_label(m)}"),
                     f"run{rid}_agreement_{m}", f"an_{side}_agree_{m}")
        st.dataframe(agreement_table(agreement), hide_index=True, key=f"an_{side}_agree_table", column_config={
            "same prediction as teacher (%)": st.column_config.NumberColumn(
                format="%.1f", help="Share of images where the model predicts the same class as the teacher, right or wrong."),
        })
    cal = s.get("calibration") or {}
    if cal:
        st.markdown("#### Calibration")
        st.caption("Is a model as sure as it should be? A model that says 90 % should be right 90 % of the time. "
                   "Points below the diagonal = over-confident, above = under-confident.", help=HELP["ece"])
        cols = st.columns(len(cal))
        for col, (m, c) in zip(cols, cal.items()):
            col.metric(f"ECE {model_label(m).lower()}", f"{100 * float(c.get('ece', float('nan'))):.1f} %", help=HELP["ece"])
        plot(reliability_figure(cal, title="Reliability diagram", height=480 if compact else 500, compact=compact),
             f"run{rid}_calibration", f"an_{side}_calib")

