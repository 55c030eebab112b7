"""The New-experiment form's sections, each drawn with its fields' problems right below them.

Widgets get their values from Session State (keys ``nx_...``, see ``ui.form_fields``), never ``value=``. Number
fields have no ``min_value``/``max_value``: a browser number field silently keeps its old value when a typed one
is out of its range, so the typed value goes to validation instead, which refuses it next to the field. For the
same reason whole-number fields are float fields (``WHOLE``): an integer field truncates a typed 2.5 to 2.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from kd_core.data import DATASETS
from kd_core.models import MODELS
from ui import forms
from ui.badges import count_text
from ui.form_checks import FormCheck
from ui.form_fields import NO_METHOD, SOURCES, P
from ui.forms import HELP, PARAM_HELP, SOURCE_HELP, options_with, show_problems

ss = st.session_state
WHOLE = {"step": 1.0, "format": "%.15g"}  # a whole-number field that keeps a typed fraction for validation to refuse


def _row_problems(check: FormCheck, paths: tuple[str, ...], prefix: str = "") -> None:
    """The problems of a row of fields, right under the row at full width (a narrow column would wrap them per word)."""
    show_problems(check, *(prefix + path for path in paths))


def run_section(check: FormCheck) -> None:
    st.subheader("Run")
    c = st.columns([3, 1, 1, 1])
    c[0].text_input("Name", key=f"{P}name", help=HELP["name"] + " It follows the config until you type your own.")
    c[1].number_input("Seed", key=f"{P}seed", help=HELP["seed"], **WHOLE)
    c[2].selectbox("Device", options_with(["auto", "cpu", "cuda"], ss.get(f"{P}device")), key=f"{P}device", help=HELP["device"])
    c[3].selectbox("Precision", options_with(["auto", "fp32", "bf16", "fp16"], ss.get(f"{P}precision")), key=f"{P}precision",
                   help=HELP["precision"])
    _row_problems(check, ("name", "seed", "device", "precision"))


def _dataset_label(name: str) -> str:
    info = DATASETS.get(name)
    if info is None:
        return f"{name} (unknown)"
    return f"{name} — {info.description}" + ("" if info.offline else " · downloads")


def dataset_section(check: FormCheck) -> None:
    st.subheader("Dataset")
    c = st.columns([3, 2])
    c[0].selectbox("Dataset", options_with(list(DATASETS), ss.get(f"{P}ds_name")), key=f"{P}ds_name",
                   format_func=_dataset_label, help=HELP["dataset"])
    c[1].text_input("Data folder (root)", key=f"{P}ds_root", help=HELP["root"])
    _row_problems(check, ("dataset.name", "dataset.root"))
    c = st.columns(4)
    c[0].number_input("Validation fraction", key=f"{P}ds_val", step=0.05, format="%g", help=HELP["val"])
    c[1].number_input("Subset (max training images)", key=f"{P}ds_subset", placeholder="all", help=HELP["subset"], **{**WHOLE, "step": 100.0})
    c[2].number_input("Image size", key=f"{P}ds_image_size", placeholder="dataset's own", help=HELP["image_size"], **{**WHOLE, "step": 8.0})
    with c[3]:
        st.write("")
        st.checkbox("Augment", key=f"{P}ds_augment", help=HELP["augment"])
    _row_problems(check, ("val_fraction", "subset", "image_size", "augment"), "dataset.")
    c = st.columns(4)
    c[0].selectbox("Loader", options_with(["auto", "resident", "streaming"], ss.get(f"{P}ds_loader")), key=f"{P}ds_loader",
                   help=HELP["loader"])
    c[1].number_input("Loader workers", key=f"{P}ds_workers", placeholder="one per core", help=HELP["workers"], **WHOLE)
    _row_problems(check, ("loader", "workers"), "dataset.")
    show_problems(check, "dataset")


def _shape() -> tuple[int, int, int]:
    """(classes, channels, image size) of the form's dataset, for parameter counts."""
    size = ss.get(f"{P}ds_image_size")
    size = int(size) if isinstance(size, (int, float)) and float(size).is_integer() and 0 < size <= 1024 else None
    return forms.dataset_shape(str(ss.get(f"{P}ds_name")), size)


