"""``python -m kd_core``: run experiments headless and read results back from the database.

Imports stay inside the commands: ``work`` (the background worker) must install its signal handlers
before torch is imported, and ``submit``/``status`` should answer without loading torch at all.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from typing import Any

from kd_core.cli_common import COMMANDS, command, format_table, open_store, pct, run_id_arg
from storage.db import StoreUnavailable

class TqdmSink:
    """Shows the engine's progress reports as a tqdm bar while forwarding everything to the real sink."""

    def __init__(self, inner: Any) -> None:
        from tqdm import tqdm

        self.inner = inner
        self.bar = tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.phase = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def update_progress(self, progress: dict[str, Any]) -> None:
        self.inner.update_progress(progress)
        if progress["phase"] == "analysis":  # stages, not steps
            self.bar.set_description(f"[{progress['phase_index']}/{progress['phases']}] analysis: {progress.get('stage', '')}")
            return
        if progress["phase"] != self.phase:
            self.phase = progress["phase"]
            self.bar.reset(total=progress["steps"])
            self.bar.set_description(f"[{progress['phase_index']}/{progress['phases']}] {self.phase}")
        self.bar.n = progress["step"]
        self.bar.set_postfix(epoch=f"{progress['epoch']}/{progress['epochs']}", img_s=progress["images_per_s"])

    def close(self) -> None:
        self.bar.close()


