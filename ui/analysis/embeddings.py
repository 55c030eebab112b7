"""2-D maps of the embeddings (PCA, t-SNE, UMAP; or teacher and student in one space) with the class prototypes.

A lasso or box selection on a map is remembered per run and opens in the Disagreement explorer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from ui import charts
from ui.analysis.common import (
    EXPLORER_SOURCE_KEY,
    HELP,
    SELECTION_KEY,
    TAB_KEY,
    TABS,
    keep,
    restore,
)
from ui.analysis.data import (
    PROJECTION_LABELS,
    RunData,
    class_color,
    model_label,
    predictions,
)
from ui.charts import role_color, style


def hover_texts(tensors: Mapping[str, np.ndarray], class_names: Sequence[str], models: Sequence[str]) -> list[str]:
    """Per sample: its label and each model's prediction (✓ / ✗)."""
    y = np.asarray(tensors["targets"])
    preds = {m: predictions(tensors, m) for m in models}
    out = []
    for i, label in enumerate(y):
        parts = [f"image {i}", f"label <b>{class_names[int(label)]}</b>"]
        for m in models:
            p = preds[m]
            if p is not None:
                ok = "✓" if p[i] == label else "✗"
                parts.append(f"{model_label(m).lower()}: {class_names[int(p[i])]} {ok}")
        out.append("<br>".join(parts))
    return out


def _sample_traces(fig: go.Figure, points: np.ndarray, targets: np.ndarray, class_names: Sequence[str],
                   hover: Sequence[str], *, symbol: str = "circle", name_suffix: str = "", opacity: float = 0.75,
                   showlegend: bool = True, size: int = 8, row: int | None = None, col: int | None = None) -> None:
    idx_all = np.arange(len(targets))
    for c in np.unique(targets):
        sel = targets == c
        kw = {"row": row, "col": col} if row is not None else {}
        fig.add_trace(go.Scattergl(
            x=points[sel, 0], y=points[sel, 1], mode="markers", name=f"{class_names[int(c)]}{name_suffix}",
            legendgroup=f"class{int(c)}", showlegend=showlegend,
            marker={"color": class_color(int(c)), "size": size, "symbol": symbol, "opacity": opacity,
                    "line": {"width": 0.5, "color": "white"}},
            customdata=idx_all[sel], text=[hover[i] for i in idx_all[sel]],
            hovertemplate="%{text}<extra></extra>",
        ), **kw)


def _prototype_trace(fig: go.Figure, protos: np.ndarray, class_names: Sequence[str], *, model: str,
                     symbol: str = "diamond", showlegend: bool = True, row: int | None = None, col: int | None = None) -> None:
    kw = {"row": row, "col": col} if row is not None else {}
    n = len(protos)
    fig.add_trace(go.Scatter(
        x=protos[:, 0], y=protos[:, 1], mode="markers+text", name=f"{model_label(model)} prototypes",
        text=[str(class_names[c]) for c in range(n)], textposition="middle center",
        textfont={"size": 13, "color": "white"},
        marker={"size": 26, "symbol": symbol, "color": [class_color(c) for c in range(n)],
                "line": {"width": 3, "color": role_color(model)}},
        customdata=np.full(n, -1), showlegend=showlegend,
        hovertemplate=f"{model_label(model)} prototype of class %{{text}}<extra></extra>",
    ), **kw)


def embedding_figure(points: np.ndarray, prototypes: np.ndarray | None, targets: np.ndarray,
                     class_names: Sequence[str], hover: Sequence[str], *, model: str, title: str,
                     subtitle: str | None = None, highlight: Sequence[int] | None = None, height: int = 560) -> go.Figure:
    """Samples coloured by class with the class prototypes (class means) drawn on top as big labelled markers.

    Sample points carry their index in ``customdata`` (prototypes carry -1), so a lasso selection maps back to
    images.
    """
    fig = go.Figure()
    pts = np.asarray(points, dtype=float)
    y = np.asarray(targets)
    _sample_traces(fig, pts, y, class_names, hover)
    if prototypes is not None:
        _prototype_trace(fig, np.asarray(prototypes, dtype=float), class_names, model=model)
    _highlight(fig, pts, highlight)
    style(fig, title, subtitle, height=height)
    fig.update_layout(dragmode="lasso", legend={"title": {"text": "class"}, "itemsizing": "constant"})
    fig.update_xaxes(showticklabels=False, title_text="")
    fig.update_yaxes(showticklabels=False, title_text="")
    return fig


