"""How fast the dashboard's data paths are on a big database: 1,000 runs and 10 million metric rows.

    .venv/bin/python bench/dashboard.py [--db /tmp/distillery-bench.db] [--rows 10000000] [--big-rows 2000000]

Fills a SQLite file once (raw ``executemany`` in big transactions, then the pre-aggregated buckets the
Store would have written; a few minutes, progress printed) and reuses it afterwards. Run 1 is the "big" run: ``--big-rows`` steps of the student phase, each step logging
``loss/total`` (so that key alone has ~2M rows) and, every 4th step, loss/ce, loss/kd, lr and images/s;
the other 999 runs share the remaining rows. Then it times:

* the runs table: ``pages.runs.build_runs_frame`` if the runs page exposes one, else ``Store.list_runs``
  plus a DataFrame build;
* the run-detail curve builders for the big run (every step key of every phase, bucketed in SQL into
  ≤2,000 buckets, plus the Plotly figures) as for a RUNNING run (``ui.metrics.live_bucketed_series``):
  cold (empty live cache: the first render in a fresh dashboard process), then a poll after the "training"
  appended ``--append`` more rows (only the tail from the first incomplete bucket is read; the result is
  checked against ``Store.metric_series_bucketed`` from scratch); and as a finished run (``st.cache_data``);
* the per-epoch accuracy table of the big run;
* every page's whole server-side script run (bench/page_times.py, whose docstring says how): New experiment,
  Runs, Run detail of the big run (Curves, also as if running, and a click on each other tab), Analysis of the
  big run, Compare of runs 1-3 (and switching it to the 2M-row key), Sweeps (a 240-run sweep made for the
  duration), Playground; driven through app.py by Streamlit's AppTest but timed inside the script thread, so
  AppTest's own overhead is not counted.  "first" is the view in a new process that has only viewed another
  page, "cleared" after clearing st.cache_data and the live cache, "best" the best of 3 warm views.
  ``--pages NAME ...`` times only the pages whose names contain one of the words; ``--no-pages`` none.

``--server-cpu [--hold 60]`` measures the dashboard server's CPU instead, with Playwright holding each page
(and three tabs together) open on a live run, and a watched vs unwatched demo run: see bench/server_cpu.py.

The appended rows (steps past the big run's last step) are deleted again at the end, so the file is reused
unchanged.  Prints one line per measurement: the first call and the best of 3 (cold timings clear the live
cache before each call; poll timings append ``--append`` rows before each call).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

DEFAULT_DB = "/tmp/distillery-bench.db"
N_RUNS = 1000
STEP_KEYS_SMALL = ["loss/total", "loss/ce", "loss/kd", "lr", "images_per_s"]


def _config(i: int) -> dict:
    return {
        "name": f"bench run {i}",
        "seed": i % 3,
        "device": "cpu",
        "dataset": {"name": "mnist5k", "val_fraction": 0.1},
        "teacher": {"arch": "cnn_small", "source": "train", "epochs": 4, "batch_size": 64},
        "student": {"arch": "cnn_tiny", "epochs": 6, "batch_size": 64,
                    "optimizer": {"name": "sgd", "lr": [0.01, 0.05, 0.1][i % 3]}},
        "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 1 + i % 8}}],
        "baseline": True,
    }


def fill(path: str, total_rows: int, big_rows: int) -> None:
    """Create the schema with the Store (migrations), then bulk-insert runs and metrics with raw sqlite3."""
    from storage import Store

    Store(f"sqlite:///{path}").dispose()
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    now = time.time() - 86400
    statuses = ["completed"] * 8 + ["failed", "cancelled"]
    with con:
        con.executemany(
            "INSERT INTO runs (id, name, status, config, created_at, started_at, finished_at, summary, progress, tags, hidden)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,0)",
            [
                (
                    i, f"bench run {i}", statuses[i % 10] if i > 1 else "completed", json.dumps(_config(i)),
                    now + i, now + i, now + i + 600,
                    json.dumps({"teacher_acc": 98.0, "student_acc": 95 + (i % 7) * 0.3, "student_last_acc": 95.0,
                                "baseline_acc": 95.5, "kd_gain": (i % 7) * 0.3 - 0.5, "duration_s": 600.0}),
                    "{}", "[]",
                )
                for i in range(1, N_RUNS + 1)
            ],
        )
    sql = "INSERT INTO metrics (run_id, phase, step, epoch, key, value, time) VALUES (?,?,?,?,?,?,?)"
    written = 0
    t0 = time.time()

    def flush(rows: list) -> None:
        nonlocal written
        with con:
            con.executemany(sql, rows)
        written += len(rows)
        rate = written / max(time.time() - t0, 1e-9)
        print(f"  {written:>11,} / {total_rows:,} rows  ({rate:,.0f} rows/s)", flush=True)

    # the big run: loss/total at every step, the other step keys every 4th step, accuracy every epoch
    steps_per_epoch = max(big_rows // 20, 1)
    rows: list = []
    for step in range(1, big_rows + 1):
        epoch = (step - 1) // steps_per_epoch
        t = now + step * 0.01
        x = step / big_rows
        rows.append((1, "student", step, epoch, "loss/total", 2.5 * (1 - x) ** 2 + 0.1 + 0.2 * ((step * 7919) % 97) / 97, t))
        if step % 4 == 0:
            rows.append((1, "student", step, epoch, "loss/ce", 2.0 * (1 - x) + 0.1, t))
            rows.append((1, "student", step, epoch, "loss/kd", 1.0 * (1 - x) + 0.05, t))
            rows.append((1, "student", step, epoch, "lr", 0.05 * (1 - x), t))
            rows.append((1, "student", step, epoch, "images_per_s", 5000 + (step % 13) * 10, t))
        if step % steps_per_epoch == 0:
            for phase, acc in (("teacher", 98.0), ("student", 90 + 5 * x), ("baseline", 89 + 5 * x)):
                rows.append((1, phase, step, epoch, "val/top1", acc, t))
                rows.append((1, phase, step, epoch, "val/loss", 0.3, t))
        if len(rows) >= 500_000:
            flush(rows)
            rows = []
    flush(rows) if rows else None
    # the other runs share what is left: 3 phases x (5 step keys per step + 2 epoch keys per epoch)
    left = max(total_rows - written, 0)
    per_run = left // (N_RUNS - 1)
    steps = max(per_run // (3 * 5), 1)
    rows = []
    for run_id in range(2, N_RUNS + 1):
        for phase in ("teacher", "student", "baseline"):
            for step in range(1, steps + 1):
                t = now + run_id + step * 0.1
                epoch = step * 6 // (steps + 1)
                for k in STEP_KEYS_SMALL:
                    rows.append((run_id, phase, step, epoch, k, 1.0 / step, t))
        if len(rows) >= 500_000:
            flush(rows)
            rows = []
    if rows:
        flush(rows)
    con.execute("ANALYZE")
    con.close()
    # the rows bypassed the Store: aggregate them into the buckets the Store writes as rows arrive
    from storage import rollups

    started = time.time()
    store = Store(f"sqlite:///{path}")
    rollups.backfill(store.engine)
    store.dispose()
    print(f"  pre-aggregated buckets built in {time.time() - started:.1f} s", flush=True)


def _runs_page_builder():
    """``build_frame(runs)`` of pages/runs.py without rendering the page (its module-level UI code is skipped)."""
    import ast

    path = Path(__file__).resolve().parents[1] / "pages" / "runs.py"
    if not path.exists():
        return None
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
            or (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets))]
    for n in keep:
        if isinstance(n, ast.FunctionDef):
            n.decorator_list = []  # fragments/caches refer to page state; the plain function is what we time
    ns: dict = {"__file__": str(path), "__name__": "runs_page_bench"}
    try:
        exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 - our own page
    except Exception as exc:  # noqa: BLE001
        print(f"(could not load pages/runs.py build_frame: {type(exc).__name__}: {exc})")
        return None
    return ns.get("build_frame")


def timed(label: str, fn, repeat: int = 3) -> object:
    first = None
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = out
    print(f"{label:<62} first {times[0]*1000:8.1f} ms   best {min(times)*1000:8.1f} ms", flush=True)
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=DEFAULT_DB)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--big-rows", type=int, default=2_000_000)
    ap.add_argument("--append", type=int, default=1_000, help="rows appended to the live run before each poll")
    ap.add_argument("--no-pages", action="store_true", help="skip the whole-page timings (AppTest)")
    ap.add_argument("--pages", nargs="*", default=None, help="time only the pages whose names contain one of these")
    ap.add_argument("--server-cpu", action="store_true",
                    help="instead: the server's CPU with real browser tabs held open (bench/server_cpu.py, ~18 min)")
    ap.add_argument("--hold", type=float, default=60.0, help="with --server-cpu: seconds each page is held open")
    args = ap.parse_args()
    if args.server_cpu:
        from bench import server_cpu

        server_cpu.measure(server_cpu.DEFAULT_CONFIG, args.hold)
        return

    if Path(args.db).exists():
        print(f"reusing {args.db} (delete it to rebuild)")
    else:
        print(f"filling {args.db}: {N_RUNS} runs, {args.rows:,} metric rows")
        t0 = time.time()
        fill(args.db, args.rows, args.big_rows)
        print(f"filled in {time.time() - t0:.0f} s")
    os.environ["DISTILLERY_DB_URL"] = f"sqlite:///{args.db}"

    import numpy as np
    import pandas as pd

    from storage import Store
    from ui import charts, metrics

    store = Store(f"sqlite:///{args.db}")
    print(f"database: {store.count_metrics(1):,} rows in run 1; file {Path(args.db).stat().st_size / 1e9:.2f} GB")

    build = _runs_page_builder()
    if build is not None:
        df = timed("runs table: Store.list_runs() + pages/runs.py build_frame (1,000 runs)", lambda: build(store.list_runs()))
    else:
        print("(pages/runs.py exposes no build_frame; timing Store.list_runs + a plain DataFrame)")

        def runs_frame() -> pd.DataFrame:
            runs = store.list_runs()
            return pd.DataFrame(
                [{"id": r.id, "name": r.name, "status": r.status, "created": r.created_at,
                  "student_acc": r.summary.get("student_acc"), "kd_gain": r.summary.get("kd_gain")} for r in runs]
            )

        df = timed("runs table: Store.list_runs() + DataFrame (1,000 runs)", runs_frame)
    print(f"  -> {len(df)} rows")

    run = store.get_run(1)
    live = run.__class__(**{**run.__dict__, "status": "running", "finished_at": None})  # as if still running
    cache = metrics.live_cache()
    last_step = store.last_metric_step(1, "student")
    state = {"step": last_step, "appended": 0}

    def append_rows() -> None:
        """What the training loop logs: loss/total every step, 4 more keys every 4th step; --append rows."""
        rows, step, now = [], state["step"], time.time()
        while len(rows) < args.append:
            step += 1
            rows.append({"phase": "student", "step": step, "epoch": 99, "key": "loss/total", "value": 0.1, "time": now})
            if step % 4 == 0:
                for k in ("loss/ce", "loss/kd", "lr", "images_per_s"):
                    rows.append({"phase": "student", "step": step, "epoch": 99, "key": k, "value": 0.1, "time": now})
        rows = rows[: args.append]
        store.append_metrics(1, rows)
        state["step"] = step
        state["appended"] += len(rows)

    def polls(label: str, fn) -> object:
        """best of 3 polls, each after appending --append rows (the append itself is not timed)."""
        times, first = [], None
        for i in range(3):
            append_rows()
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            first = out if i == 0 else first
        print(f"{label:<62} first {times[0]*1000:8.1f} ms   best {min(times)*1000:8.1f} ms", flush=True)
        return out

    def cold(fn):
        def run_cold():
            cache.clear()
            return fn()
        return run_cold

    def one_key() -> object:
        df = metrics.bucketed_series(store, live, "loss/total", "student")
        return charts.curves_figure([charts.Curve(name="student", color=charts.role_color("student"), frame=df)], x="step",
                                    title="loss/total", total_points=int(df["count"].sum()))

    def all_series() -> int:
        """The data part of the run-detail curves: every step key of every phase, no figures."""
        n = 0
        for phase, key in metrics.metric_keys(store, live):
            if not metrics.is_epoch_key(key):
                n += len(metrics.bucketed_series(store, live, key, phase))
        return n

    try:
        fig = timed("one key, 2M rows: live, cold (empty cache) + figure", cold(one_key))
        print(f"  -> subtitle: {metrics.points_caption(fig)}")
        timed("one key: live poll, nothing new + figure", one_key)
        fig = polls(f"one key: live poll after +{args.append:,} rows + figure", one_key)
        print(f"  -> subtitle: {metrics.points_caption(fig)}")
        timed("run detail curves: every step key, all phases (live, cold)", cold(lambda: metrics.curve_figures(store, live)))
        polls(f"run detail curves: live poll after +{args.append:,} rows", lambda: metrics.curve_figures(store, live))
        polls(f"  of which data (bucketed series, no figures) after +{args.append:,}", all_series)
        got = metrics.bucketed_series(store, live, "loss/total", "student")
        ref = store.metric_series_bucketed(1, "loss/total", "student", metrics.MAX_POINTS)
        same = (len(got) == len(ref) and (got["step"].to_numpy() == ref["step"].to_numpy()).all()
                and (got["count"].to_numpy() == ref["count"].to_numpy()).all()
                and bool(np.allclose(got["value"], ref["value"])) and bool(np.allclose(got["max"], ref["max"])))
        print(f"  -> live == from scratch after {state['appended']:,} appended rows: {same}; "
              f"{int(got['count'].sum()):,} points in {len(got):,} buckets")
        timed("run detail curves: every step key, all phases (finished, cached)*", lambda: metrics.curve_figures(store, run))
        timed("per-epoch table (accuracy, agreement, KL)", lambda: metrics.epoch_table(store, live))
    finally:
        removed = store.delete_metrics_after(1, "student", last_step)
        print(f"(removed the {removed:,} appended rows again)")
    print("* outside a Streamlit session st.cache_data falls back to a process-local memo with the same key")
    store.dispose()
    if not args.no_pages:
        import tempfile

        from bench.page_times import page_section

        home = tempfile.mkdtemp(prefix="distillery-bench-home-")  # no artifacts: the pages say what is missing
        os.environ.setdefault("DISTILLERY_HOME", home)
        os.environ.setdefault("DISTILLERY_ARTIFACTS", str(Path(home) / "artifacts"))
        page_section(only=args.pages)


if __name__ == "__main__":
    main()
