"""The embedded executor: each run is a detached ``python -m kd_core work RUN_ID`` process on this host.

Detached means its own session (``start_new_session``): a Streamlit rerun, a closed tab or a dashboard
restart neither waits for it nor kills it, and cancel can signal its whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

from kd_core.runner.base import (
    HOST,
    REPO_ROOT,
    STALE_HEARTBEAT_S,
    WORKER_LOST,
    Executor,
    Probe,
    configured_slots,
    heartbeat_age,
    log_path_for,
    run_devices,
    visible_gpus,
    worker_command,
    worker_env,
)

if TYPE_CHECKING:
    from storage import RunRecord, Store

# Liveness of a worker on another host cannot be checked with a signal; only its heartbeat tells.
REMOTE_STALE_S = 60.0
# Executors whose runs are processes on some host with a pid: workers and `python -m kd_core run`.
PROCESS_EXECUTORS = ("local", "inline")

# Popen handles of the workers this process started, polled so they do not linger as zombies
# (a zombie still answers os.kill(pid, 0)).
_children: dict[int, subprocess.Popen[bytes]] = {}


def reap_children() -> None:
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]


def pid_alive(pid: int, run_id: int | None = None) -> bool:
    """True when ``pid`` is a live (non-zombie) process that looks like one of our workers."""
    reap_children()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # state is the field after the parenthesised command name
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        return True  # no /proc here: trust the signal
    # a recycled pid belongs to some unrelated program
    return b"kd_core" in cmdline


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the worker's process group (it leads its own session); a plain process otherwise."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


class LocalExecutor(Executor):
    name = "local"

    def slots(self) -> int:
        # one per GPU, or one on CPU (two CPU runs would just halve each other's speed)
        return configured_slots(max(1, visible_gpus()))

    def occupied(self, active: list[RunRecord]) -> int:
        return sum(self.slots_needed(r) for r in active if (r.executor or "local") in PROCESS_EXECUTORS and (r.host in (None, HOST)))

    def slots_needed(self, run: RunRecord) -> int:
        # a slot is a GPU where there are GPUs: a run on N of them holds N (never more than exist, or it would wait forever)
        if visible_gpus() == 0 or run.config.get("device") == "cpu":
            return 1
        return min(run_devices(run.config), self.slots())

    def launch(self, store: Store, run: RunRecord) -> None:
        log_path = log_path_for(run)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **worker_env(store)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env["DISTILLERY_EXECUTOR"] = self.name  # the worker dispatches the next queued run the same way
        device = self._assign_device(store, run, env)
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting worker for run {run.id} on {HOST} ({device})\n".encode())
            log.flush()
            proc = subprocess.Popen(
                worker_command(run.id, run_devices(run.config)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=os.getcwd(),  # relative paths in configs (dataset.root) mean the same as for the submitter
            )
        _children[proc.pid] = proc
        store.update_run(run.id, pid=proc.pid, executor_ref=device, log_path=str(log_path))

    def _assign_device(self, store: Store, run: RunRecord, env: dict[str, str]) -> str:
        """Give the worker one GPU (the least used by our other runs) via CUDA_VISIBLE_DEVICES."""
        gpus = visible_gpus()
        devices = run_devices(run.config)
        threads = max(1, (os.cpu_count() or 1) // self.slots() // devices)
        env.setdefault("DISTILLERY_THREADS", str(threads))  # CPU runs (and ranks) side by side must not oversubscribe cores
        if gpus == 0 or run.config.get("device") == "cpu":
            return "cpu" if devices == 1 else f"cpu x{devices}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(gpus)]
        in_use: dict[str, int] = {i: 0 for i in ids}
        for other in store.list_runs(status=["starting", "running", "cancelling"], include_hidden=True):
            ref = other.executor_ref or ""
            if other.id != run.id and other.executor == self.name and other.host == HOST and ref.startswith("cuda:"):
                for gpu in ref.removeprefix("cuda:").split(","):
                    in_use[gpu] = in_use.get(gpu, 0) + 1
        chosen = ",".join(sorted(ids, key=lambda i: in_use.get(i, 0))[:devices])  # validation refused more than visible
        env["CUDA_VISIBLE_DEVICES"] = chosen
        return f"cuda:{chosen}"

    def probe(self, run: RunRecord) -> Probe:
        if run.host not in (None, HOST):
            alive = heartbeat_age(run) < REMOTE_STALE_S
            return Probe(alive, None if alive else f"{WORKER_LOST}: the worker on {run.host} sent no heartbeat for {REMOTE_STALE_S:.0f} s")
        if run.pid is None:
            return Probe(False, f"{WORKER_LOST}: its process was never started (the dispatcher stopped before launching it)")
        return Probe(pid_alive(run.pid))

    def request_stop(self, run: RunRecord) -> None:
        if run.pid is None or run.host not in (None, HOST):
            return  # the worker sees status 'cancelling' in its heartbeat thread instead
        if pid_alive(run.pid):
            # a terminal `run` turns SIGINT into a clean cancel; workers handle SIGTERM
            _signal_group(run.pid, signal.SIGINT if run.executor == "inline" else signal.SIGTERM)

    def kill(self, run: RunRecord) -> bool:
        if run.host not in (None, HOST):
            return heartbeat_age(run) > STALE_HEARTBEAT_S  # cannot signal it; gone once silent
        if run.pid is not None and pid_alive(run.pid):
            _signal_group(run.pid, signal.SIGKILL)
        return True
