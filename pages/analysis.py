"""Analysis: what the student learned from the teacher, beyond accuracy.

Five views of one run (or two runs side by side with "Compare with"): layer similarity (CKA) during training,
class prototypes and 2-D embeddings, attribution maps, teacher-vs-student agreement and calibration, and a
disagreement explorer that links them (pick a bucket or lasso points in the embedding → see those images, the
models' predictions and their attribution maps).

Everything is read from the artifacts the run wrote (ANALYSIS_ARTIFACTS.md), cached on path + mtime, so the page
does no computation of its own. The run comes from ``?run=<id>`` (selectbox fallback), the second run from
``?with=<id>``. The tabs run lazily: only the open one is drawn.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from ui import analysis_views as av
from ui import charts, metrics
from ui import state as ui_state

from ui.badges import status_badge

ACTIVE = ui_state.ACTIVE
TABS = ("🧠 Layer similarity (CKA)", "📍 Prototypes & embeddings", "🔥 Attribution maps",
        "🎯 Agreement & calibration", "🔎 Disagreement explorer")
EXPLORER_TAB = TABS[4]
SHOW_COUNTS = (24, 48, 96)

HELP = {
    "cka": "CKA (centered kernel alignment) measures how similar two layers' representations of the same images are, "
           "from 0 (unrelated) to 1 (the same up to rotation and scale). It compares layers of different widths, "
           "so a teacher layer can be compared with a student layer.",
    "prototype": "A class prototype is the mean embedding (the penultimate-layer feature vector) of the images of "
                 "one class: the 'centre' of that class in the model's feature space.",
    "ncm": "NCM (nearest class mean) accuracy: classify each image by the closest prototype instead of the final "
           "layer. High NCM accuracy = classes form tight, well-separated clusters.",
    "ece": "ECE (expected calibration error): the average gap between how confident the model is and how often it "
           "is right, over confidence bins. 0 % = perfectly calibrated.",
    "spearman": "Spearman rank correlation between the teacher's and the student's attribution maps of the same image: "
                "+1 = same ranking of important pixels, 0 = unrelated, −1 = opposite.",
    "iou": "Top-k IoU: take the most important k % pixels of each map and measure the overlap (intersection over "
           "union). Two random maps overlap by about k/(200−k) — shown as the reference.",
    "norm": "Mean length (L2 norm) of the embedding vectors. The ND paper (ECCV 2024) observed that distilled "
            "students have smaller feature norms than their teachers; a ratio below 1 shows it.",
    "spread": "Average distance of an image's embedding to its class prototype, relative to the embedding norm: "
              "lower = tighter classes.",
    "cos": "Average cosine similarity between an image's embedding and its class prototype: 1 = every image points "
           "exactly in its class direction.",
}


# --------------------------------------------------------------------------- loading (cached on path + mtime)


@st.cache_data(show_spinner=False, max_entries=512)
def _json(path: str, mtime: float) -> dict:
    import json

    return json.loads(Path(path).read_text())


@st.cache_data(show_spinner="Loading the analysis tensors…", max_entries=16)
def _tensors(path: str, mtime: float) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(path))


def _read_json(path: str) -> dict | None:
    p = Path(path)
    try:
        return _json(str(p), p.stat().st_mtime)
    except (OSError, ValueError):
        return None


class RunData:
    """Everything the page shows for one run, read from its artifacts."""

    def __init__(self, store: Any, run: Any) -> None:
        self.run = run
        self.cka: dict[str, list[dict]] = {}
        self.teacher_self: dict | None = None
        self.summary: dict | None = None
        self.tensors: dict[str, np.ndarray] = {}
        self.error: str | None = None
        seen: set[str] = set()
        for art in store.artifacts(run.id, "cka"):
            if art.path in seen:
                continue
            seen.add(art.path)
            data = _read_json(art.path)
            if not data:
                continue
            phase = str(data.get("phase") or art.meta.get("phase", ""))
            if phase == "teacher":
                self.teacher_self = data
            elif "matrix" in data:
                self.cka.setdefault(phase, []).append(data)
        for phase in list(self.cka):
            self.cka[phase] = av.cka_sorted(self.cka[phase], phase)
        if self.teacher_self is None and self.cka:  # the teacher's self-similarity sits next to the checkpoints
            first = next(iter(store.artifacts(run.id, "cka")), None)
            if first is not None:
                self.teacher_self = _read_json(str(Path(first.path).with_name("cka_teacher_self.json")))
        arts = store.artifacts(run.id, "analysis")
        if arts:
            art = arts[0]
            self.summary = _read_json(art.path)
            tpath = art.meta.get("tensors") or str(Path(art.path).with_suffix(".safetensors"))
            try:
                self.tensors = _tensors(str(tpath), Path(tpath).stat().st_mtime)
            except (OSError, ValueError) as exc:
                self.error = f"Could not read {tpath}: {exc}"
            if self.summary is None:
                self.error = f"Could not read {art.path}."

    @property
    def complete(self) -> bool:
        return bool(self.summary) and bool(self.tensors)

    @property
    def class_names(self) -> list[str]:
        names = (self.summary or {}).get("class_names")
        if names:
            return [str(c) for c in names]
        logits = self.tensors.get("teacher.logits")
        return [str(i) for i in range(logits.shape[1] if logits is not None else 0)]

    @property
    def models(self) -> list[str]:
        return av.models_in(self.summary, self.tensors)

    @property
    def label(self) -> str:
        return f"#{self.run.id} {self.run.name}"


def _missing_message(data: RunData) -> str:
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


# --------------------------------------------------------------------------- run pickers


def _label(run) -> str:
    return f"#{run.id} {run.name} — {status_badge(run.status)}"


def pick_runs(store):
    """The run from ?run= (selectbox fallback) and an optional second run from ?with=."""
    runs = store.list_runs(limit=500)
    by_id = {r.id: r for r in runs}
    wanted = metrics.parse_run_ids(st.query_params.get("run"))
    other = metrics.parse_run_ids(st.query_params.get("with"))
    for rid in wanted[:1] + other[:1]:
        if rid not in by_id:
            try:
                by_id[rid] = store.get_run(rid)
            except KeyError:
                st.warning(f"Run #{rid} does not exist (deleted?). Pick another one below.")
    if not by_id:
        st.info("No runs yet. Start one on the **New experiment** page; its analysis appears here when it finishes.")
        return None, None
    ids = sorted(by_id, reverse=True)
    first = wanted[0] if wanted and wanted[0] in by_id else ids[0]
    c1, c2 = st.columns([3, 2])
    chosen = c1.selectbox("Run", ids, index=ids.index(first), format_func=lambda i: _label(by_id[i]), key="an_run",
                          help="The run analysed on this page. The address bar (?run=…) keeps it, so you can share the link.")
    options = [None] + [i for i in ids if i != chosen]
    second = other[0] if other and other[0] in options else None
    versus = c2.selectbox("Compare with (optional)", options, index=options.index(second),
                          format_func=lambda i: "— nobody —" if i is None else _label(by_id[i]), key="an_with",
                          help="Show the same views for a second run side by side (e.g. another loss or temperature).")
    if st.query_params.get("run") != str(chosen):
        st.query_params["run"] = str(chosen)
    if versus is None:
        if "with" in st.query_params:
            del st.query_params["with"]
    elif st.query_params.get("with") != str(versus):
        st.query_params["with"] = str(versus)
    return by_id[chosen], (by_id[versus] if versus is not None else None)


def _side_by_side(datas: list[RunData], render) -> None:
    """Call ``render(data, side, compact)`` for one run, or for two runs in two columns."""
    if len(datas) == 1:
        render(datas[0], "a", False)
        return
    cols = st.columns(2, gap="large")
    for col, data, side in zip(cols, datas, ("a", "b")):
        with col:
            st.markdown(f"### {data.label}")
            render(data, side, True)


def _plot(fig, name: str, key: str, **kw) -> Any:
    return st.plotly_chart(fig, config=charts.plotly_config(name), key=key, **kw)


def _restore(key: str, default: Any, options: Any = None) -> Any:
    """Widgets in a closed tab are not drawn, and Streamlit then forgets their value. Bring back the value
    remembered by ``_keep`` (if still valid) and return the default to pass to the widget: None when the value
    comes from Session State (passing both makes Streamlit warn)."""
    memo = st.session_state.get("_an_keep", {})
    if key not in st.session_state and key in memo:
        value = memo[key]
        valid = options is None or (all(v in options for v in value) if isinstance(value, list) else value in options)
        if valid:
            st.session_state[key] = value
    return None if key in st.session_state else default


def _keep(key: str, value: Any) -> Any:
    st.session_state.setdefault("_an_keep", {})[key] = value
    return value


def _need_summary(data: RunData) -> bool:
    if data.complete:
        return True
    st.info(data.error or _missing_message(data))
    return False


# --------------------------------------------------------------------------- CKA


def cka_view(data: RunData, side: str, compact: bool) -> None:
    rid = data.run.id
    if not data.cka:
        st.info("No CKA checkpoints for this run. " + ("" if data.complete else _missing_message(data)))
        return
    phases = [p for p in ("student", "baseline") if p in data.cka]
    phase = phases[0]
    if len(phases) > 1:
        k = f"an_{side}_cka_phase"
        phase = st.segmented_control(
            "Model compared with the teacher", phases, default=_restore(k, phases[0], phases), key=k,
            format_func=charts.role_label,
            help="Student (distilled) = trained with the recipe; baseline = the same architecture trained with "
                 "cross-entropy only. Comparing both shows what the teacher's signal changed.") or phases[0]
        _keep(k, phase)
    entries = data.cka[phase]
    epochs = [int(e["epoch"]) for e in entries]
    if len(entries) > 1:
        k = f"an_{side}_cka_epoch_{phase}"
        epoch = _keep(k, st.select_slider(
            f"Checkpoint — {len(epochs)} computed during training (epochs {', '.join(map(str, epochs))})", options=epochs,
            value=_restore(k, epochs[-1], epochs), key=k, format_func=lambda e: f"epoch {e}",
            help="CKA was computed at these epochs during training; slide to watch the student's layers line up "
                 "with the teacher's."))
    else:
        epoch = epochs[0]
        st.caption(f"One CKA checkpoint (epoch {epoch}).")
    entry = entries[epochs.index(epoch)]
    st.caption(
        f"**CKA** = how similar two layers' representations of the same images are (0 = unrelated, 1 = identical up to "
        f"rotation/scale). Bright cells: a {model_word(phase)} layer that represents the images like that "
        f"teacher layer. Computed on {entry.get('n', '?')} {entry.get('split', '')} images "
        f"({str(entry.get('estimator', '')).replace('_', ' ')}, {entry.get('pooling', '')}-pooled); colours clipped to [0, 1].",
        help=HELP["cka"])
    fig = av.cka_heatmap(entry["matrix"], entry["rows"], entry["cols"],
                         title=f"Teacher vs {model_word(phase)} — epoch {epoch}",
                         x_title=f"{model_word(phase)} layer", height=420 if compact else 460)
    _plot(fig, f"run{rid}_cka_{phase}_e{epoch}", f"an_{side}_cka_heat")

    st.markdown("#### CKA over training")
    k = f"an_{side}_cka_mode"
    mode = st.segmented_control(
        "Teacher layer each student layer is compared with", ["best", "depth"], default=_restore(k, "best"), key=k,
        format_func=lambda m: {"best": "best-matching", "depth": "same relative depth"}[m],
        help="Best-matching: the teacher layer with the highest CKA at that checkpoint. Same relative depth: "
             "first with first, embedding with embedding, the others spread evenly (the 'diagonal').") or "best"
    _keep(k, mode)
    track = av.cka_track({p: data.cka[p] for p in phases}, mode)
    fig = av.cka_over_time_figure(track, title="CKA with the matching teacher layer",
                                  subtitle=("one line per student layer" + ("<br>" if compact else " · ")
                                            + "blue = distilled student, orange = baseline; higher = more teacher-like"),
                                  height=420 if compact else 460)
    _plot(fig, f"run{rid}_cka_over_time", f"an_{side}_cka_time")
    if len(epochs) == 1:
        st.caption("Only one checkpoint: raise `analysis.cka_checkpoints` (and epochs) to see a trend.")

    st.markdown("#### Self-similarity")
    st.caption("Each model's layers compared with each other: a bright block = layers that still represent the "
               "images the same way (little new happens there).", help=HELP["cka"])
    cols = st.columns(1 if compact else 2)
    with cols[0]:
        if data.teacher_self:
            t = data.teacher_self
            _plot(av.cka_heatmap(t["matrix"], t["rows"], t["cols"], title="Teacher vs teacher",
                                 x_title="teacher layer", height=400), f"run{rid}_cka_teacher_self", f"an_{side}_cka_tself")
        else:
            st.caption("No teacher self-similarity stored.")
    with cols[-1]:
        if entry.get("self_model"):
            _plot(av.cka_heatmap(entry["self_model"], entry["cols"], entry["cols"],
                                 title=f"{model_word(phase).capitalize()} vs itself — epoch {epoch}",
                                 x_title=f"{model_word(phase)} layer", y_title=f"{model_word(phase)} layer", height=400),
                  f"run{rid}_cka_{phase}_self", f"an_{side}_cka_sself")


def model_word(phase: str) -> str:
    return {"student": "student", "baseline": "baseline", "teacher": "teacher"}.get(phase, phase)


# --------------------------------------------------------------------------- prototypes & embeddings


def _store_selection(chart_key: str, sel_key: str) -> None:
    st.session_state[sel_key] = av.selected_indices(st.session_state.get(chart_key))


def _open_explorer(sel_key: str, source_key: str) -> None:
    st.session_state[source_key] = "selection"
    st.session_state["an_tab"] = EXPLORER_TAB


def prototypes_view(data: RunData, side: str, compact: bool) -> None:
    if not _need_summary(data):
        return
    s, t, rid = data.summary, data.tensors, data.run.id
    names = data.class_names
    others = [m for m in data.models if m != "teacher"]
    st.caption("A **prototype** is the average embedding of one class — the class's centre in the model's feature "
               "space. Distillation should make the student's classes sit like the teacher's.", help=HELP["prototype"])
    table = av.prototype_table(s)
    if not table.empty:
        nc = st.column_config.NumberColumn
        st.dataframe(table, hide_index=True, key=f"an_{side}_proto_table", column_config={
            "top-1 accuracy (%)": nc(format="%.1f", help="Accuracy of the model's own classifier on these images."),
            "NCM accuracy (%)": nc(format="%.1f", help=HELP["ncm"]),
            "mean norm": nc(format="%.3f", help=HELP["norm"]),
            "norm ÷ teacher's": nc(format="%.2f×", help=HELP["norm"]),
            "spread": nc(format="%.3f", help=HELP["spread"]),
            "cosine to prototype": nc(format="%.3f", help=HELP["cos"]),
        })
    ratio = s.get("norm_ratio") or {}
    if ratio:
        cols = st.columns(len(ratio) + 1)
        for col, (m, r) in zip(cols, ratio.items()):
            col.metric(f"{model_label(m)} norm ÷ teacher norm", f"{r:.2f}×", help=HELP["norm"])
        smaller = [m for m, r in ratio.items() if r < 1]
        cols[-1].caption(("Smaller than the teacher's, as the ND paper observed for distilled students. "
                          if "student" in smaller else "Not smaller than the teacher's here. ")
                         + f"Measured on {s.get('n', '?')} {s.get('split', 'test')} images.")

    st.markdown("#### Prototype similarity")
    st.caption("Cosine similarity between every pair of class prototypes. Similar patterns in teacher and student "
               "= the student learned the teacher's class geometry (which classes are close).")
    other = others[0] if others else None
    if len(others) > 1:
        k = f"an_{side}_proto_model"
        other = _keep(k, st.segmented_control("Compare the teacher with", others, default=_restore(k, others[0], others),
                                              key=k, format_func=charts.role_label) or others[0])
    pc = s.get("prototype_cosine") or {}
    if "teacher" in pc and other in pc:
        mats = [("Teacher", np.asarray(pc["teacher"]), False), (model_label(other), np.asarray(pc[other]), False),
                (f"{model_label(other)} − teacher", np.asarray(pc[other]) - np.asarray(pc["teacher"]), True)]
        cols = st.columns(1 if compact else 3)
        for i, (title, m, diff) in enumerate(mats):
            with cols[i % len(cols)]:
                _plot(av.prototype_cosine_figure(m, names, title=title, diff=diff, height=420),
                      f"run{rid}_prototype_cosine_{title.split()[0].lower()}", f"an_{side}_pcos_{i}")
        st.caption("Difference: red = the student puts these two classes closer together than the teacher does, "
                   "blue = further apart.")

    embedding_view(data, side, compact, other)


def embedding_view(data: RunData, side: str, compact: bool, other: str | None) -> None:
    s, t, rid = data.summary, data.tensors, data.run.id
    names = data.class_names
    st.markdown("#### 2-D view of the embeddings")
    projections = [p for p in (s.get("projections") or ["pca"]) if f"teacher.{p}" in t]
    has_joint = other is not None and f"joint.{other}_pca" in t and "teacher.pca" in t
    c1, c2 = st.columns(2)
    layout = "side"
    if has_joint:
        k = f"an_{side}_emb_layout"
        layout = c1.segmented_control(
            "Layout", ["side", "joint"], default=_restore(k, "side"), key=k,
            format_func=lambda v: {"side": "side by side", "joint": "one space"}[v],
            help="Side by side: each model projected on its own (positions are not comparable between the two plots). "
                 "One space: the student's embedding is mapped into the teacher's feature space (least squares) and "
                 "both are drawn with the teacher's PCA, so you see where the student's classes sit relative to the "
                 "teacher's.") or "side"
        _keep(k, layout)
    proj = projections[0] if projections else None
    if layout == "side" and len(projections) > 1:
        k = f"an_{side}_emb_proj"
        proj = c2.segmented_control("Projection", projections, default=_restore(k, projections[0], projections), key=k,
                                    format_func=lambda p: av.PROJECTION_LABELS.get(p, p),
                                    help="PCA keeps global distances (stable, linear). t-SNE keeps neighbourhoods: "
                                         "clusters are meaningful, their sizes and the distances between them are not.") or projections[0]
        _keep(k, proj)
    if proj is None:
        st.caption("No 2-D projections stored for this run.")
        return
    y = np.asarray(t["targets"])
    hover = av.hover_texts(t, names, data.models)
    sel_key = f"an_sel_{rid}"
    source_key = f"an_{side}_exp_source"
    highlight = st.session_state.get(sel_key) or []
    st.caption("Small dots: images (colour = true class; hover for label and predictions). Big labelled markers: the "
               "class prototypes. **Lasso or box-select points** (toolbar above the chart) to see those images in the "
               "Disagreement explorer.", help=HELP["prototype"])
    if layout == "joint":
        r2 = s.get("joint_r2")
        r2v = r2.get(other) if isinstance(r2, dict) else r2
        sub = ("○ teacher images, × " + model_label(other).lower() + " images; ◆ teacher prototypes, ★ "
               + model_label(other).lower() + " prototypes, dotted = how far each moved"
               + (f" · mapping R² = {r2v:.2f}" if isinstance(r2v, (int, float)) else ""))
        fig = av.joint_figure(t["teacher.pca"], t[f"joint.{other}_pca"], y, names, hover, model=other,
                              title=f"Teacher and {model_label(other).lower()} in the teacher's PCA space", subtitle=sub,
                              highlight=highlight, height=620 if compact else 680)
        chart_keys = [f"an_{side}_emb_joint"]
        figs = [fig]
    else:
        shown = ["teacher"] + ([other] if other else [])
        figs, chart_keys = [], []
        for m in shown:
            pts = t.get(f"{m}.{proj}")
            if pts is None:
                continue
            figs.append(av.embedding_figure(
                pts, t.get(f"{m}.{proj}_prototypes"), y, names, hover, model=m,
                title=f"{charts.role_label(m)} — {av.PROJECTION_LABELS.get(proj, proj)}",
                subtitle=f"{len(y)} {s.get('split', 'test')} images", highlight=highlight, height=560))
            chart_keys.append(f"an_{side}_emb_{m}_{proj}")
    cols = st.columns(1 if compact or len(figs) == 1 else len(figs))
    for i, (fig, ck) in enumerate(zip(figs, chart_keys)):
        with cols[i % len(cols)]:
            st.plotly_chart(fig, config=charts.plotly_config(f"run{rid}_{ck.removeprefix(f'an_{side}_')}"), key=ck,
                            on_select=functools.partial(_store_selection, ck, sel_key), selection_mode=("points", "lasso", "box"))
    picked = st.session_state.get(sel_key) or []
    c1, c2 = st.columns([3, 2])
    if picked:
        c1.success(f"**{len(picked)} image(s) selected** (ringed in black).")
        c2.button(f"🔎 Show the {len(picked)} selected images in the explorer", key=f"an_{side}_to_explorer",
                  on_click=_open_explorer, args=(sel_key, source_key), type="primary")
    else:
        c1.caption("Nothing selected yet.")


def model_label(m: str) -> str:
    return av.model_label(m)


# --------------------------------------------------------------------------- attribution


def _attr_methods(data: RunData) -> list[str]:
    attr = (data.summary or {}).get("attribution") or {}
    return [m for m in attr.get("methods") or [] if f"attr.teacher.{m}" in data.tensors]


def _default_methods(data: RunData) -> list[str]:
    methods = _attr_methods(data)
    return [m for m in ("saliency", "gradcam", "integrated_gradients") if m in methods][:2] or methods[:2]


def _attr_controls(data: RunData, side: str) -> tuple[list[str], str, list[str]]:
    methods = _attr_methods(data)
    default = _default_methods(data)
    c1, c2, c3 = st.columns([3, 2, 2])
    km, kn, kb = f"an_{side}_attr_methods", f"an_{side}_attr_norm", f"an_{side}_attr_base"
    chosen = c1.multiselect("Methods", methods, default=_restore(km, default, methods), key=km, format_func=av.method_label,
                            help="Saliency: gradient of the class score w.r.t. each pixel. Integrated gradients: gradients "
                                 "averaged along a path from a blank image. SmoothGrad: saliency averaged over noisy copies. "
                                 "Grad-CAM: which regions of the last convolutional layer drive the class. Occlusion: how "
                                 "much the score drops when a patch is hidden.")
    _keep(km, chosen)
    _restore(kn, None, ["per_map", "joint"])
    mode = c2.radio("Scale the maps", ["per_map", "joint"], key=kn,
                    format_func=lambda v: {"per_map": "per map (compare shape)", "joint": "jointly (compare magnitude)"}[v],
                    help="Per map: every map is scaled to its own strongest pixels — shows WHERE each model looks. "
                         "Jointly: teacher and student maps of an image share one scale — a model whose attributions "
                         "are weaker shows up fainter.")
    _keep(kn, mode)
    models = [m for m in data.models if f"attr.{m}.{(chosen or methods or ['?'])[0]}" in data.tensors]
    with_base = "baseline" in models
    if with_base:
        show = c3.toggle("Show the baseline too", value=bool(_restore(kb, True, [True, False])), key=kb,
                         help="The baseline is the same student trained without the teacher: if the distilled student's "
                              "maps are closer to the teacher's than the baseline's, the student learned where to look.")
        if not _keep(kb, show):
            models = [m for m in models if m != "baseline"]
    return chosen, mode, models


def attribution_view(data: RunData, side: str, compact: bool) -> None:
    if not _need_summary(data):
        return
    s, t, rid = data.summary, data.tensors, data.run.id
    attr = s.get("attribution") or {}
    methods = _attr_methods(data)
    idx = np.asarray(t.get("attr_index", np.zeros(0, int)))
    if not methods or idx.size == 0:
        st.info("No attribution maps stored for this run (`analysis.attribution_images` was 0).")
        return
    st.caption(f"Attribution maps show which pixels drove the prediction of the **true class** for {idx.size} test "
               "images (chosen so that teacher-right / student-wrong cases come first). If distillation transfers "
               "'where to look', the student's maps resemble the teacher's more than the baseline's do.")
    chosen, mode, models = _attr_controls(data, side)
    k = attr.get("k")
    iou_random = attr.get("iou_random")
    st.info(f"**Scaling in use: {'per map — compare the shape of the maps' if mode == 'per_map' else 'jointly — compare magnitudes (same scale within each row)'}.** "
            f"ρ = Spearman rank correlation with the teacher's map; IoU = overlap of the top "
            f"{(k or 0.1) * 100:g} % pixels (two random maps: {iou_random if iou_random is not None else float('nan'):.3f}).",
            icon="ℹ️")
    with st.expander("What do ρ and IoU mean?"):
        st.markdown(f"- **Spearman ρ** — {HELP['spearman']}\n- **Top-k IoU** — {HELP['iou']}")
    summary = av.attribution_summary(attr)
    if not summary.empty:
        fig = av.attribution_summary_figure(summary, iou_random, k, title="How much do the maps agree with the teacher's?",
                                            height=380)
        _plot(fig, f"run{rid}_attribution_iou", f"an_{side}_attr_summary")
        wide = av.attribution_summary_wide(summary)
        st.dataframe(wide, hide_index=True, key=f"an_{side}_attr_table", column_config={
            c: st.column_config.NumberColumn(format="%+.3f" if c.endswith("ρ") else "%.3f",
                                             help=HELP["spearman"] if c.endswith("ρ") else HELP["iou"])
            for c in wide.columns if c != "method"})
        st.caption(f"Means over the {idx.size} images. ρ = Spearman rank correlation with the teacher's map, IoU = "
                   f"top-{(k or 0.1) * 100:g} % overlap with the teacher's map (random maps: "
                   f"{iou_random if iou_random is not None else float('nan'):.3f}).")
    if not chosen:
        st.caption("Pick at least one method above to see the maps.")
        return
    st.markdown("#### Gallery")
    names = data.class_names
    y = np.asarray(t["targets"])
    preds = {m: av.predictions(t, m) for m in data.models}
    per_row = 1 if compact else 2
    cols = st.columns(per_row)
    for j, i in enumerate(idx.tolist()):
        with cols[j % per_row]:
            fig = _attr_figure(data, j, int(i), chosen, models, mode, names, y, preds, row_height=110)  # half-width
            _plot(fig, f"run{rid}_attribution_image{i}", f"an_{side}_attr_img{j}", theme=None)


def _attr_figure(data: RunData, j: int, i: int, methods, models, mode, names, y, preds, row_height: int = 190):
    t, s = data.tensors, data.summary or {}
    agree = ((s.get("attribution") or {}).get("agreement") or {})
    maps = {m: {mod: t[f"attr.{mod}.{m}"][j] for mod in models if f"attr.{mod}.{m}" in t} for m in methods}
    scores = {}
    for m in methods:
        scores[m] = {}
        for mod in models:
            vals = (agree.get(mod) or {}).get(m) or {}
            sp, io = vals.get("spearman") or [], vals.get("iou") or []
            if j < len(sp) and j < len(io):
                scores[m][mod] = (float(sp[j]), float(io[j]))
    title = f"image {i} · label <b>{names[int(y[i])]}</b> · " + " · ".join(
        f"{model_label(m).lower()} {names[int(p[i])]} {'✓' if p[i] == y[i] else '✗'}" for m, p in preds.items() if p is not None)
    return av.attribution_grid(t["images"][i], maps, methods, models, mode=mode, scores=scores, title=title,
                               row_height=row_height)


# --------------------------------------------------------------------------- agreement & calibration


def agreement_view(data: RunData, side: str, compact: bool) -> None:
    if not _need_summary(data):
        return
    s, rid = data.summary, data.run.id
    agreement = s.get("agreement") or {}
    st.caption(f"Who is right on each of the {s.get('n', '?')} {s.get('split', 'test')} images: the teacher, the student, "
               "both or neither. 'Teacher right, student wrong' is what distillation could still fix; open it in the "
               "Disagreement explorer.")
    if agreement:
        cols = st.columns(1 if compact else len(agreement))
        for i, (m, counts) in enumerate(agreement.items()):
            with cols[i % len(cols)]:
                _plot(av.agreement_figure(counts, m, title=f"Teacher vs {charts.role_label(m)}"),
                      f"run{rid}_agreement_{m}", f"an_{side}_agree_{m}")
        st.dataframe(av.agreement_table(agreement), hide_index=True, key=f"an_{side}_agree_table", column_config={
            "same prediction as teacher (%)": st.column_config.NumberColumn(
                format="%.1f", help="Share of images where the model predicts the same class as the teacher, right or wrong."),
        })
    cal = s.get("calibration") or {}
    if cal:
        st.markdown("#### Calibration")
        st.caption("Is a model as sure as it should be? A model that says 90 % should be right 90 % of the time. "
                   "Points below the diagonal = over-confident, above = under-confident.", help=HELP["ece"])
        cols = st.columns(len(cal))
        for col, (m, c) in zip(cols, cal.items()):
            col.metric(f"ECE {model_label(m).lower()}", f"{100 * float(c.get('ece', float('nan'))):.1f} %", help=HELP["ece"])
        _plot(av.reliability_figure(cal, title="Reliability diagram", height=480 if compact else 500, compact=compact),
              f"run{rid}_calibration", f"an_{side}_calib")


# --------------------------------------------------------------------------- disagreement explorer


def explorer_view(data: RunData, side: str, compact: bool) -> None:
    if not _need_summary(data):
        return
    t, s, rid = data.tensors, data.summary, data.run.id
    names = data.class_names
    others = [m for m in data.models if m != "teacher"]
    if not others:
        st.info("Only the teacher was analysed for this run.")
        return
    sel_key = f"an_sel_{rid}"
    picked = st.session_state.get(sel_key) or []
    source_key = f"an_{side}_exp_source"
    _restore(source_key, None, ["bucket", "selection"])
    c1, c2, c3 = st.columns([2, 3, 3])
    source = c1.radio("Images to show", ["bucket", "selection"], key=source_key,
                      format_func=lambda v: {"bucket": "an agreement bucket",
                                             "selection": f"my selection in the 2-D view ({len(picked)})"}[v],
                      help="Bucket: images grouped by who is right. Selection: the points you lasso-selected on the "
                           "Prototypes & embeddings tab.")
    _keep(source_key, source)
    model = others[0]
    if len(others) > 1:
        k = f"an_{side}_exp_model"
        model = _keep(k, c2.segmented_control(
            "Compare the teacher with", others, default=_restore(k, others[0], others), key=k,
            format_func=charts.role_label,
            help="Which model is compared with the teacher (buckets and predictions).") or others[0])
    masks = av.bucket_masks(t, model)
    y = np.asarray(t["targets"])
    if source == "bucket":
        k = f"an_{side}_exp_bucket"
        _restore(k, None, list(av.BUCKETS))
        bucket = c3.selectbox("Bucket", list(av.BUCKETS), key=k,
                              format_func=lambda b: f"{av.bucket_label(b, model)} ({int(masks[b].sum())} images)",
                              help="Teacher right / student wrong: what the student failed to learn from the teacher. "
                                   "Teacher wrong / student right: where the student did better on its own.")
        _keep(k, bucket)
        indices = np.flatnonzero(masks[bucket]).tolist()
        what = av.bucket_label(bucket, model)
    else:
        indices = list(picked)
        what = "your selection"
        if picked:
            c3.button("Clear the selection", key=f"an_{side}_exp_clear", on_click=lambda: st.session_state.pop(sel_key, None))
    classes = sorted({int(y[i]) for i in indices})
    if len(classes) > 1:
        only = st.multiselect("Only these true classes (optional)", classes, key=f"an_{side}_exp_classes",
                              format_func=lambda c: names[c], placeholder="all classes")
        if only:
            indices = [i for i in indices if int(y[i]) in only]
    if not indices:
        st.info("No images here." if source == "bucket" else
                "Nothing selected yet: lasso or box-select points in the 2-D view on the **Prototypes & embeddings** tab.")
        return
    attr_pos = {int(i): j for j, i in enumerate(np.asarray(t.get("attr_index", np.zeros(0, int))).tolist())}
    indices = sorted(indices, key=lambda i: (i not in attr_pos, i))  # images with attribution maps first
    preds = {m: av.predictions(t, m) for m in ("teacher", model)}
    probs = {m: av.softmax(t[f"{m}.logits"]) for m in data.models}
    c1, c2 = st.columns([4, 1])
    limit = SHOW_COUNTS[0]
    if len(indices) > SHOW_COUNTS[0]:
        k = f"an_{side}_exp_limit"
        _restore(k, None, list(SHOW_COUNTS))
        limit = _keep(k, c2.selectbox("Show at most", SHOW_COUNTS, key=k, help="Thumbnails shown (images with attribution maps first)."))
    shown = indices[:limit]
    text = f"**{len(indices)} image(s)** — {what}" + (f" (first {limit} shown)" if len(indices) > limit else "") + "."
    if source == "selection":
        comp = {b: int(sum(masks[b][i] for i in indices)) for b in av.BUCKETS}
        text += " Among them: " + ", ".join(f"{n} {av.bucket_label(b, model)}" for b, n in comp.items() if n) + "."
    c1.markdown(text)
    st.caption(f"Under each image: its number and true class, then **T** = the teacher's prediction and **"
               f"{model_label(model)[0]}** = the {model_label(model).lower()}'s, each with its probability "
               "(✓ right, ✗ wrong). 🔥 = attribution maps stored for this image (shown first).")
    per_row = 3 if compact else 6
    for start in range(0, len(shown), per_row):
        cols = st.columns(per_row)
        for col, i in zip(cols, shown[start:start + per_row]):
            lab = int(y[i])
            tp, mp = int(preds["teacher"][i]), int(preds[model][i])
            cap = (f"{'🔥 ' if i in attr_pos else ''}#{i} · class {names[lab]}  \n"
                   f"T {names[tp]} {'✓' if tp == lab else '✗'} {100 * probs['teacher'][i, tp]:.0f}% · "
                   f"{model_label(model)[0]} {names[mp]} {'✓' if mp == lab else '✗'} {100 * probs[model][i, mp]:.0f}%")
            col.image(av.thumbnail(t["images"][i], 112), caption=cap, width="stretch")
    st.markdown("#### Look closer")
    pick = st.selectbox("Image", shown, key=f"an_{side}_exp_pick",
                        format_func=lambda i: (f"{'🔥 ' if i in attr_pos else ''}#{i} — label {names[int(y[i])]}, teacher "
                                               f"{names[int(preds['teacher'][i])]}, {model_label(model).lower()} "
                                               f"{names[int(preds[model][i])]}"),
                        help="Softmax of each model for this image and, where stored, its attribution maps.")
    c1, c2 = st.columns([1, 3]) if not compact else (st.container(), st.container())
    with c1:
        st.image(av.thumbnail(t["images"][pick], 224), caption=f"#{pick}, true class {names[int(y[pick])]}")
    with c2:
        shown_models = [m for m in data.models if m in ("teacher", model)] + [m for m in data.models if m not in ("teacher", model)]
        fig = av.probs_figure(names, {m: probs[m][pick] for m in shown_models}, int(y[pick]),
                              title="What each model predicts (softmax)", height=320)
        _plot(fig, f"run{rid}_probs_image{pick}", f"an_{side}_exp_probs")
    if pick in attr_pos:
        memo = st.session_state.get("_an_keep", {})
        methods = [m for m in memo.get(f"an_{side}_attr_methods") or [] if m in _attr_methods(data)] or _default_methods(data)
        mode = memo.get(f"an_{side}_attr_norm", "per_map")
        models = [m for m in data.models if f"attr.{m}.{methods[0]}" in t] if methods else []
        st.caption(f"Attribution maps ({'scaled per map: compare shape' if mode == 'per_map' else 'scaled jointly: compare magnitude'}; "
                   "methods and scaling as chosen on the Attribution tab).", help=HELP["spearman"] + " " + HELP["iou"])
        fig = _attr_figure(data, attr_pos[pick], pick, methods, models, mode, names, y,
                           {m: av.predictions(t, m) for m in data.models}, row_height=110 if compact else 190)
        _plot(fig, f"run{rid}_explorer_attribution{pick}", f"an_{side}_exp_attr", theme=None)
    else:
        st.caption("No attribution maps were stored for this image (only the first "
                   f"{len(attr_pos)} images of the analysis set, disagreements first, get them).")


# --------------------------------------------------------------------------- page


def main() -> None:
    st.title("Analysis")
    st.caption("What did the student learn from the teacher, beyond accuracy? Layer similarity during training, "
               "class geometry of the embeddings, where the models look, and where they disagree — all computed "
               "by the run itself on held-out test images.")
    store = ui_state.get_store()
    run, versus = pick_runs(store)
    if run is None:
        return
    datas = [RunData(store, run)] + ([RunData(store, versus)] if versus is not None else [])
    for d in datas:
        if not d.complete:
            if d.cka or d.run.status in ACTIVE:
                st.info(f"**{d.label}:** {d.error or _missing_message(d)}")
            else:
                st.warning(f"**{d.label}:** {d.error or _missing_message(d)}")
        if d.run.status in ACTIVE:
            st.button("🔄 Refresh", key=f"an_refresh_{d.run.id}", help="Load the checkpoints written since.")
    if not any(d.complete or d.cka for d in datas):
        try:
            st.page_link("pages/run_detail.py", label="📈 Open the run's detail page", query_params={"run": str(run.id)})
        except Exception:  # noqa: BLE001 - page not registered (page run on its own)
            pass
        return
    tabs = st.tabs(list(TABS), key="an_tab", on_change="rerun")
    renderers = (cka_view, prototypes_view, attribution_view, agreement_view, explorer_view)
    for tab, render in zip(tabs, renderers):
        if tab.open is False:
            continue
        with tab:
            _side_by_side(datas, render)


ui_state.ensure_app(__file__)  # a deep link on a fresh server: hand over to app.py (navigation, page config)
main()
