"""New experiment: every field of the config schema as a form, checked before launch, then submitted to the runner.

Flow of one render: (1) load a prefill / preset / import into Session State if one is pending, (2) build the config
dict from the widget values already in Session State and validate it, (3) draw the widgets with each problem next to
its field, (4) Launch (disabled while anything is wrong) submits and switches to the run's page.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st
import yaml

from kd_core.config import ConfigError, validate_config
from kd_core.data import DATASETS
from kd_core.models import MODELS
from kd_core.teachers import TeacherUnavailable
from ui import forms
from ui.badges import count_text
from ui.forms import HELP, P, PARAM_HELP, SOURCE_HELP, SOURCES, options_with, show_errors
from ui.state import ensure_app, flash, get_store, runner, show_flash

ensure_app(__file__)
store = get_store()
ss = st.session_state


# --------------------------------------------------------------------------- (1) what to load into the form


def _load(config: dict, origin: str) -> None:
    ss.pop("_nx_parent", None)
    ignored = forms.apply_config(config)
    note = f"Loaded {origin} into the form."
    if ignored:
        note += f" Ignored fields the form does not know: {', '.join(ignored)}."
    ss["_nx_msg"] = ("warning" if ignored else "success", note)


def _on_preset() -> None:
    label = ss.get("nx_preset_choice")
    all_presets = forms.presets()
    if label in all_presets:
        _load(all_presets[label], f"preset “{label}”")


def _on_import() -> None:
    text = ""
    upload = ss.get("nx_import_file")
    if upload is not None:
        text = upload.getvalue().decode("utf-8", errors="replace")
        origin = upload.name
    else:
        text = ss.get("nx_import_text") or ""
        origin = "the pasted YAML"
    if not text.strip():
        ss["_nx_msg"] = ("error", "Nothing to import: upload a .yaml file or paste a config first.")
        return
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        ss["_nx_msg"] = ("error", f"{origin} is not valid YAML: {exc}")
        return
    if not isinstance(data, dict):
        ss["_nx_msg"] = ("error", f"{origin} is not a config (expected fields like name:, teacher:, student:, recipe:).")
        return
    try:
        _load(data, origin)
    except (TypeError, ValueError) as exc:
        ss["_nx_msg"] = ("error", f"{origin} could not be loaded: {exc}")


def _add_term() -> None:
    forms.new_term_state(ss.get("nx_new_loss") or "kd")


def _remove_term(uid: int) -> None:
    ss[f"{P}recipe_ids"] = [u for u in ss.get(f"{P}recipe_ids", []) if u != uid]


def _on_run_teacher() -> None:
    """Choosing an earlier run's teacher also sets the teacher architecture to the one that run trained."""
    rid = ss.get(f"{P}t_src_run")
    if rid is None:
        return
    try:
        arch = ((store.get_run(int(rid)).config or {}).get("teacher") or {}).get("arch")
    except KeyError:
        return
    if arch:
        ss[f"{P}t_arch"] = arch


prefill = ss.pop("prefill_config", None)
if prefill:
    _load(prefill, "the run's config")
    if ss.get("_nx_msg", ("success",))[0] == "success":
        ss.pop("_nx_msg", None)  # the "Editing a copy of run #N" note says it already
    ss["_nx_parent"] = ss.pop("prefill_parent_id", None)
elif f"{P}name" not in ss:  # first visit, or back from another page (Streamlit drops widget state of unseen pages)
    forms.apply_config(ss.get("_nx_config") or forms.default_config())

