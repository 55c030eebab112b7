"""The CKA view: teacher-vs-student layer similarity at the checkpoints computed during training, its trend, and
each model's self-similarity (on request: two more heatmaps the first view of the page does not need)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui.analysis.common import HELP, keep, plot, restore
from ui.analysis.data import RunData, missing_message, model_label
from ui.charts import FONT_SIZE, LINE_WIDTH, role_color, role_label, style


def cka_sorted(entries: Sequence[Mapping[str, Any]], phase: str) -> list[Mapping[str, Any]]:
    """The CKA checkpoints of one phase, by epoch."""
    return sorted((e for e in entries if e.get("phase") == phase), key=lambda e: (int(e.get("epoch", 0)), int(e.get("step", 0))))


def matching_rows(matrix: np.ndarray, mode: str) -> np.ndarray:
    """For each student layer (column), the teacher layer (row) it is compared with over time.

    ``best``: the teacher layer with the highest CKA at this checkpoint; ``depth``: the teacher layer at the same
    relative depth (first↔first, embedding↔embedding, in between spread evenly).
    """
    m = np.asarray(matrix, dtype=float)
    rows, cols = m.shape
    if mode == "best":
        return np.nanargmax(np.where(np.isfinite(m), m, -np.inf), axis=0)
    if cols == 1:
        return np.array([rows - 1])
    return np.rint(np.arange(cols) * (rows - 1) / (cols - 1)).astype(int)


def cka_track(entries_by_phase: Mapping[str, Sequence[Mapping[str, Any]]], mode: str = "best") -> pd.DataFrame:
    """Long frame (phase, epoch, student_layer, teacher_layer, cka): each student layer's CKA with its matching
    teacher layer at every checkpoint."""
    rows: list[dict[str, Any]] = []
    for phase, entries in entries_by_phase.items():
        for e in entries:
            m = np.asarray(e["matrix"], dtype=float)
            pick = matching_rows(m, mode)
            for j, col in enumerate(e["cols"]):
                i = int(pick[j])
                rows.append({"phase": phase, "epoch": int(e["epoch"]), "student_layer": str(col),
                             "teacher_layer": str(e["rows"][i]), "cka": float(m[i, j])})
    return pd.DataFrame(rows, columns=["phase", "epoch", "student_layer", "teacher_layer", "cka"])


def cka_heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], *, title: str,
                subtitle: str | None = None, x_title: str = "student layer", y_title: str = "teacher layer",
                height: int = 440) -> go.Figure:
    """Layer-by-layer CKA; colour clipped to [0, 1] (the debiased estimator can dip below 0), hover = raw value."""
    m = np.asarray(matrix, dtype=float)
    shown = np.clip(m, 0.0, 1.0)
    small = m.size <= 150
    fig = go.Figure(go.Heatmap(
        z=shown, x=list(cols), y=list(rows), customdata=m, zmin=0, zmax=1, colorscale="Viridis",
        text=np.round(m, 2) if small else None, texttemplate="%{text:.2f}" if small else None,
        textfont={"size": FONT_SIZE},
        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>CKA %{{customdata:.3f}}<extra></extra>",
        colorbar={"title": "CKA", "thickness": 12},
    ))
    style(fig, title, subtitle, height=height, x_title=x_title, y_title=y_title)
    fig.update_layout(margin={"b": 60})
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def cka_over_time_figure(track: pd.DataFrame, *, title: str, subtitle: str | None = None, height: int = 420) -> go.Figure:
    """One line per (model, student layer): CKA with its matching teacher layer across checkpoints."""
    fig = go.Figure()
    layers = list(dict.fromkeys(track["student_layer"])) if len(track) else []
    symbols = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon")
    dashes = (None, "dash", "dot", "dashdot", "longdash")
    for phase in ("student", "baseline"):
        part = track[track["phase"] == phase]
        for j, layer in enumerate(layers):
            d = part[part["student_layer"] == layer].sort_values("epoch")
            if d.empty:
                continue
            fig.add_trace(go.Scatter(
                x=d["epoch"], y=d["cka"], mode="lines+markers", name=f"{model_label(phase)} · {layer}",
                legendgroup=phase, customdata=d["teacher_layer"],
                line={"color": role_color(phase), "width": LINE_WIDTH, "dash": dashes[j % len(dashes)]},
                marker={"size": 11, "symbol": symbols[j % len(symbols)]},
                hovertemplate=f"{model_label(phase)} layer {layer}<br>epoch %{{x}}<br>CKA %{{y:.3f}} with teacher %{{customdata}}<extra></extra>",
            ))
    style(fig, title, subtitle, height=height, x_title="epoch", y_title="CKA with teacher")
    fig.update_yaxes(range=[min(0.0, float(track["cka"].min()) - 0.02) if len(track) else 0, 1.02])
    fig.update_xaxes(dtick=1)
    return fig


def cka_view(data: RunData, side: str, compact: bool) -> None:
    if not data.cka:
        st.info("No CKA checkpoints for this run. " + ("" if data.complete else missing_message(data)))
        return
    phases = [p for p in ("student", "baseline") if p in data.cka]
    phase = _pick_phase(phases, side)
    entry = _pick_checkpoint(data.cka[phase], phase, side)
    st.caption(
        f"**CKA** = how similar two layers' representations of the same images are (0 = unrelated, 1 = identical up to "
        f"rotation/scale). Bright cells: a {phase} layer that represents the images like that "
        f"teacher layer. Computed on {entry.get('n', '?')} {entry.get('split', '')} images "
        f"({str(entry.get('estimator', '')).replace('_', ' ')}, {entry.get('pooling', '')}-pooled); colours clipped to [0, 1].",
        help=HELP["cka"])
    fig = cka_heatmap(entry["matrix"], entry["rows"], entry["cols"], title=f"Teacher vs {phase} — epoch {entry['epoch']}",
                      x_title=f"{phase} layer", height=420 if compact else 460)
    plot(fig, f"run{data.run.id}_cka_{phase}_e{entry['epoch']}", f"an_{side}_cka_heat")
    _over_training(data, phases, side, compact)
    _self_similarity(data, entry, phase, side, compact)


def _pick_phase(phases: list[str], side: str) -> str:
    if len(phases) == 1:
        return phases[0]
    k = f"an_{side}_cka_phase"
    phase = st.segmented_control(
        "Model compared with the teacher", phases, default=restore(k, phases[0], phases), key=k, format_func=role_label,
        help="Student (distilled) = trained with the recipe; baseline = the same architecture trained with "
             "cross-entropy only. Comparing both shows what the teacher's signal changed.") or phases[0]
    return keep(k, phase)


def _pick_checkpoint(entries: list[dict], phase: str, side: str) -> dict:
    epochs = [int(e["epoch"]) for e in entries]
    if len(entries) == 1:
        st.caption(f"One CKA checkpoint (epoch {epochs[0]}).")
        return entries[0]
    k = f"an_{side}_cka_epoch_{phase}"
    epoch = keep(k, st.select_slider(
        f"Checkpoint — {len(epochs)} computed during training (epochs {', '.join(map(str, epochs))})", options=epochs,
        value=restore(k, epochs[-1], epochs), key=k, format_func=lambda e: f"epoch {e}",
        help="CKA was computed at these epochs during training; slide to watch the student's layers line up "
             "with the teacher's."))
    return entries[epochs.index(epoch)]


def _over_training(data: RunData, phases: list[str], side: str, compact: bool) -> None:
    st.markdown("#### CKA over training")
    k = f"an_{side}_cka_mode"
    mode = st.segmented_control(
        "Teacher layer each student layer is compared with", ["best", "depth"], default=restore(k, "best"), key=k,
        format_func=lambda m: {"best": "best-matching", "depth": "same relative depth"}[m],
        help="Best-matching: the teacher layer with the highest CKA at that checkpoint. Same relative depth: "
             "first with first, embedding with embedding, the others spread evenly (the 'diagonal').") or "best"
    keep(k, mode)
    track = cka_track({p: data.cka[p] for p in phases}, mode)
    fig = cka_over_time_figure(track, title="CKA with the matching teacher layer",
                               subtitle=("one line per student layer" + ("<br>" if compact else " · ")
                                         + "blue = distilled student, orange = baseline; higher = more teacher-like"),
                               height=420 if compact else 460)
    plot(fig, f"run{data.run.id}_cka_over_time", f"an_{side}_cka_time")
    if track["epoch"].nunique() == 1:
        st.caption("Only one checkpoint: raise `analysis.cka_checkpoints` (and epochs) to see a trend.")


def _self_similarity(data: RunData, entry: dict, phase: str, side: str, compact: bool) -> None:
    st.markdown("#### Self-similarity")
    k = f"an_{side}_cka_self"
    if not keep(k, st.toggle("Show each model's layers compared with each other", value=bool(restore(k, False)), key=k,
                             help=HELP["cka"])):
        return
    st.caption("A bright block = layers that still represent the images the same way (little new happens there).")
    rid = data.run.id
    cols = st.columns(1 if compact else 2)
    with cols[0]:
        t = data.teacher_self
        if t:
            plot(cka_heatmap(t["matrix"], t["rows"], t["cols"], title="Teacher vs teacher", x_title="teacher layer", height=400),
                 f"run{rid}_cka_teacher_self", f"an_{side}_cka_tself")
        else:
            st.caption("No teacher self-similarity stored.")
    with cols[-1]:
        if entry.get("self_model"):
            plot(cka_heatmap(entry["self_model"], entry["cols"], entry["cols"], title=f"{phase.capitalize()} vs itself — epoch {entry['epoch']}",
                             x_title=f"{phase} layer", y_title=f"{phase} layer", height=400),
                 f"run{rid}_cka_{phase}_self", f"an_{side}_cka_sself")
