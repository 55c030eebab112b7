"""Data access for the result pages, on top of :class:`storage.Store`.

* Series come bucketed from SQL (``Store.metric_series_bucketed``): a page never pulls millions of rows.
* Finished runs are cached whole (``st.cache_data`` keyed on run id, key, phase and ``finished_at``, plus the
  database URL): a finished run's data never changes, and a resumed run gets a new ``finished_at`` when it
  finishes again.
* Running runs are never served stale: every poll reads the rows from the first incomplete bucket on (an
  index range on ``step``).  Only COMPLETE buckets are kept, in a process-level LRU (:class:`LiveBuckets`):
  buckets are power-of-two wide and aligned at step 0, so bucket ``[k*w, (k+1)*w)`` can no longer change
  once the run logged a step ``>= (k+1)*w``.  When the width doubles as the run grows, cached buckets are
  merged in pairs instead of re-read.

Works outside a Streamlit session too (the benchmark): ``st.cache_data`` then keeps a process-local memo.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from kd_core.runner import ACTIVE_STATUSES as ACTIVE
from storage.metrics import BUCKET_COLUMNS, BUCKETED_COLUMNS, bucket_width
from ui import charts

ROLES = ("teacher", "student", "baseline")
MAX_POINTS = 2000
EPOCH_PREFIXES = ("val/", "test/")
# per-epoch keys worth a curve (class_acc/<c> go to the per-class chart)
EPOCH_KEYS = ("top1", "top5", "loss", "agreement", "kl_teacher_student")


# --------------------------------------------------------------------------- status and caching


def is_finished(run: Any) -> bool:
    """True when the run's data can no longer change (terminal status with a finish time)."""
    return run.status not in ACTIVE and run.finished_at is not None


def _url(store: Any) -> str:
    return str(getattr(store, "url", id(store)))


@st.cache_data(show_spinner=False, max_entries=512)
def _bucketed_cached(_store: Any, url: str, run_id: int, key: str, phase: str | None, max_points: int,
                     finished_at: float) -> pd.DataFrame:
    return _store.metric_series_bucketed(run_id, key, phase, max_points)