def _highlight(fig: go.Figure, pts: np.ndarray, highlight: Sequence[int] | None) -> None:
    if highlight is None or len(highlight) == 0:
        return
    h = np.asarray(list(highlight), dtype=int)
    h = h[(h >= 0) & (h < len(pts))]
    fig.add_trace(go.Scatter(x=pts[h, 0], y=pts[h, 1], mode="markers", name="in the explorer",
                             marker={"size": 16, "symbol": "circle-open", "color": "#111111", "line": {"width": 2}},
                             hoverinfo="skip", customdata=np.full(len(h), -1)))


def joint_figure(teacher_pts: np.ndarray, model_pts: np.ndarray, targets: np.ndarray, class_names: Sequence[str],
                 hover: Sequence[str], *, model: str = "student", title: str, subtitle: str | None = None,
                 highlight: Sequence[int] | None = None, height: int = 600) -> go.Figure:
    """Teacher and ``model`` samples in the teacher's PCA space; prototypes of both, joined by a line per class."""
    fig = go.Figure()
    tp, mp = np.asarray(teacher_pts, float), np.asarray(model_pts, float)
    y = np.asarray(targets)
    n = len(class_names)
    _sample_traces(fig, tp, y, class_names, hover, symbol="circle", name_suffix="", opacity=0.35, size=7)
    _sample_traces(fig, mp, y, class_names, hover, symbol="x", name_suffix=f" ({model_label(model).lower()})",
                   opacity=0.8, showlegend=False, size=8)
    # class means of the 2-D points = the projected prototypes (the map and the PCA are affine)
    t_proto = np.array([tp[y == c].mean(0) if (y == c).any() else [np.nan, np.nan] for c in range(n)])
    m_proto = np.array([mp[y == c].mean(0) if (y == c).any() else [np.nan, np.nan] for c in range(n)])
    xs, ys = [], []
    for c in range(n):
        xs += [t_proto[c, 0], m_proto[c, 0], None]
        ys += [t_proto[c, 1], m_proto[c, 1], None]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="prototype shift", hoverinfo="skip",
                             line={"color": "#333333", "width": 2, "dash": "dot"}))
    _prototype_trace(fig, t_proto, class_names, model="teacher", symbol="diamond")
    _prototype_trace(fig, m_proto, class_names, model=model, symbol="star")
    _highlight(fig, mp, highlight)
    style(fig, title, subtitle, height=height)
    fig.update_layout(dragmode="lasso", legend={"title": {"text": "class"}, "itemsizing": "constant"})
    fig.update_xaxes(showticklabels=False, title_text="teacher PC 1")
    fig.update_yaxes(showticklabels=False, title_text="teacher PC 2")
    return fig


def selected_indices(selection: Any) -> list[int]:
    """Sample indices from a ``st.plotly_chart`` selection (prototype markers and highlights carry -1)."""
    points = []
    try:
        points = selection["selection"]["points"]
    except (KeyError, TypeError):
        try:
            points = selection.selection.points
        except AttributeError:
            return []
    out: list[int] = []
    for p in points or []:
        cd = p.get("customdata")
        if isinstance(cd, (list, tuple)):
            cd = cd[0] if cd else None
        if cd is None:
            continue
        try:
            i = int(cd)
        except (TypeError, ValueError):
            continue
        if i >= 0 and i not in out:
            out.append(i)
    return sorted(out)


def _store_selection(chart_key: str, sel_key: str) -> None:
    st.session_state[sel_key] = selected_indices(st.session_state.get(chart_key))


def _open_explorer(sel_key: str, source_key: str) -> None:
    st.session_state[source_key] = "selection"
    st.session_state[TAB_KEY] = TABS["explorer"]


