"""How much CPU the dashboard server takes from training, with real browser tabs open (Playwright + Chromium).

    .venv/bin/python bench/server_cpu.py [--config configs/mnist5k_kd.yaml] [--hold 60] [--pairs 3]

One dashboard server (``streamlit run app.py``, its own SQLite database and data folder under a temporary
directory; the server's supervisor dispatches queued runs to a local worker, as in normal use). First one tab
opens the Runs page and closes, as a user's does before submitting (the server's first render imports the
pages' modules). Measured in one process tree and printed as a table:

1. *idle*: the server with no tab open, ``--hold`` seconds;
2. *unwatched / watched run*, ``--pairs`` times in turn: the demo config submitted (``python -m kd_core
   submit``) with no tab open, then again with three tabs opened on it right after submission (Run detail, Runs,
   Compare with the first run); wall time from submission to the run's end, server and Chromium CPU meanwhile
   (for the watched run, from the tabs' first draw on), and the watched / unwatched ratio of each pair;
3. *page load*: Chromium's CPU seconds to open and draw each of the three pages on a finished run, next to a
   one-line Streamlit app served the same way (what any Streamlit page costs the browser here), median of 3;
4. *live run*: a run of the same config with a 1000-epoch teacher (cancelled at the end), held ``--hold``
   seconds with each page alone (Run detail, Runs, Compare, Analysis, Sweeps, New experiment), then twice in
   turn with no tab and with Run detail + Runs + Compare together; each window also gives the run's training
   steps per second (the steady cost of watching, without the pages' first load);
5. *finished run*: Run detail of the finished run, then the three tabs, held open ``--hold`` seconds each.

Server CPU is the server process's own user+system time (``/proc/<pid>/stat``; workers are separate
processes and are not counted) divided by the wall time of the window, in % of one core. Chromium's CPU (all
its processes) is printed beside it: in real use it runs on the user's machine, but here it shares the two
cores with the training, so it is part of why a watched run is slower. Linux only. About 18 minutes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@contextmanager
def dashboard(home: Path) -> Iterator[tuple[str, int, dict[str, str]]]:
    env = {**os.environ, "DISTILLERY_DB_URL": f"sqlite:///{home / 'distillery.db'}", "DISTILLERY_HOME": str(home),
           "DISTILLERY_ARTIFACTS": str(home / "artifacts"), "DISTILLERY_SLOTS": "1"}
    with streamlit_server(ROOT / "app.py", env) as (url, pid):
        yield url, pid, env


@contextmanager
def streamlit_server(script: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``streamlit run script`` on a port of its own: (url, server pid)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", script.name, "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=script.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        raise SystemExit(f"streamlit run {script} did not answer /_stcore/health within 60 s")
    try:
        yield url, server.pid
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "kd_core", *args], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def wait_finished(env: dict[str, str], run_id: int) -> str:
    from storage import Store

    store = Store(env["DISTILLERY_DB_URL"])
    try:
        while (status := store.get_run(run_id).status) not in ("completed", "failed", "cancelled"):
            time.sleep(1.0)
        return status
    finally:
        store.dispose()


def browser_cpu_seconds() -> float:
    """User + system CPU seconds of every Chromium process alive now (those of earlier tabs that have exited are
    not counted: compare it over windows in which no tab closes)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().startswith(("chromium", "chrome", "headless")):
                total += cpu_seconds(int(proc.name))
        except OSError:  # exited meanwhile
            continue
    return total


def window(pid: int, fn) -> tuple[float, float, float, object]:
    """(wall seconds, server CPU % of one core, browser CPU % of one core, fn's result) over fn()."""
    c0, b0, t0 = cpu_seconds(pid), browser_cpu_seconds(), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    return wall, 100 * (cpu_seconds(pid) - c0) / wall, 100 * (browser_cpu_seconds() - b0) / wall, result


def open_tabs(context, url: str, paths: list[str]) -> list:
    pages = []
    for path in paths:
        page = context.new_page()
        page.goto(f"{url}/{path}")
        pages.append(page)
    for page in pages:  # each tab's first render has ended (the fragments poll from here on)
        page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(timeout=120_000)
    return pages


