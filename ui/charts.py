"""Plotly figure builders shared by the result pages.

Conventions (so every chart of the dashboard looks alike and reads on a projector):

* the runs of one chart get distinct colours (``run_colors``): the palette in order, then evenly spread hues;
* within one run, teacher / student / baseline have fixed colours (``role_color``);
* fonts >= 14 px, lines 3 px, wide layouts, legends above the plot;
* long series arrive bucketed (mean line + min/max band, ``Store.metric_series_bucketed``) and the chart
  says how many points it stands for, e.g. "2,000 buckets of 10,000,000 points".

No Streamlit import here: these are plain functions, testable and usable from the benchmark.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

FONT_SIZE = 15
TITLE_SIZE = 18
LINE_WIDTH = 3
FAINT_OPACITY = 0.25

# Okabe-Ito-like, colour-blind safe first, then Plotly's D3 extras. Fixed order: colours never move.
PALETTE: tuple[str, ...] = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C564B", "#7F7F7F",
    "#BCBD22", "#17BECF", "#9467BD", "#2CA02C",
)
ROLE_COLORS: dict[str, str] = {
    "teacher": "#7F7F7F",   # grey: the reference
    "student": "#0072B2",   # blue: the distilled student
    "baseline": "#E69F00",  # orange: same student without the teacher
}
ROLE_LABELS: dict[str, str] = {"teacher": "Teacher", "student": "Student (distilled)", "baseline": "Baseline (CE only)"}


def run_colors(run_ids: Sequence[int]) -> dict[int, str]:
    """A distinct colour for each run, in the order given (the same runs in the same order: the same colours).

    The palette first; past its end, hues spread evenly around the colour wheel in between its colours, so two runs
    never share a colour however many are compared (a colour from the run id alone repeats every 12 ids).
    """
    ids = list(dict.fromkeys(run_ids))
    extra = len(ids) - len(PALETTE)
    return {rid: PALETTE[i] if i < len(PALETTE) else _hue((i - len(PALETTE) + 0.5) / extra) for i, rid in enumerate(ids)}


def _hue(fraction: float) -> str:
    r, g, b = colorsys.hls_to_rgb(fraction % 1.0, 0.42, 0.75)
    return f"#{int(r * 255):02X}{int(g * 255):02X}{int(b * 255):02X}"


def role_color(role: str) -> str:
    """Teacher / student / baseline colour (report names like ``student_best`` map to their role)."""
    return ROLE_COLORS.get(role.split("_")[0], "#444444")


def role_label(role: str) -> str:
    return ROLE_LABELS.get(role, role)


def rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    r, g, b = (int(c[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def plotly_config(filename: str) -> dict:
    """``st.plotly_chart(config=...)``: the camera button saves a 2x PNG under a meaningful name."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in filename)[:120] or "chart"
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": "png", "filename": safe, "scale": 2},
    }


GRID_COLOR = "#e5e5e5"


def style(fig: go.Figure, title: str | None = None, subtitle: str | None = None, height: int = 420,
          x_title: str | None = None, y_title: str | None = None) -> go.Figure:
    """Readable defaults: big fonts, white background, legend on top, a subtitle line under the title."""
    text = title or ""
    if subtitle:
        text = f"{text}<br><span style='font-size:14px;color:#555'>{subtitle}</span>"
    fig.update_layout(
        # explicit colours, not template="plotly_white": plotly validates a named template on every
        # figure (~75 ms each), and Streamlit's theme restyles the chart in the page anyway
        paper_bgcolor="white",
        plot_bgcolor="white",
        font={"size": FONT_SIZE},
        title={"text": text, "font": {"size": TITLE_SIZE}, "x": 0, "xanchor": "left"} if text else None,
        height=height,
        margin={"l": 60, "r": 20, "t": 80 if subtitle else 55, "b": 115},
        # legend under the plot: above it, it collides with two-line titles on narrow charts
        legend={"orientation": "h", "yanchor": "top", "y": -0.3, "xanchor": "left", "x": 0, "font": {"size": FONT_SIZE}},
        hoverlabel={"font": {"size": FONT_SIZE}},
    )
    fig.update_xaxes(gridcolor=GRID_COLOR, zerolinecolor=GRID_COLOR, **({"title_text": x_title} if x_title is not None else {}))
    fig.update_yaxes(gridcolor=GRID_COLOR, zerolinecolor=GRID_COLOR, **({"title_text": y_title} if y_title is not None else {}))
    return fig


