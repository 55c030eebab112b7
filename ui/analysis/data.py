"""What the Analysis page reads for one run, loaded lazily: each view touches only the artifacts it shows.

A run's analysis artifacts (``cka_*.json``, ``analysis.json``, ``analysis.safetensors``; see ANALYSIS_ARTIFACTS.md)
are read once per (path, modification time) and shared, not copied: ``st.cache_resource`` hands every rerun the
same read-only arrays, where ``st.cache_data`` would unpickle megabytes of tensors on each one. The CKA tab
never loads the tensors at all. Plus the small helpers on predictions and images that several views share.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from ui.badges import status_badge
from ui.state import ACTIVE

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
# class colours: 20 distinct colours (Plotly Dark24/Light24 picks), repeated only beyond 20 classes; never a model's
CLASS_PALETTE: tuple[str, ...] = (
    "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#BCBD22", "#17BECF", "#7F3C8D",
    "#11A579", "#3969AC", "#F2B701", "#E73F74", "#80BA5A", "#E68310", "#008695", "#CF1C90", "#4B4B8F", "#A5AA99",
)


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


# --------------------------------------------------------------------------- loading


@st.cache_resource(show_spinner=False, max_entries=512)
def _json(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


@st.cache_resource(show_spinner="Loading the analysis tensors…", max_entries=8)
def _tensors(path: str, mtime: float) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    arrays = dict(load_file(path))
    for a in arrays.values():
        a.flags.writeable = False  # shared by every session: nobody may change them
    return arrays


def read_json(path: str | Path) -> dict | None:
    p = Path(path)
    try:
        return _json(str(p), p.stat().st_mtime)
    except (OSError, ValueError):
        return None


class RunData:
    """Everything the page can show for one run; each part is read on first use."""

    def __init__(self, store: Any, run: Any) -> None:
        self.store, self.run = store, run
        self.error: str | None = None

    @cached_property
    def _cka(self) -> tuple[dict[str, list[dict]], dict | None]:
        from ui.analysis.cka import cka_sorted

        by_phase: dict[str, list[dict]] = {}
        teacher_self = None
        arts = list({a.path: a for a in self.store.artifacts(self.run.id, "cka")}.values())
        for art in arts:
            data = read_json(art.path)
            phase = str((data or {}).get("phase") or art.meta.get("phase", ""))
            if data and phase == "teacher":
                teacher_self = data
            elif data and "matrix" in data:
                by_phase.setdefault(phase, []).append(data)
        if teacher_self is None and arts:  # the teacher's self-similarity sits next to the checkpoints
            teacher_self = read_json(Path(arts[0].path).with_name("cka_teacher_self.json"))
        return {phase: cka_sorted(entries, phase) for phase, entries in by_phase.items()}, teacher_self

    @property
    def cka(self) -> dict[str, list[dict]]:
        return self._cka[0]

    @property
    def teacher_self(self) -> dict | None:
        return self._cka[1]

    @cached_property
    def _artifact(self) -> Any:
        arts = self.store.artifacts(self.run.id, "analysis")
        return arts[0] if arts else None

    @cached_property
    def summary(self) -> dict | None:
        if self._artifact is None:
            return None
        summary = read_json(self._artifact.path)
        if summary is None:
            self.error = f"Could not read {self._artifact.path}."
        return summary

    @property
    def tensor_path(self) -> Path | None:
        art = self._artifact
        return None if art is None else Path(art.meta.get("tensors") or Path(art.path).with_suffix(".safetensors"))

    @cached_property
    def tensors(self) -> Mapping[str, np.ndarray]:
        from safetensors import SafetensorError

        path = self.tensor_path
        try:
            return _tensors(str(path), path.stat().st_mtime) if path else {}
        except (OSError, ValueError, SafetensorError) as exc:
            self.error = f"Could not read {path}: {exc}"
            return {}

    @property
    def complete(self) -> bool:
        """The end-of-run analysis is there (checked without reading the tensors)."""
        return bool(self.summary) and self.tensor_path is not None and self.tensor_path.is_file()

    @property
    def class_names(self) -> list[str]:
        names = (self.summary or {}).get("class_names")
        if names:
            return [str(c) for c in names]
        logits = self.tensors.get("teacher.logits")
        return [str(i) for i in range(logits.shape[1] if logits is not None else 0)]

    @property
    def models(self) -> list[str]:
        return models_in(self.summary, self.tensors)

    @property
    def label(self) -> str:
        return f"#{self.run.id} {self.run.name}"


def missing_message(data: RunData) -> str:
    """Why this run has no end-of-run analysis, in words a first-time user understands."""
    run = data.run
    enabled = ((run.config or {}).get("analysis") or {}).get("enabled", None)
    if run.status in ACTIVE:
        have = sum(len(v) for v in data.cka.values())
        return (f"{status_badge(run.status)} — the prototype, attribution and agreement views are computed when "
                f"training ends. " + (f"{have} CKA checkpoint(s) computed so far are in the CKA tab." if have else
                                      "CKA checkpoints appear here as training reaches them."))
    err = (run.summary or {}).get("analysis_error")
    if err:
        return (f"The end-of-run analysis failed: `{err}`. The trained models are fine; the run's log has the "
                "details.")
    if enabled is False:
        return ("Analysis was switched off for this run (`analysis.enabled: false` in its config). "
                "Clone the run with analysis enabled to get these views.")
    if run.status in ("failed", "cancelled"):
        return (f"This run is {status_badge(run.status)}: it stopped before the end-of-run analysis. "
                "Resume it from the Run detail page to finish training and compute the analysis.")
    return ("This run has no analysis artifacts — it was probably trained before the Analysis page existed "
            "(or with analysis turned off). Re-run it to compute them.")

