"""Whole-page server times with Streamlit's AppTest, for bench/dashboard.py (:func:`page_section`).

What is timed is the script run itself, inside the script thread: ``ScriptRunner._run_script`` is wrapped
(:func:`install_hook`), so a view's time is everything the server does for one rerun of app.py (navigation,
sidebar, the page, widget bookkeeping; a ``st.rerun()`` the page asks for is included, it is one more pass
of that loop), and nothing of AppTest's own work around it (``AppTest.from_file``, the mock runtime, the
component-manifest scan of ~0.3 s per run in Streamlit 1.67, parsing the element tree).  The CPU time of the
script thread (``time.thread_time``) is kept too: it is what a busy second core does not inflate.

Three numbers per page (or tab click, or widget change):

* first: a new process (``python bench/page_times.py --first NAME``, one at a time) views another page (Runs;
  Sweeps before Runs itself), then this one, timed: the first sight of the page in a server that has imported
  app.py and another page, but not this page's own modules, with empty caches;
* cleared: in the main process, which has viewed every page once, after ``st.cache_data.clear()`` and the
  live-bucket cache cleared (imports warm, data cold: e.g. the Curves tab of the 2M-row run on first sight);
* best: the best of 3 more views, caches warm.

Each view is a fresh session, except that a tab click or a widget change is timed as the rerun it causes in
a session that first opened the page (untimed).  The sweep page gets a 240-run sweep for the duration
(:func:`temporary_sweep`); "run 1 as running" patches ``Store.get_run`` in the process (no database write).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 300
BIG_RUN = 1
COMPARE = "1,2,3"
SWEEP_RUNS = range(761, 1001)
DETAIL = ("pages/run_detail.py", {"run": str(BIG_RUN)})
RD_TABS = ["Curves", "Accuracy", "Per class", "Confusion", "Config", "Log", "Downloads"]
_RUNS: list[tuple[float, float]] = []  # (wall s, script-thread CPU s) of every script run, in order


def install_hook() -> None:
    """Record the wall and CPU time of every ``ScriptRunner._run_script`` (idempotent)."""
    from streamlit.runtime.scriptrunner.script_runner import ScriptRunner

    if getattr(ScriptRunner._run_script, "_timed", False):
        return
    original = ScriptRunner._run_script

    def _run_script(self, rerun_data):  # Streamlit's signature
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return original(self, rerun_data)
        finally:
            _RUNS.append((time.perf_counter() - t0, time.thread_time() - c0))

    _run_script._timed = True
    ScriptRunner._run_script = _run_script


def clear_caches() -> None:
    """What a freshly started server has not got: st.cache_data and the live buckets (the Store is kept)."""
    import streamlit as st

    from ui import metrics

    st.cache_data.clear()
    metrics.live_cache().clear()


def _timed_run(at) -> tuple[float, float]:
    n = len(_RUNS)
    at.run()
    if at.exception:
        raise RuntimeError(f"page raised: {[e.value for e in at.exception][:1]}")
    runs = _RUNS[n:]
    return sum(w for w, _ in runs), sum(c for _, c in runs)


def new_session(page: str, query: dict | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page(page)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    return at


def opened(page: str, query: dict | None = None):
    at = new_session(page, query)
    _timed_run(at)
    return at


@contextmanager
def shown_as_running(run_id: int):
    """``Store.get_run(run_id)`` says "running" (no finish time) in this process: the live page, no database write."""
    from dataclasses import replace

    from storage import Store

    original = Store.get_run

    def get_run(self, rid: int):
        run = original(self, rid)
        return replace(run, status="running", finished_at=None) if rid == run_id else run

    Store.get_run = get_run
    try:
        yield
    finally:
        Store.get_run = original


def _tab(label: str):
    def click() -> tuple[float, float]:
        at = opened(*DETAIL)  # the page opens on Curves; the click is what is timed
        at.session_state["rd_tab"] = next(t.label for t in at.tabs if t.label.endswith(label))
        return _timed_run(at)
    return click


def _compare_big() -> tuple[float, float]:
    at = opened("pages/compare.py", {"runs": COMPARE})
    at.selectbox(key="cmp_key").set_value(("student", "loss/total"))
    return _timed_run(at)


def _view(page: str, query: dict | None = None):
    return lambda: _timed_run(new_session(page, query))


# name -> (what is timed, context it runs in)
TARGETS = {
    "New experiment": (_view("pages/new_experiment.py"), nullcontext),
    "Runs (1,000 runs)": (_view("pages/runs.py"), nullcontext),
    f"Analysis of run {BIG_RUN} (no analysis artifacts)": (_view("pages/analysis.py", {"run": str(BIG_RUN)}), nullcontext),
    f"Compare runs {COMPARE} (opens on student val/top1)": (_view("pages/compare.py", {"runs": COMPARE}), nullcontext),
    "Compare, switch to student loss/total (2M rows)": (_compare_big, nullcontext),
    f"Sweeps ({len(SWEEP_RUNS)}-run sweep)": (_view("pages/sweep.py"), nullcontext),
    "Playground (no checkpoints)": (_view("pages/playground.py"), nullcontext),
    f"Run detail of run {BIG_RUN}: Curves tab": (_view(*DETAIL), nullcontext),
    f"Run detail of run {BIG_RUN} as running: Curves": (_view(*DETAIL), lambda: shown_as_running(BIG_RUN)),
    **{f"Run detail: click {t} tab": (_tab(t), nullcontext) for t in RD_TABS[1:]},
}


def first_view(name: str) -> tuple[float, float]:
    """In this (new) process: view another page untimed, then time ``name``."""
    install_hook()
    primer = "pages/sweep.py" if name.startswith("Runs") else "pages/runs.py"
    _timed_run(new_session(primer))
    fn, ctx = TARGETS[name]
    with ctx():
        return fn()


@contextmanager
def temporary_sweep(url: str, run_ids: range):
    """A sweep over ``run_ids`` (lr x temperature x seed, as their configs vary), forgotten again afterwards."""
    from sqlalchemy import update

    from storage import Store
    from storage.schema import runs

    store = Store(url)
    axes = {"student.optimizer.lr": [0.01, 0.05, 0.1], "recipe[1].params.temperature": list(range(1, 9)), "seed": [0, 1, 2]}
    sweep_id = store.create_sweep("bench sweep", {"axes": axes, "base": {}})
    try:
        with store.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id.in_(list(run_ids)), runs.c.sweep_id.is_(None)).values(sweep_id=sweep_id))
        yield sweep_id
    finally:
        store.delete_sweep(sweep_id)  # the runs' sweep_id back to NULL
        store.dispose()


def line(label: str, first: tuple[float, float] | None, cleared: tuple[float, float], best: tuple[float, float]) -> str:
    worst = max(first[0] if first else 0.0, cleared[0], best[0])
    f = f"{first[0]*1000:8.1f}" if first else "       -"
    return (f"{label:<54} first {f} ms   cleared {cleared[0]*1000:8.1f} ms   best {best[0]*1000:8.1f} ms"
            f"   (cpu {(first or (0, 0))[1]*1000:5.0f}/{cleared[1]*1000:5.0f}/{best[1]*1000:5.0f})"
            + ("  > 1 s" if worst > 1.0 else ""))


def page_section(repeat: int = 3, only: list[str] | None = None) -> None:
    """One line per target: first (new process), cleared caches, best of ``repeat`` (see the module docstring)."""
    from storage.db import default_db_url

    os.environ.setdefault("DISTILLERY_SUPERVISE_INTERVAL_S", "3600")  # no reconcile passes beside the timings
    names = [n for n in TARGETS if not only or any(o.lower() in n.lower() for o in only)]
    install_hook()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with temporary_sweep(default_db_url(), SWEEP_RUNS):
        firsts = {}
        for name in names:  # one process at a time
            out = subprocess.run([sys.executable, __file__, "--first", name], env=env, capture_output=True, text=True, check=False,
                                 timeout=TIMEOUT)
            got = [ln for ln in out.stdout.splitlines() if ln.startswith("FIRST ")]
            firsts[name] = tuple(json.loads(got[-1][6:])) if got else None
            if not got:
                print(f"({name}: the first-view process failed: {out.stderr.strip().splitlines()[-1:]})")
        t0 = time.perf_counter()
        for name in names:  # warm-up: imports, compiled scripts, the Store
            fn, ctx = TARGETS[name]
            with ctx():
                fn()
        print(f"(warm-up: every page viewed once in this process, {time.perf_counter() - t0:.1f} s with AppTest)")
        for name in names:
            fn, ctx = TARGETS[name]
            with ctx():
                clear_caches()
                cleared = fn()
                rest = [fn() for _ in range(repeat)]
            best = min(rest)
            print(line(f"page: {name}", firsts[name], cleared, (best[0], min(c for _, c in rest))), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--first":
        print("FIRST " + json.dumps(first_view(sys.argv[2])), flush=True)
    else:
        sys.exit("usage: bench/page_times.py --first NAME (run bench/dashboard.py for the whole page section)")
