"""A sweep against the same runs launched one by one: wall time, trainings, and the sweep's answer.

    .venv/bin/python bench/sweep.py [--config configs/sweeps/mnist5k_temperature.yaml] [--db /tmp/bench-sweep.db]

1. *Sweep*: ``python -m kd_core sweep CONFIG`` (the teacher trained once, the CE baseline once per seed, every
   student reusing them), waited for until every run has ended.
2. *One by one*: every cell of the same grid as its own run (``python -m kd_core submit``), each training its
   own teacher and baseline, as a user clicking Launch once per cell gets.

Both go through the local executor with the same number of slots (``DISTILLERY_SLOTS``, default 1 here) and
the same database. Printed: wall time of each, their ratio, the phases trained (counted in the database), and
the sweep's table (student accuracy and KD gain, mean ± std and 95 % interval over seeds per swept value).
The database is kept (``--db``) so the Sweeps page can show the result afterwards
(``DISTILLERY_DB_URL=sqlite:///<db> make run``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "kd_core", *args], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def wait_all(store, ids: list[int]) -> float:
    """Seconds until every run in ``ids`` has ended (polled every second)."""
    t0 = time.perf_counter()
    while any(store.get_run(i).status not in ("completed", "failed", "cancelled") for i in ids):
        time.sleep(1.0)
    return time.perf_counter() - t0


def trained_phases(store, ids: list[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in ids:
        for phase in {p for p, k in store.metric_keys(i) if k == "loss/total"}:
            role = phase.split("_")[0]
            counts[role] = counts.get(role, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sweeps" / "mnist5k_temperature.yaml"))
    parser.add_argument("--db", default="/tmp/bench-sweep.db")
    args = parser.parse_args()
    from kd_core.sweeps import plan_sweep, sweep_runs, sweep_summary
    from storage import Store

    home = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    env = {**os.environ, "DISTILLERY_DB_URL": f"sqlite:///{args.db}", "DISTILLERY_HOME": str(home),
           "DISTILLERY_ARTIFACTS": str(home / "artifacts"), "DISTILLERY_EXECUTOR": "local",
           "DISTILLERY_SLOTS": os.environ.get("DISTILLERY_SLOTS", "1")}
    raw = yaml.safe_load(Path(args.config).read_text())
    store = Store(env["DISTILLERY_DB_URL"])

    t0 = time.perf_counter()
    sweep_id = int(cli(env, "sweep", args.config))
    sweep_ids = [r.id for r in store.list_runs(sweep_id=sweep_id)]
    wait_all(store, sweep_ids)
    sweep_wall = time.perf_counter() - t0

    cells = plan_sweep(raw).cells
    t0 = time.perf_counter()
    single_ids = []
    for cell in cells:  # what a user launching each cell from the form gets: its own teacher and baseline
        config = cell.config.model_dump(mode="json")
        config["teacher"]["source"], config["baseline"] = raw["teacher"].get("source", "train"), bool(raw.get("baseline"))
        path = home / f"cell{len(single_ids)}.yaml"
        path.write_text(yaml.safe_dump(config))
        single_ids.append(int(cli(env, "submit", str(path))))
    wait_all(store, single_ids)
    single_wall = time.perf_counter() - t0

    failed = [i for i in sweep_ids + single_ids if store.get_run(i).status != "completed"]
    print(f"config {Path(args.config).name}: {len(cells)} cells, slots {env['DISTILLERY_SLOTS']}, "
          f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs" + (f"; NOT completed: runs {failed}" if failed else ""))
    print("\n| launched as | runs | trainings (teacher / student / baseline) | wall |\n|---|---:|---|---:|")
    for label, ids, wall in (("one sweep", sweep_ids, sweep_wall), ("one run per cell", single_ids, single_wall)):
        c = trained_phases(store, ids)
        print(f"| {label} | {len(ids)} | {c.get('teacher', 0)} / {c.get('student', 0)} / {c.get('baseline', 0)} | "
              f"{wall / 60:.1f} min |")
    print(f"\nthe sweep took {sweep_wall / single_wall:.2f}× the wall time of the same cells launched one by one\n")
    axes = [a for a in raw["sweep"] if a != "seed"]
    table = sweep_summary(sweep_runs(store, sweep_id), axes)
    cols = [c for c in table.columns if c in axes or c.startswith(("student_acc", "kd_gain", "baseline_acc")) or c == "runs"]
    print(table[cols].round(2).to_string(index=False))
    print(f"\nsweep id {sweep_id} in {args.db}")
    store.dispose()


if __name__ == "__main__":
    main()
