"""New experiment: every field of the config schema as a form, checked before launch, then submitted to the runner.

Flow of one render: (1) load a prefill / preset / import into Session State if one is pending, (2) build the config
from the widget values already in Session State and check it (``ui.form_checks.check_form``), (3) draw the
widgets with each problem next to its field, (4) Launch (disabled while anything is wrong) submits and switches
to the run's page.
"""

from __future__ import annotations

import time

import streamlit as st
import yaml

from kd_core.config import ConfigError
from kd_core.teachers import TeacherUnavailable
from ui import form_widgets as fw
from ui import form_sweep, forms, presets
from ui.form_checks import check_form
from ui.form_fields import P
from ui.form_state import follow_config_with_name
from ui.state import ensure_app, flash, get_store, runner, show_flash

ensure_app(__file__)
store = get_store()
ss = st.session_state
NOT_SETTABLE = ("_remove", "t_upload", "import_file", "import_btn", "export", "_btn")  # buttons and uploaders: Streamlit owns their state


# --------------------------------------------------------------------------- (1) what to load into the form


def _load(config: dict, origin: str) -> bool:
    """Load ``config`` into the form, or leave the form as it is and say which fields it could not take."""
    problems = forms.apply_config(config)
    if problems:
        ss["_nx_msg"] = ("error", f"{origin} was not loaded; the form cannot hold these values:\n"
                         + "\n".join(f"- `{path}`: {why}" for path, why in problems))
        return False
    ss.pop("_nx_parent", None)
    form_sweep.clear(ss)  # a loaded config replaces the whole form, its sweep too
    ss["_nx_msg"] = ("success", f"Loaded {origin} into the form.")
    return True


def _on_preset() -> None:
    chosen = presets.presets().get(ss.get("nx_preset_choice"))
    if chosen is not None:
        _load(chosen.config, f"the preset {chosen.file}")


def _on_import() -> None:
    upload = ss.get("nx_import_file")
    text = upload.getvalue().decode("utf-8", errors="replace") if upload is not None else ss.get("nx_import_text") or ""
    origin = upload.name if upload is not None else "the pasted YAML"
    if not text.strip():
        ss["_nx_msg"] = ("error", "Nothing to import: upload a .yaml file or paste a config first.")
        return
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        ss["_nx_msg"] = ("error", f"{origin} is not valid YAML: {exc}")
        return
    if not (isinstance(data, dict) and "sweep" in data):
        _load(data, origin)
        return
    # a sweep file: the base config goes into the form and its sweep: section into "Sweep over", or nothing loads
    why = form_sweep.load_axes({}, data["sweep"])
    if why:
        ss["_nx_msg"] = ("error", f"{origin} was not loaded: {why}")
    elif _load({k: v for k, v in data.items() if k != "sweep"}, origin):
        form_sweep.load_axes(ss, data["sweep"])
        ss["_nx_msg"] = ("success", f"Loaded {origin} into the form, with its sweep over {', '.join(map(str, data['sweep']))}.")


def _remove_term(uid: int) -> None:
    ss[f"{P}recipe_ids"] = [u for u in ss.get(f"{P}recipe_ids", []) if u != uid]


def _on_run_teacher() -> None:
    """Choosing an earlier run's teacher also sets the teacher architecture to the one that run trained."""
    try:
        arch = ((store.get_run(int(ss[f"{P}t_src_run"])).config or {}).get("teacher") or {}).get("arch")
    except (KeyError, TypeError, ValueError):
        return
    if arch:
        ss[f"{P}t_arch"] = arch


def take_pending() -> None:
    """A config handed over by another page, or the last form (Streamlit drops the widgets of unseen pages)."""
    prefill = ss.pop("prefill_config", None)
    if prefill:
        parent = ss.pop("prefill_parent_id", None)
        if "sweep" in prefill:  # e.g. the Sweeps preset handed over: keep its sweep
            axes, prefill = prefill["sweep"], {k: v for k, v in prefill.items() if k != "sweep"}
            if _load(prefill, "the sweep's config"):
                form_sweep.load_axes(ss, axes)
            return
        if _load(prefill, "the run's config"):
            ss.pop("_nx_msg", None)  # the "Editing a copy of run #N" note says it already
            ss["_nx_parent"] = parent
    elif f"{P}name" not in ss:
        saved, default = ss.get("_nx_state"), presets.default_preset()
        if saved:
            ss.update(saved)
        elif default is not None:
            forms.apply_config(default.config)


def keep_upload() -> str | None:
    """An uploaded checkpoint becomes data-folder/uploads/<sha256>.<ext>, once per file; returns why it was refused."""
    uploaded = ss.get(f"{P}t_upload")
    if ss.get(f"{P}t_src") != "upload" or uploaded is None:
        ss[f"{P}t_upload_path"] = None
        return None
    done = ss.get("_nx_upload_done")
    if not done or done[0] != uploaded.file_id:
        try:
            ss["_nx_upload_done"] = (uploaded.file_id, str(forms.save_upload(uploaded.name, uploaded.getvalue())), None)
        except (ValueError, OSError, TeacherUnavailable) as exc:
            ss["_nx_upload_done"] = (uploaded.file_id, None, str(exc).removeprefix("teacher.source: "))
    ss[f"{P}t_upload_path"] = ss["_nx_upload_done"][1]
    return ss["_nx_upload_done"][2]