@command("run", "train a config in this process and print the summary (Ctrl-C stops at a checkpoint)", lambda p: p.add_argument("config", help="YAML config file"))
def cmd_run(args: argparse.Namespace) -> int:
    from storage import RunSink

    from kd_core.config import load_config
    from kd_core.engine import StopRequested, run_experiment
    from kd_core.settings import run_dir
    from kd_core.teachers import run_teachers_in

    store = open_store(args)
    config = load_config(args.config, run_teachers=run_teachers_in(store))
    if config.student.devices > 1:
        return run_on_ranks(store, config)
    run_id = store.create_run(config.name, config.model_dump(mode="json"), status="running")
    run = store.get_run(run_id)
    store.update_run(run_id, started_at=time.time(), host=socket.gethostname(), pid=os.getpid(), executor="inline")
    print(f"run {run_id}: {config.name} (Ctrl-C stops it at a checkpoint; `resume {run_id}` continues)", file=sys.stderr)
    flag = stop_on_interrupt()
    sink = TqdmSink(RunSink(store, run_id))
    try:
        summary = run_experiment(config, sink, run_dir(run.uid), stop_requested=flag.is_set, run_teachers=run_teachers_in(store), run_uid=run.uid)
    except StopRequested:
        sink.close()
        step = store.get_run(run_id).progress.get("step")
        store.update_run(run_id, status="cancelled", finished_at=time.time(),
                         error=f"interrupted from the terminal and checkpointed; `python -m kd_core resume {run_id}` continues from there")
        print(f"\nstopped at a checkpoint (step {step}); continue with: python -m kd_core resume {run_id}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        store.update_run(run_id, status="cancelled", finished_at=time.time(), error="interrupted twice from the terminal; resume continues from the last checkpoint")
        return 130
    except Exception as exc:
        store.update_run(run_id, status="failed", finished_at=time.time(), error=f"{exc.__class__.__name__}: {exc}")
        raise
    finally:
        sink.close()
    store.update_run(run_id, status="completed", finished_at=time.time())
    store.checkpoint_wal()
    print(run_id)
    print(summary_table(summary), file=sys.stderr)
    return 0


def run_on_ranks(store: Any, config: Any) -> int:
    """``student.devices`` > 1: the run's worker, through torchrun, in the foreground (its log lines go to the terminal).

    Ctrl-C reaches torchrun, which stops every rank at the same step; rank 0 checkpoints and records the run.
    """
    import subprocess

    from kd_core.runner.base import REPO_ROOT, worker_command, worker_env

    run_id = store.create_run(config.name, config.model_dump(mode="json"), status="starting")
    store.update_run(run_id, host=socket.gethostname(), pid=os.getpid(), executor="inline")
    print(f"run {run_id}: {config.name} on {config.student.devices} processes (Ctrl-C stops it at a checkpoint; "
          f"`resume {run_id}` continues)", file=sys.stderr)
    env = {**os.environ, **worker_env(store), "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    signal.signal(signal.SIGINT, lambda *_: None)  # the terminal's Ctrl-C reaches torchrun too; it stops the ranks
    # the worker's log lines go to stderr: stdout carries only the run id, as for a one-device run
    code = subprocess.run(worker_command(run_id, config.student.devices), env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr).returncode
    run = store.get_run(run_id)
    if run.status != "completed":
        print(f"run {run_id} {run.status}: {(run.error or '').splitlines()[0] if run.error else f'exit status {code}'}", file=sys.stderr)
        return 130 if run.status == "cancelled" else 1
    print(run_id)
    print(summary_table(run.summary), file=sys.stderr)
    return 0


def stop_on_interrupt():  # type: ignore[no-untyped-def]
    """The first Ctrl-C asks the engine to stop after the current step and checkpoint; a second one interrupts at once."""
    from kd_core.runner.worker import StopFlag

    flag = StopFlag()

    def handler(signum: int, _frame: Any) -> None:
        flag.set("Ctrl-C")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step (Ctrl-C again to interrupt at once)...", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    return flag


def summary_table(summary: dict[str, Any]) -> str:
    rows = [
        ["teacher", pct(summary.get("teacher_acc")), ""],
        ["student (KD)", pct(summary.get("student_acc")), pct(summary.get("student_last_acc"))],
        ["baseline (CE only)", pct(summary.get("baseline_acc")), pct(summary.get("baseline_last_acc"))],
    ]
    table = format_table(rows, ["model", "test top-1 % (best)", "(last)"])
    if "kd_gain" in summary:
        table += f"\nKD gain over the baseline: {summary['kd_gain']:+.2f} points (best checkpoints, chosen on {summary['selection_split']})"
    return table


def _runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="include hidden runs")
    p.add_argument("--sweep", type=int, default=None, help="only the runs of this sweep (see `sweeps`)")


@command("runs", "list runs, newest first", _runs_args)
def cmd_runs(args: argparse.Namespace) -> int:
    store = open_store(args)
    if args.sweep is not None:
        store.get_sweep(args.sweep)  # an unknown sweep is an error, not an empty list
    runs = store.list_runs(include_hidden=args.all or args.sweep is not None, sweep_id=args.sweep)
    rows = [
        [r.id, r.status, r.name, r.config.get("dataset", {}).get("name"), f"{r.config['teacher']['arch']}→{r.config['student']['arch']}",
         pct(r.summary.get("student_acc")), pct(r.summary.get("kd_gain"))]
        for r in runs
    ]
    print(format_table(rows, ["id", "status", "name", "dataset", "teacher→student", "student %", "KD gain"]))
    return 0


def _show_args(p: argparse.ArgumentParser) -> None:
    run_id_arg(p)
    p.add_argument("--config", action="store_true", help="print only the run's config, as YAML (python -m kd_core run accepts it)")


@command("show", "a run's status, summary, logged metric keys and config", _show_args)
def cmd_show(args: argparse.Namespace) -> int:
    import yaml

    store = open_store(args)
    run = store.get_run(args.run_id)
    config_yaml = yaml.safe_dump(run.config, sort_keys=False)
    if args.config:
        print(config_yaml, end="")
        return 0
    print(f"run {run.id}: {run.name} [{run.status}]")
    if run.error:
        print(f"error: {run.error}")
    if run.progress and run.status in ("running", "queued", "starting"):
        print("progress: " + ", ".join(f"{k}={v}" for k, v in run.progress.items()))
    if run.summary:
        print(summary_table(run.summary))
    keys = store.metric_keys(run.id)
    print(f"{store.count_metrics(run.id)} metric rows; keys: " + ", ".join(sorted({f'{p}:{k}' for p, k in keys if 'class_acc' not in k})))
    print("config:\n  " + config_yaml.rstrip().replace("\n", "\n  "))
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    run_id_arg(p)
    p.add_argument("--csv", required=True, help="file to write the run's metrics to")


@command("export", "write a run's metrics to CSV", _export_args)
def cmd_export(args: argparse.Namespace) -> int:
    frame = open_store(args).metrics_frame(args.run_id)
    frame.to_csv(args.csv, index=False)
    print(f"wrote {len(frame)} rows to {args.csv}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- sweeps


# --------------------------------------------------------------------------- background runs


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--parent", type=int, default=None, help="id of the run this one derives from")


@command("submit", "queue a config as a background run; prints only its id (RUN=$(python -m kd_core submit c.yaml))", _config_arg)
def cmd_submit(args: argparse.Namespace) -> int:
    from kd_core.config import load_config
    from kd_core.runner import submit

    config = load_config(args.config)
    run_id = submit(open_store(args), config, parent_id=args.parent)
    status = open_store(args).get_run(run_id).status
    print(f"run {run_id}: {config.name} [{status}]", file=sys.stderr)
    print(run_id)
    return 0


@command("status", "a run's status, progress and error", run_id_arg)
def cmd_status(args: argparse.Namespace) -> int:
    run = open_store(args).get_run(args.run_id)
    print(f"run {run.id}: {run.name} [{run.status}]")
    where = ", ".join(f"{k} {v}" for k, v in (("executor", run.executor), ("host", run.host), ("pid", run.pid), ("ref", run.executor_ref)) if v)
    if where:
        print(where)
    if run.heartbeat_at and run.status in ("starting", "running", "cancelling"):
        print(f"last heartbeat {time.time() - run.heartbeat_at:.1f} s ago")
    if run.progress:
        from kd_core.engine.reporting import progress_line

        print(f"progress: {progress_line(run.progress)}")
    if run.error:
        print(f"error: {run.error}")
    if run.log_path:
        print(f"log: {run.log_path}")
    return 0


@command("cancel", "stop a run (a running one checkpoints first; `resume` continues it)", run_id_arg)
def cmd_cancel(args: argparse.Namespace) -> int:
    from kd_core.runner import cancel

    status = cancel(open_store(args), args.run_id)
    print(f"run {args.run_id}: {status}", file=sys.stderr)
    return 0


@command("resume", "queue a failed or cancelled run again; it continues from its last checkpoint", run_id_arg)
def cmd_resume(args: argparse.Namespace) -> int:
    from kd_core.runner import resume

    store = open_store(args)
    resume(store, args.run_id)
    print(f"run {args.run_id}: {store.get_run(args.run_id).status}", file=sys.stderr)
    return 0


def _logs_args(p: argparse.ArgumentParser) -> None:
    run_id_arg(p)
    p.add_argument("-n", "--tail", type=int, default=200, help="number of lines (default 200)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")


@command("logs", "print a run's worker log (stdout and stderr)", _logs_args)
def cmd_logs(args: argparse.Namespace) -> int:
    from kd_core.runner import ACTIVE_STATUSES, read_log, reconcile

    store = open_store(args)
    text = read_log(store, args.run_id, args.tail)
    print(text)
    while args.follow and store.get_run(args.run_id).status in ACTIVE_STATUSES:
        time.sleep(1.0)
        reconcile(store)
        # re-read a generous tail and print only what is new; a rotated/shorter log is printed whole
        new = read_log(store, args.run_id, 10_000)
        if new != text:
            print(new[len(text):].lstrip("\n") if new.startswith(text) else new, flush=True)
            text = new
    return 0


@command("supervise", "keep the queue moving without a dashboard: notice dead workers, start queued runs (Ctrl-C stops)")
def cmd_supervise(args: argparse.Namespace) -> int:
    from kd_core.runner.supervisor import Supervisor

    supervisor = Supervisor(open_store(args).url)
    print(f"supervising {open_store(args)!r} every {supervisor.interval:g} s (Ctrl-C stops)", file=sys.stderr)
    supervisor.start()
    try:
        while supervisor.is_alive():
            supervisor.join(1.0)
    except KeyboardInterrupt:
        supervisor.stop()
        supervisor.join(10)
    return 0


@command("work", "(internal) the background worker that trains one queued run", lambda p: p.add_argument("run_id", type=int))
def cmd_work(args: argparse.Namespace) -> int:
    from kd_core.runner.worker import main as work

    return work(args.run_id, args.db)


from kd_core import cli_catalog, cli_sweeps  # noqa: E402,F401 - register their commands after the core ones

OFFLINE_COMMANDS = ("work", "methods", "models", "rank-students")  # no queue involved (the worker reconciles itself when it ends)


def reconcile_first(args: argparse.Namespace) -> None:
    """Every CLI call brings the database up to date with reality first (dead workers, free slots)."""
    from kd_core.runner import reconcile

    store = open_store(args)  # StoreUnavailable goes up: there is nothing to answer without the database
    try:
        reconcile(store)
    except Exception as exc:  # noqa: BLE001 - e.g. Ray unreachable: still answer the question asked
        print(f"warning: could not reconcile runs: {exc.__class__.__name__}: {exc}", file=sys.stderr)


DB_HELP = "SQLAlchemy URL (default: $DISTILLERY_DB_URL or SQLite in ./distillery-data); before or after the command"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kd_core", description="Distillery: knowledge-distillation experiments")
    parser.add_argument("--db", default=None, help=DB_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, arguments, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        arguments(p)
        # also after the command (`run c.yaml --db URL`, as people type it); SUPPRESS keeps a --db given before it
        p.add_argument("--db", default=argparse.SUPPRESS, help=DB_HELP)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "work":
        return args.func(args)  # before any heavy import; see the module docstring
    try:
        if args.command not in OFFLINE_COMMANDS:
            reconcile_first(args)
        return args.func(args)
    except BrokenPipeError:  # `runs | head` closed the pipe: end quietly, like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyError as exc:  # unknown run id
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. resuming a completed run; ConfigError is a ValueError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
