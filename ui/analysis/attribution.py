"""Attribution maps: which pixels drove each model's score for the true class, teacher and students side by side,
with how much each student's maps agree with the teacher's.

Raw gradient maps of small CNNs look like checkerboard noise. By default they are shown the way the literature
displays them: the absolute value, lightly blurred (``for_display``), with SmoothGrad and Grad-CAM as the default
methods; the agreement scores are always those of the raw maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ui.analysis.common import HELP, keep, need_analysis, plot, restore
from ui.analysis.data import RunData, image_hwc, method_label, model_label, predictions
from ui.charts import FONT_SIZE, role_color, role_label, style

BLUR_SIGMA_PER_PIXEL = 1 / 28  # a 1-pixel Gaussian on a 28×28 image, scaled with the image side
METHODS_HELP = ("Saliency: gradient of the class score w.r.t. each pixel. Integrated gradients: gradients averaged along a "
                "path from a blank image. SmoothGrad: saliency averaged over noisy copies. Grad-CAM: which regions of the "
                "last convolutional layer drive the class. Occlusion: how much the score drops when a patch is hidden.")


def for_display(attribution: np.ndarray) -> np.ndarray:
    """|attribution| blurred with a small Gaussian: how saliency maps are usually shown (sign and pixel noise dropped)."""
    a = np.abs(np.asarray(attribution, dtype=float))
    sigma = max(0.5, BLUR_SIGMA_PER_PIXEL * max(a.shape))
    radius = max(1, int(round(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(a, radius, mode="reflect")
    rows = sum(w * padded[i:i + a.shape[0], :] for i, w in enumerate(kernel))
    return sum(w * rows[:, i:i + a.shape[1]] for i, w in enumerate(kernel))


def rgb_scale(hexes: Sequence[str]) -> list[list]:
    """A colorscale with rgb() stops (the dashboard's Plotly front end mis-draws some 7-digit hex stops near 0)."""
    out = []
    for i, h in enumerate(hexes):
        c = h.lstrip("#")
        out.append([i / (len(hexes) - 1), f"rgb({int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)})"])
    return out


# matplotlib's "inferno": black = no attribution, yellow = strongest
ATTR_SCALE = rgb_scale(("#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06",
                        "#f7d13d", "#fcffa4"))


def _scale(a: np.ndarray, outlier_perc: float = 2.0) -> float:
    flat = np.abs(np.asarray(a, dtype=float)).ravel()
    if flat.size == 0:
        return 1.0
    s = float(np.quantile(flat, 1 - outlier_perc / 100.0))
    if s <= 0:
        s = float(flat.max())
    return s if s > 0 else 1.0


def normalize_group(maps: Mapping[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Scale the maps of one image and method (one per model) to [-1, 1] for display.

    ``per_map``: each map by its own 98th percentile of |value| (compares *where* each model looks);
    ``joint``: one scale for all of them (compares *how strongly*: a weak map stays faint).
    """
    if mode == "joint":
        s = _scale(np.concatenate([np.ravel(m) for m in maps.values()])) if maps else 1.0
        return {k: np.clip(np.asarray(m, float) / s, -1, 1) for k, m in maps.items()}
    return {k: np.clip(np.asarray(m, float) / _scale(m), -1, 1) for k, m in maps.items()}


def _image_trace(image: np.ndarray) -> go.BaseTraceType:
    a = image_hwc(image)
    if a.shape[2] == 1:
        return go.Heatmap(z=a[..., 0], colorscale="gray", zmin=0, zmax=1, showscale=False, hoverinfo="skip")
    return go.Image(z=(a * 255).astype(np.uint8), hoverinfo="skip")


def attribution_grid(image: np.ndarray, maps: Mapping[str, Mapping[str, np.ndarray]], methods: Sequence[str],
                     models: Sequence[str], *, mode: str, scores: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
                     title: str | None = None, row_height: int = 190, smooth: bool = False) -> go.Figure:
    """One image: rows = methods, columns = the image, then each model's map.

    ``maps[method][model]`` raw ``[H, W]``; with ``smooth`` shown as ``for_display`` makes them, then normalized per
    image+method with ``normalize_group(mode)``.
    ``scores[method][model] = (spearman, iou)`` vs the teacher, shown in the column titles.
    """
    cols = 1 + len(models)
    titles: list[str] = []
    for method in methods:
        titles.append(f"<b>{method_label(method)}</b>")
        for m in models:
            t = model_label(m)
            sc = (scores or {}).get(method, {}).get(m)
            if sc is not None and m != "teacher":
                t += f"<br><span style='font-size:13px'>ρ {sc[0]:+.2f}<br>IoU {sc[1]:.2f}</span>"
            titles.append(t)
    gap_px = 75  # room for the three-line column titles of the next row
    spacing = min(gap_px / (row_height * max(1, len(methods))), 0.9 / max(1, len(methods) - 1))
    fig = make_subplots(rows=len(methods), cols=cols, subplot_titles=titles, horizontal_spacing=0.03,
                        vertical_spacing=spacing if len(methods) > 1 else 0.0)
    for r, method in enumerate(methods, start=1):
        fig.add_trace(_image_trace(image), row=r, col=1)
        group = normalize_group({m: for_display(maps[method][m]) if smooth else maps[method][m]
                                 for m in models if m in maps.get(method, {})}, mode)
        signed = any(float(v.min()) < 0 for v in group.values())
        for c, m in enumerate(models, start=2):
            if m not in group:
                continue
            fig.add_trace(go.Heatmap(
                z=group[m], zmin=-1 if signed else 0, zmax=1, colorscale="RdBu_r" if signed else ATTR_SCALE,
                showscale=(r == 1 and c == cols), colorbar={"thickness": 10, "len": 0.8, "title": "attr."},
                hovertemplate=f"{model_label(m)} {method_label(method)}<br>x %{{x}}, y %{{y}}<br>%{{z:.2f}}<extra></extra>",
            ), row=r, col=c)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed", scaleanchor="x")
    for r in range(1, len(methods) + 1):
        for c in range(1, cols + 1):
            idx = (r - 1) * cols + c
            fig.update_yaxes(scaleanchor=f"x{idx if idx > 1 else ''}", row=r, col=c)
    fig.update_annotations(font_size=14)
    fig.update_layout(paper_bgcolor="white", plot_bgcolor="white", font={"size": FONT_SIZE}, height=(125 if title else 80) + (row_height + gap_px) * len(methods),
                      margin={"l": 10, "r": 10, "t": 125 if title else 80, "b": 10},
                      title={"text": title, "x": 0, "y": 1, "yanchor": "top", "yref": "container", "pad": {"t": 8},
                             "font": {"size": 16}} if title else None)
    return fig


def attribution_summary(attr: Mapping[str, Any]) -> pd.DataFrame:
    """Mean Spearman / top-k IoU per (model, method) over the attribution images."""
    rows = []
    for model, per_method in (attr.get("agreement") or {}).items():
        for method, vals in per_method.items():
            sp = np.asarray(vals.get("spearman") or [], float)
            iou = np.asarray(vals.get("iou") or [], float)
            rows.append({"model": model, "method": method,
                         "spearman": float(np.nanmean(sp)) if sp.size else np.nan,
                         "iou": float(np.nanmean(iou)) if iou.size else np.nan, "images": int(max(sp.size, iou.size))})
    return pd.DataFrame(rows, columns=["model", "method", "spearman", "iou", "images"])


def attribution_summary_wide(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per method; columns "<Model> ρ" and "<Model> IoU" (student, then baseline)."""
    if summary.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"method": [method_label(m) for m in dict.fromkeys(summary["method"])]})
    for model in ("student", "baseline"):
        d = summary[summary["model"] == model].set_index("method")
        if d.empty:
            continue
        order = list(dict.fromkeys(summary["method"]))
        out[f"{model_label(model)} ρ"] = [d["spearman"].get(m, np.nan) for m in order]
        out[f"{model_label(model)} IoU"] = [d["iou"].get(m, np.nan) for m in order]
    return out


def attribution_summary_figure(summary: pd.DataFrame, iou_random: float | None, k: float | None, *,
                               title: str, height: int = 400) -> go.Figure:
    """Mean top-k IoU with the teacher's maps per method (student vs baseline), the random-map IoU as a line."""
    fig = go.Figure()
    for model in ("student", "baseline"):
        d = summary[summary["model"] == model]
        if d.empty:
            continue
        fig.add_trace(go.Bar(x=[method_label(m) for m in d["method"]], y=d["iou"], name=role_label(model),
                             marker_color=role_color(model), customdata=d["spearman"],
                             hovertemplate=f"{role_label(model)}<br>%{{x}}<br>mean IoU %{{y:.3f}}<br>mean Spearman %{{customdata:+.3f}}<extra></extra>"))
    if iou_random is not None:
        fig.add_hline(y=iou_random, line={"color": "#D55E00", "width": 2, "dash": "dash"},
                      annotation_text=f"random maps: {iou_random:.3f}", annotation_font_size=FONT_SIZE,
                      annotation_position="top right")
    kp = f"top {k * 100:g} % pixels" if k else "top-k pixels"
    style(fig, title, f"IoU of the {kp} of each map with the teacher's map, mean over images", height=height,
          y_title="IoU with teacher")
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1])
    return fig


