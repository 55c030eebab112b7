"""The executor interface and what every executor shares: statuses, timings, worker environment, logs.

A run's life, all of it recorded in the database (never in a dashboard's memory)::

    queued -> starting -> running -> completed | failed | cancelled
                 \\           \\-> cancelling -> cancelled
                  \\-> failed (the worker never came up)

* ``queued -> starting`` is the *claim*: one conditional UPDATE (``Store.transition``), so two dashboards
  or CLIs can never start the same run twice. The dispatcher then asks an :class:`Executor` to launch
  ``python -m kd_core work RUN_ID``.
* ``starting -> running`` is done by the worker itself once its process is up.
* While a run is ``cancelling``, ``finished_at`` holds the time the stop was requested (the runs table
  has no other free column for it); the worker overwrites it with the real end time.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kd_core.settings import artifacts_root, run_dir

if TYPE_CHECKING:
    from storage import RunRecord, Store

ACTIVE_STATUSES: frozenset[str] = frozenset({"queued", "starting", "running", "cancelling"})
# Statuses that hold a slot: everything active except waiting in the queue.
SLOT_STATUSES: tuple[str, ...] = ("starting", "running", "cancelling")
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

HEARTBEAT_INTERVAL_S = 2.0  # worker thread; well under the staleness limit so one slow write is no death
STALE_HEARTBEAT_S = 10.0  # a running run whose heartbeat is older than this *and* whose process is gone has died
CANCEL_GRACE_S = 10.0  # SIGTERM -> SIGKILL
WORKER_LOST = "worker stopped without reporting"
EXIT_MARK = "=== worker ended:"  # the worker's last log line says how it ended; its absence means it was killed
FATAL_MARK = "Fatal Python error:"  # faulthandler's first line after a native crash (SIGSEGV, SIGBUS, SIGFPE, SIGABRT)
LOG_NAME = "worker.log"
ERROR_LOG_LINES = 40  # log lines appended to run.error when a run fails

HOST = socket.gethostname()
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding kd_core/ and storage/


@dataclass(frozen=True)
class Probe:
    """What an executor knows about a run's worker.

    ``alive``: the process/job may still report. ``reason``: why it is gone or will never start (becomes
    run.error). ``stop``: the executor still holds something (e.g. a Ray job stuck in PENDING) that the
    caller should stop.
    """

    alive: bool
    reason: str | None = None
    stop: bool = False


class Executor(ABC):
    """Starts, watches and stops worker processes. Implementations: ``local`` and ``ray``."""

    name: ClassVar[str]

    @abstractmethod
    def slots(self) -> int:
        """How many runs this executor may run at once."""

    @abstractmethod
    def occupied(self, active: list[RunRecord]) -> int:
        """How many of the slot-holding runs ``active`` use this executor's slots."""

    def slots_needed(self, run: RunRecord) -> int:
        """How many slots ``run`` holds while it trains (several for a run on several GPUs of this host)."""
        return 1

    @abstractmethod
    def launch(self, store: Store, run: RunRecord) -> None:
        """Start ``python -m kd_core work RUN_ID`` for a run just claimed (status ``starting``); return at once."""

    @abstractmethod
    def probe(self, run: RunRecord) -> Probe:
        """Is the run's worker still there?"""

    @abstractmethod
    def request_stop(self, run: RunRecord) -> None:
        """Ask the worker to stop gracefully (it checkpoints and marks the run ``cancelled``)."""

    @abstractmethod
    def kill(self, run: RunRecord) -> bool:
        """Stop the worker now; False when this executor cannot reach it (another host)."""

    def fallback_log(self, run: RunRecord, tail_lines: int) -> str | None:
        """The run's log when its log file is not readable here (e.g. from the cluster); None if unknown."""
        return None


# --------------------------------------------------------------------------- configuration


def positive_env(name: str, default: float, cast: type[int] | type[float], meaning: str) -> Any:
    """Environment variable ``name`` as a positive ``cast`` value, else ``default``; a bad value says so."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive {cast.__name__} ({meaning}), got {raw!r}")
    return value


def configured_slots(default: int) -> int:
    """``DISTILLERY_SLOTS`` when set, else ``default``."""
    return positive_env("DISTILLERY_SLOTS", default, int, "runs trained at once")


def visible_gpus() -> int:
    """Number of NVIDIA GPUs this host may use, found without importing torch (the CLI stays fast)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)])


