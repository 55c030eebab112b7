"""The disagreement explorer: the images of an agreement bucket (or of a lasso selection on the embeddings) with
each model's prediction, and a closer look at one image: every model's softmax and its attribution maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from ui import charts
from ui.analysis.attribution import attribution_figure, remembered_display
from ui.analysis.common import (
    EXPLORER_SOURCE_KEY,
    HELP,
    SELECTION_KEY,
    keep,
    need_analysis,
    plot,
    restore,
)
from ui.analysis.data import (
    BUCKETS,
    RunData,
    bucket_label,
    bucket_masks,
    model_label,
    predictions,
    softmax,
    thumbnail,
)
from ui.charts import role_color, style

SHOW_COUNTS = (24, 48, 96)
MAPS_MARK = "[maps]"  # marks images that have attribution maps (plain text: renders without an emoji font)


def probs_figure(class_names: Sequence[str], probs: Mapping[str, np.ndarray], label: int, *, title: str,
                 height: int = 300) -> go.Figure:
    """Softmax of each model for one image, grouped by class; the true class is marked."""
    names = [str(c) for c in class_names]
    fig = go.Figure()
    for model, p in probs.items():
        fig.add_trace(go.Bar(x=names, y=100 * np.asarray(p, float), name=model_label(model), marker_color=role_color(model)))
    fig.add_vrect(x0=label - 0.5, x1=label + 0.5, fillcolor="#009E73", opacity=0.15, line_width=0,
                  annotation_text="true", annotation_position="top left", annotation_font_size=13)
    style(fig, title, height=height, y_title="probability (%)")
    fig.update_layout(barmode="group", margin={"t": 50, "b": 80}, legend={"y": -0.25})
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 102])
    return fig


def explorer_view(data: RunData, side: str, compact: bool) -> None:
    if not need_analysis(data):
        return
    others = [m for m in data.models if m != "teacher"]
    if not others:
        st.info("Only the teacher was analysed for this run.")
        return
    source, model, indices, what = _choose_images(data, side, others)
    if not indices:
        st.info("No images here." if source == "bucket" else
                "Nothing selected yet: lasso or box-select points in the 2-D view on the **Prototypes & embeddings** tab.")
        return
    t = data.tensors
    attr_pos = {int(i): j for j, i in enumerate(np.asarray(t.get("attr_index", np.zeros(0, int))).tolist())}
    indices = sorted(indices, key=lambda i: (i not in attr_pos, i))  # images with attribution maps first
    shown = _thumbnails(data, side, model, indices, what, attr_pos, compact, source)
    _closer_look(data, side, model, shown, attr_pos, compact)


def _choose_images(data: RunData, side: str, others: list[str]) -> tuple[str, str, list[int], str]:
    """(source, compared model, image indices, what they are) from the explorer's controls."""
    t, names = data.tensors, data.class_names
    sel_key, source_key = SELECTION_KEY.format(run=data.run.id), EXPLORER_SOURCE_KEY.format(side=side)
    picked = st.session_state.get(sel_key) or []
    restore(source_key, None, ["bucket", "selection"])
    c1, c2, c3 = st.columns([2, 3, 3])
    source = keep(source_key, c1.radio(
        "Images to show", ["bucket", "selection"], key=source_key,
        format_func=lambda v: {"bucket": "an agreement bucket", "selection": f"my selection in the 2-D view ({len(picked)})"}[v],
        help="Bucket: images grouped by who is right. Selection: the points you lasso-selected on the Prototypes & embeddings tab."))
    model = others[0]
    if len(others) > 1:
        k = f"an_{side}_exp_model"
        model = keep(k, c2.segmented_control("Compare the teacher with", others, default=restore(k, others[0], others), key=k,
                                             format_func=charts.role_label,
                                             help="Which model is compared with the teacher (buckets and predictions).") or others[0])
    masks = bucket_masks(t, model)
    if source == "bucket":
        k = f"an_{side}_exp_bucket"
        restore(k, None, list(BUCKETS))
        bucket = keep(k, c3.selectbox("Bucket", list(BUCKETS), key=k,
                                      format_func=lambda b: f"{bucket_label(b, model)} ({int(masks[b].sum())} images)",
                                      help="Teacher right / student wrong: what the student failed to learn from the teacher. "
                                           "Teacher wrong / student right: where the student did better on its own."))
        indices, what = np.flatnonzero(masks[bucket]).tolist(), bucket_label(bucket, model)
    else:
        indices, what = list(picked), "your selection"
        if picked:
            c3.button("Clear the selection", key=f"an_{side}_exp_clear", on_click=lambda: st.session_state.pop(sel_key, None))
        counts = {b: int(sum(masks[b][i] for i in picked)) for b in BUCKETS}
        what += " (" + ", ".join(f"{n} {bucket_label(b, model)}" for b, n in counts.items() if n) + ")" if picked else ""
    y = np.asarray(t["targets"])
    classes = sorted({int(y[i]) for i in indices})
    if len(classes) > 1:
        only = st.multiselect("Only these true classes (optional)", classes, key=f"an_{side}_exp_classes",
                              format_func=lambda c: names[c], placeholder="all classes")
        indices = [i for i in indices if not only or int(y[i]) in only]
    return source, model, indices, what


