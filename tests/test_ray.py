"""The Ray executor against a real local Ray head (Jobs API on 127.0.0.1), started and stopped here.

Skipped only when Ray is not installed (`pip install -r requirements-ray.txt`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "ray.job_submission",
    reason="Ray is not installed, so the Ray executor is NOT tested: `.venv/bin/pip install -r requirements-ray.txt`",
)

import kd_core.runner as runner  # noqa: E402
from kd_core.config import ExperimentConfig, validate_config  # noqa: E402
from kd_core.runner import cancel, read_log, submit  # noqa: E402
from kd_core.settings import run_dir  # noqa: E402
from storage import Store  # noqa: E402
from tests import polling  # noqa: E402

pytestmark = pytest.mark.slow
HEAD_START_TIMEOUT_S = 120.0
TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray head with the dashboard/Jobs API on 127.0.0.1, in its own process group so we stop only it."""
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    dashboard_port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # Ray 2.60 defaults to token auth
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
        f"--port={free_port()}", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception as exc:  # noqa: BLE001 - not up yet
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not come up at {address}: {exc}\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        # --block makes `ray start` shut its node down on SIGTERM; SIGKILL the group if it lingers
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        log.close()
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_store(ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("DISTILLERY_DB_URL", f"sqlite:///{tmp_path / 'distillery.db'}")
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DISTILLERY_EXECUTOR", "ray")
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    monkeypatch.setenv("DISTILLERY_SLOTS", "2")
    monkeypatch.setenv("DISTILLERY_THREADS", "1")
    runner._executors.pop("ray", None)  # a fresh client for this head
    store = Store(None)
    yield store
    store.dispose()
    runner._executors.pop("ray", None)


def tiny_config(name: str, **over: Any) -> ExperimentConfig:
    data: dict[str, Any] = {
        "name": name,
        "device": "cpu",
        "dataset": {"name": "synthetic", "val_fraction": 0.1},
        "teacher": {"arch": "cnn_tiny", "source": "random", "epochs": 0},
        "student": {"arch": "cnn_tiny", "epochs": 1, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.003}},
        "recipe": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "params": {"temperature": 4}}],
        "baseline": False,
        "analysis": {"enabled": False},
        "checkpoint_every_s": 1,
    }
    data.update(over)
    return validate_config(data)


def wait_for(store: Store, what: str, predicate: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    return polling.wait_for(store, what, predicate, timeout, interval=0.5)


def job_status(address: str, ref: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_status(ref).value


def test_ray_job_trains_a_run(ray_store: Store, ray_address: str) -> None:
    store = ray_store
    config = tiny_config("on-ray")
    run_id = submit(store, config)
    wait_for(store, "the Ray run to finish", lambda: store.get_run(run_id).status in ("completed", "failed", "cancelled"))
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    assert run.executor == "ray" and run.executor_ref.startswith(f"distillery-run-{run_id}-")
    steps = store.metric_series(run_id, "loss/total", "student")["step"].tolist()
    assert steps == list(range(1, 58))  # 900 training images / 16, once each
    assert f"worker ended: run {run_id} completed, normally" in read_log(store, run_id)
    wait_for(store, "the Ray job to end", lambda: job_status(ray_address, run.executor_ref) == "SUCCEEDED", timeout=30)


def test_ray_cancel_checkpoints(ray_store: Store, ray_address: str) -> None:
    store = ray_store
    config = tiny_config("cancel-on-ray", dataset={"name": "synthetic", "val_fraction": 0.1, "image_size": 32},
                         student={"arch": "resnet8", "epochs": 3, "batch_size": 16})
    run_id = submit(store, config)
    wait_for(store, "training steps", lambda: store.get_run(run_id).status == "running" and store.last_metric_step(run_id, "student"))
    assert cancel(store, run_id) == "cancelling"
    wait_for(store, "the cancel", lambda: store.get_run(run_id).status == "cancelled", timeout=60)
    run = store.get_run(run_id)
    assert run.error is None, run.error  # the worker saw 'cancelling' and stopped itself
    assert (run_dir(run.uid) / "checkpoint.pt").exists()
    assert "checkpoint saved" in read_log(store, run_id)
    wait_for(store, "the Ray job to end", lambda: job_status(ray_address, run.executor_ref) in ("SUCCEEDED", "STOPPED"), timeout=30)


def test_ray_gpu_request_that_cannot_be_placed_fails_clearly(ray_store: Store, ray_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ray_store
    monkeypatch.setenv("DISTILLERY_RAY_PENDING_TIMEOUT_S", "6")
    run_id = submit(store, tiny_config("wants-a-gpu", device="cuda"))  # this head has no GPU: PENDING forever
    ref = store.get_run(run_id).executor_ref
    assert job_status(ray_address, ref) == "PENDING"
    wait_for(store, "the pending timeout", lambda: store.get_run(run_id).status == "failed", timeout=60)
    error = store.get_run(run_id).error
    assert "still PENDING" in error and "1 GPU" in error and "DISTILLERY_RAY_PENDING_TIMEOUT_S" in error
    # Ray 2.60 cannot stop a job whose supervisor was never placed (stop_job leaves it PENDING until Ray's
    # own RAY_JOB_START_TIMEOUT_SECONDS); should it ever start, its worker finds the run failed and exits.
    assert job_status(ray_address, ref) in ("PENDING", "STOPPED")