# an upload becomes a file under distillery-data/uploads/<sha256>.<ext>, once per uploaded file
upload_error = None
uploaded = ss.get(f"{P}t_upload")
if ss.get(f"{P}t_src") == "upload" and uploaded is not None:
    done = ss.get("_nx_upload_done")
    if not done or done[0] != uploaded.file_id:  # a new file: save it, refuse (and drop) what is not a state dict
        try:
            path = forms.save_upload(uploaded.name, uploaded.getvalue())
            ss["_nx_upload_done"] = (uploaded.file_id, str(path))
        except (ValueError, OSError, TeacherUnavailable) as exc:
            ss["_nx_upload_done"] = (uploaded.file_id, None)
            upload_error = str(exc)
    ss[f"{P}t_upload_path"] = ss["_nx_upload_done"][1]
elif ss.get(f"{P}t_src") == "upload":
    ss[f"{P}t_upload_path"] = None

# --------------------------------------------------------------------------- (2) build and check the config

config_dict, form_problems = forms.state_to_config(ss)
problems: list[tuple[str, str]] = list(form_problems)
if upload_error:
    problems.append(("teacher.source", upload_error if upload_error.startswith("teacher.source:") else f"teacher.source: {upload_error}"))
problems += forms.path_problems(config_dict)
config = None
try:
    config = validate_config(config_dict)
except ConfigError as exc:
    problems += exc.errors
if not any(path == "teacher.source" for path, _ in problems):
    problems += forms.teacher_problems(config_dict, store)
if problems:
    config = None
errors: dict[str, list[str]] = {}
for path, msg in problems:
    errors.setdefault(path, [])
    if msg not in errors[path]:
        errors[path].append(msg)
ss["_nx_config"] = config_dict  # survives a visit to another page
ss["_nx_shown_errors"] = set()

# --------------------------------------------------------------------------- (3) the form

st.title("New experiment")
st.caption(
    "Pick a dataset, a **teacher** (big, accurate network) and a **student** (small network), then the **recipe**: "
    "the losses the student learns from. Start from a preset, check the numbers below, and press **Launch**."
)
show_flash()
if ss.get("_nx_parent"):
    st.info(f"Editing a copy of run #{ss['_nx_parent']}'s config: change what you like and launch it as a new run.")
msg = ss.pop("_nx_msg", None)
if msg:
    getattr(st, msg[0])(msg[1])

top = st.columns([3, 2], vertical_alignment="bottom")
with top[0]:
    preset_labels = list(forms.presets())
    if ss.get("nx_preset_choice") not in preset_labels:
        ss["nx_preset_choice"] = preset_labels[0] if preset_labels else None
    st.selectbox("Start from a preset", preset_labels, key="nx_preset_choice",
                 help="Ready-made configs. Loading one replaces everything in the form.")
with top[1]:
    st.button("Load preset", on_click=_on_preset, width="stretch")

with st.expander("Import a YAML config (the same file `python -m kd_core run` takes)"):
    st.file_uploader("Upload a .yaml file", type=["yaml", "yml"], key="nx_import_file")
    st.text_area("…or paste YAML", key="nx_import_text", height=140,
                 placeholder="name: my run\nteacher: {arch: cnn_small}\nstudent: {arch: cnn_tiny}\nrecipe:\n  - {loss: kd}")
    st.button("Load into the form", on_click=_on_import, key="nx_import_btn")

# ---- general
st.subheader("Run")
c = st.columns([3, 1, 1])
c[0].text_input("Name", key=f"{P}name", help=HELP["name"])
c[1].number_input("Seed", key=f"{P}seed", min_value=0, step=1, help=HELP["seed"])
c[2].selectbox("Device", ["auto", "cpu", "cuda"], key=f"{P}device", help=HELP["device"])
with c[0]:
    show_errors(errors, "name")
with c[1]:
    show_errors(errors, "seed")
with c[2]:
    show_errors(errors, "device")

# ---- dataset
st.subheader("Dataset")
ds_names = options_with(list(DATASETS), ss.get(f"{P}ds_name"))


def _ds_label(name: str) -> str:
    info = DATASETS.get(name)
    if info is None:
        return f"{name} (unknown)"
    return f"{name} — {info.description}" + ("" if info.offline else " · downloads")


