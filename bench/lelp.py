"""LELP against KD and CE on the few-class tasks shipped with it (same data, teacher, student and epochs).

Tasks: ``configs/methods/mnist5k_lelp.yaml`` (even vs odd digits) and ``..._lelp_3class.yaml`` (digits mod 3).
Per task the teacher is trained once (the config's seed and schedule) and shared by every student. Per seed,
one run trains the LELP student and the CE-only baseline, a second one a KD student with the project's
default recipe (0.1 CE + 0.9 KD, T = 4). Within a seed the three students see the same validation hold-out and
start from the same initialisation; the seed changes both. Test images are never seen by the teacher, but for
seeds other than the teacher's, some of the students' validation images were in the teacher's training split.

Printed: test top-1 % (checkpoint chosen on validation) per seed, mean ± std over seeds, and the gains.
Results are kept in ``--out`` (JSON), so an interrupted run continues where it stopped.

Usage: ``.venv/bin/python bench/lelp.py [--seeds 0 1 2] [--tasks 2class 3class] [--student-epochs 8]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {"2class": ("2-class (even vs odd)", "configs/methods/mnist5k_lelp.yaml"),
         "3class": ("3-class (digit mod 3)", "configs/methods/mnist5k_lelp_3class.yaml")}
KD_RECIPE = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}]


def run(raw: dict, out: Path) -> dict:
    from kd_core.config import validate_config
    from kd_core.engine import run_experiment
    from kd_core.sink import MemorySink

    return run_experiment(validate_config(raw), MemorySink(), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--student-epochs", type=int, default=None, help="default: the shipped config's")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the shipped config's")
    parser.add_argument("--params", default=None, help="LELP params as YAML, e.g. '{subclasses: 5, beta: 0.5}' (default: the config's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: up to 4)")
    parser.add_argument("--out", default="bench_lelp.json")
    parser.add_argument("--work", default="bench_lelp_runs", help="folder for the runs' artifacts")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))
    out, work = Path(args.out), Path(args.work)
    state = json.loads(out.read_text()) if out.exists() else {}
    save = lambda: out.write_text(json.dumps(state, indent=1))
    for task in args.tasks:
        title, path = TASKS[task]
        base = yaml.safe_load((ROOT / path).read_text())
        base.update(device="cpu", analysis={"enabled": False})
        if args.student_epochs:
            base["student"]["epochs"] = args.student_epochs
        if args.teacher_epochs:
            base["teacher"]["epochs"] = args.teacher_epochs
        if args.params:
            base["method"]["params"] = yaml.safe_load(args.params)
        results = state.setdefault(task, {})
        teacher_file = work / task / "teacher" / "teacher.safetensors"
        if "teacher_acc" not in results or not teacher_file.exists():
            t0 = time.perf_counter()
            teacher_only = copy.deepcopy(base)  # trains the teacher (the config's seed); its 1-epoch student is not used
            teacher_only.update(recipe=KD_RECIPE, method=None, baseline=False)
            teacher_only["student"]["epochs"] = 1
            summary = run(teacher_only, teacher_file.parent)
            results.update(teacher_acc=summary["teacher_acc"], teacher_seed=base["seed"])
            save()
            print(f"{title}: teacher {summary['teacher_acc']:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
        for seed in args.seeds:
            if str(seed) in results.get("seeds", {}):
                continue
            t0 = time.perf_counter()
            shared = copy.deepcopy(base)
            shared["seed"] = seed
            shared["teacher"]["source"] = f"file:{teacher_file}"
            lelp = run(shared, work / task / f"lelp-{seed}")
            kd = run({**copy.deepcopy(shared), "recipe": KD_RECIPE, "method": None, "baseline": False}, work / task / f"kd-{seed}")
            accs = {"CE": lelp["baseline_acc"], "KD": kd["student_acc"], "LELP": lelp["student_acc"]}
            results.setdefault("seeds", {})[str(seed)] = accs
            save()
            print(f"{title} seed {seed}: " + "  ".join(f"{k} {v:.2f}" for k, v in accs.items()) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    print("\nstudent test top-1 % (best-on-val checkpoint), mean ± std over seeds; one teacher per task")
    print(f"{'task':<24} {'teacher':>7} {'seeds':>5} {'CE':>14} {'KD':>14} {'LELP':>14} {'KD-CE':>7} {'LELP-CE':>8} {'LELP-KD':>8}")
    for task in args.tasks:
        results = state.get(task, {})
        per_seed = [results["seeds"][str(s)] for s in args.seeds if str(s) in results.get("seeds", {})]
        if not per_seed:
            continue
        acc = {k: [r[k] for r in per_seed] for k in ("CE", "KD", "LELP")}
        mean = {k: statistics.mean(v) for k, v in acc.items()}

        def ms(v: list[float]) -> str:
            return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"

        print(f"{TASKS[task][0]:<24} {results['teacher_acc']:>7.2f} {len(per_seed):>5} {ms(acc['CE']):>14} {ms(acc['KD']):>14} "
              f"{ms(acc['LELP']):>14} {mean['KD'] - mean['CE']:>+7.2f} {mean['LELP'] - mean['CE']:>+8.2f} {mean['LELP'] - mean['KD']:>+8.2f}")


if __name__ == "__main__":
    main()