def embedding_view(data: RunData, side: str, compact: bool, other: str | None) -> None:
    st.markdown("#### 2-D view of the embeddings")
    layout, proj = _controls(data, side, other)
    if proj is None:
        st.caption("No 2-D projections stored for this run.")
        return
    sel_key = SELECTION_KEY.format(run=data.run.id)
    highlight = st.session_state.get(sel_key) or []
    st.caption("Small dots: images (colour = true class; hover for label and predictions). Big labelled markers: the "
               "class prototypes. **Lasso or box-select points** (toolbar above the chart) to see those images in the "
               "Disagreement explorer.", help=HELP["prototype"])
    figs = _joint(data, side, other, highlight, compact) if layout == "joint" else _side_by_side_maps(data, side, other, proj, highlight)
    cols = st.columns(1 if compact or len(figs) == 1 else len(figs))
    for i, (key, fig) in enumerate(figs.items()):
        with cols[i % len(cols)]:
            st.plotly_chart(fig, config=charts.plotly_config(f"run{data.run.id}_{key.removeprefix(f'an_{side}_')}"), key=key,
                            on_select=functools.partial(_store_selection, key, sel_key), selection_mode=("points", "lasso", "box"))
    picked = st.session_state.get(sel_key) or []
    c1, c2 = st.columns([3, 2])
    if picked:
        c1.success(f"**{len(picked)} image(s) selected** (ringed in black).")
        c2.button(f"Show the {len(picked)} selected images in the explorer", key=f"an_{side}_to_explorer", icon=":material/search:",
                  on_click=_open_explorer, args=(sel_key, EXPLORER_SOURCE_KEY.format(side=side)), type="primary")
    else:
        c1.caption("Nothing selected yet.")


def _controls(data: RunData, side: str, other: str | None) -> tuple[str, str | None]:
    """(layout: side | joint, projection) as chosen; the choices offered are those the run stored."""
    t = data.tensors
    projections = [p for p in (data.summary.get("projections") or ["pca"]) if f"teacher.{p}" in t]
    c1, c2 = st.columns(2)
    layout = "side"
    if other is not None and f"joint.{other}_pca" in t and "teacher.pca" in t:
        k = f"an_{side}_emb_layout"
        layout = keep(k, c1.segmented_control(
            "Layout", ["side", "joint"], default=restore(k, "side"), key=k,
            format_func=lambda v: {"side": "side by side", "joint": "one space"}[v],
            help="Side by side: each model projected on its own (positions are not comparable between the two plots). "
                 "One space: the student's embedding is mapped into the teacher's feature space (least squares) and "
                 "both are drawn with the teacher's PCA, so you see where the student's classes sit relative to the "
                 "teacher's.") or "side")
    proj = projections[0] if projections else None
    if layout == "side" and len(projections) > 1:
        k = f"an_{side}_emb_proj"
        proj = keep(k, c2.segmented_control(
            "Projection", projections, default=restore(k, projections[0], projections), key=k,
            format_func=lambda p: PROJECTION_LABELS.get(p, p),
            help="PCA keeps global distances (stable, linear). t-SNE keeps neighbourhoods: "
                 "clusters are meaningful, their sizes and the distances between them are not.") or projections[0])
    return layout, proj


def _joint(data: RunData, side: str, other: str, highlight: list[int], compact: bool) -> dict[str, go.Figure]:
    s, t = data.summary, data.tensors
    r2 = s.get("joint_r2")
    r2v = r2.get(other) if isinstance(r2, dict) else r2
    who = model_label(other).lower()
    sub = (f"○ teacher images, × {who} images; ◆ teacher prototypes, ★ {who} prototypes, dotted = how far each moved"
           + (f" · mapping R² = {r2v:.2f}" if isinstance(r2v, (int, float)) else ""))
    fig = joint_figure(t["teacher.pca"], t[f"joint.{other}_pca"], np.asarray(t["targets"]), data.class_names,
                       hover_texts(t, data.class_names, data.models), model=other,
                       title=f"Teacher and {who} in the teacher's PCA space", subtitle=sub, highlight=highlight,
                       height=620 if compact else 680)
    return {f"an_{side}_emb_joint": fig}


def _side_by_side_maps(data: RunData, side: str, other: str | None, proj: str, highlight: list[int]) -> dict[str, go.Figure]:
    t = data.tensors
    y, hover = np.asarray(t["targets"]), hover_texts(t, data.class_names, data.models)
    figs = {}
    for m in ["teacher"] + ([other] if other else []):
        if f"{m}.{proj}" in t:
            figs[f"an_{side}_emb_{m}_{proj}"] = embedding_figure(
                t[f"{m}.{proj}"], t.get(f"{m}.{proj}_prototypes"), y, data.class_names, hover, model=m,
                title=f"{charts.role_label(m)} — {PROJECTION_LABELS.get(proj, proj)}",
                subtitle=f"{len(y)} {data.summary.get('split', 'test')} images", highlight=highlight, height=560)
    return figs
