"""What the Sweep page shows, computed from the database: progress of the grid, the per-cell results table,
and the figures (swept value vs student accuracy and KD gain, a heatmap for two swept axes).

No Streamlit here: plain functions of ``kd_core.sweeps.sweep_runs`` frames, so the tests can check the numbers.
Spread over seeds is the sample std and the 95 % confidence interval of the mean (Student's t), both from
``kd_core.sweeps.sweep_summary``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from kd_core.sweeps import SEED_AXIS, parse_path, sweep_summary
from ui import charts

# status -> the progress bucket it counts in; cancelled runs are counted apart (Resume queues them again)
PROGRESS_BUCKETS = {"completed": "done", "starting": "running", "running": "running", "cancelling": "running",
                    "queued": "queued", "failed": "failed", "cancelled": "cancelled"}
ERROR_BARS = {"ci95": "95 % confidence interval of the mean over seeds", "std": "standard deviation over seeds"}
BAR_NAMES = {"ci95": "95 % CI", "std": "std"}  # short enough for a half-width chart's subtitle


def progress_counts(runs: pd.DataFrame) -> dict[str, int]:
    """How many runs of the grid are done / running / queued / failed / cancelled (every bucket present)."""
    counts = dict.fromkeys(("done", "running", "queued", "failed", "cancelled"), 0)
    for status in runs["status"] if len(runs) else []:
        counts[PROGRESS_BUCKETS.get(status, "queued")] += 1
    return counts


def progress_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    parts = [f"{counts['done']}/{total} done"] + [f"{counts[k]} {k}" for k in ("running", "queued", "failed", "cancelled") if counts[k]]
    return " · ".join(parts)


def axis_title(path: str) -> str:
    """``recipe[1].params.temperature`` -> ``temperature of recipe term 2``; other paths as they are."""
    parts = parse_path(path)
    if parts[0] == "recipe" and len(parts) > 2 and isinstance(parts[1], int):
        return f"{parts[-1]} of recipe term {parts[1] + 1}"
    return path


def grid_axes(axes: Sequence[str]) -> list[str]:
    """The swept axes results are shown against: every axis but the seed (seeds are averaged over)."""
    return [a for a in axes if a != SEED_AXIS]


def _cell_key(row: pd.Series, groups: list[str]) -> tuple:
    return tuple(row[g] for g in groups)


def cells_frame(runs: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """One row per cell of the grid (combination of the non-seed axes), in the sweep's order, with its run ids,
    how many runs it has and how many finished, and the mean, std and 95 % interval of the finished ones."""
    groups = grid_axes(axes)
    stats = sweep_summary(runs, list(axes)) if (runs["status"] == "completed").any() else pd.DataFrame()
    by_key = {_cell_key(r, groups): r for _, r in stats.iterrows()} if len(stats) else {}
    rows = []
    for key, part in (runs.groupby(groups, sort=False, dropna=False) if groups else [((), runs)]):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(groups, key))
        row["run_ids"] = [int(i) for i in part["run"]]
        row["finished"] = int((part["status"] == "completed").sum())
        row["runs"] = len(part)
        found = by_key.get(key)
        for col in ("student_acc", "kd_gain", "baseline_acc"):
            for stat in ("mean", "std", "ci95"):
                name = f"{col}_{stat}"
                row[name] = float(found[name]) if found is not None else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def results_table(cells: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """The table a user reads (and downloads): per cell, finished/total runs, mean ± std and the 95 % interval."""
    groups = grid_axes(axes)
    out = pd.DataFrame({axis_title(g): cells[g] for g in groups})
    out["finished runs"] = [f"{f} of {n}" for f, n in zip(cells["finished"], cells["runs"])]
    for col, label in (("student_acc", "student acc (%)"), ("kd_gain", "KD gain (points)"), ("baseline_acc", "baseline acc (%)")):
        out[f"{label} mean"] = cells[f"{col}_mean"]
        out[f"{label} std"] = cells[f"{col}_std"]
        out[f"{label} 95% CI ±"] = cells[f"{col}_ci95"]
        out[f"{label} mean ± std"] = [_mean_std(m, s) for m, s in zip(cells[f"{col}_mean"], cells[f"{col}_std"])]
    out["runs"] = [", ".join(f"#{i}" for i in ids) for ids in cells["run_ids"]]
    return out


def _mean_std(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if not math.isnan(std) else " (one seed)")


def cell_label(cell: pd.Series, axes: Sequence[str]) -> str:
    groups = grid_axes(axes)
    return ", ".join(f"{str(parse_path(g)[-1])}={cell[g]}" for g in groups) or "all runs"


def csv_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue().encode()


# --------------------------------------------------------------------------- figures


def _x_axis(values: Sequence[Any]) -> dict[str, Any]:
    """Numbers spread over an order of magnitude or more (temperatures 1…16, learning rates) on a log axis."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(values) or not numbers:
        return {"type": "category"}
    if min(numbers) > 0 and max(numbers) / min(numbers) >= 8:
        return {"type": "log", "tickvals": sorted(numbers), "ticktext": [f"{v:g}" for v in sorted(numbers)]}
    return {"type": "linear", "tickvals": sorted(numbers)}


