"""How well does DisWOT's training-free ranking agree with real short KD runs?

Teacher and data: ``configs/mnist5k_kd.yaml`` (the default demo: cnn_small teacher, mnist5k). For each candidate
student, ``kd_core.diswot.rank_students`` scores it without training; then each candidate is trained briefly
with KD (the config's recipe: 0.1 CE + 0.9 KD at T = 4; the same epochs, batch size and optimizer for all,
one shared teacher trained once) and its test top-1 (checkpoint chosen on validation) is recorded. Printed:
the table and the Spearman (and Kendall) rank correlation between each score and the accuracy -- for the
DisWOT score, each of its two parts, the same with the trained teacher, and the parameter count as a naive
reference ("bigger is better").

Results are kept in ``--out`` (JSON) so an interrupted run continues where it stopped.

Usage: ``.venv/bin/python bench/diswot.py [--candidates cnn_tiny lenet5 ...] [--epochs 3] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CANDIDATES = ["cnn_tiny", "lenet5", "mlp", "resnet8", "wrn_16_1", "timm:mobilenetv3_small_100", "cnn_small"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist5k_kd.yaml")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--epochs", type=int, default=3, help="KD epochs per candidate (the same budget for all)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=10, help="DisWOT draws averaged")
    parser.add_argument("--out", default="bench_diswot.json")
    parser.add_argument("--work", default="bench_diswot_runs", help="folder for the short runs' artifacts")
    args = parser.parse_args()

    import torch
    from scipy.stats import kendalltau, spearmanr

    from kd_core.config import validate_config
    from kd_core.diswot import rank_students
    from kd_core.engine import run_experiment
    from kd_core.sink import MemorySink

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {}
    save = lambda: out.write_text(json.dumps(state, indent=1))
    base = yaml.safe_load((ROOT / args.config).read_text())
    base.update(device="cpu", baseline=False, analysis={"enabled": False})
    if args.teacher_epochs:
        base["teacher"]["epochs"] = args.teacher_epochs
    base["student"]["epochs"] = args.epochs
    work = Path(args.work)
    teacher_path = work / "teacher" / "teacher.safetensors"

    # 1. the training-free ranking (Gaussian teacher, as released): nothing trained
    key = f"diswot_gaussian_r{args.repeats}"
    if key not in state:
        t0 = time.perf_counter()
        ranking = rank_students(validate_config(base), args.candidates, repeats=args.repeats)
        state[key] = {"records": ranking.records(), "seconds": round(time.perf_counter() - t0, 1)}
        save()
        print(ranking.describe(), ranking.table(), f"({state[key]['seconds']} s)", sep="\n", flush=True)

    # 2. the short KD runs: teacher trained once, then every candidate with the same budget
    runs = state.setdefault("kd", {})
    for arch in args.candidates:
        if arch in runs:
            continue
        raw = copy.deepcopy(base)
        raw["student"]["arch"] = arch
        if teacher_path.exists():
            raw["teacher"]["source"] = f"file:{teacher_path}"
            folder = work / arch.replace(":", "_")
        else:
            folder = work / "teacher"
        t0 = time.perf_counter()
        summary = run_experiment(validate_config(raw), MemorySink(), folder)
        runs[arch] = {"student_acc": summary["student_acc"], "teacher_acc": summary.get("teacher_acc"), "params": summary["student_params"],
                      "seconds": round(time.perf_counter() - t0, 1)}
        save()
        print(f"KD {arch}: {summary['student_acc']:.2f} % ({runs[arch]['seconds']} s)", flush=True)

    # 3. the ranking against the trained teacher (a variant; the released code does not use trained weights)
    key_t = f"diswot_trained_r{args.repeats}"
    if key_t not in state:
        trained = copy.deepcopy(base)
        trained["teacher"]["source"] = f"file:{teacher_path}"
        state[key_t] = {"records": rank_students(validate_config(trained), args.candidates, repeats=args.repeats, teacher_init="trained").records()}
        save()

    acc = {a: runs[a]["student_acc"] for a in args.candidates}
    teacher_acc = next(r["teacher_acc"] for r in runs.values() if r.get("teacher_acc") is not None)
    gaussian = {r["arch"]: r for r in state[key]["records"]}
    trained = {r["arch"]: r for r in state[key_t]["records"]}
    order = sorted(args.candidates, key=lambda a: -acc[a])
    print(f"\nteacher {base['teacher']['arch']} ({teacher_acc:.2f} %), {args.epochs} KD epochs per student, DisWOT mean of {args.repeats} draws")
    print(f"{'student':<28} {'params':>9} {'relation':>10} {'semantic':>9} {'score':>9} {'DisWOT rank':>11} {'KD top-1 %':>10} {'KD rank':>7}")
    for a in order:
        g = gaussian[a]
        print(f"{a:<28} {g['params']:>9,} {g['relation']:>10.6f} {g['semantic']:>9.4f} {g['score']:>9.4f} {g['rank']:>11} {acc[a]:>10.2f} "
              f"{order.index(a) + 1:>7}")
    ys = [acc[a] for a in args.candidates]
    print(f"\nrank correlation with the KD accuracy over {len(ys)} candidates:")
    print(f"{'predictor':<44} {'Spearman':>8} {'Kendall':>8}")
    for name, values in [
        ("DisWOT score (Gaussian teacher, as released)", [gaussian[a]["score"] for a in args.candidates]),
        ("  relation part alone", [gaussian[a]["relation"] for a in args.candidates]),
        ("  semantic part alone", [gaussian[a]["semantic"] for a in args.candidates]),
        ("DisWOT score (trained teacher)", [trained[a]["score"] for a in args.candidates]),
        ("  relation part alone", [trained[a]["relation"] for a in args.candidates]),
        ("  semantic part alone", [trained[a]["semantic"] for a in args.candidates]),
        ("parameter count (reference)", [gaussian[a]["params"] for a in args.candidates]),
    ]:
        print(f"{name:<44} {spearmanr(values, ys).statistic:>+8.3f} {kendalltau(values, ys).statistic:>+8.3f}")


if __name__ == "__main__":
    main()
