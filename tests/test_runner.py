"""The background runner for real: detached worker processes, a SQLite queue, kill -9, cancel, resume.

Every test trains tiny configs in real `python -m kd_core work` subprocesses against a tmp SQLite file;
nothing of the runner is mocked. The machine may be small and busy, so waits are generous but each
assertion about timing (death noticed within 15 s) is exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kd_core.config import ExperimentConfig, validate_config
from kd_core.runner import ACTIVE_STATUSES, cancel, reconcile, read_log, rerun, resume, submit
from kd_core.runner.local import pid_alive
from kd_core.settings import run_dir
from storage import Store
from tests import polling

REPO = Path(__file__).resolve().parents[1]
DONE = ("completed", "failed", "cancelled")
FINISH_TIMEOUT_S = 240.0  # a busy 2-core CI box starts torch processes slowly

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def tiny_config(name: str, *, arch: str = "cnn_tiny", epochs: int = 2, batch_size: int = 16, image_size: int = 16,
                optimizer: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None) -> ExperimentConfig:
    return validate_config({
        "name": name,
        "device": "cpu",
        "dataset": dataset or {"name": "synthetic", "val_fraction": 0.1, "image_size": image_size},
        "teacher": {"arch": "cnn_tiny", "source": "random", "epochs": 0},
        "student": {"arch": arch, "epochs": epochs, "batch_size": batch_size,
                    "optimizer": optimizer or {"name": "adamw", "lr": 0.003}},
        "recipe": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "params": {"temperature": 4}}],
        "baseline": False,
        "analysis": {"enabled": False},
        "checkpoint_every_s": 1,
    })


def steps_per_run(config: ExperimentConfig) -> int:
    """Optimizer steps of the student phase (synthetic: 1000 training images, val_fraction of them held out)."""
    train = 1000 - round(config.dataset.val_fraction * 1000)
    return -(-train // config.student.batch_size) * config.student.epochs


def wait_for(store: Store, what: str, predicate: Callable[[], Any], timeout: float = FINISH_TIMEOUT_S, interval: float = 0.2) -> Any:
    return polling.wait_for(store, what, predicate, timeout, interval)


def wait_final(store: Store, run_ids: list[int], timeout: float = FINISH_TIMEOUT_S) -> dict[int, Any]:
    wait_for(store, f"runs {run_ids} to finish", lambda: all(store.get_run(i).status in DONE for i in run_ids), timeout)
    return {i: store.get_run(i) for i in run_ids}


def wait_exited(store: Store, run_ids: list[int], timeout: float = 30.0) -> None:
    """The worker processes themselves are gone (they write the WAL checkpoint last)."""
    def gone() -> bool:
        return all(store.get_run(i).pid is None or not pid_alive(store.get_run(i).pid) for i in run_ids)

    wait_for(store, f"workers of {run_ids} to exit", gone, timeout)


def assert_continuous(store: Store, run_id: int, config: ExperimentConfig) -> None:
    """Every per-step key has steps 1..N exactly once; every per-epoch key once per epoch."""
    frame = store.metrics_frame(run_id, phase="student")
    total = steps_per_run(config)
    assert not frame.duplicated(["phase", "key", "step"]).any(), frame[frame.duplicated(["phase", "key", "step"], keep=False)]
    for key in ("loss/total", "loss/ce", "loss/kd", "lr", "images_per_s"):
        steps = frame.loc[frame["key"] == key, "step"].tolist()
        assert steps == list(range(1, total + 1)), f"{key}: {len(steps)} rows, expected steps 1..{total}"
    for key in ("val/top1", "val/loss", "val/agreement"):
        assert (frame["key"] == key).sum() == config.student.epochs, key
    assert store.count_metrics(run_id) == len(store.metrics_frame(run_id))


def checkpoint_progress(store: Store, run_id: int) -> dict[str, Any] | None:
    import torch

    path = run_dir(store.get_run(run_id).uid) / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)["progress"]
    except Exception:  # noqa: BLE001 - being replaced right now; look again
        return None


@pytest.fixture
def runner_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A SQLite store in tmp_path that workers started from this process share (via the environment)."""
    monkeypatch.setenv("DISTILLERY_DB_URL", f"sqlite:///{tmp_path / 'distillery.db'}")
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DISTILLERY_EXECUTOR", "local")
    monkeypatch.setenv("DISTILLERY_SLOTS", "2")
    monkeypatch.setenv("DISTILLERY_THREADS", "1")  # two workers on two cores; more threads only fight
    store = Store(None)
    yield store
    # never leave our own workers behind, whatever the test did
    for run in store.list_runs(include_hidden=True):
        if run.pid and pid_alive(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
    store.dispose()


# --------------------------------------------------------------------------- tests


def test_kill_9_mid_epoch_is_noticed_and_resume_continues(runner_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store = runner_store
    monkeypatch.setenv("DISTILLERY_SLOTS", "1")
    # batches of 4: an epoch lasts several seconds, so the 1 s mid-epoch checkpoint is on disk long enough to be seen
    config = tiny_config("kill-me", arch="resnet8", image_size=32, epochs=2, batch_size=4)
    run_id = submit(store, config)

    # wait for a mid-epoch checkpoint (batch > 0), then kill the worker without any chance to report
    wait_for(store, "a mid-epoch checkpoint", lambda: (p := checkpoint_progress(store, run_id)) and p["batch"] > 0 and p["step"] > 0,
             interval=0.05)
    run = store.get_run(run_id)
    assert run.status == "running" and run.pid
    os.kill(run.pid, signal.SIGKILL)
    killed_at = time.time()

    failed = wait_for(store, "the killed run to be marked failed", lambda: store.get_run(run_id).status == "failed", timeout=20, interval=0.25)
    noticed_after = time.time() - killed_at
    print(f"kill -9 noticed after {noticed_after:.1f} s")
    assert failed and noticed_after < 15, f"death noticed after {noticed_after:.1f} s"
    run = store.get_run(run_id)
    assert run.error.startswith("the worker") and "vanished without a word" in run.error and "kill -9" in run.error, run.error
    resume_point = checkpoint_progress(store, run_id)
    assert resume_point is not None and resume_point["step"] > 0

    resume(store, run_id)
    run = wait_final(store, [run_id])[run_id]
    assert run.status == "completed", run.error
    assert_continuous(store, run_id, config)
    # the rows up to the checkpoint are the ones written before the kill: training continued, not restarted
    loss = store.metric_series(run_id, "loss/total", "student")
    before = loss[loss["time"] < killed_at]
    assert before["step"].max() == resume_point["step"]
    assert (loss.loc[loss["step"] > resume_point["step"], "time"] > killed_at).all()
    assert "resuming from its checkpoint" in read_log(store, run_id, 500)


def test_four_runs_share_two_slots_while_a_reader_polls(runner_store: Store) -> None:
    store = runner_store
    configs = [tiny_config(f"slot-{i}") for i in range(4)]
    errors: list[str] = []
    max_active = [0]
    stop = threading.Event()
    run_ids: list[int] = []

    def reader() -> None:
        """A second dashboard: reads status and metrics every 200 ms from its own connection pool."""
        other = Store(store.url)
        try:
            while not stop.is_set():
                try:
                    active = [r for r in other.list_runs(include_hidden=True) if r.status in ("starting", "running", "cancelling")]
                    max_active[0] = max(max_active[0], len(active))
                    for rid in list(run_ids):
                        other.metric_series(rid, "loss/total", "student")
                        other.count_metrics(rid)
                except Exception as exc:  # noqa: BLE001 - 'database is locked' and friends are what we look for
                    errors.append(f"{exc.__class__.__name__}: {exc}")
                time.sleep(0.2)
        finally:
            other.dispose()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for config in configs:
            run_ids.append(submit(store, config))
        statuses = [store.get_run(i).status for i in run_ids]
        assert statuses.count("queued") >= 2, statuses  # only two slots
        runs = wait_final(store, run_ids)
    finally:
        stop.set()
        thread.join(10)

    assert not errors, errors[:5]
    assert all(r.status == "completed" for r in runs.values()), {i: (r.status, r.error) for i, r in runs.items()}
    assert max_active[0] <= 2, f"{max_active[0]} runs held slots at once with DISTILLERY_SLOTS=2"
    # the same from the runs' own timestamps: never more than two running intervals overlap
    events = sorted([(r.started_at, 1) for r in runs.values()] + [(r.finished_at, -1) for r in runs.values()])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2
    for run_id, config in zip(run_ids, configs):
        assert_continuous(store, run_id, config)
    assert "data: resident (synthetic is loaded whole and kept on the cpu as uint8)" in read_log(store, run_ids[0])

    # the last worker folds the WAL back into the database when it ends
    wait_exited(store, run_ids)
    wal = Path(str(store.engine.url.database) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, f"WAL is {wal.stat().st_size} bytes after all runs finished"


def test_bad_data_and_nan_loss_fail_alone(runner_store: Store, tmp_path: Path) -> None:
    store = runner_store
    missing = tmp_path / "no-such-images"
    bad_data = tiny_config("bad-data", dataset={"name": "imagefolder", "root": str(missing), "val_fraction": 0.1})
    nan = tiny_config("nan-loss", arch="mlp", optimizer={"name": "sgd", "lr": 10.0, "momentum": 0.9})
    good = tiny_config("good", epochs=1)
    ids = [submit(store, c) for c in (bad_data, nan, good)]
    runs = wait_final(store, ids)

    assert runs[ids[0]].status == "failed"
    assert "DatasetUnavailable" in runs[ids[0]].error and str(missing) in runs[ids[0]].error
    assert runs[ids[1]].status == "failed"
    assert "became non-finite" in runs[ids[1]].error and "lower student.optimizer.lr (now 10)" in runs[ids[1]].error
    assert "--- last lines of worker.log ---" in runs[ids[1]].error  # the traceback is in run.error too
    assert runs[ids[2]].status == "completed", runs[ids[2]].error
    assert runs[ids[2]].summary["student_acc"] > 10
    assert_continuous(store, ids[2], good)


def test_cancel_checkpoints_and_resume_completes(runner_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store = runner_store
    monkeypatch.setenv("DISTILLERY_SLOTS", "1")
    config = tiny_config("cancel-me", arch="resnet8", image_size=32, epochs=2)
    run_id = submit(store, config)
    waiting = submit(store, tiny_config("waits"))
    assert store.get_run(waiting).status == "queued"
    assert cancel(store, waiting) == "cancelled"  # a queued run is cancelled directly, no worker involved
    assert store.get_run(waiting).status == "cancelled"

    wait_for(store, "training steps", lambda: store.get_run(run_id).status == "running"
             and store.last_metric_step(run_id, "student"), interval=0.1)
    assert cancel(store, run_id) == "cancelling"
    asked = time.monotonic()
    run = wait_final(store, [run_id], timeout=60)[run_id]
    assert run.status == "cancelled"
    assert run.error is None, run.error  # stopped by itself, not killed after the grace period
    assert time.monotonic() - asked < 10
    stopped_at = checkpoint_progress(store, run_id)
    assert stopped_at is not None and stopped_at["step"] > 0
    assert "checkpoint saved" in read_log(store, run_id)

    with pytest.raises(ValueError, match="only queued, starting or running"):
        cancel(store, run_id)
    resume(store, run_id)
    run = wait_final(store, [run_id])[run_id]
    assert run.status == "completed", run.error
    assert_continuous(store, run_id, config)
    with pytest.raises(ValueError, match="only failed or cancelled runs can be resumed; use rerun"):
        resume(store, run_id)


def test_cli_submit_prints_only_the_id_and_workers_drain_the_queue(runner_store: Store, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `submit` calls with one slot; the submitting CLI processes exit at once and nobody polls,
    so only the first worker can start the second run when it ends."""
    monkeypatch.setenv("DISTILLERY_SLOTS", "1")
    store = runner_store
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(tiny_config("cli-long", arch="resnet8", image_size=32, epochs=2).to_yaml())
    second.write_text(tiny_config("cli-short", epochs=1).to_yaml())
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kd_core", *args], capture_output=True, text=True, env=env, timeout=120)

    ids = []
    for path in (first, second):
        submitted = cli("submit", str(path))
        assert submitted.returncode == 0, submitted.stderr
        assert submitted.stdout.strip().isdigit(), repr(submitted.stdout)  # RUN=$(python -m kd_core submit c.yaml)
        ids.append(int(submitted.stdout))
    assert store.get_run(ids[1]).status == "queued", "the first run ended before the second was submitted; make it longer"
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while time.monotonic() < deadline and not all(store.get_run(i).status in DONE for i in ids):
        time.sleep(0.5)  # no reconcile() here on purpose
    assert [store.get_run(i).status for i in ids] == ["completed", "completed"], [store.get_run(i).error for i in ids]
    assert f"started queued run(s) {ids[1]}" in read_log(store, ids[0])

    status = cli("status", str(ids[1]))
    assert status.returncode == 0 and "[completed]" in status.stdout, status.stdout + status.stderr
    logs = cli("logs", str(ids[1]))
    assert f"worker ended: run {ids[1]} completed, normally" in logs.stdout
    again = cli("resume", str(ids[1]))
    assert again.returncode == 2 and "only failed or cancelled" in again.stderr


def test_reconcile_settles_dead_and_never_started_workers(runner_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """No training here: runs whose recorded process is gone, with real (dead) pids."""
    store = runner_store
    config = tiny_config("ghost").model_dump(mode="json")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    long_ago = time.time() - 60
    lost = store.create_run("lost", config, status="running")
    store.update_run(lost, pid=dead.pid, host=os.uname().nodename, executor="local", heartbeat_at=long_ago)
    never = store.create_run("never", config, status="starting")
    store.update_run(never, host=os.uname().nodename, executor="local", heartbeat_at=long_ago)
    stopping = store.create_run("stopping", config, status="cancelling")
    store.update_run(stopping, pid=dead.pid, host=os.uname().nodename, executor="local", finished_at=time.time())
    fresh = store.create_run("fresh", config, status="running")  # heartbeat now: not judged yet, even without a process
    store.update_run(fresh, pid=dead.pid, host=os.uname().nodename, executor="local", heartbeat_at=time.time())

    changed = reconcile(store)
    assert {lost, never, stopping} <= set(changed)
    assert store.get_run(lost).status == "failed" and "vanished without a word" in store.get_run(lost).error
    assert store.get_run(never).status == "failed" and "never started" in store.get_run(never).error
    assert store.get_run(stopping).status == "cancelled"
    assert store.get_run(fresh).status == "running"

    # a worker that ignores SIGTERM is killed once the grace period is over (the request is backdated)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)", "kd_core-stub"],
        start_new_session=True,
    )
    time.sleep(0.5)  # let it install SIG_IGN
    hung = store.create_run("hung", config, status="running")
    store.update_run(hung, pid=stubborn.pid, host=os.uname().nodename, executor="local", heartbeat_at=time.time())
    assert cancel(store, hung) == "cancelling"
    time.sleep(0.5)
    assert stubborn.poll() is None and hung not in reconcile(store)  # SIGTERM ignored, still within grace
    store.update_run(hung, finished_at=time.time() - 11)
    assert hung in reconcile(store)
    assert stubborn.wait(5) == -signal.SIGKILL
    assert store.get_run(hung).status == "cancelled" and "killed" in store.get_run(hung).error

    # rerun queues a copy with parent_id; with the single slot held by `fresh` it waits in the queue
    monkeypatch.setenv("DISTILLERY_SLOTS", "1")
    child = rerun(store, lost)
    record = store.get_run(child)
    assert record.parent_id == lost and record.config == store.get_run(lost).config
    assert record.status == "queued" and record.status in ACTIVE_STATUSES
    assert "still queued" in read_log(store, child)
    assert cancel(store, child) == "cancelled"
    store.update_run(fresh, status="failed")