def hold(pid: int, seconds: float, label: str, rows: list[tuple[str, ...]], steps: Callable[[], int] | None = None) -> float:
    """Hold for ``seconds``; with ``steps`` (a live run's step counter), return its training steps per second."""
    first = steps() if steps else 0
    wall, cpu, browser, _ = window(pid, lambda: time.sleep(seconds))
    rate = (steps() - first) / wall if steps else float("nan")
    rows.append((label, f"{wall:.0f}", f"{cpu:.2f}", f"{browser:.1f}", "-" if steps is None else f"{rate:.1f}"))
    return rate


def step_counter(env: dict[str, str], run_id: int) -> Callable[[], int]:
    """The training step a live run's worker last reported (its progress row), read from the database."""
    from storage import Store

    def steps() -> int:
        store = Store(env["DISTILLERY_DB_URL"])
        try:
            return int((store.get_run(run_id).progress or {}).get("step", 0))
        finally:
            store.dispose()

    return steps


def long_config(path: str, out: Path) -> Path:
    """The config with a teacher that trains far longer than the bench holds its pages (cancelled at the end)."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    cfg["name"] = "server-cpu bench: live run"
    cfg["teacher"]["epochs"] = 1000
    out.write_text(yaml.safe_dump(cfg))
    return out


def watched_pair(context, url: str, pid: int, env: dict[str, str], config: str, first: int | None,
                 rows: list) -> tuple[int, int, float]:
    """The demo run unwatched, then again with Run detail, Runs and Compare (with the ``first`` run, else the
    unwatched one) opened on it right after submission: the two runs' ids and the watched / unwatched wall time."""
    unwatched = int(cli(env, "submit", config))
    wall_u, cpu, browser, status = window(pid, lambda: wait_finished(env, unwatched))
    rows.append((f"unwatched run {unwatched} ({status})", f"{wall_u:.0f}", f"{cpu:.2f}", f"{browser:.1f}", "-"))
    time.sleep(3)
    watched = int(cli(env, "submit", config))
    t0 = time.perf_counter()
    tabs = open_tabs(context, url, [f"run_detail?run={watched}", "runs", f"compare?runs={first or unwatched},{watched}"])
    # CPU is measured once the tabs have drawn (their steady polling); the wall time from submission
    _, cpu, browser, status = window(pid, lambda: wait_finished(env, watched))
    wall_w = time.perf_counter() - t0
    rows.append((f"watched run {watched} ({status}), 3 tabs (Run detail, Runs, Compare)", f"{wall_w:.0f}", f"{cpu:.2f}",
                 f"{browser:.1f}", "-"))
    for tab in tabs:
        tab.close()
    time.sleep(3)
    return unwatched, watched, wall_w / wall_u


def page_load_cpu(context, url: str, path: str) -> float:
    """Chromium CPU seconds to open one page in a new tab and draw it (taken before the tab closes: a closed tab's
    processes exit and take their CPU time with them)."""
    b0 = browser_cpu_seconds()
    tab = open_tabs(context, url, [path])[0]
    time.sleep(2.5)  # plotly draws after the script has ended
    spent = browser_cpu_seconds() - b0
    tab.close()
    time.sleep(2)
    return spent


TRIVIAL_PAGE = 'import streamlit as st\n\nst.title("A trivial page")\nst.write("One line of text.")\n'


def page_load_cases(context, url: str, run_id: int, tmp: Path, rows: list) -> None:
    """Chromium's CPU for a first view of each watched page (median of 3), next to a one-line Streamlit app's: what
    any Streamlit page costs a browser on this machine."""
    (tmp / "trivial").mkdir()
    (tmp / "trivial" / "app.py").write_text(TRIVIAL_PAGE)
    with streamlit_server(tmp / "trivial" / "app.py", dict(os.environ)) as (trivial_url, _):
        cases = [("a one-line Streamlit app", trivial_url, "")]
        cases += [(name, url, path) for name, path in
                  (("Run detail", f"run_detail?run={run_id}"), ("Runs", "runs"), ("Compare", f"compare?runs={run_id}"))]
        for name, base, path in cases:
            spent = statistics.median(page_load_cpu(context, base, path) for _ in range(3))
            rows.append((f"page load, finished run: {name} (median of 3)", "-", "-", f"{spent:.2f} CPU-s", "-"))


