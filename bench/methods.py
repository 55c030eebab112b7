"""Every shipped training method against the plain KD recipe and the CE baseline, on the configs as shipped.

For each shipped mnist5k config that sets a ``method:`` (``configs/methods/`` and the cross-family OFA pairs
in ``configs/``; plus ``configs/mnist5k_kd.yaml``, the plain KD recipe, as the reference row) one run trains
what the config says: its teacher(s), the student with the method, and the CE-only baseline of the same
student. A second run is the ablation "same config, no method": the method removed and the config's recipe
kept (or, for a method that has no distillation term of its own, the default recipe 0.1 CE + 0.9 KD at T = 4),
so the same seed trains the same teacher and the same baseline. The analysis views are switched off (they
are not part of a method's cost). Printed per config: teacher, student with the method, the same student
with plain KD, the CE baseline (test top-1 %, checkpoint chosen on the validation split), the gains in
points and the measured training time of the method's run. Results are kept in ``--out`` (JSON), so an
interrupted run continues where it stopped.

One seed per config: the gains of a single seed carry about ±1.5 points of seed noise on mnist5k (see the
README's preset numbers); ``--seeds 0 1 2`` prints the mean over seeds.

Usage: ``.venv/bin/python bench/methods.py [--only dho ofa] [--seeds 0] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REFERENCE = ("kd (plain recipe)", ROOT / "configs" / "mnist5k_kd.yaml")
DEFAULT_KD_RECIPE = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}]
NO_METHOD = "no-method"


def shipped_method_configs() -> dict[str, Path]:
    """Name -> config for every shipped mnist5k config that sets a method, plus the plain-KD reference."""
    found = {REFERENCE[0]: REFERENCE[1]}
    for path in sorted([*(ROOT / "configs" / "methods").glob("mnist5k_*.yaml"), *(ROOT / "configs").glob("mnist5k_*.yaml")]):
        if (yaml.safe_load(path.read_text()) or {}).get("method"):
            found[path.stem.removeprefix("mnist5k_")] = path
    return found


def without_method(raw: dict) -> dict:
    """The ablation: the same config with the method removed and a distillation recipe kept or added."""
    raw = {k: v for k, v in raw.items() if k not in ("method", "teachers")}
    if not any(term.get("loss") != "ce" for term in raw.get("recipe") or []):
        raw["recipe"] = DEFAULT_KD_RECIPE
    return raw


def train(path: Path, seed: int, variant: str) -> dict:
    from kd_core.config import validate_config
    from kd_core.engine import run_experiment
    from kd_core.sink import MemorySink

    raw = yaml.safe_load(path.read_text())
    if variant == NO_METHOD:
        raw = without_method(raw)
    raw.update(seed=seed, device="cpu", analysis={"enabled": False}, baseline=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = run_experiment(validate_config(raw), MemorySink(), Path(out))
    return {**{k: summary.get(k) for k in ("teacher_acc", "student_acc", "baseline_acc", "kd_gain", "trained_s")},
            "wall_s": round(time.perf_counter() - t0, 1)}


def mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configs = shipped_method_configs()
    parser.add_argument("--only", nargs="+", choices=list(configs), default=list(configs))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_methods.json")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {}
    for name in args.only:
        for seed in args.seeds:
            for variant in ("method", NO_METHOD) if name != REFERENCE[0] else ("method",):
                key = f"{name}/seed{seed}" + ("" if variant == "method" else f"/{variant}")
                if key not in state:
                    print(f"training {key} ...", file=sys.stderr, flush=True)
                    state[key] = train(configs[name], seed, variant)
                    out.write_text(json.dumps(state, indent=1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seeds {args.seeds}; test top-1 %\n")
    print("| method | config | teacher | student (method) | student (no method) | CE baseline | method − CE | "
          "method − no method | trained (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.only:
        rows = [state[f"{name}/seed{s}"] for s in args.seeds if f"{name}/seed{s}" in state]
        plain = [state[f"{name}/seed{s}/{NO_METHOD}"] for s in args.seeds if f"{name}/seed{s}/{NO_METHOD}" in state]
        col = {k: mean([r[k] for r in rows]) for k in ("teacher_acc", "student_acc", "baseline_acc", "kd_gain", "trained_s")}
        kd = mean([r["student_acc"] for r in plain])
        vs_kd = None if kd is None or col["student_acc"] is None else col["student_acc"] - kd
        print(f"| {name} | {configs[name].relative_to(ROOT)} | {fmt(col['teacher_acc'], '.2f')} | {fmt(col['student_acc'], '.2f')} | "
              f"{fmt(kd, '.2f')} | {fmt(col['baseline_acc'], '.2f')} | {fmt(col['kd_gain'], '+.2f')} | {fmt(vs_kd, '+.2f')} | "
              f"{fmt(col['trained_s'], '.0f')} |")


if __name__ == "__main__":
    main()