@dataclass
class Display:
    """How the maps are shown, as chosen on the Attribution tab (the explorer shows its maps the same way)."""

    methods: list[str]
    mode: str = "per_map"  # per_map | joint
    models: list[str] | None = None  # None: every model with maps
    smooth: bool = True

    def describe(self) -> str:
        scaling = "each map scaled on its own: compare shapes" if self.mode == "per_map" else "maps of an image on one scale: compare magnitudes"
        shown = "|attribution| with a light Gaussian blur" if self.smooth else "the raw signed attribution (red +, blue −)"
        return f"Shown: {shown}; {scaling}."


def stored_methods(data: RunData) -> list[str]:
    attr = (data.summary or {}).get("attribution") or {}
    return [m for m in attr.get("methods") or [] if f"attr.teacher.{m}" in data.tensors]


def remembered_display(data: RunData, side: str) -> Display:
    """The choices last made on the Attribution tab (its widgets are not drawn while another tab is open)."""
    memo = st.session_state.get("_an_keep", {})
    methods = [m for m in memo.get(f"an_{side}_attr_methods") or [] if m in stored_methods(data)] or _default_methods(data)
    return Display(methods, memo.get(f"an_{side}_attr_norm", "per_map"), None, memo.get(f"an_{side}_attr_smooth", True))