def live_cases(context, url: str, pid: int, env: dict[str, str], config: Path, finished: int, seconds: float,
               rows: list) -> float:
    """Each page alone, then no tab and the three-tab case twice in turn, on a run that trains throughout (cancelled
    after); returns its training speed with the three tabs over its speed with none (alternated: the machine's own
    speed drifts by more than the effect)."""
    live = int(cli(env, "submit", str(config)))
    steps = step_counter(env, live)
    pages = {"Run detail": f"run_detail?run={live}", "Runs": "runs", "Compare": f"compare?runs={finished},{live}",
             "Analysis": f"analysis?run={live}", "Sweeps": "sweep", "New experiment": "new_experiment"}
    open_tabs(context, url, [pages["Run detail"]])[0].close()  # wait until the run trains and the page has been built once
    for name, path in pages.items():
        tab = open_tabs(context, url, [path])[0]
        time.sleep(3)
        hold(pid, seconds, f"live run, 1 tab ({name})", rows, steps)
        tab.close()
    speed: dict[str, float] = {"none": 0.0, "three": 0.0}
    for _ in range(2):
        time.sleep(3)  # closed tabs' processes have exited (their CPU would count negative)
        speed["none"] += hold(pid, seconds, "live run, no tab", rows, steps)
        tabs = open_tabs(context, url, [pages["Run detail"], pages["Runs"], pages["Compare"]])
        time.sleep(3)
        speed["three"] += hold(pid, seconds, "live run, 3 tabs (Run detail, Runs, Compare)", rows, steps)
        for tab in tabs:
            tab.close()
    cli(env, "cancel", str(live))
    return speed["three"] / speed["none"]


DEFAULT_CONFIG = str(ROOT / "configs" / "mnist5k_kd.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--hold", type=float, default=60.0, help="seconds each page or set of tabs is held open")
    parser.add_argument("--pairs", type=int, default=3, help="unwatched / watched demo runs, alternated")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    measure(args.config, args.hold, args.pairs)


def measure(config: str, hold_s: float, pairs: int = 3) -> None:
    """Every case of the module docstring, printed as a table."""
    from playwright.sync_api import sync_playwright

    rows: list[tuple[str, ...]] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, dashboard(Path(tmp)) as (url, pid, env), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1600})
        # the page a user opens to submit: the server's first render imports the pages' modules (~3.5 CPU-s), which
        # would otherwise fall on whichever run is watched first
        open_tabs(context, url, ["runs"])[0].close()
        time.sleep(3)
        hold(pid, hold_s, "idle, no tab open", rows)
        first = None
        for _ in range(pairs):
            unwatched, second, ratio = watched_pair(context, url, pid, env, config, first, rows)
            first = first or unwatched
            ratios.append(ratio)
        page_load_cases(context, url, second, Path(tmp), rows)
        speed = live_cases(context, url, pid, env, long_config(config, Path(tmp) / "long.yaml"), second, hold_s, rows)
        tabs = open_tabs(context, url, [f"run_detail?run={second}"])
        time.sleep(3)
        hold(pid, hold_s, "finished run, 1 tab (Run detail)", rows)
        tabs += open_tabs(context, url, ["runs", f"compare?runs={first},{second}"])
        time.sleep(3)
        hold(pid, hold_s, "finished runs, 3 tabs", rows)
        browser.close()
    print(f"config {Path(config).relative_to(ROOT)}, load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs\n")
    print("| case | wall (s) | server CPU (% of one core) | Chromium CPU (% of one core) | live run's training steps/s |\n"
          "|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print(f"\nwatched / unwatched wall time of the demo run (tabs opened right after submission), {pairs} pairs: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}×")
    print(f"live run's training speed with the three tabs held open / with no tab: {speed:.2f}×")


if __name__ == "__main__":
    main()
