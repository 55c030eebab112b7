"""GPU readiness: kd_core against a plain hand-written KD loop on CIFAR-100-shaped data, each knob on and off.

    .venv/bin/python bench/gpu.py                 # resnet32x4 -> resnet8x4, 50k images, 2 epochs, on the GPU
    .venv/bin/python bench/gpu.py --tiny          # cnn_small -> cnn_tiny, 512 images, 1 epoch (CPU, seconds)

The data are random uint8 images of CIFAR-100's shape (3×32×32, 100 classes), registered as the dataset
``cifar100_shaped`` for this process only: speed does not depend on what the pixels show. The plain loop
holds the images as a float32 tensor on the device, runs the teacher under no_grad every step, in fp32,
with no logging or checkpoints. kd_core runs the same KD (and DKD) recipe with its defaults, then with one
knob changed at a time: precision, channels_last, compile, teacher caching. Images/s are measured after the
first epoch's first step (compilation and warm-up excluded), from the timestamps of kd_core's own metric rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import torch

from kd_core.config import validate_config
from kd_core.data.registry import DATASETS, DatasetInfo, RawImages
from kd_core.engine import run_experiment
from kd_core.sink import MemorySink
from throughput import plain_loop  # noqa: E402 - bench/ is on the path when run as a script

RECIPES = {
    "KD": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}],
    "DKD": [{"loss": "ce", "weight": 1.0}, {"loss": "dkd", "weight": 1.0}],
}


def register_cifar100_shaped(train: int, test: int) -> None:
    def load(root: str, image_size: int | None) -> RawImages:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(train + test, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 100, size=train + test)
        return RawImages(x[:train], y[:train], x[train:], y[train:], [f"c{i}" for i in range(100)])

    DATASETS["cifar100_shaped"] = DatasetInfo("cifar100_shaped", load, 100, 3, 32, True, True, "random CIFAR-100-shaped images (bench)")


def config(args: argparse.Namespace, recipe: str, **knobs: object) -> dict:
    model = {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": {"lr": 0.05}, "scheduler": "none"}
    return {"name": "gpu-bench", "device": args.device, "dataset": {"name": "cifar100_shaped", "val_fraction": 0.0},
            "teacher": {"arch": args.teacher, "source": "random", "epochs": 0}, "student": {"arch": args.student, **model},
            "recipe": RECIPES[recipe], "baseline": False, "checkpoint_every_s": 3600, "analysis": {"enabled": False}, **knobs}


def plain_loop_rate(args: argparse.Namespace) -> tuple[float, float]:
    """(images/s, seconds per epoch) of the hand-written loop of bench/throughput.py: fp32, teacher every step, no logging."""
    rate = plain_loop(argparse.Namespace(**vars(args), dataset="cifar100_shaped"))
    return rate, args.train / rate


def kd_core_rate(args: argparse.Namespace, recipe: str, **knobs: object) -> tuple[float, float]:
    """(images/s, seconds per epoch) of kd_core's student phase, from its per-step metric timestamps."""
    cfg = validate_config(config(args, recipe, **knobs))
    sink = MemorySink()
    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(cfg, sink, Path(tmp))
    by_epoch: dict[int, list[float]] = {}
    for r in sink.rows:
        if r["key"] == "loss/total" and r["phase"] == "student":
            by_epoch.setdefault(r["epoch"], []).append(r["time"])
    # within each epoch, from its first step on: evaluation between epochs and the first step's warm-up excluded
    images = sum((len(t) - 1) * args.batch_size for t in by_epoch.values())
    rate = images / sum(max(t) - min(t) for t in by_epoch.values())
    return rate, args.train / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="cnn_small -> cnn_tiny on 512 images, 1 epoch: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=50_000)
    args = parser.parse_args()
    args.teacher, args.student = ("cnn_small", "cnn_tiny") if args.tiny else ("resnet32x4", "resnet8x4")
    if args.tiny:
        args.train, args.epochs, args.batch_size = 512, 1, 64
    register_cifar100_shaped(args.train, 256)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.teacher} -> {args.student}, CIFAR-100-shaped {args.train} images, batch {args.batch_size}, {args.epochs} epochs, {device}")
    rows = {"plain PyTorch KD loop, fp32 (baseline)": plain_loop_rate(args)}
    for recipe in RECIPES:
        rows[f"kd_core {recipe}, defaults"] = kd_core_rate(args, recipe)
    rows["kd_core KD, precision fp32"] = kd_core_rate(args, "KD", precision="fp32")
    rows["kd_core KD, precision bf16"] = kd_core_rate(args, "KD", precision="bf16")
    rows["kd_core KD, channels_last on"] = kd_core_rate(args, "KD", channels_last=True)
    rows["kd_core KD, channels_last off"] = kd_core_rate(args, "KD", channels_last=False)
    rows["kd_core KD, teacher every step (cache off)"] = kd_core_rate(args, "KD", cache_teacher=False)
    rows["kd_core KD, compile on"] = kd_core_rate(args, "KD", compile=True)
    base = rows["plain PyTorch KD loop, fp32 (baseline)"][0]
    width = max(map(len, rows))
    print(f"{'':{width}}  {'images/s':>10}  {'s/epoch':>8}  {'× plain':>8}")
    for name, (rate, epoch_s) in rows.items():
        print(f"{name:{width}}  {rate:10.0f}  {epoch_s:8.2f}  {rate / base:8.2f}")


if __name__ == "__main__":
    main()