def _errors(frame: pd.DataFrame, col: str, bars: str) -> list[float]:
    return [0.0 if math.isnan(v) else v for v in frame[f"{col}_{bars}"]]


def value_figure(cells: pd.DataFrame, axis: str, col: str, bars: str, by: str | None = None) -> go.Figure:
    """Mean of ``col`` (student_acc or kd_gain) against the swept ``axis``, with error bars, one line per value
    of ``by`` (a second swept axis) if given, and the CE-only baseline as a band (accuracy) or the zero line (gain)."""
    done = cells[cells["finished"] > 0]
    done = done.sort_values(axis) if _x_axis(list(done[axis]))["type"] != "category" else done
    series = [(None, done)] if by is None else list(done.groupby(by, sort=False))
    fig = go.Figure()
    if col == "student_acc":
        _baseline_band(fig, done, axis, bars)
    else:
        fig.add_hline(y=0, line={"color": charts.role_color("baseline"), "width": 2, "dash": "dash"},
                      annotation_text="CE baseline (gain 0)", annotation_position="bottom right")
    for i, (value, part) in enumerate(series):
        name = "student (distilled)" if value is None else f"{parse_path(by)[-1]}={value}"
        color = charts.role_color("student") if value is None else charts.PALETTE[i % len(charts.PALETTE)]
        fig.add_trace(go.Scatter(
            x=list(part[axis]), y=list(part[f"{col}_mean"]), mode="lines+markers", name=name,
            line={"color": color, "width": charts.LINE_WIDTH}, marker={"size": 9},
            error_y={"type": "data", "array": _errors(part, col, bars), "visible": True, "thickness": 2},
            customdata=list(part["finished"]), hovertemplate="%{x}: %{y:.2f} (%{customdata} runs)<extra></extra>"))
    title, y_title = ("Student accuracy", "student accuracy (%)") if col == "student_acc" else ("KD gain", "KD gain (points)")
    charts.style(fig, title=f"{title} vs {parse_path(axis)[-1]}", subtitle=f"mean over seeds · bars: {BAR_NAMES[bars]}",
                 x_title=axis_title(axis), y_title=y_title)
    fig.update_xaxes(**_x_axis(list(done[axis])))
    return fig


def _baseline_band(fig: go.Figure, done: pd.DataFrame, axis: str, bars: str) -> None:
    """The CE-only baseline: its mean as a dashed line inside a band of ± the same spread as the error bars."""
    base = done[done["baseline_acc_mean"].notna()]
    if base.empty:
        return
    color = charts.role_color("baseline")
    x, mean, err = list(base[axis]), base["baseline_acc_mean"], pd.Series(_errors(base, "baseline_acc", bars), index=base.index)
    fig.add_trace(go.Scatter(x=x, y=list(mean + err), mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x, y=list(mean - err), mode="lines", line={"width": 0}, fill="tonexty",
                             fillcolor=charts.rgba(color, 0.2), showlegend=False, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x, y=list(mean), mode="lines", name="CE-only baseline", line={"color": color, "width": 2, "dash": "dash"},
                             hovertemplate="baseline %{y:.2f}<extra></extra>"))


def heatmap_figure(cells: pd.DataFrame, x_axis: str, y_axis: str, col: str) -> go.Figure:
    """Mean of ``col`` per cell of two swept axes, each square labelled with mean ± 95 % interval."""
    table = cells.pivot_table(index=y_axis, columns=x_axis, values=f"{col}_mean", aggfunc="first", dropna=False)
    ci = cells.pivot_table(index=y_axis, columns=x_axis, values=f"{col}_ci95", aggfunc="first", dropna=False)
    text = [[_mean_ci(m, c) for m, c in zip(row_m, row_c)] for row_m, row_c in zip(table.values, ci.reindex_like(table).values)]
    what = "student accuracy (%)" if col == "student_acc" else "KD gain (points)"
    fig = go.Figure(go.Heatmap(
        z=table.values.tolist(), x=[str(v) for v in table.columns], y=[str(v) for v in table.index], text=text,
        texttemplate="%{text}", colorscale="RdBu" if col == "kd_gain" else "Viridis", zmid=0 if col == "kd_gain" else None,
        colorbar={"title": {"text": what}}, hovertemplate=f"{x_axis}=%{{x}}, {y_axis}=%{{y}}: %{{text}}<extra></extra>"))
    charts.style(fig, title=f"{'Student accuracy' if col == 'student_acc' else 'KD gain'} per cell",
                 subtitle="mean over seeds ± 95 % confidence interval",
                 x_title=axis_title(x_axis), y_title=axis_title(y_axis), height=460)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def _mean_ci(mean: float, ci: float) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.2f}" + (f" ± {ci:.2f}" if ci is not None and not math.isnan(ci) else "")
