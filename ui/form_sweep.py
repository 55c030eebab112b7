"""The New-experiment form's "Sweep over" section: launch a grid of runs (``kd_core.sweeps``) instead of one.

The user picks fields (a recipe term's temperature or weight, the student's architecture or learning rate, the
seed, …) and types a list of values for each. Values are kept as typed: a value that is not of the field's kind
is refused with the field named, and every run of the grid is validated (``plan_sweep``) before Launch is enabled.
The estimated time comes from this database's finished runs of the same dataset and architectures, or is
"no estimate yet"; it is never a guessed constant.

State keys start with ``nx_sw_`` so the form keeps them across page switches like its other fields.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from kd_core.config import PRETRAINED_SOURCES
from kd_core.sweeps import SEED_AXIS, parse_path
from ui.badges import duration_text
from ui.form_fields import BOOL, FLOAT, INT, TEXT, P, loss_params, yaml_line

ON, ROWS = f"{P}sw_on", f"{P}sw_rows"
ADD_KEY = f"{P}sw_add_btn"  # a button: pages/new_experiment.py must not restore it (NOT_SETTABLE)
KINDS = {SEED_AXIS: INT, "student.arch": TEXT, "teacher.arch": TEXT, "student.epochs": INT, "teacher.epochs": INT}
row_ids = itertools.count(1)


def field_choices(config: Mapping[str, Any]) -> dict[str, str]:
    """Swept field path -> label, for the recipe the form holds now."""
    choices: dict[str, str] = {}
    for i, term in enumerate(config.get("recipe") or []):
        loss = term.get("loss")
        if "temperature" in (term.get("params") or {}) or "temperature" in loss_params(loss):
            choices[f"recipe[{i}].params.temperature"] = f"temperature of term {i + 1} ({loss})"
    for i, term in enumerate(config.get("recipe") or []):
        choices[f"recipe[{i}].weight"] = f"weight of term {i + 1} ({term.get('loss')})"
    choices.update({"student.arch": "student architecture", SEED_AXIS: "seed", "student.optimizer.lr": "learning rate of the student",
                    "student.epochs": "student epochs"})
    return choices


def kind_of(path: str, config: Mapping[str, Any]) -> str:
    """What a value of ``path`` must be: the known fields by name, others by the kind of the value the form holds."""
    if path in KINDS:
        return KINDS[path]
    node: Any = config
    for part in parse_path(path):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return FLOAT if path.endswith(("temperature", "weight", "lr")) else TEXT
    return BOOL if isinstance(node, bool) else INT if isinstance(node, int) else FLOAT if isinstance(node, float) else TEXT


def parse_values(text: str, kind: str) -> tuple[list[Any], str]:
    """Comma-separated values as the field's kind, or why not (each value is kept as typed, never rounded)."""
    body = str(text or "").strip().removeprefix("[").removesuffix("]").strip()
    if not body:
        return [], "type the values separated by commas, e.g. 1, 2, 4"
    values = []
    for item in (part.strip() for part in body.split(",")):
        if not item:
            return [], "a value is missing between two commas"
        value, why = _parse_one(item, kind)
        if why:
            return [], why
        values.append(value)
    return values, ""


def _parse_one(item: str, kind: str) -> tuple[Any, str]:
    if kind == TEXT:
        return item.strip("'\""), ""
    if kind == BOOL:
        return (item.lower() == "true", "") if item.lower() in ("true", "false") else (None, f"{item!r} is not true or false")
    try:
        return int(item), ""
    except ValueError:
        pass
    if kind == INT:
        return None, f"{item!r} is not a whole number"
    try:
        number = float(item)
    except ValueError:
        return None, f"{item!r} is not a number"
    return (number, "") if math.isfinite(number) else (None, f"{item!r} is not a finite number")


# --------------------------------------------------------------------------- the check


@dataclass
class SweepCheck:
    axes: dict[str, list[Any]] = field(default_factory=dict)  # swept path -> values, as typed
    errors: list[str] = field(default_factory=list)  # each names its field
    raw: dict[str, Any] | None = None  # what submit_sweep takes, when everything is valid
    plan: Any = None  # kd_core.sweeps.SweepPlan

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.axes.values()) if self.axes else 0


