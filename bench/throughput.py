"""Training throughput of kd_core against a plain hand-written PyTorch KD loop, measured in one run.

    .venv/bin/python bench/throughput.py [--epochs 3] [--teacher cnn_small] [--student cnn_tiny] [--device cpu]

Prints images/s of: the plain loop (teacher under no_grad every step + student + KD), kd_core's KD step
with and without teacher-output caching, student-alone CE training, and kd_core with metrics going to a
real SQLite database instead of memory (the cost of logging). Ratios are against the plain loop.
kd_core figures come from the timestamps of its own per-step metric rows, within each epoch (the evaluation and
checkpoint between epochs excluded); the plain loop is timed the same way, from each epoch's first step to its last.

Then augmented KD (``dataset.augment: true``, where the in-memory cache cannot be used): the teacher live every
step (``soft_labels.store: false``), the first run that writes the soft-label store, and a second run that reads
it; images/s and the student's test accuracy of each, same seed (full logits: the accuracies must agree within
0.3 points; they are bit-identical). The same with a top-k store on a generated 200-class image folder (top-k
applies only above 100 classes), ratios against that set's own live run. The teacher trains max(epochs, 4) epochs.
These cases also report images per CPU-second of the process and run on one thread (``--soft-label-threads``).
"""

from __future__ import annotations

import argparse
import os
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
from kd_core.engine import Callback, PhaseRun, run_experiment
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
    """Images per second of the student's training steps: within each epoch, from its first to its last logged
    step, summed over epochs (the evaluation and checkpoint between epochs are left out: the plain loop has neither)."""
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        if r["key"] == "loss/total" and r["phase"] == "student":
            by_epoch.setdefault(r["epoch"], []).append(r["time"])
    last_batch = n_train % batch_size or batch_size
    images = seconds = 0.0
    for times in by_epoch.values():
        if len(times) > 1:
            images += (len(times) - 2) * batch_size + last_batch  # the steps after the first; the last may be short
            seconds += max(times) - min(times)
    return images / seconds if seconds > 0 else float("nan")