def bucketed_series(store: Any, run: Any, key: str, phase: str | None = None, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Bucketed series (phase, step, epoch, value, min, max, count, time), as ``Store.metric_series_bucketed``.

    Finished runs: cached whole.  Running runs: :func:`live_bucketed_series` (complete buckets cached, the
    tail re-read on every call).
    """
    if is_finished(run):
        return _bucketed_cached(store, _url(store), run.id, key, phase, max_points, float(run.finished_at))
    return live_bucketed_series(store, run, key, phase, max_points)


# --------------------------------------------------------------------------- live (running-run) buckets


@dataclass(frozen=True)
class _Complete:
    """The complete buckets of one phase of one metric: every bucket starting before ``end``."""

    width: int
    lo: int  # the phase's first step when cached (it never changes unless rows are deleted)
    hi: int  # the largest step seen: it only grows, unless rows were deleted (a resume)
    end: int  # first step not covered (a multiple of width); buckets from here on are re-read
    frame: pd.DataFrame  # BUCKET_COLUMNS, start < end


class LiveBuckets:
    """Thread-safe LRU of complete buckets, keyed by (db url, run id, started_at, key, phase, max_points).

    ``started_at`` is in the key because a resumed run (new ``started_at``) first deletes the rows past its
    checkpoint; a largest step that went down also drops the entry (see :func:`_live_phase`).
    """

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = int(max_entries)
        self._data: OrderedDict[tuple, _Complete] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> _Complete | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._data.move_to_end(key)
            return entry

    def put(self, key: tuple, entry: _Complete) -> None:
        with self._lock:  # two sessions polling at once: last one wins (both entries are correct)
            self._data[key] = entry
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def drop(self, key: tuple) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


@st.cache_resource(show_spinner=False)
def live_cache() -> LiveBuckets:
    """The process-wide cache shared by every session of the dashboard."""
    return LiveBuckets()


def merge_buckets(frame: pd.DataFrame, width: int) -> pd.DataFrame:
    """Merge buckets (BUCKET_COLUMNS) into wider aligned ones of ``width`` (a multiple of theirs).

    min of mins, max of maxes, sums of counts, firsts of step/epoch/time, and the mean weighted by the
    number of non-NULL values: what SQL would give over the same rows (up to float rounding).
    """
    if frame.empty:
        return frame
    start = frame["start"].to_numpy()
    n_val = frame["n_values"].to_numpy()
    value = frame["value"].to_numpy(dtype="float64")
    weighted = np.where(n_val > 0, value * n_val, 0.0)
    tmp = frame.assign(start=start - start % width, _w=weighted)
    g = tmp.groupby("start", sort=True)
    out = g.agg(step=("step", "min"), epoch=("epoch", "min"), min=("min", "min"), max=("max", "max"),
                count=("count", "sum"), n_values=("n_values", "sum"), _w=("_w", "sum"), time=("time", "min"))
    nv = out["n_values"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["value"] = np.where(nv > 0, out["_w"].to_numpy() / np.maximum(nv, 1), np.nan)
    return out.reset_index()[BUCKET_COLUMNS]


def _widen(entry: _Complete, width: int) -> _Complete:
    """The same complete buckets at a larger width: pairs merged, a half-complete last pair dropped."""
    end = entry.end - entry.end % width
    frame = merge_buckets(entry.frame, width)
    frame = frame[frame["start"] < end].reset_index(drop=True)
    return _Complete(width=width, lo=entry.lo, hi=entry.hi, end=end, frame=frame)


def _live_phase(store: Any, run: Any, key: str, phase: str, max_points: int,
                cache: LiveBuckets) -> pd.DataFrame:
    """Buckets (BUCKET_COLUMNS) of one phase of a running run: cached complete ones + the tail read now."""
    ck = (_url(store), int(run.id), getattr(run, "started_at", None), key, phase, int(max_points))
    rng = store.metric_step_range(run.id, key, phase)
    if rng is None:
        cache.drop(ck)
        return pd.DataFrame({c: [] for c in BUCKET_COLUMNS})
    lo, hi = rng
    width = bucket_width(lo, hi, max_points)
    entry = cache.get(ck)
    if entry is not None and (entry.lo != lo or hi < entry.hi or entry.width > width):
        entry = None  # rows were deleted (resume from a checkpoint) or the cache is from elsewhere
    if entry is not None and entry.width < width:
        entry = _widen(entry, width)
    since = entry.end if entry is not None else None
    tail = store.metric_buckets(run.id, key, phase, width, since_step=since)
    # complete: every step of the bucket is < hi, and steps are logged in order (hi was read before the tail)
    end = hi - hi % width
    parts = [p for p in (entry.frame if entry is not None else None, tail) if p is not None and len(p)]
    full = pd.concat(parts, ignore_index=True) if len(parts) > 1 else (parts[0] if parts else tail)
    done = full[full["start"] < end].reset_index(drop=True)
    cache.put(ck, _Complete(width=width, lo=lo, hi=hi, end=end, frame=done))
    return full


def live_bucketed_series(store: Any, run: Any, key: str, phase: str | None = None, max_points: int = MAX_POINTS,
                         cache: LiveBuckets | None = None) -> pd.DataFrame:
    """``Store.metric_series_bucketed`` for a running run, incrementally and never stale.

    Per phase: two index probes (first/last step), the cached complete buckets (pairs merged if the width
    doubled) and one index-range query for the buckets from the first incomplete one on.  Series of at most
    ``max_points`` rows come back unbucketed, as from the store.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    cache = live_cache() if cache is None else cache
    phases = [phase] if phase is not None else store.metric_phases(run.id, key)
    parts = []
    for ph in phases:
        df = _live_phase(store, run, key, ph, max_points, cache)
        if len(df):
            parts.append(df.assign(phase=ph))
    if sum(int(p["count"].sum()) for p in parts) <= max_points:
        return store.metric_series_bucketed(run.id, key, phase, max_points)  # small: unbucketed rows
    out = pd.concat(parts, ignore_index=True)
    out["phase"] = out["phase"].astype("object")
    return out[BUCKETED_COLUMNS]


@st.cache_data(show_spinner=False, max_entries=256)
def _keys_cached(_store: Any, url: str, run_id: int, finished_at: float) -> list[tuple[str, str]]:
    return _store.metric_keys(run_id)


def metric_keys(store: Any, run: Any) -> list[tuple[str, str]]:
    """Distinct (phase, key) pairs of the run."""
    if is_finished(run):
        return _keys_cached(store, _url(store), run.id, float(run.finished_at))
    return store.metric_keys(run.id)


def is_epoch_key(key: str) -> bool:
    return key.startswith(EPOCH_PREFIXES)


# --------------------------------------------------------------------------- step curves


def group_step_keys(keys: Iterable[str]) -> "OrderedDict[str, list[str]]":
    """Per-step keys grouped for display: Losses / Learning rate / Throughput / Other."""
    groups: OrderedDict[str, list[str]] = OrderedDict((g, []) for g in ("Losses", "Learning rate", "Throughput", "Other"))
    for key in sorted(set(keys), key=lambda k: (k != "loss/total", k)):
        if is_epoch_key(key):
            continue
        if key.startswith("loss/"):
            groups["Losses"].append(key)
        elif key == "lr":
            groups["Learning rate"].append(key)
        elif key == "images_per_s":
            groups["Throughput"].append(key)
        else:
            groups["Other"].append(key)
    return OrderedDict((g, ks) for g, ks in groups.items() if ks)


KEY_TITLES = {
    "loss/total": "Total loss (weighted sum of the recipe)",
    "lr": "Learning rate",
    "images_per_s": "Throughput (images per second)",
}


def key_title(key: str) -> str:
    if key in KEY_TITLES:
        return KEY_TITLES[key]
    if key.startswith("loss/"):
        return f"Loss term '{key[5:]}' (unweighted)"
    return key


def key_figure(store: Any, run: Any, key: str, phases: Sequence[str], *, x: str = "step",
               max_points: int = MAX_POINTS, height: int = 380) -> Any:
    """One key of one run, a line per phase (teacher/student/baseline colours), min/max band when bucketed."""
    curves = []
    for phase in phases:
        df = bucketed_series(store, run, key, phase, max_points)
        if len(df):
            curves.append(charts.Curve(name=charts.role_label(phase), color=charts.role_color(phase), frame=df))
    return charts.curves_figure(curves, x=x, title=key_title(key), y_title=key, height=height)


def curve_figures(store: Any, run: Any, *, x: str = "step", max_points: int = MAX_POINTS) -> "OrderedDict[str, list[tuple[str, Any]]]":
    """Every per-step key of the run as figures, grouped: {group: [(key, figure)]}."""
    pairs = metric_keys(store, run)
    phases_of: dict[str, list[str]] = {}
    for phase, key in pairs:
        phases_of.setdefault(key, []).append(phase)
    out: OrderedDict[str, list[tuple[str, Any]]] = OrderedDict()
    for group, keys in group_step_keys(phases_of).items():
        out[group] = [
            (key, key_figure(store, run, key, sorted(phases_of[key], key=_role_order), x=x, max_points=max_points))
            for key in keys
        ]
    return out


def _role_order(phase: str) -> int:
    return ROLES.index(phase) if phase in ROLES else len(ROLES)


def points_caption(fig: Any) -> str:
    """'2,000 buckets of 2,000,000 points' from a figure made by ``charts.curves_figure``."""
    meta = fig.layout.meta or {}
    if not meta:
        return ""
    return charts.points_subtitle(int(meta.get("buckets", 0)), int(meta.get("points", 0)))


# --------------------------------------------------------------------------- per-epoch data


def eval_split(pairs: Iterable[tuple[str, str]]) -> str:
    """'val' or 'test': the split the run evaluated on every epoch."""
    keys = {k for _, k in pairs}
    return "val" if any(k.startswith("val/") for k in keys) else "test"


@st.cache_data(show_spinner=False, max_entries=128)
def _epoch_cached(_store: Any, url: str, run_id: int, keys: tuple[str, ...], finished_at: float) -> pd.DataFrame:
    return _store.metrics_frame(run_id, keys=list(keys))


def epoch_table(store: Any, run: Any, *, with_classes: bool = False) -> pd.DataFrame:
    """Per-epoch rows (phase, step, epoch, key, value, time) of the evaluation keys (by index: key IN ...)."""
    pairs = metric_keys(store, run)
    keys = sorted({k for _, k in pairs if is_epoch_key(k) and (with_classes or "/class_acc/" not in k)})
    if not keys:
        return pd.DataFrame(columns=["phase", "step", "epoch", "key", "value", "time"])
    if is_finished(run):
        return _epoch_cached(store, _url(store), run.id, tuple(keys), float(run.finished_at))
    return store.metrics_frame(run.id, keys=keys)


def epoch_series(table: pd.DataFrame, key: str) -> dict[str, pd.DataFrame]:
    """{phase: frame(epoch, step, value)} of one per-epoch key, sorted by step."""
    out: dict[str, pd.DataFrame] = {}
    sub = table[table["key"] == key]
    for phase, df in sub.groupby("phase"):
        out[str(phase)] = df.sort_values("step")[["epoch", "step", "value"]].reset_index(drop=True)
    return out


def epoch_wide(table: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch table for humans and CSV: one row per (phase, epoch), one column per key."""
    if table.empty:
        return pd.DataFrame()
    wide = table.pivot_table(index=["phase", "epoch", "step"], columns="key", values="value", aggfunc="last")
    wide = wide.reset_index()
    wide["epoch"] = wide["epoch"].astype(int) + 1
    wide["_o"] = wide["phase"].map(_role_order)
    return wide.sort_values(["_o", "step"]).drop(columns="_o").reset_index(drop=True)


def last_class_acc(store: Any, run: Any) -> dict[str, list[float]]:
    """Per-class accuracy at each phase's last evaluated epoch, from the ``<split>/class_acc/<c>`` keys."""
    table = epoch_table(store, run, with_classes=True)
    sub = table[table["key"].str.contains("/class_acc/", regex=False)]
    out: dict[str, list[float]] = {}
    for phase, df in sub.groupby("phase"):
        last = df[df["step"] == df["step"].max()]
        idx = last["key"].str.rsplit("/", n=1).str[-1].astype(int)
        out[str(phase)] = last.assign(c=idx).sort_values("c")["value"].tolist()
    return dict(sorted(out.items(), key=lambda kv: _role_order(kv[0])))
