"""Data helpers and Plotly figure builders for the Analysis page (CKA, prototypes, attribution, agreement).

Everything here works on what a run stored (``cka_*.json``, ``analysis.json``, ``analysis.safetensors``; see
ANALYSIS_ARTIFACTS.md) as plain dicts / NumPy arrays. No Streamlit import: the page does the loading (cached) and
the layout; these functions are testable on their own.

Colours follow ui.charts: teacher grey, distilled student blue, baseline orange. Class colours use a separate
categorical palette so they never look like a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.charts import FONT_SIZE, LINE_WIDTH, role_color, role_label, style

MODELS = ("teacher", "student", "baseline")
BUCKETS: tuple[str, ...] = ("teacher_right_model_wrong", "teacher_wrong_model_right", "both_wrong", "both_right")
METHOD_LABELS = {
    "saliency": "Saliency",
    "integrated_gradients": "Integrated gradients",
    "smoothgrad": "SmoothGrad",
    "gradcam": "Grad-CAM",
    "occlusion": "Occlusion",
}
PROJECTION_LABELS = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
# class colours: 20 distinct colours (Plotly Dark24/Light24 picks), repeated only beyond 20 classes
CLASS_PALETTE: tuple[str, ...] = (
    "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#BCBD22", "#17BECF", "#7F3C8D",
    "#11A579", "#3969AC", "#F2B701", "#E73F74", "#80BA5A", "#E68310", "#008695", "#CF1C90", "#4B4B8F", "#A5AA99",
)


def _rgb_scale(hexes: Sequence[str]) -> list[list]:
    """A colorscale with rgb() stops (the dashboard's Plotly front end mis-draws some 7-digit hex stops near 0)."""
    out = []
    for i, h in enumerate(hexes):
        c = h.lstrip("#")
        out.append([i / (len(hexes) - 1), f"rgb({int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)})"])
    return out


# matplotlib's "inferno": black = no attribution, yellow = strongest
ATTR_SCALE = _rgb_scale(("#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06",
                         "#f7d13d", "#fcffa4"))


def class_color(c: int) -> str:
    return CLASS_PALETTE[int(c) % len(CLASS_PALETTE)]


def method_label(m: str) -> str:
    return METHOD_LABELS.get(m, m.replace("_", " "))


def model_label(model: str) -> str:
    return {"teacher": "Teacher", "student": "Student", "baseline": "Baseline"}.get(model, model)


def bucket_label(bucket: str, model: str = "student") -> str:
    m = model_label(model).lower()
    return {
        "teacher_right_model_wrong": f"teacher right, {m} wrong",
        "teacher_wrong_model_right": f"teacher wrong, {m} right",
        "both_wrong": "both wrong",
        "both_right": "both right",
    }.get(bucket, bucket)


# --------------------------------------------------------------------------- predictions


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predictions(tensors: Mapping[str, np.ndarray], model: str) -> np.ndarray | None:
    logits = tensors.get(f"{model}.logits")
    return None if logits is None else np.asarray(logits).argmax(axis=1)


def bucket_masks(tensors: Mapping[str, np.ndarray], model: str = "student") -> dict[str, np.ndarray]:
    """{bucket: bool [n]} for teacher vs ``model`` (same split as the stored agreement counts)."""
    y = np.asarray(tensors["targets"])
    t, s = predictions(tensors, "teacher"), predictions(tensors, model)
    if t is None or s is None:
        return {}
    tr, sr = t == y, s == y
    return {
        "teacher_right_model_wrong": tr & ~sr,
        "teacher_wrong_model_right": ~tr & sr,
        "both_wrong": ~tr & ~sr,
        "both_right": tr & sr,
    }


def models_in(summary: Mapping[str, Any] | None, tensors: Mapping[str, np.ndarray]) -> list[str]:
    listed = list((summary or {}).get("models") or [])
    return [m for m in (listed or MODELS) if f"{m}.logits" in tensors]


# --------------------------------------------------------------------------- CKA


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


# --------------------------------------------------------------------------- prototypes


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
            "top-1 accuracy (%)": acc.get(m),
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


# --------------------------------------------------------------------------- attribution


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


def image_hwc(image: np.ndarray) -> np.ndarray:
    """[C, H, W] float in [0, 1] → [H, W, C] (C = 1 or 3) float."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    return np.clip(np.transpose(a, (1, 2, 0)), 0, 1)


def thumbnail(image: np.ndarray, size: int = 96) -> np.ndarray:
    """uint8 [H', W'] or [H', W', 3] upscaled by pixel repetition (tiny 8×8 digits stay crisp)."""
    a = image_hwc(image)
    f = max(1, int(np.ceil(size / max(a.shape[0], a.shape[1]))))
    a = np.repeat(np.repeat(a, f, axis=0), f, axis=1)
    a = (a * 255).round().astype(np.uint8)
    return a[..., 0] if a.shape[2] == 1 else a


def _image_trace(image: np.ndarray) -> go.BaseTraceType:
    a = image_hwc(image)
    if a.shape[2] == 1:
        return go.Heatmap(z=a[..., 0], colorscale="gray", zmin=0, zmax=1, showscale=False, hoverinfo="skip")
    return go.Image(z=(a * 255).astype(np.uint8), hoverinfo="skip")


def attribution_grid(image: np.ndarray, maps: Mapping[str, Mapping[str, np.ndarray]], methods: Sequence[str],
                     models: Sequence[str], *, mode: str, scores: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
                     title: str | None = None, row_height: int = 190) -> go.Figure:
    """One image: rows = methods, columns = the image, then each model's map.

    ``maps[method][model]`` raw ``[H, W]``; normalized per image+method with ``normalize_group(mode)``.
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
        group = normalize_group({m: maps[method][m] for m in models if m in maps.get(method, {})}, mode)
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


# --------------------------------------------------------------------------- agreement and calibration


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
