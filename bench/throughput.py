"""Training throughput of kd_core against a plain hand-written PyTorch KD loop, measured in one run.

    .venv/bin/python bench/throughput.py [--epochs 3] [--teacher cnn_small] [--student cnn_tiny] [--device cpu]

Prints images/s of: the plain loop (teacher under no_grad every step + student + KD), kd_core's KD step
with and without teacher-output caching, student-alone CE training, and kd_core with metrics going to a
real SQLite database instead of memory (the cost of logging). Ratios are against the plain loop.
kd_core figures come from the timestamps of its own per-step metric rows (evaluation excluded).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import torch.nn.functional as F

from kd_core.config import validate_config
from kd_core.data import batch_indices, load_dataset
from kd_core.losses import kd_loss
from kd_core.models import create_model
from kd_core.sink import MemorySink
from kd_core.engine import run_experiment
from kd_core.engine.optim import make_optimizer
from storage import RunSink, Store


def config(args: argparse.Namespace, recipe: list[dict], cache: bool) -> dict:
    model = {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": {"lr": 0.05}, "scheduler": "none"}
    return {
        "name": "bench",
        "device": args.device,
        "dataset": {"name": args.dataset, "val_fraction": 0.0},
        "teacher": {"arch": args.teacher, "source": "random", "epochs": 0},
        "student": {"arch": args.student, **model},
        "recipe": recipe,
        "baseline": False,
        "cache_teacher": cache,
        "checkpoint_every_s": 3600,
    }


KD_RECIPE = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}]


def kd_core_images_per_s(rows: list[dict], batch_size: int, n_train: int) -> float:
    """Images per second between the first and the last logged step of the student phase."""
    times = sorted(r["time"] for r in rows if r["key"] == "loss/total" and r["phase"] == "student")
    steps = len(times) - 1
    last_batch = n_train % batch_size or batch_size
    return (steps * batch_size - batch_size + last_batch) / (times[-1] - times[0]) if steps > 0 else float("nan")


def plain_loop(args: argparse.Namespace) -> float:
    """The baseline: what one would write by hand, with no logging, caching or checkpoints."""
    data = load_dataset(args.dataset, val_fraction=0.0, device=args.device)
    train_x = data.train_x[:]  # float32, normalized once: how a hand-written loop holds a small dataset
    torch.manual_seed(0)
    teacher = create_model(args.teacher, data.num_classes, data.in_channels, data.image_size).to(args.device).eval()
    student = create_model(args.student, data.num_classes, data.in_channels, data.image_size).to(args.device)
    cfg = validate_config(config(args, KD_RECIPE, True)).student
    optimizer = make_optimizer(list(student.parameters()), cfg)
    images, start = 0, None
    for epoch in range(args.epochs):
        for idx in batch_indices(len(data.train_y), args.batch_size, shuffle=True, seed=0, epoch=epoch):
            x, y = train_x[idx], data.train_y[idx]
            with torch.no_grad():
                t_logits = teacher(x)
            logits = student(x)
            loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * kd_loss(logits, t_logits, 4.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if start is None:  # time from the end of the first step, like the kd_core figures
                start = time.perf_counter()
            else:
                images += len(idx)
    return images / (time.perf_counter() - start)


def measure(args: argparse.Namespace, recipe: list[dict], cache: bool, sink_kind: str) -> float:
    cfg = validate_config(config(args, recipe, cache))
    with tempfile.TemporaryDirectory() as tmp:
        if sink_kind == "sqlite":
            store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
            run_id = store.create_run("bench", cfg.model_dump(mode="json"))
            run_experiment(cfg, RunSink(store, run_id), Path(tmp) / "run")
            rows = store.metrics_frame(run_id).to_dict("records")
            store.dispose()
        else:
            sink = MemorySink()
            run_experiment(cfg, sink, Path(tmp) / "run")
            rows = sink.rows
    n_train = len(load_dataset(args.dataset, val_fraction=0.0).train_y)
    return kd_core_images_per_s(rows, args.batch_size, n_train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--teacher", default="cnn_small")
    parser.add_argument("--student", default="cnn_tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"{args.teacher} -> {args.student} on {args.dataset}, batch {args.batch_size}, {args.epochs} epochs, {args.device}, {torch.get_num_threads()} threads")

    results = {"plain PyTorch KD loop (baseline)": plain_loop(args)}
    results["kd_core KD, teacher cached"] = measure(args, KD_RECIPE, True, "memory")
    results["kd_core KD, teacher every step"] = measure(args, KD_RECIPE, False, "memory")
    results["kd_core student alone (CE)"] = measure(args, [{"loss": "ce"}], True, "memory")
    results["kd_core KD cached, metrics to SQLite"] = measure(args, KD_RECIPE, True, "sqlite")

    base = results["plain PyTorch KD loop (baseline)"]
    width = max(map(len, results))
    print(f"{'':{width}}  {'images/s':>10}  {'× plain':>8}")
    for name, value in results.items():
        print(f"{name:{width}}  {value:10.0f}  {value / base:8.2f}")
    logging_cost = 1 - results["kd_core KD cached, metrics to SQLite"] / results["kd_core KD, teacher cached"]
    print(f"cost of metric logging to SQLite (vs memory): {100 * logging_cost:.1f} % of throughput")


if __name__ == "__main__":
    main()
