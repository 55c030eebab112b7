"""Background runs: a queue in the database, drained by detached worker processes.

Training never runs inside the dashboard: :func:`submit` records a ``queued`` run and, when a slot is
free, launches ``python -m kd_core work RUN_ID`` through an executor (``local`` by default, ``ray`` with
``DISTILLERY_EXECUTOR=ray``). Everything is state in the database, so any number of dashboards and CLIs
can call these functions at once.

Public API (the dashboard codes against it): :func:`submit`, :func:`cancel`, :func:`resume`,
:func:`rerun`, :func:`reconcile`, :func:`read_log`, :func:`get_executor`, :data:`ACTIVE_STATUSES`.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_core.runner.base import (
    ACTIVE_STATUSES,
    CANCEL_GRACE_S,
    FINAL_STATUSES,
    HOST,
    SLOT_STATUSES,
    STALE_HEARTBEAT_S,
    Executor,
    Probe,
    heartbeat_age,
    log_path_for,
    lost_worker_reason,
    tail_text,
    warn,
    with_log_tail,
)

if TYPE_CHECKING:
    from storage import RunRecord, Store

    from kd_core.config import ExperimentConfig

EXECUTORS = ("local", "ray")
_executors: dict[str, Executor] = {}


def get_executor(name: str | None = None) -> Executor:
    """The executor called ``name``, else ``$DISTILLERY_EXECUTOR``, else ``local`` (one instance per name)."""
    name = (name or os.environ.get("DISTILLERY_EXECUTOR") or "local").strip().lower()
    if name not in _executors:
        if name == "local":
            from kd_core.runner.local import LocalExecutor

            _executors[name] = LocalExecutor()
        elif name == "ray":
            from kd_core.runner.ray_executor import RayExecutor  # imports ray only now

            _executors[name] = RayExecutor()
        else:
            raise ValueError(f"DISTILLERY_EXECUTOR={name!r} is not an executor; allowed: {', '.join(EXECUTORS)}")
    return _executors[name]


def executor_for(run: RunRecord) -> Executor:
    """The executor that started ``run`` (terminal `run` processes are watched like local workers)."""
    return get_executor("ray" if run.executor == "ray" else "local")


# --------------------------------------------------------------------------- submit / cancel / resume


def submit(store: Store, config: ExperimentConfig | dict[str, Any], *, parent_id: int | None = None) -> int:
    """Queue a run of ``config`` and start it if a slot is free; returns its id at once."""
    from kd_core.config import validate_config
    from kd_core.teachers import run_teachers_in

    config = validate_config(config, run_teachers=run_teachers_in(store))  # ConfigError names the fields
    run_id = store.create_run(config.name, config.model_dump(mode="json"), status="queued", parent_id=parent_id)
    dispatch(store, get_executor())
    return run_id


def rerun(store: Store, run_id: int, config: ExperimentConfig | dict[str, Any] | None = None) -> int:
    """A new run with ``run_id``'s config (or an edited copy), ``parent_id`` pointing back at it."""
    source = store.get_run(run_id)
    return submit(store, source.config if config is None else config, parent_id=run_id)


def cancel(store: Store, run_id: int) -> str:
    """Stop a run: a queued one is cancelled at once, a running one checkpoints first. Returns the new status.

    A running worker gets SIGTERM (local) or sees the ``cancelling`` status within a heartbeat; if it is
    still there after the grace period, :func:`reconcile` kills it.
    """
    for _ in range(5):  # the status may move under us (starting -> running); retry on the new one
        run = store.get_run(run_id)
        if run.status == "queued":
            if store.transition(run_id, "queued", "cancelled", finished_at=time.time()):
                return "cancelled"
        elif run.status in ("starting", "running"):
            if store.transition(run_id, run.status, "cancelling", finished_at=time.time()):
                executor_for(run).request_stop(store.get_run(run_id))
                return "cancelling"
        elif run.status == "cancelling":
            executor_for(run).request_stop(run)
            return "cancelling"
        else:
            raise ValueError(f"run {run_id} is {run.status}; only queued, starting or running runs can be cancelled")
    raise RuntimeError(f"run {run_id} kept changing status while cancelling; try again")


def resume(store: Store, run_id: int) -> None:
    """Queue a failed or cancelled run again; its worker continues from ``run_dir/checkpoint.pt``."""
    fields: dict[str, Any] = {"finished_at": None, "error": None, "pid": None, "executor_ref": None, "heartbeat_at": None}
    if not store.transition(run_id, ["failed", "cancelled"], "queued", **fields):
        status = store.get_run(run_id).status
        hint = "; use rerun for a new run with the same config" if status == "completed" else ""
        raise ValueError(f"run {run_id} is {status}; only failed or cancelled runs can be resumed{hint}")
    dispatch(store, get_executor())


def read_log(store: Store, run_id: int, tail_lines: int = 200) -> str:
    """The last ``tail_lines`` lines of the run's worker log (stdout and stderr)."""
    run = store.get_run(run_id)
    text = tail_text(run.log_path or log_path_for(run), tail_lines)
    if text is None and run.executor_ref:
        try:
            text = executor_for(run).fallback_log(run, tail_lines)
        except Exception as exc:  # noqa: BLE001 - a log view must not break the page
            text = f"(log not readable here, and the executor could not fetch it: {exc})"
    if text is None:
        if run.status == "queued":
            return "(no log yet: the run is still queued)"
        if run.executor == "inline":
            return f"(run {run_id} was trained in a terminal with `python -m kd_core run`; its output went there)"
        return f"(no log file for run {run_id})"
    return text


# --------------------------------------------------------------------------- scheduling


