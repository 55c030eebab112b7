"""Trust under failure, the way users meet it: several databases sharing one artifacts folder, deleted
databases and runs, workers killed or crashing with nobody watching, Ctrl-C in a terminal.

Real worker processes and real SQLite files; the waits in this file never call reconcile() themselves
unless a user would (CLI commands do), so recovery has to come from the supervisor loop.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kd_core.config import validate_config
from kd_core.runner import read_log, resume, submit
from kd_core.runner.base import STALE_HEARTBEAT_S
from kd_core.runner.local import pid_alive
from kd_core.settings import run_dir
from storage import Store
from tests.test_runner import DONE, FINISH_TIMEOUT_S, REPO, checkpoint_progress, tiny_config

pytestmark = pytest.mark.slow


def passive_wait(what: str, predicate: Callable[[], Any], timeout: float = FINISH_TIMEOUT_S, interval: float = 0.25) -> Any:
    """Look, without reconciling, until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def digits_config(name: str, teacher: str, student: str, **over: Any):  # type: ignore[no-untyped-def]
    return validate_config({
        "name": name, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.1, "subset": 400},
        "teacher": {"arch": teacher, "source": "train", "epochs": 1, "batch_size": 32},
        "student": {"arch": student, "epochs": 2, "batch_size": 32},
        "recipe": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5}], "baseline": False,
        "analysis": {"enabled": False}, "checkpoint_every_s": 1, **over,
    })


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One artifacts folder (the default one is shared by every database of a checkout) and the worker env."""
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DISTILLERY_EXECUTOR", "local")
    monkeypatch.setenv("DISTILLERY_SLOTS", "1")
    monkeypatch.setenv("DISTILLERY_THREADS", "1")
    return tmp_path


@pytest.fixture
def open_store(shared: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Store]]:
    """Opens (and on teardown closes, killing leftover workers) SQLite stores by file name."""
    stores: list[Store] = []

    def opener(name: str) -> Store:
        monkeypatch.setenv("DISTILLERY_DB_URL", f"sqlite:///{shared / name}")
        stores.append(Store(None))
        return stores[-1]

    yield opener
    for store in stores:
        try:
            for run in store.list_runs(include_hidden=True):
                if run.pid and pid_alive(run.pid):
                    os.killpg(run.pid, signal.SIGKILL)
        except Exception:  # noqa: BLE001 - a deleted database has nothing left to clean
            pass
        store.dispose()


def finish(store: Store, run_id: int) -> Any:
    """Wait as the dashboard would (reconcile included) for one run to end."""
    from tests.polling import wait_for

    wait_for(store, f"run {run_id} to end", lambda: store.get_run(run_id).status in DONE, FINISH_TIMEOUT_S)
    return store.get_run(run_id)


def assert_trained_from_scratch(store: Store, run_id: int, arch: str) -> None:
    run = finish(store, run_id)
    assert run.status == "completed", run.error
    log = read_log(store, run_id, 500)
    assert "from scratch" in log and "resuming" not in log
    steps = store.metric_series(run_id, "loss/total", "student")["step"].tolist()
    assert steps == list(range(1, len(steps) + 1))
    assert run.config["student"]["arch"] == arch and Path(run.log_path).parent == run_dir(run.uid)


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".log"}


# --------------------------------------------------------------------------- identity


def test_two_databases_never_share_a_runs_files(open_store: Callable[[str], Store]) -> None:
    a = open_store("a.db")
    first = submit(a, digits_config("mlp pair", "mlp", "mlp"))
    assert finish(a, first).status == "completed"
    b = open_store("b.db")
    second = submit(b, digits_config("cnn pair", "cnn_small", "cnn_tiny"))
    assert first == second == 1  # the numbers collide, as they do in every fresh database
    assert_trained_from_scratch(b, second, "cnn_tiny")
    assert run_dir(a.get_run(first).uid) != run_dir(b.get_run(second).uid)


def test_a_deleted_and_recreated_database_starts_clean(open_store: Callable[[str], Store], shared: Path) -> None:
    store = open_store("runs.db")
    first = submit(store, digits_config("before", "mlp", "mlp"))
    assert finish(store, first).status == "completed"
    old_folder = run_dir(store.get_run(first).uid)
    store.dispose()
    for suffix in ("", "-wal", "-shm"):
        (shared / f"runs.db{suffix}").unlink(missing_ok=True)
    from storage.db import forget_migrations

    forget_migrations()
    store = open_store("runs.db")
    again = submit(store, digits_config("after", "cnn_small", "cnn_tiny"))
    assert again == first
    assert_trained_from_scratch(store, again, "cnn_tiny")
    assert old_folder.exists() and run_dir(store.get_run(again).uid) != old_folder


def test_a_new_run_never_picks_up_a_deleted_runs_folder(open_store: Callable[[str], Store]) -> None:
    store = open_store("runs.db")
    first = submit(store, digits_config("deleted later", "mlp", "mlp"))
    assert finish(store, first).status == "completed"
    left_behind = run_dir(store.get_run(first).uid)
    store.delete_run(first)  # its folder stays, as when file removal fails
    second = submit(store, digits_config("next", "cnn_small", "cnn_tiny"))
    assert second == first  # SQLite hands out the deleted newest id again
    assert_trained_from_scratch(store, second, "cnn_tiny")
    assert left_behind.exists() and run_dir(store.get_run(second).uid) != left_behind


def test_resume_refuses_a_checkpoint_that_is_not_the_runs_own(open_store: Callable[[str], Store]) -> None:
    store = open_store("runs.db")
    slow = tiny_config("slow", arch="resnet8", image_size=32, epochs=3)
    victim = submit(store, slow)
    passive_wait("a mid-epoch checkpoint", lambda: (p := checkpoint_progress(store, victim)) and p["step"] > 0, interval=0.1)
    os.killpg(store.get_run(victim).pid, signal.SIGKILL)
    finish(store, victim)
    # another run's checkpoint lands in this run's folder: resume must refuse it and leave every file alone
    other = submit(store, tiny_config("other", arch="resnet8", image_size=32, epochs=3))
    passive_wait("the other run's checkpoint", lambda: (p := checkpoint_progress(store, other)) and p["step"] > 0, interval=0.1)
    os.killpg(store.get_run(other).pid, signal.SIGKILL)
    finish(store, other)
    folder = run_dir(store.get_run(victim).uid)
    (folder / "checkpoint.pt").write_bytes((run_dir(store.get_run(other).uid) / "checkpoint.pt").read_bytes())
    before, rows = folder_digest(folder), store.count_metrics(victim)
    resume(store, victim)
    run = finish(store, victim)
    assert run.status == "failed" and f"belongs to run {store.get_run(other).uid}" in run.error and "nothing was overwritten" in run.error
    assert folder_digest(folder) == before and store.count_metrics(victim) == rows
    # a checkpoint of the same run but another config is refused the same way
    store.update_run(other, config={**store.get_run(other).config, "seed": 99})
    resume(store, other)
    run = finish(store, other)
    assert run.status == "failed" and "written for a different config" in run.error


# --------------------------------------------------------------------------- recovery with nobody watching


def start_supervisor(store: Store) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "kd_core", "--db", store.url, "supervise"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_and_time_recovery(store: Store) -> float:
    """Two runs on one slot; kill -9 the first worker; seconds until it is failed and the second started."""
    first = submit(store, tiny_config("killed", arch="resnet8", image_size=32, epochs=3))
    second = submit(store, tiny_config("next in line", epochs=1))
    assert store.get_run(second).status == "queued"
    passive_wait("the first worker to train", lambda: store.get_run(first).status == "running" and store.last_metric_step(first, "student"))
    os.kill(store.get_run(first).pid, signal.SIGKILL)
    killed = time.monotonic()
    passive_wait("the killed run failed and the next one started", lambda: store.get_run(first).status == "failed"
                 and store.get_run(second).status in ("starting", "running", "completed"), timeout=30)
    elapsed = time.monotonic() - killed
    assert "vanished without a word" in store.get_run(first).error
    return elapsed


def test_supervise_recovers_the_queue_without_any_page_or_command(open_store: Callable[[str], Store]) -> None:
    store = open_store("runs.db")
    supervisor = start_supervisor(store)
    try:
        elapsed = kill_and_time_recovery(store)
    finally:
        os.killpg(supervisor.pid, signal.SIGTERM)
        supervisor.wait(10)
    print(f"kill -9 to 'failed' + next run started, headless supervisor: {elapsed:.1f} s")
    assert elapsed < 15


def test_a_native_crash_leaves_its_stack_in_the_log_and_resume_continues(open_store: Callable[[str], Store]) -> None:
    store = open_store("runs.db")
    # batches of 4, as in test_kill_9_mid_epoch…: an epoch lasts long enough for the 1 s mid-epoch checkpoint to be seen
    config = tiny_config("segfault", arch="resnet8", image_size=32, epochs=2, batch_size=4)
    run_id = submit(store, config)
    passive_wait("a mid-epoch checkpoint", lambda: (p := checkpoint_progress(store, run_id)) and p["batch"] > 0, interval=0.1)
    os.kill(store.get_run(run_id).pid, signal.SIGSEGV)
    run = finish(store, run_id)
    assert run.status == "failed" and "crashed: Segmentation fault" in run.error
    assert "Python's stacks at the crash" in run.error and "kd_core" in run.error.split("stacks at the crash", 1)[1]  # where it was
    log = read_log(store, run_id, 500)
    assert "Fatal Python error: Segmentation fault" in log and 'File "' in log and "kd_core" in log  # Python's stack at the crash
    resume_point = checkpoint_progress(store, run_id)
    resume(store, run_id)
    run = finish(store, run_id)
    assert run.status == "completed", run.error
    assert "resuming from its checkpoint" in read_log(store, run_id, 500)
    steps = store.metric_series(run_id, "loss/total", "student")["step"].tolist()
    assert steps == list(range(1, len(steps) + 1)) and resume_point["step"] < len(steps)


def test_ctrl_c_in_a_terminal_run_checkpoints_and_resume_continues_there(open_store: Callable[[str], Store], shared: Path) -> None:
    store = open_store("runs.db")
    config = tiny_config("interactive", arch="resnet8", image_size=32, epochs=2)
    path = shared / "c.yaml"
    path.write_text(config.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "kd_core", "run", str(path), "--db", store.url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = passive_wait("the terminal run to appear", lambda: store.list_runs() and store.list_runs()[0].id)
    passive_wait("steps", lambda: (store.last_metric_step(run_id, "student") or 0) > 5, interval=0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"python -m kd_core resume {run_id}" in err
    run = store.get_run(run_id)
    stopped = checkpoint_progress(store, run_id)
    assert run.status == "cancelled" and stopped["step"] > 5
    resume(store, run_id)
    run = finish(store, run_id)
    assert run.status == "completed", run.error
    assert "resuming from its checkpoint" in read_log(store, run_id, 500)
    loss = store.metric_series(run_id, "loss/total", "student")
    assert loss["step"].tolist() == list(range(1, len(loss) + 1))  # continued at the exact step, nothing lost or repeated


def test_the_analysis_is_a_visible_phase_and_the_heartbeat_keeps_beating(open_store: Callable[[str], Store]) -> None:
    store = open_store("runs.db")
    config = digits_config("with analysis", "cnn_small", "cnn_tiny", analysis={"samples": 300, "projections": ["pca", "tsne"]})
    run_id = submit(store, config)
    stages: list[str] = []
    worst_age = 0.0
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while time.monotonic() < deadline and store.get_run(run_id).status not in DONE:
        run = store.get_run(run_id)
        if run.progress.get("phase") == "analysis":
            stages.append(run.progress.get("stage", ""))
            worst_age = max(worst_age, time.time() - run.heartbeat_at)
        time.sleep(0.2)
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    assert {"t-SNE 1/2", "t-SNE 2/2", "attribution maps 1/2"} <= set(stages), sorted(set(stages))
    assert run.progress["phases"] == 3 and run.progress["finished"] is True  # teacher, student, analysis
    assert run.summary["analysis_s"] > 0 and worst_age < STALE_HEARTBEAT_S, worst_age


@pytest.mark.browser
def test_the_dashboard_server_recovers_the_queue_after_its_page_is_closed(open_store: Callable[[str], Store], shared: Path) -> None:
    """Open the dashboard once, close the browser, then kill a worker: the server's own loop recovers."""
    from tests.test_browser import ARGS, CHROMIUM, free_port, require_chromium

    require_chromium()
    store = open_store("runs.db")
    port = free_port()
    env = {**os.environ, "DISTILLERY_DB_URL": store.url, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page()
            passive_wait("the dashboard to answer", lambda: _page_loads(page, f"http://127.0.0.1:{port}"), timeout=90, interval=1)
            page.get_by_text("Distillery").first.wait_for(timeout=90_000)
            browser.close()  # nobody is looking from here on
        elapsed = kill_and_time_recovery(store)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
    print(f"kill -9 to 'failed' + next run started, dashboard with no page open: {elapsed:.1f} s")
    assert elapsed < 15


def _page_loads(page: Any, url: str) -> bool:
    try:
        page.goto(url, timeout=5000)
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False
