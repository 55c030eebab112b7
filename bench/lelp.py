"""LELP against KD and CE on the few-class tasks shipped with it (same data, teacher, student and epochs).

For each task (``configs/methods/mnist5k_lelp.yaml``: even vs odd digits; ``..._lelp_3class.yaml``: digits
mod 3) and each seed, one run trains the teacher, the LELP student and the CE-only baseline; a second run
reuses that teacher (``file:``) for a KD student with the project's default recipe (0.1 CE + 0.9 KD, T = 4).
The seed fixes the validation hold-out and every initialisation, identically for the three students. Printed:
test top-1 % (checkpoint chosen on validation) per seed, mean ± std over seeds, and the gains.

Usage: ``.venv/bin/python bench/lelp.py [--seeds 0 1 2] [--student-epochs 8] [--teacher-epochs 10]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {"2-class (even vs odd)": "configs/methods/mnist5k_lelp.yaml", "3-class (digit mod 3)": "configs/methods/mnist5k_lelp_3class.yaml"}
KD_RECIPE = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}]


def run(raw: dict, out: Path) -> dict:
    from kd_core.config import validate_config
    from kd_core.engine import run_experiment
    from kd_core.sink import MemorySink

    return run_experiment(validate_config(raw), MemorySink(), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--student-epochs", type=int, default=None, help="default: the shipped config's")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the shipped config's")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--params", default=None, help="LELP params as YAML, e.g. '{subclasses: 5, beta: 0.5}' (default: the config's)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results: dict[str, dict[str, list[float]]] = {}
    teacher_acc: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            base = yaml.safe_load((ROOT / TASKS[task]).read_text())
            base.update(device="cpu", analysis={"enabled": False})
            if args.student_epochs:
                base["student"]["epochs"] = args.student_epochs
            if args.teacher_epochs:
                base["teacher"]["epochs"] = args.teacher_epochs
            if args.params:
                base["method"]["params"] = yaml.safe_load(args.params)
            results[task] = {"CE": [], "KD": [], "LELP": []}
            teacher_acc[task] = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                lelp_dir = Path(tmp) / f"{task[0]}-lelp-{seed}"
                summary = run({**copy.deepcopy(base), "seed": seed}, lelp_dir)
                kd = copy.deepcopy(base)
                kd.update(seed=seed, recipe=KD_RECIPE, method=None, baseline=False)
                kd["teacher"]["source"] = f"file:{lelp_dir / 'teacher.safetensors'}"
                kd_summary = run(kd, Path(tmp) / f"{task[0]}-kd-{seed}")
                results[task]["CE"].append(summary["baseline_acc"])
                results[task]["KD"].append(kd_summary["student_acc"])
                results[task]["LELP"].append(summary["student_acc"])
                teacher_acc[task].append(summary["teacher_acc"])
                print(f"{task} seed {seed}: teacher {summary['teacher_acc']:.2f}  CE {summary['baseline_acc']:.2f}  "
                      f"KD {kd_summary['student_acc']:.2f}  LELP {summary['student_acc']:.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nstudent test top-1 % (best-on-val checkpoint), mean ± std over seeds {args.seeds}")
    print(f"{'task':<24} {'teacher':>14} {'CE':>14} {'KD':>14} {'LELP':>14} {'KD-CE':>7} {'LELP-CE':>8} {'LELP-KD':>8}")
    for task, accs in results.items():
        def ms(v: list[float]) -> str:
            return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"

        mean = {k: statistics.mean(v) for k, v in accs.items()}
        print(f"{task:<24} {ms(teacher_acc[task]):>14} {ms(accs['CE']):>14} {ms(accs['KD']):>14} {ms(accs['LELP']):>14} "
              f"{mean['KD'] - mean['CE']:>+7.2f} {mean['LELP'] - mean['CE']:>+8.2f} {mean['LELP'] - mean['KD']:>+8.2f}")


if __name__ == "__main__":
    main()
