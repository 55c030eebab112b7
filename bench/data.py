"""Data paths: memory and speed of resident uint8 images and of image files streamed by worker processes.

    .venv/bin/python bench/data.py [--sizes 1000 10000 50000] [--image-size 32] [--workers N] [--batch-size 256]

1. Resident: one epoch of augmented training batches of mnist5k built from uint8 images normalized per batch
   (what the engine does now) against gathering from a float32 tensor normalized up front (what it did
   before, and what a hand-written loop does), with the bytes each keeps.
2. Streaming: for each size, that many generated PNGs in class folders (written once under the temp folder),
   one augmented epoch through ``dataset.loader: streaming`` in a fresh process; prints images/s and the
   peak memory of the process and its workers together (proportional set size, so pages the workers share
   with their parent count once). The same folder loaded resident is printed next to it: that one grows
   with the number of images, streaming should not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import torch

from kd_core.data import augment_batch, augmentation_generator, batch_indices, load_dataset


def resident_epoch(epochs: int = 3, batch_size: int = 64) -> None:
    data = load_dataset("mnist5k", val_fraction=0.0, loader="resident")
    before = data.train_x[:]  # float32, normalized up front
    n = len(data.train_y)

    def run(gather) -> float:
        start = time.perf_counter()
        for epoch in range(epochs):
            for b, idx in enumerate(batch_indices(n, batch_size, shuffle=True, seed=0, epoch=epoch)):
                augment_batch(gather(idx), flip=False, generator=augmentation_generator(0, epoch, b))
        return epochs * n / (time.perf_counter() - start)

    run(lambda idx: before[idx])  # warm-up
    # best of 5, interleaved: a shared machine disturbs each pass differently
    rates = [(run(lambda idx: before[idx]), run(lambda idx: data.train_x[idx])) for _ in range(5)]
    float_rate, uint8_rate = max(r[0] for r in rates), max(r[1] for r in rates)
    print(f"resident, mnist5k ({n} images), augmented batches of {batch_size}, CPU, {torch.get_num_threads()} threads, best of 5:")
    print(f"  float32 normalized up front: {float_rate:10.0f} images/s, {before.numel() * 4 / 2**20:6.1f} MB")
    print(f"  uint8, normalized per batch: {uint8_rate:10.0f} images/s, {data.train_x.images.numel() / 2**20:6.1f} MB"
          f"  ({uint8_rate / float_rate:.2f}× the speed, {data.train_x.images.numel() / (before.numel() * 4):.2f}× the memory)")


def write_images(root: Path, count: int, size: int, classes: int = 10) -> Path:
    folder = root / f"images-{count}-{size}"
    if (folder / ".complete").exists():
        return folder
    from PIL import Image

    rng = np.random.default_rng(count)
    for c in range(classes):
        (folder / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size + 8, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"class{i % classes:02d}" / f"{i:06d}.png", compress_level=1)
    (folder / ".complete").touch()
    return folder


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


class PeakMemory:
    """Samples the summed PSS of this process and its descendants every 20 ms; ``peak_mb`` is the largest sum."""

    def __init__(self) -> None:
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import os

        me = os.getpid()
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in [me, *_descendants(me)]))
            time.sleep(0.02)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def one_epoch(folder: str, loader: str, size: int, workers: int, batch_size: int) -> dict:
    """Runs in a fresh process: load ``folder`` with ``loader``, then one augmented training epoch."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        data = load_dataset("imagefolder", folder, image_size=size, loader=loader, workers=workers)
        loaded = time.perf_counter()
        batches = batch_indices(len(data.train_y), batch_size, shuffle=True, seed=0, epoch=0)
        seen = sum(len(x) for _, _, x in data.train_x.train_batches(batches, start=0, epoch=0, seed=0, augment=True, flip=True))
        end = time.perf_counter()
    return {"load_s": loaded - start, "images_per_s": seen / (end - loaded), "peak_mb": memory.peak_mb, "images": seen}


def streaming_curve(sizes: list[int], size: int, workers: int, batch_size: int) -> None:
    root = Path(tempfile.gettempdir()) / "distillery-bench-data"
    print(f"\nimage folders of {size + 8}px PNGs, {size}px crops, batches of {batch_size}, {workers} workers:")
    print(f"{'images':>8} {'loader':>10} {'load s':>8} {'images/s':>10} {'peak MB':>9}")
    for count in sizes:
        folder = write_images(root, count, size)
        for loader in ("streaming", "resident"):
            code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from data import one_epoch; "
                    f"print(json.dumps(one_epoch({str(folder)!r}, {loader!r}, {size}, {workers}, {batch_size})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{count:8d} {loader:>10} {r['load_s']:8.1f} {r['images_per_s']:10.0f} {r['peak_mb']:9.0f}", flush=True)


def main() -> None:
    from kd_core.data.streaming import default_workers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the resident comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resident_epoch()
    streaming_curve(args.sizes, args.image_size, args.workers, args.batch_size)


if __name__ == "__main__":
    main()