def check_sweep(s: Mapping[str, Any], form_check: Any, store: Any) -> SweepCheck:
    """The swept values the widgets hold, every problem with them, and the validated plan when there is none."""
    from kd_core.config import ConfigError
    from kd_core.sweeps import plan_sweep
    from kd_core.teachers import run_teachers_in

    out = SweepCheck()
    labels = field_choices(form_check.config)
    for uid in s.get(ROWS, []):
        path = s.get(f"{P}sw_{uid}_path")
        name = f"Sweep over · {labels.get(path, path)} (`{path}`)"
        values, why = parse_values(s.get(f"{P}sw_{uid}_values", ""), kind_of(path, form_check.config))
        if path in out.axes:
            out.errors.append(f"{name}: picked twice; put all its values in one row")
        elif why:
            out.errors.append(f"{name}: {why}")
        else:
            out.axes[path] = values
    if not out.axes and not out.errors:
        out.errors.append("Sweep over: pick a field and type its values")
    if out.errors or form_check.valid is None:
        return out
    raw = {**form_check.valid.model_dump(mode="json"), "sweep": out.axes}
    try:
        out.plan, out.raw = plan_sweep(raw, run_teachers=run_teachers_in(store)), raw
    except ConfigError as exc:
        out.errors += [f"`{path}`: {message}" for path, message in exc.errors]
    return out


def estimate(plan: Any, store: Any) -> str:
    """Total training time of the grid from the last finished run here of each cell's kind, or "no estimate yet"."""
    measured = [r for r in store.list_runs(status=["completed"], include_hidden=True, limit=500)
                if isinstance((r.summary or {}).get("trained_s"), (int, float))]
    total, used, rough = 0.0, set(), False
    for cell in plan.cells:
        c = cell.config
        same = [r for r in measured if _archs(r.config) == (c.dataset.name, c.teacher.arch, c.student.arch)]
        if not same:
            return (f"no estimate yet: no run of {c.dataset.name} with {c.teacher.arch} → {c.student.arch} has finished here "
                    "(times are measured, never guessed)")
        kind = (cell.trains_teacher and c.teacher.source in ("train", *PRETRAINED_SOURCES), bool(c.baseline))
        match = next((r for r in same if _kind(r.config) == kind), None)
        rough |= match is None
        run = match or same[0]
        total += run.summary["trained_s"]
        used.add(run.id)
    note = "; some runs timed from a run that trained other phases, so rough" if rough else ""
    return (f"≈ {duration_text(total)} of training in total, one run after another (from the last finished runs here with "
            f"the same dataset and architectures: {', '.join(f'#{i}' for i in sorted(used))}{note})")


def _archs(config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return ((config.get("dataset") or {}).get("name"), (config.get("teacher") or {}).get("arch"), (config.get("student") or {}).get("arch"))


def _kind(config: Mapping[str, Any]) -> tuple[bool, bool]:
    """(trains its teacher, trains a baseline): what a run spends its time on besides the student."""
    return (config.get("teacher") or {}).get("source", "train") in ("train", *PRETRAINED_SOURCES), bool(config.get("baseline"))


# --------------------------------------------------------------------------- loading and drawing


def clear(s: MutableMapping[str, Any]) -> None:
    """Switch the sweep off and forget its rows (a preset or a run's config replaces the whole form)."""
    for key in [k for k in s if isinstance(k, str) and k.startswith(f"{P}sw_") and k != ADD_KEY]:
        del s[key]


def load_axes(s: MutableMapping[str, Any], axes: Any) -> str:
    """Put an imported config's ``sweep:`` section into the rows; why not, if it is not a mapping of lists."""
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, list) for v in axes.values()):
        return "sweep: give field paths with lists of values, e.g. {recipe[1].params.temperature: [1, 2, 4]}"
    clear(s)
    s[ON], s[ROWS] = True, []
    for path, values in axes.items():
        _add_row(s, str(path), ", ".join(yaml_line(v) for v in values))
    return ""


