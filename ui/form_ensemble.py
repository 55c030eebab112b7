"""The New-experiment form's further teachers (an ensemble, ``teachers:``), drawn under the training method.

State and checks are in :mod:`ui.form_teachers`; this module only draws the widgets.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from ui import form_teachers as ft
from ui import forms
from ui.form_checks import FormCheck
from ui.forms import options_with, show_problems

ss = st.session_state


def _on_run_chosen(uid: int) -> None:
    """Reusing an earlier run's teacher also sets this teacher's architecture to the one that run trained."""
    from ui.state import get_store

    try:
        arch = ((get_store().get_run(int(ss[ft.key(uid, "src_run")])).config or {}).get("teacher") or {}).get("arch")
    except (KeyError, TypeError, ValueError):
        return
    if arch:
        ss[ft.key(uid, "arch")] = arch


def ensemble_section(check: FormCheck, method: str, arch_select) -> None:
    """The list of further teachers with an Add button; ``arch_select(key, label)`` draws an architecture selectbox."""
    ids = list(ss.get(ft.IDS) or [])
    st.markdown(f"**Further teachers** ({method} distils the average of all teachers' predictions: the teacher above, then these)")
    if not ids:
        st.caption("None yet: with the teacher above alone, the ensemble is that one teacher.")
    for i, uid in enumerate(ids):
        with st.container(border=True):
            _teacher(check, i, uid, arch_select)
    show_problems(check, "teachers")
    st.button("Add a teacher", key="mui_add_teacher", icon=":material/add:", on_click=ft.new_teacher_state, args=(ss,),
              help="Adds a teacher with the first teacher's architecture and training settings; change them as you like.")


def _teacher(check: FormCheck, i: int, uid: int, arch_select) -> None:
    where = f"teachers[{i}]"
    c = st.columns([3, 3, 1], vertical_alignment="bottom")
    with c[0]:
        arch_select(ft.key(uid, "arch"), f"Teacher {i + 2}: architecture")
    kind_key = ft.key(uid, "src")
    c[1].selectbox("Weights", options_with(list(ft.KINDS), ss.get(kind_key)), key=kind_key,
                   format_func=lambda k: ft.KINDS.get(k, f"{k} (unknown)"))
    c[2].button("Remove", key=ft.key(uid, "remove"), icon=":material/delete:", on_click=ft.remove_teacher, args=(ss, uid),
                help="Remove this teacher from the ensemble")
    kind = ss.get(kind_key)
    if kind == "run":
        _earlier_run(uid)
    elif kind == "file":
        st.text_input("Checkpoint path", key=ft.key(uid, "src_file"), placeholder=f"{forms.data_home_text()}/teachers/t2.safetensors",
                      help="Path of a .safetensors or .pt state dict on this machine, inside the data folder or DISTILLERY_ALLOWED_ROOTS.")
    st.text_input("Training settings (YAML)" + ("" if kind == "train" else ": not used, this teacher is not trained here"),
                  key=ft.key(uid, "train"), disabled=kind != "train",
                  help="epochs, batch_size, optimizer and scheduler of this teacher, as a YAML mapping (as under teacher: in a config).")
    show_problems(check, where, prefix=True)


def _earlier_run(uid: int) -> None:
    from ui.state import get_store

    candidates = {r.id: r for r in forms.trained_teacher_runs(get_store())}
    key = ft.key(uid, "src_run")
    chosen = ss.get(key)
    ids = list(candidates) + ([chosen] if chosen is not None and chosen not in candidates else [])
    if not ids:
        st.info("No completed run has a trained teacher yet.")

    def label(rid: Any) -> str:
        r = candidates.get(rid)
        if r is None:
            return f"run {rid} (not a completed run with a trained teacher)"
        acc = (r.summary or {}).get("teacher_acc")
        acc_text = f", teacher {acc:.1f}%" if isinstance(acc, (int, float)) else ""
        return f"#{r.id} {r.name} — {(r.config.get('teacher') or {}).get('arch')}{acc_text}"

    ss.setdefault(key, None)
    st.selectbox("Earlier run", ids, key=key, format_func=label, placeholder="Choose a run", on_change=_on_run_chosen, args=(uid,),
                 help="Completed runs that trained their teacher; its weights are reused.")
