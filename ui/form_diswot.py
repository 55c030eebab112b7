"""The New-experiment form's "Which student?" panel: DisWOT's training-free ranking of candidate students.

On a button press, ``kd_core.diswot.rank_students`` scores the chosen candidates against the form's teacher
architecture on the form's dataset (randomly initialised networks, one batch per repeat, nothing trained) and
the table stays until the next ranking; it names the teacher and dataset it was made for, so a table made
before the form changed says so. "Use" sets the student architecture (in a callback: before the selectbox is drawn).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import pandas as pd
import streamlit as st

from ui.form_checks import FormCheck
from ui.form_fields import P

ss = st.session_state
PAPER = "Dong, Li, Wei: DisWOT: Student Architecture Search for Distillation WithOut Training, CVPR 2023"
PAPER_URL = "https://arxiv.org/abs/2303.15678"
DEFAULT_CANDIDATES = ("cnn_tiny", "lenet5", "resnet8", "mlp")
CANDIDATES_KEY = f"{P}diswot_candidates"
RESULT_KEY = "_diswot_result"  # not an nx_ key: a ranking is not part of the form's config
REPEATS, BATCH = 3, 64
VERIFY_TOP = 3  # candidates trained by "Check the ranking"


def ranking_config(check: FormCheck) -> dict[str, Any]:
    """The smallest config that names the form's dataset, teacher architecture and seed (what the ranking reads)."""
    config = check.config
    arch = config["teacher"]["arch"]
    return {"name": "diswot ranking", "seed": config["seed"], "dataset": config["dataset"],
            "teacher": {"arch": arch, "source": "random", "epochs": 0}, "student": {"arch": arch}, "recipe": [{"loss": "kd"}]}


def rank(check: FormCheck, candidates: list[str]) -> dict[str, Any]:
    """Rank ``candidates``; returns the table, what it was ranked for and how long it took (or the reason it could not)."""
    from kd_core.config import ConfigError
    from kd_core.diswot import rank_students

    config = ranking_config(check)
    started = time.perf_counter()
    try:
        ranking = rank_students(config, candidates, batch_size=BATCH, repeats=REPEATS)
    except (ConfigError, ValueError) as exc:
        errors = getattr(exc, "errors", None)
        reason = "; ".join(f"{p}: {m}" for p, m in errors) if errors else str(exc)
        return {"error": reason}
    seconds = time.perf_counter() - started
    table = pd.DataFrame([{"rank": c.rank, "student": c.arch, "DisWOT score": c.score, "parameters": c.params,
                           "relation": c.relation, "semantic": c.semantic} for c in ranking.candidates])
    return {"table": table, "seconds": seconds, "teacher": config["teacher"]["arch"], "dataset": ranking.dataset,
            "repeats": ranking.repeats, "batch": ranking.batch_size}


def use_student(arch: str) -> None:
    ss[f"{P}s_arch"] = arch


def verification_sweep(config: dict[str, Any], ranked: list[str]) -> dict[str, Any]:
    """The form's config as a sweep over the student architecture, one run per ranked candidate, named by the
    predicted order so the Sweeps page can be read against it."""
    return {**copy.deepcopy(config), "name": "DisWOT check: " + " > ".join(ranked), "sweep": {"student.arch": list(ranked)}}


def verify(check: FormCheck, ranked: list[str]) -> None:
    """Queue the verification sweep (the teacher trained once, shared) and open the Sweeps page on it."""
    from kd_core.config import ConfigError
    from kd_core.sweeps import submit_sweep
    from ui.state import flash, get_store

    try:
        sweep_id = submit_sweep(get_store(), verification_sweep(check.config, ranked))
    except ConfigError as exc:
        st.error("Not launched:\n" + "\n".join(f"- `{path}`: {msg}" for path, msg in exc.errors), icon=":material/error:")
        return
    flash(f"Launched sweep #{sweep_id}: a short run of each of {', '.join(ranked)}.")
    st.switch_page("pages/sweep.py", query_params={"sweep": str(sweep_id)})


def diswot_panel(check: FormCheck) -> None:
    from kd_core.models import MODELS

    # a key keeps the panel open across reruns even when elements above it come and go (a "Loaded …" notice)
    with st.expander("Which student? (training-free ranking, DisWOT)", key="mui_diswot_panel", expanded=RESULT_KEY in ss):
        st.caption("Scores each candidate student against the teacher architecture without training anything: both networks "
                   "get random weights and see the same batches; a student whose sample relations and class-gradient "
                   "structure look like the teacher's is predicted to distil better (higher score = better). "
                   f"Paper: [{PAPER}]({PAPER_URL}).")
        if CANDIDATES_KEY not in ss:
            ss[CANDIDATES_KEY] = [a for a in DEFAULT_CANDIDATES if a in MODELS]
        st.multiselect("Candidate students", list(MODELS), key=CANDIDATES_KEY,
                       help="Architectures to rank as students of the teacher above, on the dataset above.")
        candidates = list(ss.get(CANDIDATES_KEY) or [])
        if st.button("Rank the candidates", key="mui_diswot_rank", icon=":material/leaderboard:", disabled=not candidates,
                     help=f"{REPEATS} repeats of one {BATCH}-image batch of the training split, on the CPU."):
            with st.spinner("Ranking…"):
                ss[RESULT_KEY] = rank(check, candidates)
        _result(ss.get(RESULT_KEY), check)


def _result(result: dict[str, Any] | None, check: FormCheck) -> None:
    if not result:
        return
    if "error" in result:
        st.error(f"Could not rank: {result['error']}", icon=":material/error:")
        return
    table = result["table"]
    # the panel sits in the narrow student column: the score's two parts come last (scroll right for them)
    st.dataframe(table, hide_index=True, column_config={
        "rank": st.column_config.NumberColumn(width="small"),
        "DisWOT score": st.column_config.NumberColumn(format="%.4f", help="relation + semantic; higher (closer to 0) = predicted to distil better"),
        "parameters": st.column_config.NumberColumn(format="compact", help="for this dataset's input shape"),
        "relation": st.column_config.NumberColumn(format="%.4f", help="minus the distance between the two networks' sample-similarity matrices"),
        "semantic": st.column_config.NumberColumn(format="%.4f", help="minus the distance between their classifier-gradient class Grams")})
    st.caption(f"Ranked {len(table)} candidates for teacher **{result['teacher']}** on **{result['dataset']}** in "
               f"{result['seconds']:.2f} s (measured; {result['repeats']} repeats of a {result['batch']}-image batch).")
    top = str(table.iloc[0]["student"])
    chosen = ss.get(f"{P}s_arch") == top
    st.button(f"{top} is the student already" if chosen else f"Use {top} as the student", key="mui_diswot_use", on_click=use_student,
              args=(top,), icon=":material/check:", disabled=chosen, help="Sets the student architecture above to the best-ranked candidate.")
    ranked = [str(a) for a in table["student"].head(VERIFY_TOP)]
    epochs = check.config["student"].get("epochs")
    if st.button(f"Check the ranking: train the top {len(ranked)}", key="mui_diswot_verify", icon=":material/fact_check:",
                 disabled=bool(check.errors) or len(ranked) < 2,
                 help=f"One run per candidate with this form's settings ({epochs} student epochs: lower them above for a "
                      "quicker check), as a sweep over the student architecture: the teacher is trained once and shared. "
                      "The Sweeps page then shows whether the measured order matches the predicted one."):
        verify(check, ranked)