LEGEND_ROW_PX = 23  # one line of 15 px legend text
LEGEND_CHARS = 95  # longer legend entries wrap onto a second line
LEGEND_CHAR_PX = 9  # generous width of a character: Plotly clips an entry at the width it measured


def legend_below(fig: go.Figure, names: Sequence[str], plot_height: int) -> go.Figure:
    """One legend entry per line under the plot, with the figure made tall enough to hold them all.

    A legend Plotly places by itself overflows the figure when there are many entries or long names, and the
    exported PNG cuts it off; here the bottom margin grows by a row per entry (two for a wrapped name).
    """
    rows = 0
    for trace in fig.data:
        if trace.name in names and trace.showlegend is not False:
            if len(trace.name) > LEGEND_CHARS:
                trace.name = _wrap(trace.name)
            rows += trace.name.count("<br>") + 1
    bottom = 80 + LEGEND_ROW_PX * rows
    top = fig.layout.margin.t or 80
    longest = max((len(line) for n in names for line in _wrap(n).split("<br>")), default=10)
    fig.update_layout(
        showlegend=True, height=top + plot_height + bottom, margin={"b": bottom},
        legend={"orientation": "v", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0, "xanchor": "left",
                "tracegroupgap": 0, "entrywidth": 40 + LEGEND_CHAR_PX * longest, "entrywidthmode": "pixels"},
    )
    return fig


def _wrap(name: str) -> str:
    words, lines = name.split(" "), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + 1 + len(word) > LEGEND_CHARS:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return "<br>".join(lines)


# --------------------------------------------------------------------------- long series


def points_subtitle(n_buckets: int, n_points: int) -> str:
    """What a line stands for: every point, or how many buckets of how many points."""
    if n_buckets >= n_points:
        return f"all {n_points:,} points"
    return f"{n_buckets:,} buckets of {n_points:,} points (line = bucket mean, band = min–max)"