c = st.columns([3, 2])
c[0].selectbox("Dataset", ds_names, key=f"{P}ds_name", format_func=_ds_label, help=HELP["dataset"])
with c[0]:
    show_errors(errors, "dataset.name")
c[1].text_input("Data folder (root)", key=f"{P}ds_root", help=HELP["root"])
with c[1]:
    show_errors(errors, "dataset.root")
c = st.columns(4)
c[0].number_input("Validation fraction", key=f"{P}ds_val", min_value=0.0, max_value=1.0, step=0.05, format="%g", help=HELP["val"])
c[1].number_input("Subset (max training images)", key=f"{P}ds_subset", min_value=0, step=100, placeholder="all", help=HELP["subset"])
c[2].number_input("Image size", key=f"{P}ds_image_size", min_value=0, step=8, placeholder="dataset's own", help=HELP["image_size"])
with c[3]:
    st.write("")
    st.checkbox("Augment", key=f"{P}ds_augment", help=HELP["augment"])
for col, path in zip(c, ("dataset.val_fraction", "dataset.subset", "dataset.image_size", "dataset.augment")):
    with col:
        show_errors(errors, path)
show_errors(errors, "dataset")

# ---- models
arch_help = {name: info.description for name, info in MODELS.items()}


def _arch_label(name: str) -> str:
    return f"{name} — {arch_help[name]}" if name in arch_help else f"{name} (unknown)"


