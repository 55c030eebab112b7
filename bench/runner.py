"""Background-runner latency and overhead, on a throwaway SQLite database.

* submit -> ``running`` and submit -> first metric row, through the local executor (a detached worker);
* step time of the same tiny config trained in this process with a MemorySink vs through a worker with
  RunSink and heartbeats (the per-step interval from the metric rows' timestamps, so logging, progress,
  heartbeat and flush costs are all inside it).

    .venv/bin/python bench/runner.py [--repeats 3] [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config_dict(epochs: int) -> dict[str, Any]:
    return {
        "name": "bench-runner",
        "device": "cpu",
        "dataset": {"name": "synthetic", "val_fraction": 0.1},
        "teacher": {"arch": "cnn_tiny", "source": "random", "epochs": 0},
        "student": {"arch": "cnn_tiny", "epochs": epochs, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.003}},
        "recipe": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "params": {"temperature": 4}}],
        "baseline": False,
    }


def step_intervals_ms(times: list[float]) -> dict[str, float]:
    diffs = [1000 * (b - a) for a, b in zip(times, times[1:])]
    return {"median_ms": round(statistics.median(diffs), 2), "mean_ms": round(statistics.fmean(diffs), 2), "steps": len(times)}


def in_process(epochs: int) -> dict[str, float]:
    import torch

    from kd_core.config import validate_config
    from kd_core.sink import MemorySink
    from kd_core.engine import run_experiment

    torch.set_num_threads(1)  # the worker gets DISTILLERY_THREADS=1 below: same compute either way
    sink = MemorySink()
    with tempfile.TemporaryDirectory() as d:
        run_experiment(validate_config(config_dict(epochs)), sink, d)
    times = [r["time"] for r in sink.rows if r["key"] == "loss/total" and r["phase"] == "student"]
    return step_intervals_ms(times)


def through_worker(store: Any, epochs: int) -> dict[str, Any]:
    from kd_core.runner import reconcile, submit

    t0 = time.time()
    run_id = submit(store, config_dict(epochs))
    submitted = time.time() - t0
    running = first_metric = None
    while True:
        now = time.time()
        run = store.get_run(run_id)
        if running is None and run.status in ("running", "completed"):
            running = now - t0
        if first_metric is None and store.count_metrics(run_id) > 0:
            first_metric = now - t0
        if run.status in ("completed", "failed", "cancelled"):
            break
        reconcile(store)
        time.sleep(0.05)
    if run.status != "completed":
        raise RuntimeError(f"bench run {run_id} ended {run.status}: {run.error}")
    series = store.metric_series(run_id, "loss/total", "student")
    return {"submit_call_s": round(submitted, 3), "to_running_s": round(running or 0, 2), "to_first_metric_s": round(first_metric or 0, 2),
            "total_s": round(time.time() - t0, 2), **step_intervals_ms(series["time"].tolist())}


def worker_import_s() -> float:
    """What every worker pays before its first step: a fresh interpreter importing the engine."""
    import subprocess

    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import kd_core.engine"], check=True, cwd=Path(__file__).resolve().parents[1])
    return round(time.time() - t0, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-runner-"))
    os.environ.update(DISTILLERY_DB_URL=f"sqlite:///{tmp / 'db.sqlite'}", DISTILLERY_ARTIFACTS=str(tmp / "artifacts"),
                      DISTILLERY_SLOTS="1", DISTILLERY_THREADS="1", DISTILLERY_EXECUTOR="local")
    from storage import Store

    import kd_core.config  # noqa: F401 - a dashboard has it loaded; time the runner, not this import

    store = Store(None)
    load = os.getloadavg()[0]
    import_s = worker_import_s()
    worker, inproc = [], []
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits both sides alike
        worker.append(through_worker(store, args.epochs))
        inproc.append(in_process(args.epochs))
    result = {
        "cpu_count": os.cpu_count(),
        "loadavg_1min_at_start": round(load, 2),
        "fresh_python_import_kd_core_train_s": import_s,
        "worker": worker,
        "in_process": inproc,
        "summary": {
            "to_running_s_median": statistics.median(w["to_running_s"] for w in worker),
            "to_first_metric_s_median": statistics.median(w["to_first_metric_s"] for w in worker),
            "step_ms_median_worker": statistics.median(w["median_ms"] for w in worker),
            "step_ms_median_in_process": statistics.median(r["median_ms"] for r in inproc),
            "step_ms_mean_worker": statistics.median(w["mean_ms"] for w in worker),
            "step_ms_mean_in_process": statistics.median(r["mean_ms"] for r in inproc),
        },
    }
    s = result["summary"]
    s["overhead_pct_median"] = round(100 * (s["step_ms_median_worker"] / s["step_ms_median_in_process"] - 1), 1)
    s["overhead_pct_mean"] = round(100 * (s["step_ms_mean_worker"] / s["step_ms_mean_in_process"] - 1), 1)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    store.dispose()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