@contextmanager
def dispatch_lock(store: Store) -> Iterator[None]:
    """Serialise "count free slots, claim runs" across processes on this host.

    The claim alone is atomic per run, but two dispatchers could each see one free slot and claim
    different runs. A file lock next to the SQLite file (or in the artifacts folder, which a cluster
    shares) closes that gap.
    """
    from kd_core.runner.base import absolute_db_url
    from kd_core.settings import artifacts_root

    url = absolute_db_url(store.url)
    if url.startswith("sqlite") and "///" in url:
        # a URI filename (sqlite:///file:/path?mode=ro&uri=true) names the same file without its scheme
        path = Path(url.split("///", 1)[1].split("?", 1)[0].removeprefix("file:") + ".dispatch.lock")
    else:
        path = artifacts_root() / ".dispatch.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dispatch(store: Store, executor: Executor) -> list[int]:
    """Claim queued runs (oldest first) while ``executor`` has free slots and launch them; their ids."""
    started: list[int] = []
    with dispatch_lock(store):
        active = store.list_runs(status=list(SLOT_STATUSES), include_hidden=True)
        free = executor.slots() - executor.occupied(active)
        if free <= 0:
            return started
        queued = sorted(store.list_runs(status="queued", include_hidden=True), key=lambda r: (r.created_at, r.id))
        for run in queued:
            if free <= 0:
                break
            if not _teacher_ready(store, run):
                continue  # waits for the run that trains its teacher (a sweep's shared teacher)
            if executor.slots_needed(run) > free:
                break  # a run on several GPUs waits for them; runs queued after it do not overtake it
            claim = {"executor": executor.name, "host": HOST, "heartbeat_at": time.time(), "pid": None,
                     "executor_ref": None, "error": None, "finished_at": None, "log_path": str(log_path_for(run))}
            if not store.transition(run.id, "queued", "starting", **claim):
                continue  # someone else took it, or it was cancelled meanwhile
            try:
                executor.launch(store, store.get_run(run.id))
            except Exception as exc:  # noqa: BLE001 - this run fails alone; the others still start
                store.transition(run.id, "starting", "failed", finished_at=time.time(),
                                 error=f"could not start the worker ({executor.name} executor): {exc.__class__.__name__}: {exc}")
                continue
            started.append(run.id)
            free -= executor.slots_needed(run)
    return started


def _teacher_ready(store: Store, run: RunRecord) -> bool:
    """A run reusing ``run:<id>``'s teacher may start once that teacher exists; if that run ended without
    one, this run fails with the reason instead of waiting forever."""
    source = str((run.config.get("teacher") or {}).get("source", ""))
    if not source.startswith("run:"):
        return True
    from kd_core.teachers import TeacherUnavailable, run_teachers_in

    teacher_run = int(source[4:])
    try:
        run_teachers_in(store)(teacher_run)
        return True
    except TeacherUnavailable as exc:
        try:
            status = store.get_run(teacher_run).status
        except KeyError:
            status = "deleted"
        if status in ACTIVE_STATUSES:
            return False
        store.transition(run.id, "queued", "failed", finished_at=time.time(),
                         error=f"its teacher was to come from run {teacher_run}, which is {status} without one ({exc}); resume run {teacher_run} first, then this one")
        return False


def reconcile(store: Store) -> list[int]:
    """Make the database match reality; call it on every dashboard poll and CLI call. Returns changed run ids.

    * ``starting``/``running`` runs with a stale heartbeat (> 10 s) whose process/job is gone -> ``failed``.
    * ``cancelling`` runs whose worker is gone -> ``cancelled``; still there after the grace period -> killed.
    * Queued runs start while slots are free.
    """
    changed: list[int] = []
    now = time.time()
    for run in store.list_runs(status=list(SLOT_STATUSES), include_hidden=True):
        try:
            if _settle(store, run, executor_for(run), now):
                changed.append(run.id)
        except Exception as exc:  # noqa: BLE001 - one unreachable executor must not block the others
            warn(f"could not check run {run.id} ({run.executor}): {exc.__class__.__name__}: {exc}")
    if changed:
        store.checkpoint_wal()
    try:
        changed += dispatch(store, get_executor())
    except Exception as exc:  # noqa: BLE001
        warn(f"could not start queued runs: {exc.__class__.__name__}: {exc}")
    return changed


def _settle(store: Store, run: RunRecord, executor: Executor, now: float) -> bool:
    if run.status == "cancelling":
        return _settle_cancelling(store, run, executor, now)
    age = heartbeat_age(run, now)
    if age <= STALE_HEARTBEAT_S:
        return False
    probe: Probe = executor.probe(run)
    if probe.alive:
        return False
    if probe.stop:
        executor.kill(run)
    error = with_log_tail(probe.reason, run.log_path) if probe.reason else lost_worker_reason(run, age)
    return store.transition(run.id, run.status, "failed", finished_at=now, error=error)


def _settle_cancelling(store: Store, run: RunRecord, executor: Executor, now: float) -> bool:
    if not executor.probe(run).alive:
        return store.transition(run.id, "cancelling", "cancelled", finished_at=now)
    requested = run.finished_at or run.heartbeat_at or now
    if now - requested <= CANCEL_GRACE_S or not executor.kill(run):
        return False
    error = f"did not stop within {CANCEL_GRACE_S:.0f} s of the cancel request, so it was killed; resume continues from its last checkpoint"
    return store.transition(run.id, "cancelling", "cancelled", finished_at=now, error=error)


__all__ = [
    "ACTIVE_STATUSES", "FINAL_STATUSES", "Executor", "cancel", "dispatch", "get_executor", "read_log",
    "reconcile", "rerun", "resume", "submit",
]
