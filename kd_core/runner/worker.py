"""``python -m kd_core work RUN_ID``: the process that trains one run, under any executor.

It reads the config from the database, beats a heartbeat from a thread (so a long evaluation is not
mistaken for death), reports progress and metrics through :class:`storage.RunSink`, and always ends the
run itself: ``completed``, ``failed`` (error + log tail) or ``cancelled`` (after a checkpoint). Then it
starts the next queued run, so the queue drains without a daemon.

How it ended is the log's last line (:data:`~kd_core.runner.base.EXIT_MARK`). A native crash leaves
Python's stack in the log through :mod:`faulthandler`; a worker killed without a word (kill -9, the
kernel's OOM killer) leaves neither, and :func:`kd_core.runner.reconcile` says so.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kd_core.runner.base import EXIT_MARK, HEARTBEAT_INTERVAL_S, HOST, log_path_for, warn, with_log_tail

if TYPE_CHECKING:
    from storage import Store


class StopFlag:
    """Set by SIGTERM/SIGINT or by a ``cancelling`` status; read by the engine after every step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def install_signal_handlers(flag: StopFlag) -> None:
    def handler(signum: int, _frame: Any) -> None:
        # only set a flag: the engine finishes the step, checkpoints and raises StopRequested
        flag.set(f"received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class Heartbeat(threading.Thread):
    """Marks the run alive every few seconds, independent of training progress, and watches for cancel."""

    def __init__(self, store: Store, run_id: int, flag: StopFlag) -> None:
        super().__init__(name=f"heartbeat-{run_id}", daemon=True)
        self.store, self.run_id, self.flag = store, run_id, flag
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.beat()
            if self._done.wait(HEARTBEAT_INTERVAL_S):
                return

    def beat(self) -> None:
        try:
            self.store.heartbeat(self.run_id)
            # a cancel from a host that cannot signal us (or through Ray) arrives as the status
            if self.store.get_run(self.run_id).status == "cancelling":
                self.flag.set("status set to cancelling")
        except KeyError:
            self.flag.set("the run was deleted")
        except Exception as exc:  # noqa: BLE001 - a DB hiccup must not kill training; the next beat retries
            warn(f"heartbeat failed: {exc.__class__.__name__}: {exc}")

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


class LoggingSink:
    """Forwards to the real sink and writes a line to the log at each new phase, epoch or analysis stage."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._last: tuple[Any, ...] = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def update_summary(self, summary: dict[str, Any]) -> None:
        self.inner.update_summary(summary)
        if summary.get("data_loader"):
            log(f"data: {summary['data_loader']} ({summary.get('data_loader_reason', '')}); device {summary.get('device')}, "
                f"precision {summary.get('precision')}")

    def update_progress(self, progress: dict[str, Any]) -> None:
        from kd_core.engine.reporting import progress_line

        self.inner.update_progress(progress)
        key = (progress.get("phase"), progress.get("epoch"), progress.get("stage"))
        if key != self._last:
            self._last = key
            log(progress_line(progress))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Outcome:
    status: str  # completed | failed | cancelled
    error: str | None = None
    how: str = "normally"  # how the worker ended: normally, by an exception, by a signal it caught


def main(run_id: int, db_url: str | None = None) -> int:
    flag = StopFlag()
    install_signal_handlers(flag)  # first: a cancel during start-up must not kill us before we can report
    faulthandler.enable(file=sys.stderr, all_threads=True)  # stderr is the run's log: a native crash leaves its stack there
    from storage import Store

    store = Store(db_url)
    ranks = join_ranks(store, run_id)
    if not ranks.is_main:
        return follow(store, run_id, flag)
    first_attempt = store.get_run(run_id).started_at is None  # before claim() records this start
    claimed = claim(store, run_id, flag, pid=os.getppid() if ranks.active else os.getpid())
    ranks.on_main(lambda: (claimed, first_attempt))  # tells the other ranks whether to train, and how
    if not claimed:
        return 0
    heartbeat = Heartbeat(store, run_id, flag)
    heartbeat.start()
    try:
        outcome = train(store, run_id, flag, first_attempt)
    finally:
        heartbeat.stop()  # before the final write, so nothing touches the run after it ends
    finish(store, run_id, outcome)
    start_next(store)
    store.checkpoint_wal()  # last write of this worker: the WAL is folded back and truncated
    store.dispose()
    return leave_ranks(outcome.status != "failed")


def join_ranks(store: Store, run_id: int) -> Any:
    """This process's place among the run's ranks (world 1 unless torchrun started it, for ``student.devices`` > 1)."""
    from kd_core.engine.distributed import launched_ranks, setup
    from kd_core.engine.experiment import resolve_device

    ranks = launched_ranks()
    if not ranks.active:
        return ranks
    return setup(resolve_device(store.get_run(run_id).config.get("device", "auto")))


def follow(store: Store, run_id: int, flag: StopFlag) -> int:
    """A rank other than 0: trains its shard with a null sink; rank 0 claims, reports and ends the run.

    An exception here propagates (exit status 1): torchrun then stops the other ranks and rank 0 records the failure.
    """
    from kd_core.engine.distributed import launched_ranks

    claimed, first_attempt = launched_ranks().on_main(lambda: (False, False))
    if not claimed:
        return 0
    outcome = _train(store, run_id, flag, first_attempt)
    return leave_ranks(outcome.status != "failed")


def leave_ranks(succeeded: bool) -> int:
    """The worker's exit status; a rank of a run on several devices leaves the process group and exits here."""
    code = 0 if succeeded else 1
    if "torch" not in sys.modules:
        return code
    from kd_core.engine.distributed import end_rank

    return end_rank(code, wait_for_peers=succeeded)


def claim(store: Store, run_id: int, flag: StopFlag, pid: int | None = None) -> bool:
    """``starting -> running`` with our pid (torchrun's for a run on several devices: the one cancel signals);
    False (after tidying up) when the run is no longer ours to run."""
    now = time.time()
    fields = {"pid": pid or os.getpid(), "host": HOST, "started_at": now, "heartbeat_at": now, "finished_at": None, "error": None}
    if store.transition(run_id, "starting", "running", **fields):
        return True
    status = store.get_run(run_id).status
    if status == "cancelling":  # cancelled while we were starting up
        store.transition(run_id, "cancelling", "cancelled", finished_at=time.time())
        log(f"run {run_id} was cancelled before it started")
    else:
        log(f"run {run_id} is {status}, not starting: nothing to do")
    return False


def train(store: Store, run_id: int, flag: StopFlag, first_attempt: bool) -> Outcome:
    run = store.get_run(run_id)
    log_path = run.log_path or log_path_for(run)
    try:
        return _train(store, run_id, flag, first_attempt)
    except KeyboardInterrupt:
        return Outcome("cancelled", how="by an interrupt")
    except Exception as exc:  # noqa: BLE001 - any error fails this run alone, with the reason recorded
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        return Outcome("failed", with_log_tail(f"{exc.__class__.__name__}: {exc}", log_path), how=f"by an exception ({exc.__class__.__name__})")


def _train(store: Store, run_id: int, flag: StopFlag, first_attempt: bool) -> Outcome:
    import torch

    from storage import RunSink

    from kd_core.config import validate_config
    from kd_core.engine import CHECKPOINT, StopRequested, run_experiment
    from kd_core.settings import run_dir
    from kd_core.teachers import run_teachers_in

    threads = os.environ.get("DISTILLERY_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    run = store.get_run(run_id)
    config = validate_config(run.config)
    directory = run_dir(run.uid)
    # only a run that was started before continues from a checkpoint, and only from one that proves to be its own
    resume = not first_attempt and (directory / CHECKPOINT).exists()
    if not resume and main_rank():
        discard_all_metrics(store, run_id)  # a restart from scratch must not duplicate an earlier attempt's rows
    rank = f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})" if "RANK" in os.environ else ""
    log(f"run {run_id} ({config.name}, uid {run.uid}) on {HOST}, pid {os.getpid()}{rank}, " + ("resuming from its checkpoint" if resume else "from scratch"))
    if flag.is_set():
        return Outcome("cancelled", how=f"on request ({flag.reason})")
    try:
        summary = run_experiment(config, LoggingSink(RunSink(store, run_id)), directory, stop_requested=flag.is_set, resume=resume,
                                 run_teachers=run_teachers_in(store), run_uid=run.uid, analysis_estimate_s=analysis_estimate(store, run))
    except StopRequested:
        log(f"stopped ({flag.reason}); checkpoint saved, `resume` continues from it")
        return Outcome("cancelled", how=f"on request ({flag.reason})")
    log("completed: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return Outcome("completed")


def main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def analysis_estimate(store: Store, run: Any, recent: int = 5) -> float | None:
    """Median end-of-run analysis time of the latest runs with the same analysis, data and models; None if none."""
    same = ("analysis", "dataset", "teacher", "student")
    times = [r.summary["analysis_s"] for r in store.list_runs(status="completed", include_hidden=True, limit=200)
             if isinstance(r.summary.get("analysis_s"), (int, float)) and all(r.config.get(k) == run.config.get(k) for k in same)][:recent]
    return sorted(times)[len(times) // 2] if times else None


def discard_all_metrics(store: Store, run_id: int) -> None:
    for phase in sorted({phase for phase, _ in store.metric_keys(run_id)}):
        store.delete_metrics_after(run_id, phase, -1)


def finish(store: Store, run_id: int, outcome: Outcome) -> None:
    try:
        progress = {**store.get_run(run_id).progress, "finished": True, "ended": f"{outcome.status}, {outcome.how}"}
    except KeyError:
        log(f"{EXIT_MARK} run {run_id} {outcome.status}, {outcome.how} (the run was deleted meanwhile)")
        return
    fields: dict[str, Any] = {"finished_at": time.time(), "error": outcome.error, "progress": progress}
    # a run cancelled while finishing its last step still counts as what actually happened
    if not store.transition(run_id, ["running", "cancelling"], outcome.status, **fields):
        warn(f"run {run_id} was no longer running (status {store.get_run(run_id).status}); left it as is")
    log(f"{EXIT_MARK} run {run_id} {outcome.status}, {outcome.how}")


def start_next(store: Store) -> None:
    try:
        from kd_core.runner import dispatch, get_executor

        started = dispatch(store, get_executor())
        if started:
            log("started queued run(s) " + ", ".join(map(str, started)))
    except Exception as exc:  # noqa: BLE001 - the next reconcile() dispatches instead
        warn(f"could not start the next queued run: {exc.__class__.__name__}: {exc}")