def _default_methods(data: RunData) -> list[str]:
    methods = stored_methods(data)
    return [m for m in ("smoothgrad", "gradcam", "saliency") if m in methods][:2] or methods[:2]


def _controls(data: RunData, side: str) -> Display:
    methods = stored_methods(data)
    c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
    km, kn, ks, kb = (f"an_{side}_attr_{k}" for k in ("methods", "norm", "smooth", "base"))
    chosen = keep(km, c1.multiselect("Methods", methods, default=restore(km, _default_methods(data), methods), key=km,
                                     format_func=method_label, help=METHODS_HELP))
    restore(kn, None, ["per_map", "joint"])
    mode = keep(kn, c2.radio("Scale the maps", ["per_map", "joint"], key=kn,
                             format_func=lambda v: {"per_map": "per map (compare shape)", "joint": "jointly (compare magnitude)"}[v],
                             help="Per map: every map is scaled to its own strongest pixels — shows WHERE each model looks. "
                                  "Jointly: teacher and student maps of an image share one scale — a model whose attributions "
                                  "are weaker shows up fainter."))
    smooth = keep(ks, c3.toggle("Smooth for display", value=bool(restore(ks, True, [True, False])), key=ks,
                                help="On: the absolute value, lightly blurred, as attribution maps are usually shown; "
                                     "gradient maps of small CNNs are checkerboard noise otherwise. Off: the raw signed maps."))
    models = [m for m in data.models if f"attr.{m}.{(chosen or methods or ['?'])[0]}" in data.tensors]
    if "baseline" in models and not keep(kb, c4.toggle(
            "Show the baseline too", value=bool(restore(kb, True, [True, False])), key=kb,
            help="The baseline is the same student trained without the teacher: if the distilled student's maps are "
                 "closer to the teacher's than the baseline's, the student learned where to look.")):
        models = [m for m in models if m != "baseline"]
    return Display(chosen, mode, models, smooth)