def ema(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard, without the bias towards the first value).

    ``weight`` in [0, 1): 0 = no smoothing. NaNs are carried through without poisoning later values.
    """
    v = np.asarray(values, dtype=float)
    if weight <= 0 or len(v) == 0:
        return v.copy()
    out = np.empty_like(v)
    acc, norm = 0.0, 0.0
    for i, x in enumerate(v):
        if np.isfinite(x):
            acc = weight * acc + (1 - weight) * x
            norm = weight * norm + (1 - weight)
        out[i] = acc / norm if norm > 0 else np.nan
    return out


@dataclass
class Curve:
    """One line of a curves chart: a bucketed frame (step, epoch, time, value, min, max, count)."""

    name: str
    color: str
    frame: pd.DataFrame
    dash: str | None = None
    group: str | None = None  # legend group (e.g. the run), so toggling hides line and band together


def x_values(frame: pd.DataFrame, x: str, t0: float | None = None) -> pd.Series:
    """The x column for ``x`` in step | epoch | time (wall seconds since ``t0`` or the first point)."""
    if x == "time":
        start = t0 if t0 is not None else (float(frame["time"].min()) if len(frame) else 0.0)
        return (frame["time"] - start) / 60.0
    if x == "epoch":
        # fractional epochs for step series (steps within an epoch spread between epoch and epoch+1)
        if "step" in frame and frame["epoch"].notna().all() and len(frame):
            e = frame["epoch"].astype(float)
            out = e.copy()
            for ep, idx in frame.groupby(e).groups.items():
                steps = frame.loc[idx, "step"].astype(float)
                lo, hi = steps.min(), steps.max()
                out.loc[idx] = ep + (steps - lo + 1) / (hi - lo + 1) if hi > lo else ep + 1.0
            return out
        return frame["epoch"].astype(float) + 1
    return frame["step"]


X_TITLES = {"step": "step", "epoch": "epoch", "time": "wall time since start (min)"}


def curves_figure(curves: Sequence[Curve], *, x: str = "step", title: str = "", y_title: str | None = None,
                  total_points: int | None = None, smoothing: float = 0.0, height: int = 420,
                  t0: Mapping[str, float] | None = None, log_y: bool = False) -> go.Figure:
    """Lines with a min/max band where buckets hold several points; with smoothing the raw line stays faint.

    The subtitle says how many points the chart stands for; ``fig.layout.meta`` keeps
    ``{"buckets": n, "points": N}`` for tests and captions.
    """
    fig = go.Figure()
    n_buckets = 0
    n_points = 0
    for c in curves:
        df = c.frame
        if df is None or len(df) == 0:
            continue
        xs = x_values(df, x, (t0 or {}).get(c.name))
        n_buckets += len(df)
        n_points += int(df["count"].sum()) if "count" in df else len(df)
        group = c.group or c.name
        if "count" in df and (df["count"] > 1).any():
            fig.add_trace(go.Scatter(x=xs, y=df["max"], mode="lines", line={"width": 0}, hoverinfo="skip",
                                     showlegend=False, legendgroup=group, name=f"{c.name} max"))
            fig.add_trace(go.Scatter(x=xs, y=df["min"], mode="lines", line={"width": 0}, fill="tonexty",
                                     fillcolor=rgba(c.color, 0.18), hoverinfo="skip", showlegend=False,
                                     legendgroup=group, name=f"{c.name} min–max"))
        mode = "lines" if len(df) > 1 else "markers"
        if smoothing > 0 and len(df) > 2:
            fig.add_trace(go.Scatter(x=xs, y=df["value"], mode=mode, name=f"{c.name} (raw)", showlegend=False,
                                     legendgroup=group, line={"color": c.color, "width": 1.5, "dash": c.dash},
                                     opacity=FAINT_OPACITY, hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=xs, y=ema(df["value"].to_numpy(), smoothing), mode=mode, name=c.name,
                                     legendgroup=group, line={"color": c.color, "width": LINE_WIDTH, "dash": c.dash},
                                     marker={"size": 9}))
        else:
            plain = "lines" if len(df) > 60 else ("lines+markers" if len(df) > 1 else "markers")
            fig.add_trace(go.Scatter(x=xs, y=df["value"], mode=plain,
                                     name=c.name, legendgroup=group,
                                     line={"color": c.color, "width": LINE_WIDTH, "dash": c.dash},
                                     marker={"size": 8, "color": c.color}))
    if total_points is None:
        total_points = n_points
    subtitle = points_subtitle(n_buckets, total_points) if n_buckets else "no data yet"
    style(fig, title, subtitle, height=height, x_title=X_TITLES.get(x, x), y_title=y_title)
    fig.update_layout(meta={"buckets": n_buckets, "points": total_points}, hovermode="x unified")
    legend_below(fig, [c.name for c in curves if c.frame is not None and len(c.frame)], plot_height=height - 195)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


# --------------------------------------------------------------------------- run detail charts


def accuracy_figure(per_role: Mapping[str, pd.DataFrame], *, title: str, y_title: str = "top-1 accuracy (%)",
                    teacher_line: float | None = None, height: int = 420) -> go.Figure:
    """Per-epoch accuracy of teacher / student / baseline; a loaded teacher is a horizontal line."""
    fig = go.Figure()
    for role in ("teacher", "student", "baseline"):
        df = per_role.get(role)
        if df is None or len(df) == 0:
            continue
        color = role_color(role)
        if role == "teacher" and len(df) == 1 and int(df["step"].iloc[0]) == 0:
            teacher_line = float(df["value"].iloc[0])  # a loaded/fixed teacher: evaluated once
            continue
        fig.add_trace(go.Scatter(x=df["epoch"].astype(int) + 1, y=df["value"], mode="lines+markers", name=role_label(role),
                                 line={"color": color, "width": LINE_WIDTH, "dash": "dot" if role == "baseline" else None},
                                 marker={"size": 9}))
    if teacher_line is not None:
        fig.add_hline(y=teacher_line, line={"color": role_color("teacher"), "width": LINE_WIDTH, "dash": "dash"},
                      annotation_text=f"teacher {teacher_line:.1f}", annotation_font_size=FONT_SIZE)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="Teacher (fixed)",
                                 line={"color": role_color("teacher"), "width": LINE_WIDTH, "dash": "dash"}))
    style(fig, title, height=height, x_title="epoch", y_title=y_title)
    fig.update_xaxes(dtick=1 if _max_epochs(per_role) <= 20 else None)
    return fig


def _max_epochs(per_role: Mapping[str, pd.DataFrame]) -> int:
    return max((int(df["epoch"].max()) + 1 for df in per_role.values() if df is not None and len(df)), default=0)


def class_bars_figure(class_names: Sequence[str], per_role: Mapping[str, Sequence[float]], *, title: str,
                      height: int = 420) -> go.Figure:
    """Grouped bars: per-class accuracy of each model."""
    fig = go.Figure()
    names = [str(c) for c in class_names]
    for role, accs in per_role.items():
        fig.add_trace(go.Bar(x=names, y=list(accs), name=role_label(role.split("_")[0]) if "_" not in role else role.replace("_", " "),
                             marker_color=role_color(role)))
    style(fig, title, height=height, x_title="class", y_title="accuracy (%)")
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_xaxes(type="category", tickangle=-45 if len(names) > 12 else 0)
    return fig


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str], *, title: str,
                     height: int = 420) -> go.Figure:
    """Row-normalised confusion matrix (colour = share of the true class, hover = count)."""
    m = np.asarray(matrix, dtype=float)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) * 100
    names = [str(c) for c in class_names]
    small = len(names) <= 12
    fig = go.Figure(go.Heatmap(
        z=share, x=names, y=names, customdata=m.astype(int), colorscale="Blues", zmin=0, zmax=100,
        text=m.astype(int) if small else None, texttemplate="%{text}" if small else None,
        hovertemplate="true %{y}, predicted %{x}<br>%{customdata} images (%{z:.1f}% of the class)<extra></extra>",
        colorbar={"title": "% of class", "thickness": 12},
    ))
    style(fig, title, height=height, x_title="predicted", y_title="true")
    fig.update_layout(margin={"b": 60})
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def parcoords_figure(df: pd.DataFrame, dims: Sequence[str], color_col: str, *, title: str,
                     height: int = 460) -> go.Figure:
    """Parallel coordinates: one line per run, coloured by ``color_col`` (e.g. final accuracy)."""
    dimensions = [{"label": short_label(d), "values": df[d].astype(float)} for d in dims]
    dimensions.append({"label": color_col, "values": df[color_col].astype(float)})
    fig = go.Figure(go.Parcoords(
        line={"color": df[color_col].astype(float), "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": color_col}},
        dimensions=dimensions, labelfont={"size": FONT_SIZE}, tickfont={"size": 13}, labelside="bottom",
    ))
    style(fig, title, height=height)
    fig.update_layout(margin={"l": 70, "r": 70, "t": 90, "b": 90})
    return fig


def short_label(field: str) -> str:
    """'recipe[1].params.temperature' -> 'recipe[1] temperature'; 'student.optimizer.lr' -> 'student lr'."""
    parts = field.replace(".params", "").split(".")
    return parts[0] if len(parts) == 1 else f"{parts[0]}<br>{parts[-1]}"


# --------------------------------------------------------------------------- playground


def probs_figure(class_names: Sequence[str], teacher_probs: Sequence[float], label: int, *, temperature: float,
                 student_probs: Sequence[float] | None = None, height: int = 400) -> go.Figure:
    """The teacher's softmax at T next to the one-hot label (and the student's softmax, faint)."""
    names = [str(c) for c in class_names]
    onehot = [100.0 if i == label else 0.0 for i in range(len(names))]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=onehot, name="true label (one-hot)", marker_color="#009E73", opacity=0.45))
    fig.add_trace(go.Bar(x=names, y=[100 * p for p in teacher_probs], name=f"teacher, T = {temperature:g}",
                         marker_color=role_color("teacher")))
    if student_probs is not None:
        fig.add_trace(go.Bar(x=names, y=[100 * p for p in student_probs], name=f"student, T = {temperature:g}",
                             marker_color=role_color("student")))
    style(fig, "What the student is taught: label vs. teacher's soft targets", height=height, x_title="class",
          y_title="probability (%)")
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 102])
    return fig


def temperature_curve_figure(temps: Sequence[float], series: Mapping[str, tuple[Sequence[float], str, str | None]],
                             current_t: float, *, title: str, y_title: str, log_y: bool = False,
                             height: int = 380) -> go.Figure:
    """Curves over T with the current T marked. ``series``: name -> (values, colour, dash)."""
    fig = go.Figure()
    t = np.asarray(temps, dtype=float)
    for name, (values, color, dash) in series.items():
        v = np.asarray(values, dtype=float)
        fig.add_trace(go.Scatter(x=t, y=v, mode="lines", name=name, line={"color": color, "width": LINE_WIDTH, "dash": dash}))
        y_now = float(np.interp(current_t, t, v))
        fig.add_trace(go.Scatter(x=[current_t], y=[y_now], mode="markers", showlegend=False, hoverinfo="x+y",
                                 marker={"size": 14, "color": color, "line": {"width": 2, "color": "white"}}))
    fig.add_vline(x=current_t, line={"color": "#D55E00", "width": 2, "dash": "dot"},
                  annotation_text=f"T = {current_t:g}", annotation_font_size=FONT_SIZE)
    style(fig, title, height=height, x_title="temperature T", y_title=y_title)
    if log_y:
        fig.update_yaxes(type="log", dtick=1)
    return fig
