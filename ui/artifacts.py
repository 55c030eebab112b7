"""What a run wrote to disk, as the result pages read it: test reports, checkpoints, the metrics as CSV."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamlit as st


@st.cache_data(show_spinner=False, max_entries=256)
def _read_json(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def reports(store: Any, run: Any) -> dict[str, dict]:
    """{report name: report} for the run (teacher, teacher_last, student_best, baseline_best, ...)."""
    out: dict[str, dict] = {}
    for art in store.artifacts(run.id, "report"):
        name = str(art.meta.get("model", Path(art.path).stem))
        p = Path(art.path)
        if name in out or not p.is_file():
            continue
        try:
            out[name] = _read_json(str(p), p.stat().st_mtime)
        except (OSError, ValueError):
            continue
    return out


def teacher_report(reps: Mapping[str, dict]) -> tuple[str, dict] | None:
    """The teacher the student learned from: the trained teacher's last weights, or the loaded one."""
    for name in ("teacher_last", "teacher", "teacher_best"):
        if name in reps:
            return name, reps[name]
    return None


def checkpoint_paths(store: Any, run_id: int) -> dict[tuple[str, str], str]:
    """{(model, which): path} of the run's checkpoint files that exist."""
    out: dict[tuple[str, str], str] = {}
    for art in store.artifacts(run_id, "checkpoint"):
        key = (str(art.meta.get("model", "")), str(art.meta.get("which", "last")))
        if key not in out and Path(art.path).is_file():
            out[key] = art.path
    return out


def checkpoint_arch(store: Any, run_id: int, model: str) -> str | None:
    for art in store.artifacts(run_id, "checkpoint"):
        if art.meta.get("model") == model and art.meta.get("arch"):
            return str(art.meta["arch"])
    return None


def metrics_csv(store: Any, run_id: int) -> bytes:
    """Every metric row of the run, long format (phase, step, epoch, key, value, time)."""
    buf = io.StringIO()
    store.metrics_frame(run_id).to_csv(buf, index=False)
    return buf.getvalue().encode()