def _arch_label(name: str, shape: tuple[int, int, int]) -> str:
    if name not in MODELS:
        return f"{name} (unknown)"
    count = forms.arch_param_counts(*shape).get(name)
    size = f"{count_text(count)} parameters" if count is not None else "does not fit this dataset's images"
    return f"{name} — {size} · {MODELS[name].description}"


def arch_select(key: str, label: str = "Architecture", on_change=None) -> None:
    """An architecture selectbox; each option shows its parameter count for the form's dataset."""
    shape = _shape()  # bound now: a format function must not read the session state later
    classes, channels, size = shape
    st.selectbox(label, options_with(list(MODELS), ss.get(key)), key=key, format_func=lambda n: _arch_label(n, shape), on_change=on_change,
                 help=HELP["arch"] + f" Parameter counts are for this dataset: {channels}×{size}×{size} inputs, {classes} classes.")


def model_section(check: FormCheck, role: str, disabled: bool = False) -> None:
    """Architecture-independent training settings of the teacher or the student."""
    p = f"{P}{role[0]}_"
    c = st.columns(4)
    c[0].number_input("Epochs", key=f"{p}epochs", help=HELP["epochs"], disabled=disabled, **WHOLE)
    c[1].number_input("Batch size", key=f"{p}bs", help=HELP["batch_size"], disabled=disabled, **{**WHOLE, "step": 16.0})
    c[2].number_input("Devices", key=f"{p}devices", help=HELP["devices"], disabled=disabled, **WHOLE)
    c[3].selectbox("Optimizer", options_with(["sgd", "adamw"], ss.get(f"{p}opt")), key=f"{p}opt", help=HELP["optimizer"], disabled=disabled)
    _row_problems(check, ("epochs", "batch_size", "devices", "optimizer.name"), f"{role}.")
    sgd = ss.get(f"{p}opt") == "sgd"
    c = st.columns(4)
    c[0].number_input("Learning rate", key=f"{p}lr", step=0.001, format="%g", help=HELP["lr"], disabled=disabled)
    c[1].number_input("Momentum", key=f"{p}mom", step=0.05, format="%g", help=HELP["momentum"], disabled=disabled or not sgd)
    c[2].number_input("Weight decay", key=f"{p}wd", step=0.0001, format="%g", help=HELP["weight_decay"], disabled=disabled)
    with c[3]:
        st.write("")
        st.checkbox("Nesterov", key=f"{p}nesterov", help=HELP["nesterov"], disabled=disabled or not sgd)
    _row_problems(check, ("optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "optimizer.nesterov"), f"{role}.")
    show_problems(check, f"{role}.optimizer")
    step = ss.get(f"{p}sched") == "step"
    c = st.columns(3)
    c[0].selectbox("LR schedule", options_with(["cosine", "step", "none"], ss.get(f"{p}sched")), key=f"{p}sched",
                   help=HELP["scheduler"], disabled=disabled)
    c[1].text_input("Milestones (epochs)", key=f"{p}milestones", help=HELP["milestones"], disabled=disabled or not step,
                    placeholder="e.g. 150, 180, 210")
    c[2].number_input("Gamma", key=f"{p}gamma", step=0.05, format="%g", help=HELP["gamma"], disabled=disabled or not step)
    _row_problems(check, ("scheduler.name", "scheduler.milestones", "scheduler.gamma"), f"{role}.")
    show_problems(check, f"{role}.scheduler", role)


def architecture(check: FormCheck, role: str, on_change=None) -> None:
    arch_select(f"{P}{role[0]}_arch", on_change=on_change)
    show_problems(check, f"{role}.arch")
    if role == "student":
        from ui.form_diswot import diswot_panel

        diswot_panel(check)


def teacher_weights(check: FormCheck, store: Any, on_run_chosen) -> str:
    """The Weights choice and its detail; returns the kind of source."""
    st.selectbox("Weights", list(SOURCES), key=f"{P}t_src", format_func=SOURCES.get, help=SOURCE_HELP)
    kind = ss.get(f"{P}t_src")
    if kind == "run":
        _earlier_run(store, on_run_chosen)
    elif kind == "upload":
        st.file_uploader("Checkpoint (.safetensors, .pt)", type=["safetensors", "pt", "pth"], key=f"{P}t_upload",
                         help="A state dict for the chosen architecture and this dataset's number of classes. "
                         "It is checked before launch and kept in the data folder's uploads/.")
        if ss.get(f"{P}t_upload_path") and "teacher.source" not in check.errors:
            st.success(f"Checkpoint fits {ss.get(f'{P}t_arch')}: {forms.display_path(ss[f'{P}t_upload_path'])}",
                       icon=":material/check_circle:")
    elif kind == "file":
        st.text_input("Checkpoint path", key=f"{P}t_src_file", placeholder=f"{forms.data_home_text()}/teachers/my_teacher.safetensors",
                      help="Path of a .safetensors or .pt state dict on this machine, inside the data folder or a folder "
                      "in DISTILLERY_ALLOWED_ROOTS.")
    elif kind == "torchvision":
        st.caption("Uses torchvision's ImageNet weights (the stem and classifier are re-initialised to fit the dataset). "
                   "They must already be on this machine.")
    elif kind == "timm":
        st.caption("Uses timm's ImageNet weights for a timm: architecture, adapted by timm to the dataset (new classifier). "
                   f"Read from {forms.data_home_text()}/timm/<timm name>.safetensors or the Hugging Face cache, never downloaded.")
    elif kind == "random":
        st.caption("An untrained teacher: only useful to test the pipeline; distillation from it teaches nothing.")
    show_problems(check, "teacher.source")
    return kind


def _earlier_run(store: Any, on_run_chosen) -> None:
    candidates = {r.id: r for r in forms.trained_teacher_runs(store)}
    chosen = ss.get(f"{P}t_src_run")
    ids = list(candidates) + ([chosen] if chosen is not None and chosen not in candidates else [])
    if not ids:
        st.info("No completed run has a trained teacher yet. Train one first (Weights: Train it here first).")

    def label(rid: int) -> str:
        r = candidates.get(rid)
        if r is None:
            return f"run {rid} (not a completed run with a trained teacher)"
        acc = r.summary.get("teacher_acc")
        acc_text = f", teacher {acc:.1f}%" if isinstance(acc, (int, float)) else ""
        return f"#{r.id} {r.name} — {(r.config.get('teacher') or {}).get('arch')} on {(r.config.get('dataset') or {}).get('name')}{acc_text}"

    ss.setdefault(f"{P}t_src_run", None)
    st.selectbox("Earlier run", ids, key=f"{P}t_src_run", format_func=label, placeholder="Choose a run", on_change=on_run_chosen,
                 help="Completed runs that trained their teacher; its weights are reused.")


# --------------------------------------------------------------------------- recipe


def recipe_section(check: FormCheck, on_add, on_remove) -> None:
    st.subheader("Recipe: what the student learns from")
    st.caption("The student's loss is the weighted sum of these terms. A classic KD recipe is 0.1 × ce (true labels) "
               "+ 0.9 × kd (the teacher's softened predictions).")
    catalogue = forms.losses()
    ids = list(ss.get(f"{P}recipe_ids", []))
    for i, uid in enumerate(ids):
        with st.container(border=True):
            _term(check, i, uid, catalogue, on_remove=on_remove)
    show_problems(check, "recipe")
    c = st.columns([2, 1, 3], vertical_alignment="bottom")
    if ss.get("nx_new_loss") not in catalogue:
        ss["nx_new_loss"] = "kd"
    c[0].selectbox("Add a term", list(catalogue), key="nx_new_loss", format_func=lambda n: f"{n} — {forms.loss_line(n)}")
    c[1].button("Add term", on_click=on_add, width="stretch", icon=":material/add:")
    method_section(check)


def method_section(check: FormCheck) -> None:
    """A method that changes the training loop (kd_core.methods), or none: the recipe alone."""
    from kd_core.methods import METHODS, describe_method

    key = f"{P}method"
    c = st.columns([2, 3], vertical_alignment="bottom")
    c[0].selectbox("Training method", options_with([NO_METHOD, *sorted(METHODS)], ss.get(key)), key=key,
                   format_func=lambda n: "none — the recipe alone" if n == NO_METHOD else f"{n} — {describe_method(n)['summary']}"
                   if n in METHODS else f"{n} (unknown)",
                   help="Some methods change the training loop itself (e.g. a second head on the student); most runs need none.")
    name = ss.get(key)
    if name in METHODS:
        info = describe_method(name)
        defaults = ", ".join(f"{k}={v}" for k, v in info["params"].items())
        c[1].text_input("Method parameters (YAML)", key=f"{P}method_params", placeholder=f"defaults: {defaults}" if defaults else "none",
                        help="Only the parameters to change, as a YAML mapping; the others keep their defaults.")
        paper = f"[{info['paper']}]({info['paper_url']})" if info.get("paper_url") else f"*{info['paper']}*" if info.get("paper") else ""
        st.caption(" ".join(part for part in (info["summary"], f"Paper: {paper}." if paper else "",
                                              f"Note: {info['caveat']}" if info.get("caveat") else "") if part))
    show_problems(check, "method", prefix=True)
    if (name in METHODS and METHODS[name].takes_teachers) or ss.get(f"{P}ens_ids"):
        from ui.form_ensemble import ensemble_section

        ensemble_section(check, str(name), lambda key, label: arch_select(key, label))


def _term(check: FormCheck, i: int, uid: int, catalogue: dict, on_remove) -> None:
    c = st.columns([2, 1, 1, 0.6], vertical_alignment="bottom")
    name_key = f"{P}r{uid}_loss"
    c[0].selectbox(f"Term {i + 1}: loss", options_with(list(catalogue), ss.get(name_key)), key=name_key, help=HELP["loss"])
    c[1].number_input("Weight", key=f"{P}r{uid}_weight", step=0.1, format="%g", help=HELP["weight"])
    c[2].number_input("Warm-up epochs", key=f"{P}r{uid}_warmup_epochs", help=HELP["warmup"], **WHOLE)
    c[3].button("Remove", key=f"{P}r{uid}_remove", on_click=on_remove, args=(uid,), help="Remove this term", icon=":material/delete:")
    info = catalogue.get(ss.get(name_key))
    if info:
        st.caption((info.get("summary") or "") + (f"  \n*{info['paper']}*" if info.get("paper") else ""))
        _params(uid, ss.get(name_key), info.get("params") or {})
    if ss.get(f"{P}r{uid}_extra"):
        st.text_input("Extra parameters (YAML)", key=f"{P}r{uid}_extra", help=HELP["extra"])
    show_problems(check, f"recipe[{i}]", prefix=True)


def _params(uid: int, loss: str, params: dict[str, Any]) -> None:
    from ui.form_recipe import param_widget_value

    columns = st.columns(4)
    for j, (pname, default) in enumerate(params.items()):
        key = f"{P}r{uid}_p_{pname}"
        if key not in ss:
            ss[key] = param_widget_value(default, default)[1]
        col = columns[j % len(columns)]
        phelp = PARAM_HELP.get(pname, f"Parameter '{pname}' of {loss} (default {default}).")
        if isinstance(default, bool):
            col.checkbox(pname, key=key, help=phelp)
        elif isinstance(default, int):
            col.number_input(pname, key=key, help=phelp, **WHOLE)
        elif isinstance(default, float):
            col.number_input(pname, key=key, format="%g", step=0.1 if default >= 0.1 else default or 0.01, help=phelp)
        else:
            col.text_input(pname, key=key, help=phelp, placeholder="default" if default is None else "")


# --------------------------------------------------------------------------- options and summary


def options_section(check: FormCheck) -> None:
    st.subheader("Options")
    c = st.columns(3)
    c[0].checkbox("Also train a baseline student (CE only)", key=f"{P}baseline", help=HELP["baseline"])
    c[1].checkbox("Cache teacher outputs", key=f"{P}cache_teacher", help=HELP["cache_teacher"])
    c[2].number_input("Checkpoint every (s)", key=f"{P}ckpt_s", step=30.0, format="%g", help=HELP["ckpt"])
    _row_problems(check, ("baseline", "cache_teacher", "checkpoint_every_s"))
    c = st.columns(3)
    c[0].selectbox("Channels-last layout", ["auto", True, False], key=f"{P}channels_last", help=HELP["channels_last"],
                   format_func=lambda v: "auto (on for CUDA)" if v == "auto" else ("on" if v else "off"))
    c[1].checkbox("Compile the student (torch.compile)", key=f"{P}compile", help=HELP["compile"])
    _row_problems(check, ("channels_last", "compile"))
    c = st.columns(3)
    c[0].checkbox("Store teacher soft labels (augmented runs)", key=f"{P}sl_store", help=HELP["soft_labels"])
    c[1].number_input("Soft labels: top-k", key=f"{P}sl_top_k", placeholder="full logits", help=HELP["top_k"], **WHOLE)
    _row_problems(check, ("store", "top_k"), "soft_labels.")
    c = st.columns([2, 1, 1, 1, 2])
    c[0].checkbox("Compute the analysis views", key=f"{P}an_enabled", help=HELP["analysis"])
    off = not ss.get(f"{P}an_enabled", True)
    c[1].number_input("CKA checkpoints", key=f"{P}an_cka", disabled=off, **WHOLE,
                      help="Epochs (evenly spaced, last included) at which teacher-vs-student CKA is computed.")
    c[2].number_input("Analysis images", key=f"{P}an_samples", disabled=off, **{**WHOLE, "step": 100.0},
                      help="Held-out images used for CKA, prototypes and the 2-D maps.")
    c[3].number_input("Attribution images", key=f"{P}an_attr", disabled=off, **{**WHOLE, "step": 4.0},
                      help="Images whose attribution maps (which pixels mattered) are computed for every model.")
    c[4].multiselect("2-D maps", ["pca", "tsne", "umap"], key=f"{P}an_proj", disabled=off, help=HELP["projections"])
    _row_problems(check, ("enabled", "cka_checkpoints", "samples", "attribution_images", "projections"), "analysis.")
    show_problems(check, "analysis")


def summary_section(check: FormCheck) -> None:
    """Model sizes and compression computed from the architectures, and what the run will train."""
    config = check.config
    shape = forms.dataset_shape(str(config["dataset"]["name"]), config["dataset"].get("image_size"))
    t_arch, s_arch = str(config["teacher"]["arch"]), str(config["student"]["arch"])
    t_n, s_n = forms.param_count(t_arch, *shape), forms.param_count(s_arch, *shape)
    inputs = f"for {shape[1]}×{shape[2]}×{shape[2]} inputs, {shape[0]} classes"
    phases = (["teacher"] if config["teacher"]["source"] == "train" else []) + ["student"] + (["baseline"] if config["baseline"] else [])
    m = st.columns(4)
    m[0].metric("Teacher parameters", count_text(t_n), help=f"{t_arch} {inputs}")
    m[1].metric("Student parameters", count_text(s_n), help=f"{s_arch} {inputs}")
    m[2].metric("Compression", f"{t_n / s_n:.1f}×" if t_n and s_n else "?",
                help="Teacher parameters ÷ student parameters: how much smaller the student is.")
    m[3].metric("Trainings", len(phases), help="What the run trains, in order: " + " → ".join(phases))
    st.caption("The run trains, in order: " + " → ".join(f"**{p}**" for p in phases)
               + (" (the baseline is the same student with CE only, to measure what distillation adds)." if "baseline" in phases else "."))
    if check.errors:
        st.error("**Fix these before launching:**\n" + "\n".join(
            f"- `{path}`: {message}" for path, messages in check.errors.items() for message in messages), icon=":material/error:")