def absolute_db_url(url: str) -> str:
    """Make a relative SQLite path absolute, so a worker started elsewhere opens the same file."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return url
    return parsed.set(database=str(Path(db).expanduser().resolve())).render_as_string(hide_password=False)


def worker_env(store: Store) -> dict[str, str]:
    """Variables every worker needs to find the same database and artifacts as its submitter."""
    if store.url.startswith("sqlite") and ":memory:" in store.url:
        raise ValueError("an in-memory SQLite database cannot be shared with worker processes; use a file or PostgreSQL URL")
    return {
        "DISTILLERY_DB_URL": absolute_db_url(store.url),
        "DISTILLERY_ARTIFACTS": str(artifacts_root().expanduser().resolve()),
        "PYTHONUNBUFFERED": "1",  # the log file shows lines as they happen
    }


def log_path_for(run: RunRecord) -> Path:
    return run_dir(run.uid) / LOG_NAME


def run_devices(config: dict[str, Any]) -> int:
    """``student.devices`` of a stored config: how many ranks train the run (1 for configs from before the key)."""
    return int((config.get("student") or {}).get("devices") or 1)


def worker_command(run_id: int, devices: int) -> list[str]:
    """``python -m kd_core work RUN_ID``; through torchrun, one process per device, when the run has several.

    The pid recorded is torchrun's (its cmdline names kd_core): cancel signals it, it stops the ranks.
    """
    work = ["-m", "kd_core", "work", str(run_id)]
    if devices <= 1:
        return [sys.executable, *work]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}", *work]


# --------------------------------------------------------------------------- logs


def tail_text(path: str | Path | None, lines: int, max_bytes: int = 512 * 1024) -> str | None:
    """The last ``lines`` lines of a text file (reads at most ``max_bytes``); None when it does not exist."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    text = data.decode("utf-8", errors="replace").replace("\r", "\n")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def with_log_tail(message: str, log_path: str | Path | None) -> str:
    """``message`` plus the end of the worker log, so run.error alone explains a failure."""
    tail = tail_text(log_path, ERROR_LOG_LINES)
    if not tail or not tail.strip():
        return message
    return f"{message}\n\n--- last lines of {Path(str(log_path)).name} ---\n{tail}"


def lost_worker_reason(run: RunRecord, age: float) -> str:
    """Why a run's worker is gone, read from the end of its log, followed by that end."""
    # faulthandler's report (every thread's stack, then the extension modules) can run to hundreds of lines
    lines = (tail_text(run.log_path, 1000) or "").splitlines()
    crash = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(FATAL_MARK)), None)
    where = f"pid {run.pid} on {run.host}"
    if crash is not None:
        reason = f"the worker ({where}) crashed: {lines[crash].removeprefix(FATAL_MARK).strip()}. `resume` continues from its last checkpoint"
        stacks = "\n".join(lines[crash : crash + ERROR_LOG_LINES])
        return f"{reason}\n\n--- Python's stacks at the crash ({Path(str(run.log_path)).name}) ---\n{stacks}"
    if EXIT_MARK in "\n".join(lines):
        reason = f"{WORKER_LOST}: the worker ({where}) ended but could not record the outcome; see its log"
    else:
        reason = (f"the worker ({where}) vanished without a word: it was killed from outside (kill -9) or by the kernel's "
                  f"out-of-memory killer (see `dmesg`); no heartbeat for {age:.0f} s")
    return with_log_tail(reason + ". `resume` continues from its last checkpoint", run.log_path)


def heartbeat_age(run: RunRecord, now: float | None = None) -> float:
    """Seconds since the run last showed life (heartbeat, else start, else creation)."""
    last = run.heartbeat_at or run.started_at or run.created_at
    return (time.time() if now is None else now) - last


def warn(message: str) -> None:
    print(f"distillery runner: {message}", file=sys.stderr)