def _add_row(s: MutableMapping[str, Any], path: str, text: str = "") -> None:
    uid = next(row_ids)
    s[f"{P}sw_{uid}_path"], s[f"{P}sw_{uid}_values"] = path, text
    s[ROWS] = [*s.get(ROWS, []), uid]


def _add_unused_row(choices: list[str]) -> None:
    taken = {st.session_state.get(f"{P}sw_{uid}_path") for uid in st.session_state.get(ROWS, [])}
    _add_row(st.session_state, next((c for c in [SEED_AXIS, *choices] if c not in taken), choices[0]))


def _remove_row(uid: int) -> None:
    st.session_state[ROWS] = [u for u in st.session_state.get(ROWS, []) if u != uid]


def sweep_section(form_check: Any, store: Any) -> SweepCheck | None:
    """Draw the section; the sweep's check when the sweep is switched on, else None (Launch starts one run)."""
    ss = st.session_state
    st.subheader("Sweep over")
    # no "launch" in the label: its help icon is named after it, and two controls named "Launch…" confuse screen
    # readers and the browser tests alike
    if not st.toggle("Sweep: one run per combination of the values below", key=ON,
                     help="The teacher is trained once and shared; the CE-only baseline is trained once per seed "
                          "(and student). The Sweeps page then shows mean ± spread over seeds per value."):
        st.caption("Off: Launch starts the one run above.")
        return None
    choices = field_choices(form_check.config)
    if not ss.get(ROWS):
        _add_row(ss, next(iter(choices)))
    for uid in ss[ROWS]:
        path_key = f"{P}sw_{uid}_path"
        options = list(choices) + ([ss[path_key]] if ss.get(path_key) not in choices else [])
        c = st.columns([3, 4, 1], vertical_alignment="bottom")
        c[0].selectbox("Field", options, key=path_key, format_func=lambda p: choices.get(p, p))
        c[1].text_input("Values", key=f"{P}sw_{uid}_values", placeholder="e.g. 1, 2, 4, 8",
                        help="Separated by commas; each value becomes its own run (times the other fields' values).")
        c[2].button("Remove", key=f"{P}sw_{uid}_remove", on_click=_remove_row, args=(uid,), width="stretch")
    st.button("Add a field", key=ADD_KEY, icon=":material/add:", on_click=_add_unused_row, args=(list(choices),))
    sweep = check_sweep(ss, form_check, store)
    _summary(sweep, store)
    return sweep


def _summary(sweep: SweepCheck, store: Any) -> None:
    if sweep.axes:
        sizes = " × ".join(str(len(v)) for v in sweep.axes.values())
        st.markdown(f"**Grid:** {sizes} = **{sweep.size} runs**")
    if sweep.errors:
        st.error("**The sweep cannot launch yet:**\n" + "\n".join(f"- {e}" for e in sweep.errors), icon=":material/error:")
    if sweep.plan is not None:
        plan = sweep.plan
        st.caption(f"Trains the teacher {plan.teacher_trainings}× and the CE-only baseline {plan.baseline_trainings}×, "
                   f"each once and shared. Estimated time: {estimate(plan, store)}.")


def launch(sweep: SweepCheck, store: Any) -> None:
    """Queue every run of the sweep and open the Sweeps page on it."""
    from kd_core.config import ConfigError
    from kd_core.sweeps import submit_sweep
    from ui.state import flash

    ss = st.session_state
    last = ss.get("_nx_last_sweep")
    if last and last[0] == repr(sweep.raw) and time.time() - last[1] < 3:
        st.stop()  # a double click: the first click already launched it
    try:
        sweep_id = submit_sweep(store, sweep.raw)
    except ConfigError as exc:  # e.g. a teacher run deleted meanwhile
        st.error("Not launched:\n" + "\n".join(f"- `{path}`: {msg}" for path, msg in exc.errors), icon=":material/error:")
        st.stop()
    ss["_nx_last_sweep"] = (repr(sweep.raw), time.time())
    flash(f"Launched sweep #{sweep_id}: {sweep.size} runs.")
    st.switch_page("pages/sweep.py", query_params={"sweep": str(sweep_id)})