def attribution_view(data: RunData, side: str, compact: bool) -> None:
    if not need_analysis(data):
        return
    idx = np.asarray(data.tensors.get("attr_index", np.zeros(0, int)))
    if not stored_methods(data) or idx.size == 0:
        st.info("No attribution maps stored for this run (`analysis.attribution_images` was 0).")
        return
    st.caption(f"Attribution maps show which pixels drove the prediction of the **true class** for {idx.size} test "
               "images (chosen so that teacher-right / student-wrong cases come first). If distillation transfers "
               "'where to look', the student's maps resemble the teacher's more than the baseline's do.")
    display = _controls(data, side)
    attr = data.summary.get("attribution") or {}
    k, iou_random = attr.get("k") or 0.1, attr.get("iou_random")
    random_text = f"{iou_random:.3f}" if iou_random is not None else "unknown"
    st.info(f"**{display.describe()}** ρ = Spearman rank correlation with the teacher's map; IoU = overlap of the top "
            f"{k * 100:g} % pixels (two random maps: {random_text}). Both are computed on the raw maps.", icon=":material/info:")
    with st.expander("What do ρ and IoU mean?"):
        st.markdown(f"- **Spearman ρ** — {HELP['spearman']}\n- **Top-k IoU** — {HELP['iou']}")
    _agreement_summary(data, side, idx.size, k, iou_random)
    if not display.methods:
        st.caption("Pick at least one method above to see the maps.")
        return
    st.markdown("#### Gallery")
    per_row = 1 if compact else 2
    cols = st.columns(per_row)
    for j, i in enumerate(idx.tolist()):
        with cols[j % per_row]:
            plot(attribution_figure(data, j, int(i), display, row_height=110),
                 f"run{data.run.id}_attribution_image{i}", f"an_{side}_attr_img{j}", theme=None)


def _agreement_summary(data: RunData, side: str, n: int, k: float, iou_random: float | None) -> None:
    summary = attribution_summary(data.summary.get("attribution") or {})
    if summary.empty:
        return
    fig = attribution_summary_figure(summary, iou_random, k, title="How much do the maps agree with the teacher's?", height=380)
    plot(fig, f"run{data.run.id}_attribution_iou", f"an_{side}_attr_summary")
    wide = attribution_summary_wide(summary)
    st.dataframe(wide, hide_index=True, key=f"an_{side}_attr_table", column_config={
        c: st.column_config.NumberColumn(format="%+.3f" if c.endswith("ρ") else "%.3f",
                                         help=HELP["spearman"] if c.endswith("ρ") else HELP["iou"])
        for c in wide.columns if c != "method"})
    st.caption(f"Means over the {n} images, on the raw maps.")


def attribution_figure(data: RunData, j: int, i: int, display: Display, row_height: int = 190) -> go.Figure:
    """The maps of the ``j``-th attribution image (test image ``i``), with each student's ρ and IoU in the titles."""
    t, names = data.tensors, data.class_names
    models = display.models if display.models is not None else [m for m in data.models if f"attr.{m}.{display.methods[0]}" in t]
    agree = (data.summary.get("attribution") or {}).get("agreement") or {}
    maps = {m: {mod: t[f"attr.{mod}.{m}"][j] for mod in models if f"attr.{mod}.{m}" in t} for m in display.methods}
    scores: dict[str, dict[str, tuple[float, float]]] = {}
    for m in display.methods:
        for mod in models:
            vals = (agree.get(mod) or {}).get(m) or {}
            sp, io = vals.get("spearman") or [], vals.get("iou") or []
            if j < len(sp) and j < len(io):
                scores.setdefault(m, {})[mod] = (float(sp[j]), float(io[j]))
    y = np.asarray(t["targets"])
    preds = {m: predictions(t, m) for m in data.models}
    title = f"image {i} · label <b>{names[int(y[i])]}</b> · " + " · ".join(
        f"{model_label(m).lower()} {names[int(p[i])]} {'✓' if p[i] == y[i] else '✗'}" for m, p in preds.items() if p is not None)
    return attribution_grid(t["images"][i], maps, display.methods, models, mode=display.mode, scores=scores, title=title,
                            row_height=row_height, smooth=display.smooth)