def model_section(role: str, prefix: str, disabled: bool = False) -> None:
    path = role
    c = st.columns(3)
    c[0].number_input("Epochs", key=f"{prefix}epochs", min_value=0, step=1, help=HELP["epochs"], disabled=disabled)
    c[1].number_input("Batch size", key=f"{prefix}bs", min_value=1, step=16, help=HELP["batch_size"], disabled=disabled)
    c[2].selectbox("Optimizer", ["sgd", "adamw"], key=f"{prefix}opt", help=HELP["optimizer"], disabled=disabled)
    for col, sub in zip(c, ("epochs", "batch_size", "optimizer.name")):
        with col:
            show_errors(errors, f"{path}.{sub}")
    c = st.columns(4)
    c[0].number_input("Learning rate", key=f"{prefix}lr", min_value=0.0, step=0.001, format="%g", help=HELP["lr"], disabled=disabled)
    c[1].number_input("Momentum", key=f"{prefix}mom", min_value=0.0, max_value=1.0, step=0.05, format="%g", help=HELP["momentum"],
                      disabled=disabled or ss.get(f"{prefix}opt") != "sgd")
    c[2].number_input("Weight decay", key=f"{prefix}wd", min_value=0.0, step=0.0001, format="%g", help=HELP["weight_decay"], disabled=disabled)
    with c[3]:
        st.write("")
        st.checkbox("Nesterov", key=f"{prefix}nesterov", help=HELP["nesterov"], disabled=disabled or ss.get(f"{prefix}opt") != "sgd")
    for col, sub in zip(c, ("optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "optimizer.nesterov")):
        with col:
            show_errors(errors, f"{path}.{sub}")
    show_errors(errors, f"{path}.optimizer")
    c = st.columns(3)
    c[0].selectbox("LR schedule", ["cosine", "step", "none"], key=f"{prefix}sched", help=HELP["scheduler"], disabled=disabled)
    step = ss.get(f"{prefix}sched") == "step"
    c[1].text_input("Milestones (epochs)", key=f"{prefix}milestones", help=HELP["milestones"], disabled=disabled or not step,
                    placeholder="e.g. 150, 180, 210")
    c[2].number_input("Gamma", key=f"{prefix}gamma", min_value=0.0, max_value=1.0, step=0.05, format="%g", help=HELP["gamma"],
                      disabled=disabled or not step)
    for col, sub in zip(c, ("scheduler.name", "scheduler.milestones", "scheduler.gamma")):
        with col:
            show_errors(errors, f"{path}.{sub}")
    show_errors(errors, f"{path}.scheduler")


left, right = st.columns(2, gap="large")
with left:
    st.subheader("Teacher")
    t_archs = options_with(list(MODELS), ss.get(f"{P}t_arch"))
    st.selectbox("Architecture", t_archs, key=f"{P}t_arch", format_func=_arch_label, help=HELP["arch"])
    show_errors(errors, "teacher.arch")
    st.selectbox("Weights", list(SOURCES), key=f"{P}t_src", format_func=SOURCES.get, help=SOURCE_HELP)
    kind = ss.get(f"{P}t_src")
    if kind == "run":
        candidates = forms.trained_teacher_runs(store)
        by_id = {r.id: r for r in candidates}
        ids = list(by_id)
        if ss.get(f"{P}t_src_run") is not None and ss[f"{P}t_src_run"] not in by_id:
            ids.append(ss[f"{P}t_src_run"])
        if not ids:
            st.info("No completed run has a trained teacher yet. Train one first (Weights: Train it here first).")

        def _run_label(rid: int) -> str:
            r = by_id.get(rid)
            if r is None:
                return f"run {rid} (not a completed run with a trained teacher)"
            t = (r.config.get("teacher") or {})
            acc = r.summary.get("teacher_acc")
            acc_text = f", teacher {acc:.1f}%" if isinstance(acc, (int, float)) else ""
            return f"#{r.id} {r.name} — {t.get('arch')} on {(r.config.get('dataset') or {}).get('name')}{acc_text}"

        ss.setdefault(f"{P}t_src_run", None)
        st.selectbox("Earlier run", ids, key=f"{P}t_src_run", format_func=_run_label,
                     placeholder="Choose a run", on_change=_on_run_teacher,
                     help="Completed runs that trained their teacher; its teacher.safetensors is reused.")
    elif kind == "upload":
        st.file_uploader("Checkpoint (.safetensors, .pt)", type=["safetensors", "pt", "pth"], key=f"{P}t_upload",
                         help="A state dict for the chosen architecture and this dataset's number of classes. "
                         "It is checked before launch and kept under distillery-data/uploads/.")
        if ss.get(f"{P}t_upload_path") and "teacher.source" not in errors:
            st.success(f"Checkpoint fits {ss.get(f'{P}t_arch')}: {forms.display_path(ss[f'{P}t_upload_path'])}", icon="✅")
    elif kind == "file":
        st.text_input("Checkpoint path", key=f"{P}t_src_file", placeholder=f"{forms.data_home_text()}/teachers/my_teacher.safetensors",
                      help="Path of a .safetensors or .pt state dict on this machine, inside distillery-data/ or a folder "
                      "in DISTILLERY_ALLOWED_ROOTS.")
    elif kind == "torchvision":
        st.caption("Uses torchvision's ImageNet weights (the stem and classifier are re-initialised to fit the dataset). "
                   "They must already be on this machine.")
    elif kind == "random":
        st.caption("An untrained teacher: only useful to test the pipeline; distillation from it teaches nothing.")
    show_errors(errors, "teacher.source")
    trains = kind == "train"
    if not trains:
        st.caption("Training settings below are not used: this teacher is not trained here.")
    model_section("teacher", f"{P}t_", disabled=not trains)

with right:
    st.subheader("Student")
    s_archs = options_with(list(MODELS), ss.get(f"{P}s_arch"))
    st.selectbox("Architecture", s_archs, key=f"{P}s_arch", format_func=_arch_label, help=HELP["arch"])
    show_errors(errors, "student.arch")
    model_section("student", f"{P}s_")

# ---- recipe
st.subheader("Recipe: what the student learns from")
st.caption("The student's loss is the weighted sum of these terms. A classic KD recipe is 0.1 × ce (true labels) "
           "+ 0.9 × kd (the teacher's softened predictions).")
catalogue = forms.losses()
loss_names = list(catalogue)
for i, uid in enumerate(list(ss.get(f"{P}recipe_ids", []))):
    with st.container(border=True):
        c = st.columns([2, 1, 1, 0.6], vertical_alignment="bottom")
        name_key = f"{P}r{uid}_loss"
        c[0].selectbox(f"Term {i + 1}: loss", options_with(loss_names, ss.get(name_key)), key=name_key, help=HELP["loss"])
        c[1].number_input("Weight", key=f"{P}r{uid}_weight", min_value=0.0, step=0.1, format="%g", help=HELP["weight"])
        c[2].number_input("Warm-up epochs", key=f"{P}r{uid}_warmup", min_value=0, step=1, help=HELP["warmup"])
        c[3].button("Remove", key=f"{P}r{uid}_remove", on_click=_remove_term, args=(uid,),
                    disabled=len(ss.get(f"{P}recipe_ids", [])) <= 1, help="Remove this term")
        name = ss.get(name_key)
        info = catalogue.get(name)
        if info:
            line = info.get("summary") or ""
            if info.get("paper"):
                line += f"  \n*{info['paper']}*"
            st.caption(line)
            params = info.get("params") or {}
            if params:
                pc = st.columns(4)
                for j, (pname, default) in enumerate(params.items()):
                    key = f"{P}r{uid}_p_{pname}"
                    if key not in ss:
                        ss[key] = forms._param_value(default, default)[1]
                    col = pc[j % len(pc)]
                    phelp = PARAM_HELP.get(pname, f"Parameter '{pname}' of {name} (default {default}).")
                    if isinstance(default, bool):
                        col.checkbox(pname, key=key, help=phelp)
                    elif isinstance(default, int):
                        col.number_input(pname, key=key, step=1, help=phelp)
                    elif isinstance(default, float):
                        col.number_input(pname, key=key, format="%g", step=0.1 if default >= 0.1 else default or 0.01, help=phelp)
                    else:
                        col.text_input(pname, key=key, help=phelp, placeholder="default" if default is None else "")
        extra_key = f"{P}r{uid}_extra"
        if ss.get(extra_key):
            st.text_input("Extra parameters (YAML)", key=extra_key, help=HELP["extra"])
        show_errors(errors, f"recipe[{i}]", prefix=True)
show_errors(errors, "recipe")
c = st.columns([2, 1, 3], vertical_alignment="bottom")
if ss.get("nx_new_loss") not in loss_names:
    ss["nx_new_loss"] = "kd" if "kd" in loss_names else loss_names[0]
c[0].selectbox("Add a term", loss_names, key="nx_new_loss", format_func=lambda n: f"{n} — {forms.loss_line(n)}")
c[1].button("Add term", on_click=_add_term, width="stretch")

# ---- extras
st.subheader("Options")
c = st.columns(3)
with c[0]:
    st.checkbox("Also train a baseline student (CE only)", key=f"{P}baseline", help=HELP["baseline"])
    show_errors(errors, "baseline")
with c[1]:
    st.checkbox("Cache teacher outputs", key=f"{P}cache_teacher", help=HELP["cache_teacher"])
with c[2]:
    st.number_input("Checkpoint every (s)", key=f"{P}ckpt_s", min_value=1.0, step=30.0, format="%g", help=HELP["ckpt"])
    show_errors(errors, "checkpoint_every_s")
c = st.columns([2, 1, 1, 1, 2])
c[0].checkbox("Compute the analysis views", key=f"{P}an_enabled", help=HELP["analysis"])
off = not ss.get(f"{P}an_enabled", True)
c[1].number_input("CKA checkpoints", key=f"{P}an_cka", min_value=0, step=1, disabled=off,
                  help="Epochs (evenly spaced, last included) at which teacher-vs-student CKA is computed.")
c[2].number_input("Analysis images", key=f"{P}an_samples", min_value=20, step=100, disabled=off,
                  help="Held-out images used for CKA, prototypes and the 2-D maps.")
c[3].number_input("Attribution images", key=f"{P}an_attr", min_value=0, step=4, disabled=off,
                  help="Images whose attribution maps (which pixels mattered) are computed for every model.")
c[4].multiselect("2-D maps", ["pca", "tsne", "umap"], key=f"{P}an_proj", disabled=off, help=HELP["projections"])
for path in ("analysis.cka_checkpoints", "analysis.samples", "analysis.attribution_images", "analysis.projections"):
    show_errors(errors, path)

# --------------------------------------------------------------------------- (4) summary and launch

st.divider()
st.subheader("Before you launch")
shape = forms.dataset_shape(config_dict["dataset"]["name"], config_dict["dataset"].get("image_size"))
t_arch, s_arch = config_dict["teacher"]["arch"], config_dict["student"]["arch"]
t_n = forms.param_count(t_arch, *shape)
s_n = forms.param_count(s_arch, *shape)
m = st.columns(4)
m[0].metric("Teacher parameters", count_text(t_n), help=f"{t_arch} for {shape[1]}×{shape[2]}×{shape[2]} inputs, {shape[0]} classes")
m[1].metric("Student parameters", count_text(s_n), help=f"{s_arch} for {shape[1]}×{shape[2]}×{shape[2]} inputs, {shape[0]} classes")
m[2].metric("Compression", f"{t_n / s_n:.1f}×" if t_n and s_n else "?", help="Teacher parameters ÷ student parameters: how much smaller the student is.")
phases = (["teacher"] if config_dict["teacher"]["source"] == "train" else []) + ["student"] + (["baseline"] if config_dict["baseline"] else [])
m[3].metric("Trainings", len(phases), help="What the run trains, in order: " + " → ".join(phases))
st.caption("The run trains, in order: " + " → ".join(f"**{p}**" for p in phases)
           + (" (the baseline is the same student with CE only, to measure what distillation adds)." if "baseline" in phases else "."))

if errors:
    st.error("**Fix these before launching:**\n" + "\n".join(
        f"- `{path}`: {msg.split(': ', 1)[1] if forms._PATH_PREFIX.match(msg) else msg}" for path, msgs in errors.items() for msg in msgs))

c = st.columns([1, 1, 2], vertical_alignment="center")
launch = c[0].button("🚀 Launch", type="primary", disabled=config is None, width="stretch",
                     help="Queue the run; it starts as soon as a worker slot is free." if config else "Fix the problems listed above first.")
if config is not None:
    c[1].download_button("Export YAML", config.to_yaml(), file_name=f"{config.name.replace(' ', '_').replace('/', '_')}.yaml",
                         mime="application/x-yaml", width="stretch", key="nx_export",
                         help="The same file `python -m kd_core run FILE` accepts.")
else:
    c[1].button("Export YAML", disabled=True, width="stretch", key="nx_export_disabled", help="Fix the problems first.")
with st.expander("Show the config as YAML"):
    st.code(config.to_yaml() if config is not None else yaml.safe_dump(config_dict, sort_keys=False), language="yaml")

if launch and config is not None:
    signature = config.to_yaml()
    last = ss.get("_nx_last_launch")
    if last and last[0] == signature and time.time() - last[1] < 3:
        st.stop()  # a double click: the first click already launched it
    try:
        run_id = runner.submit(store, config, parent_id=ss.get("_nx_parent"))
    except Exception as exc:  # noqa: BLE001 - show why instead of a traceback
        st.error(f"Could not launch: {exc}")
        st.stop()
    ss["_nx_last_launch"] = (signature, time.time(), run_id)
    flash(f"Launched run #{run_id} “{config.name}”.")
    target = "pages/run_detail.py" if Path(__file__).with_name("run_detail.py").exists() else "pages/runs.py"
    st.switch_page(target, query_params={"run": str(run_id)})