# --------------------------------------------------------------------------- (3) the page


def preset_and_import() -> None:
    all_presets = presets.presets()
    labels = list(all_presets)
    if ss.get("nx_preset_choice") not in labels:
        ss["nx_preset_choice"] = labels[0] if labels else None
    top = st.columns([4, 1], vertical_alignment="bottom")
    top[0].selectbox("Start from a preset", labels, key="nx_preset_choice",
                     help="The configs shipped in configs/, named after what they train. Loading one replaces everything in the form.")
    top[1].button("Load preset", on_click=_on_preset, width="stretch", icon=":material/download:")
    if ss.get("nx_preset_choice") in all_presets:
        st.caption(presets.description(all_presets[ss["nx_preset_choice"]], store))
    with st.expander("Import a YAML config (the same file `python -m kd_core run` takes)"):
        st.file_uploader("Upload a .yaml file", type=["yaml", "yml"], key="nx_import_file")
        st.text_area("…or paste YAML", key="nx_import_text", height=140,
                     placeholder="name: my run\nteacher: {arch: cnn_small}\nstudent: {arch: cnn_tiny}\nrecipe:\n  - {loss: kd}")
        st.button("Load into the form", on_click=_on_import, key="nx_import_btn")


def header() -> None:
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


def form(check):
    """Every section of the form; the sweep's check when "Sweep over" is switched on, else None."""
    fw.run_section(check)
    fw.dataset_section(check)
    left, right = st.columns(2, gap="large")
    with left:
        st.subheader("Teacher")
        fw.architecture(check, "teacher")
        trains = fw.teacher_weights(check, store, _on_run_teacher) == "train"
        if not trains:
            st.caption("Training settings below are not used: this teacher is not trained here.")
        fw.model_section(check, "teacher", disabled=not trains)
    with right:
        st.subheader("Student")
        fw.architecture(check, "student")
        fw.model_section(check, "student")
    fw.recipe_section(check, on_add=lambda: forms.new_term_state(ss.get("nx_new_loss") or "kd"), on_remove=_remove_term)
    fw.options_section(check)
    sweep = form_sweep.sweep_section(check, store)
    st.divider()
    st.subheader("Before you launch")
    fw.summary_section(check)
    return sweep


def launch_bar(check, sweep=None) -> None:
    c = st.columns([1, 1, 2], vertical_alignment="center")
    valid = check.valid if sweep is None else (sweep.raw if sweep.plan is not None else None)
    label = "Launch" if sweep is None else f"Launch sweep ({sweep.size} runs)"
    ready = "Queue the run; it starts as soon as a worker slot is free." if sweep is None else "Queue every run of the sweep."
    pressed = c[0].button(label, type="primary", disabled=valid is None, width="stretch", icon=":material/rocket_launch:",
                          help=ready if valid is not None else "Fix the problems listed above first.")
    if sweep is not None:
        text = yaml.safe_dump(sweep.raw if valid is not None else {**check.config, "sweep": sweep.axes}, sort_keys=False, allow_unicode=True)
    else:
        text = valid.to_yaml() if valid is not None else yaml.safe_dump(check.config, sort_keys=False, allow_unicode=True)
    file_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(check.config.get("name")))[:80] or "config"
    c[1].download_button("Export YAML", text if valid is not None else "", file_name=f"{file_name}.yaml", mime="application/x-yaml",
                         width="stretch", key="nx_export", disabled=valid is None, icon=":material/file_download:",
                         help=("The same file `python -m kd_core sweep FILE` accepts." if sweep is not None else
                               "The same file `python -m kd_core run FILE` accepts.") if valid is not None else "Fix the problems first.")
    with st.expander("Show the config as YAML"):
        st.code(text, language="yaml")
    if pressed and valid is not None:
        if sweep is not None:
            form_sweep.launch(sweep, store)
        else:
            launch(valid)


def launch(config) -> None:
    signature = config.to_yaml()
    last = ss.get("_nx_last_launch")
    if last and last[0] == signature and time.time() - last[1] < 3:
        st.stop()  # a double click: the first click already launched it
    try:
        run_id = runner.submit(store, config, parent_id=ss.get("_nx_parent"))
    except ConfigError as exc:  # e.g. the earlier run's teacher was deleted meanwhile
        st.error("Not launched:\n" + "\n".join(f"- `{path}`: {msg}" for path, msg in exc.errors), icon=":material/error:")
        st.stop()
    except Exception as exc:  # noqa: BLE001 - show why instead of a traceback
        st.error(f"Could not launch: {exc}", icon=":material/error:")
        st.stop()
    ss["_nx_last_launch"] = (signature, time.time(), run_id)
    flash(f"Launched run #{run_id} “{config.name}”.")
    st.switch_page("pages/run_detail.py", query_params={"run": str(run_id)})


take_pending()
upload_error = keep_upload()
follow_config_with_name(ss)
form_check = check_form(ss, store, upload_error)
ss["_nx_state"] = {k: v for k, v in ss.items() if isinstance(k, str) and k.startswith(P) and not k.endswith(NOT_SETTABLE)}
header()
preset_and_import()
sweep_check = form(form_check)
launch_bar(form_check, sweep_check)
