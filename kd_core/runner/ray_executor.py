"""The Ray executor: the same ``python -m kd_core work RUN_ID`` submitted through the Ray Jobs API.

Chosen with ``DISTILLERY_EXECUTOR=ray``; the cluster is ``DISTILLERY_RAY_ADDRESS`` or ``RAY_ADDRESS`` (the
dashboard/Jobs address, e.g. ``http://head:8265``). Ray is optional (``requirements-ray.txt``) and imported
only here. With several nodes the database must be PostgreSQL and ``DISTILLERY_ARTIFACTS`` a path every
node sees (checkpoints and the worker log live there), and this checkout and its venv must exist at the
same path on every node (the entrypoint names them absolutely).
"""

from __future__ import annotations

import os
import shlex
import time
from typing import TYPE_CHECKING, Any

from kd_core.runner.base import (
    REPO_ROOT,
    WORKER_LOST,
    Executor,
    Probe,
    configured_slots,
    positive_env,
    log_path_for,
    run_devices,
    worker_command,
    worker_env,
)

if TYPE_CHECKING:
    from storage import RunRecord, Store

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_PENDING_TIMEOUT_S = 300.0
# passed on to workers, so the worker that finishes can submit the next queued run the same way
FORWARDED_ENV = ("DISTILLERY_SLOTS", "DISTILLERY_RAY_PENDING_TIMEOUT_S", "RAY_AUTH_MODE", "DISTILLERY_HOME")


def pending_timeout_s() -> float:
    return positive_env("DISTILLERY_RAY_PENDING_TIMEOUT_S", DEFAULT_PENDING_TIMEOUT_S, float, "seconds a job may wait for resources")


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        try:
            from ray.job_submission import JobStatus, JobSubmissionClient
        except ImportError as exc:
            raise RuntimeError(
                f"DISTILLERY_EXECUTOR=ray needs Ray ({exc}); install it with `pip install -r requirements-ray.txt` "
                "or unset DISTILLERY_EXECUTOR to run locally"
            ) from None
        self._client_cls = JobSubmissionClient
        self._status = JobStatus
        self.address = address or os.environ.get("DISTILLERY_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = self._client_cls(self.address)
            except Exception as exc:  # noqa: BLE001 - say where we looked
                raise RuntimeError(
                    f"cannot reach the Ray Jobs API at {self.address} ({exc.__class__.__name__}: {exc}); "
                    "start the cluster (`ray start --head`) or set RAY_ADDRESS to its dashboard address"
                ) from None
        return self._client

    def slots(self) -> int:
        # Ray would queue the rest itself, but then they would sit in PENDING and hit the pending timeout;
        # set DISTILLERY_SLOTS to what the cluster can run at once.
        return configured_slots(1)

    def occupied(self, active: list[RunRecord]) -> int:
        return sum(1 for r in active if r.executor == self.name)

    def launch(self, store: Store, run: RunRecord) -> None:
        log_path = log_path_for(run)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = worker_env(store)
        env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
        env.update(
            PYTHONPATH=str(REPO_ROOT),
            DISTILLERY_EXECUTOR=self.name,
            DISTILLERY_RAY_ADDRESS=self.address,
        )
        # the absolute interpreter: Ray would otherwise run whatever `python` is first on its PATH
        devices = run_devices(run.config)  # several: torchrun starts one rank per GPU inside the job
        command = " ".join(shlex.quote(part) for part in worker_command(run.id, devices))
        entrypoint = f"cd {shlex.quote(os.getcwd())} && exec {command} >> {shlex.quote(str(log_path))} 2>&1"
        gpus = devices if run.config.get("device") == "cuda" else None
        with open(log_path, "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} submitting run {run.id} to Ray at {self.address}"
                      f"{f' ({gpus} GPU)' if gpus else ''}\n")
        submission_id = f"distillery-run-{run.id}-{int(time.time() * 1000)}"
        self.client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"env_vars": env},
            entrypoint_num_gpus=gpus,
            metadata={"distillery_run": str(run.id)},
        )
        store.update_run(run.id, executor_ref=submission_id, log_path=str(log_path))

    def _job_status(self, ref: str) -> Any | None:
        """The job's status, or None when Ray does not know the job (e.g. the cluster was restarted)."""
        try:
            return self.client.get_job_status(ref)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise

    def probe(self, run: RunRecord) -> Probe:
        ref = run.executor_ref
        if not ref:
            return Probe(False, f"{WORKER_LOST}: it was never submitted to Ray")
        status = self._job_status(ref)
        if status is None:
            return Probe(False, f"{WORKER_LOST}: Ray at {self.address} has no job {ref} (was the cluster restarted?)")
        if status == self._status.PENDING:
            return self._probe_pending(run, ref)
        if status == self._status.RUNNING:
            return Probe(True)
        message = self.client.get_job_info(ref).message
        return Probe(False, f"{WORKER_LOST}: Ray job {ref} is {status.value}" + (f" ({message})" if message else ""))

    def _probe_pending(self, run: RunRecord, ref: str) -> Probe:
        timeout = pending_timeout_s()
        waited = time.time() - (run.heartbeat_at or run.created_at)  # heartbeat_at is the claim time until the worker runs
        if waited <= timeout:
            return Probe(True)
        needs = "1 GPU" if run.config.get("device") == "cuda" else "a free worker slot"
        return Probe(
            False,
            f"Ray could not start job {ref} within {timeout:.0f} s (still PENDING): no node of the cluster at "
            f"{self.address} can give it {needs}. Check `ray status`, set device: auto or cpu, add a GPU node, "
            f"or raise DISTILLERY_RAY_PENDING_TIMEOUT_S",
            stop=True,
        )

    def request_stop(self, run: RunRecord) -> None:
        # A running worker sees status 'cancelling' within a heartbeat and checkpoints before it stops
        # (Ray's own stop_job gives it only a few seconds). A job not running yet is simply dropped.
        if run.executor_ref and self._job_status(run.executor_ref) == self._status.PENDING:
            self.client.stop_job(run.executor_ref)

    def kill(self, run: RunRecord) -> bool:
        # Ray 2.60 accepts stop_job for a job still PENDING but leaves it PENDING until its own start timeout
        # (RAY_JOB_START_TIMEOUT_SECONDS, 15 min). Harmless: if it is placed later, the worker finds the run
        # no longer 'starting' and exits without training.
        if run.executor_ref:
            status = self._job_status(run.executor_ref)
            if status in (self._status.PENDING, self._status.RUNNING):
                self.client.stop_job(run.executor_ref)
        return True

    def fallback_log(self, run: RunRecord, tail_lines: int) -> str | None:
        if not run.executor_ref:
            return None
        text = self.client.get_job_logs(run.executor_ref)
        return "\n".join(text.splitlines()[-tail_lines:])