def plain_loop(args: argparse.Namespace) -> float:
    """The baseline: what one would write by hand, with no logging, caching or checkpoints."""
    data = load_dataset(args.dataset, val_fraction=0.0, device=args.device)
    train_x = data.train_x[:]  # float32, normalized once: how a hand-written loop holds a small dataset
    torch.manual_seed(0)
    teacher = create_model(args.teacher, data.num_classes, data.in_channels, data.image_size).to(args.device).eval()
    student = create_model(args.student, data.num_classes, data.in_channels, data.image_size).to(args.device)
    cfg = validate_config(config(args, KD_RECIPE, True)).student
    optimizer = make_optimizer(list(student.parameters()), cfg)
    images, seconds, start = 0, 0.0, None
    for epoch in range(args.epochs):
        for idx in batch_indices(len(data.train_y), args.batch_size, shuffle=True, seed=0, epoch=epoch):
            idx = idx.to(train_x.device)
            x, y = train_x[idx], data.train_y[idx]
            with torch.no_grad():
                t_logits = teacher(x)
            logits = student(x)
            loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * kd_loss(logits, t_logits, 4.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if start is None:  # time from the end of each epoch's first step, like the kd_core figures
                sync(args.device)
                start = time.perf_counter()
            else:
                images += len(idx)
        sync(args.device)
        seconds += time.perf_counter() - start
        start = None
    return images / seconds


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so wall time covers it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


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


class CpuClock(Callback):
    """This process's CPU time at the student's first and last step: a neighbour's load on a shared machine slows
    the wall clock, much less the CPU-seconds a run itself spends."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] = (0.0, 0)
        self.images = 0

    def on_step(self, run: PhaseRun, idx: torch.Tensor) -> None:
        if run.phase.name == "student":
            self.images += len(idx)
            self.last = (time.process_time(), self.images)
            self.first = self.first or self.last

    def images_per_cpu_s(self) -> float:
        assert self.first is not None
        return (self.last[1] - self.first[1]) / max(self.last[0] - self.first[0], 1e-9)


def augmented_run(args: argparse.Namespace, case: dict, teacher: dict, soft_labels: dict, out: Path) -> tuple[float, float, dict]:
    """images/s (wall), images per CPU-second of the student phase and the summary of one augmented KD run."""
    raw = config(args, KD_RECIPE, True)
    raw.update(dataset={**case["dataset"], "augment": True}, teacher=teacher, soft_labels=soft_labels)
    raw["student"].update(arch=case["student"], epochs=case["epochs"])
    cfg, sink, clock = validate_config(raw), MemorySink(), CpuClock()
    summary = run_experiment(cfg, sink, out, callbacks=[clock])
    d = cfg.dataset
    n_train = len(load_dataset(d.name, d.root, val_fraction=d.val_fraction, image_size=d.image_size, seed=cfg.seed).train_y)
    return kd_core_images_per_s(sink.rows, args.batch_size, n_train), clock.images_per_cpu_s(), summary


def soft_label_case(args: argparse.Namespace, case: dict, top_k: int | None) -> dict[str, tuple[float, float, float]]:
    """(images/s, images/CPU-s, student test accuracy) of augmented KD: teacher live, writing the store, reading it.

    Same seed throughout. The teacher is trained in the first live run and loaded from its file by the others
    (same weights, same key). Live and read runs are each measured twice, interleaved, and the faster kept.
    """
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DISTILLERY_SOFT_LABELS"] = str(Path(tmp) / "soft_labels")  # an empty store: the first run writes it
        trained = {"arch": args.teacher, "epochs": max(args.epochs, 4), "batch_size": args.batch_size, "optimizer": {"lr": 0.05}}
        live = [augmented_run(args, case, trained, {"store": False}, Path(tmp) / "live")]
        from_file = {"arch": args.teacher, "source": f"file:{Path(tmp) / 'live' / 'teacher.safetensors'}", "epochs": 0}
        store = {"store": True, "top_k": top_k}
        written = augmented_run(args, case, from_file, store, Path(tmp) / "write")
        read = [augmented_run(args, case, from_file, store, Path(tmp) / "read")]
        live.append(augmented_run(args, case, from_file, {"store": False}, Path(tmp) / "live_again"))
        read.append(augmented_run(args, case, from_file, store, Path(tmp) / "read_again"))
    assert all(r[2]["teacher_outputs"] == "stored" for r in read), read[0][2].get("teacher_outputs_store")
    assert live[0][2]["student_acc"] == live[1][2]["student_acc"] and read[0][2]["student_acc"] == read[1][2]["student_acc"]
    print(f"  (teacher test accuracy {live[0][2]['teacher_acc']:.2f} %; student {case['student']}, {case['epochs']} epochs)")

    def best(runs: list[tuple[float, float, dict]]) -> tuple[float, float, float]:
        return max(r[0] for r in runs), max(r[1] for r in runs), runs[0][2]["student_acc"]

    return {"teacher live every step (store off)": best(live), "live, writing the soft-label store": best([written]),
            "soft labels read from the store": best(read)}


def many_class_folder(root: Path, classes: int = 200, per_class: int = 30, size: int = 16) -> Path:
    """A generated image folder with more than 100 classes (class templates plus noise, like ``synthetic``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1234)
    for c in range(classes):
        template = rng.uniform(0, 255, (size, size, 3))
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = 0.75 * template + 0.25 * rng.uniform(0, 255, (size, size, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"c{c:03d}" / f"{i}.png")
    return root


def print_soft_labels(title: str, case: dict[str, tuple[float, float, float]]) -> None:
    base_ips, base_cpu, base_acc = case["teacher live every step (store off)"]
    width = max(map(len, case))
    print(f"\n{title}")
    print(f"{'':{width}}  {'images/s':>10}  {'× live':>8}  {'images/CPU-s':>12}  {'× live':>8}  {'student %':>9}")
    for name, (ips, cpu, acc) in case.items():
        print(f"{name:{width}}  {ips:10.0f}  {ips / base_ips:8.2f}  {cpu:12.0f}  {cpu / base_cpu:8.2f}  {acc:9.2f}")
    diff = case["soft labels read from the store"][2] - base_acc
    print(f"student accuracy, store vs live: {diff:+.2f} points ({'within' if abs(diff) <= 0.3 else 'OUTSIDE'} 0.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--teacher", default="cnn_small")
    parser.add_argument("--student", default="cnn_tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top-k", type=int, default=10, help="top-k of the soft-label case on the generated 200-class set")
    parser.add_argument("--soft-label-threads", type=int, default=1, help="torch threads of the soft-label cases")
    parser.add_argument("--soft-labels-only", action="store_true", help="only the augmented KD live vs stored soft labels case")
    args = parser.parse_args()
    print(f"{args.teacher} -> {args.student} on {args.dataset}, batch {args.batch_size}, {args.epochs} epochs, {args.device}, {torch.get_num_threads()} threads")

    if not args.soft_labels_only:
        main_cases(args)
    # one thread here: on a shared machine OpenMP's spin-waits bill a neighbour's load to whichever run is measured
    threads = torch.get_num_threads()
    torch.set_num_threads(args.soft_label_threads)
    print(f"\nsoft-label cases: {args.soft_label_threads} thread(s); live and read runs measured twice, the faster kept")
    case = {"dataset": {"name": args.dataset, "val_fraction": 0.0}, "student": args.student, "epochs": args.epochs}
    print_soft_labels(f"augmented KD on {args.dataset}: live teacher vs stored soft labels (full float32 logits)",
                      soft_label_case(args, case, None))
    with tempfile.TemporaryDirectory() as images:
        folder = {"name": "imagefolder", "root": str(many_class_folder(Path(images))), "val_fraction": 0.0, "image_size": 16}
        # cnn_tiny's 8-wide embedding cannot separate 200 classes: the student here is cnn_small, trained longer
        case = {"dataset": folder, "student": "cnn_small", "epochs": max(args.epochs, 4)}
        print_soft_labels(f"augmented KD on a generated 200-class folder: live teacher vs stored top-{args.top_k} probabilities",
                          soft_label_case(args, case, args.top_k))
    torch.set_num_threads(threads)


def main_cases(args: argparse.Namespace) -> None:
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