def _thumbnails(data: RunData, side: str, model: str, indices: list[int], what: str, attr_pos: dict, compact: bool,
                source: str) -> list[int]:
    """A grid of the images with both models' predictions under each; returns the images shown."""
    t, names = data.tensors, data.class_names
    y = np.asarray(t["targets"])
    preds = {m: predictions(t, m) for m in ("teacher", model)}
    probs = {m: softmax(t[f"{m}.logits"]) for m in ("teacher", model)}
    c1, c2 = st.columns([4, 1])
    limit = SHOW_COUNTS[0]
    if len(indices) > SHOW_COUNTS[0]:
        k = f"an_{side}_exp_limit"
        restore(k, None, list(SHOW_COUNTS))
        limit = keep(k, c2.selectbox("Show at most", SHOW_COUNTS, key=k, help="Thumbnails shown (images with attribution maps first)."))
    shown = indices[:limit]
    c1.markdown(f"**{len(indices)} image(s)** — {what}" + (f" (first {limit} shown)" if len(indices) > limit else "") + ".")
    letter = model_label(model)[0]
    st.caption(f"Under each image: its number and true class, then **T** = the teacher's prediction and **{letter}** = the "
               f"{model_label(model).lower()}'s, each with its probability (✓ right, ✗ wrong). {MAPS_MARK} = attribution "
               "maps stored for this image (shown first).")
    per_row = 3 if compact else 6
    for start in range(0, len(shown), per_row):
        for col, i in zip(st.columns(per_row), shown[start:start + per_row]):
            lab, tp, mp = int(y[i]), int(preds["teacher"][i]), int(preds[model][i])
            cap = (f"{MAPS_MARK + ' ' if i in attr_pos else ''}#{i} · class {names[lab]}  \n"
                   f"T {names[tp]} {'✓' if tp == lab else '✗'} {100 * probs['teacher'][i, tp]:.0f}% · "
                   f"{letter} {names[mp]} {'✓' if mp == lab else '✗'} {100 * probs[model][i, mp]:.0f}%")
            col.image(thumbnail(t["images"][i], 112), caption=cap, width="stretch")
    return shown


def _closer_look(data: RunData, side: str, model: str, shown: list[int], attr_pos: dict, compact: bool) -> None:
    t, names = data.tensors, data.class_names
    y = np.asarray(t["targets"])
    preds = {m: predictions(t, m) for m in ("teacher", model)}
    st.markdown("#### Look closer")
    pick = st.selectbox("Image", shown, key=f"an_{side}_exp_pick",
                        format_func=lambda i: (f"{MAPS_MARK + ' ' if i in attr_pos else ''}#{i} — label {names[int(y[i])]}, teacher "
                                               f"{names[int(preds['teacher'][i])]}, {model_label(model).lower()} "
                                               f"{names[int(preds[model][i])]}"),
                        help="Softmax of each model for this image and, where stored, its attribution maps.")
    c1, c2 = st.columns([1, 3]) if not compact else (st.container(), st.container())
    with c1:
        st.image(thumbnail(t["images"][pick], 224), caption=f"#{pick}, true class {names[int(y[pick])]}")
    with c2:
        order = [m for m in data.models if m in ("teacher", model)] + [m for m in data.models if m not in ("teacher", model)]
        fig = probs_figure(names, {m: softmax(t[f"{m}.logits"][pick]) for m in order}, int(y[pick]),
                           title="What each model predicts (softmax)", height=320)
        plot(fig, f"run{data.run.id}_probs_image{pick}", f"an_{side}_exp_probs")
    if pick not in attr_pos:
        st.caption(f"No attribution maps were stored for this image (only the first {len(attr_pos)} images of the analysis "
                   "set, disagreements first, get them).")
        return
    display = remembered_display(data, side)
    st.caption(f"Attribution maps, methods and display as chosen on the Attribution tab. {display.describe()}",
               help=HELP["spearman"] + " " + HELP["iou"])
    plot(attribution_figure(data, attr_pos[pick], pick, display, row_height=110 if compact else 190),
         f"run{data.run.id}_explorer_attribution{pick}", f"an_{side}_exp_attr", theme=None)
