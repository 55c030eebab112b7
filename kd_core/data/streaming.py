"""Image files decoded batch by batch in ``torch.utils.data`` worker processes. Only paths and labels are held,
so memory barely grows with the number of images (bench/data.py: 558 MB at 1k images, 626 MB at 50k).

Training images get a random resized crop and a flip (torchvision's ImageNet recipe), seeded per (seed,
epoch, image) so any worker decodes the same crop and a resumed epoch replays it; evaluation images are
resized (shorter side to size × 8/7) and centre-cropped. Batches are pinned when training on CUDA.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF  # imported before workers fork: each would pay ~1 s

from kd_core.data.augment import image_generator, random_resized_crop_box
from kd_core.data.folder import decode_rgb
from kd_core.data.images import ImageSet, Normalizer

if TYPE_CHECKING:
    from kd_core.data.folder import FolderIndex
    from kd_core.data.splits import ClassSelection, DataSplits


def limit_malloc_growth() -> None:
    """Keep glibc from holding freed batch buffers: buffers of 1 MB and more are mapped and unmapped (glibc
    otherwise raises its mmap threshold after the first free and keeps such buffers in its heap). Without this,
    one epoch over 50k streamed images raised peak memory by ~200 MB (bench/data.py)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, fixed at 1 MB
    except (OSError, AttributeError):  # not glibc: nothing to limit
        pass


def _worker_init(worker_id: int) -> None:
    limit_malloc_growth()


def default_workers() -> int:
    """Loader processes when ``dataset.workers`` is not set: one per core, at most 8, leaving one core to training."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class _Decoded(Dataset):
    """Item ``i`` -> (uint8 CHW image of ``size``², label, i). ``train`` crops randomly per (seed, epoch, i)."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray, size: int, *, train: bool, flip: bool, seed: int, epoch: int) -> None:
        self.paths, self.labels, self.size = paths, labels, size
        self.train, self.flip, self.seed, self.epoch = train, flip, seed, epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image = decode_rgb(self.paths[i].decode())
        if self.train:
            gen = image_generator(self.seed, self.epoch, i)
            top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], gen)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
            if self.flip and torch.rand(1, generator=gen).item() < 0.5:
                image = image.flip(2)
        else:
            image = TF.center_crop(TF.resize(image, [round(self.size * 8 / 7)], antialias=True), [self.size, self.size])
        return image, int(self.labels[i]), i


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([item[0] for item in items]), torch.tensor([item[2] for item in items])


class StreamingImages(ImageSet):
    """A split's image files, decoded on demand by ``workers`` processes (0: in this process)."""

    kind = "streaming"

    def __init__(self, paths: list[str], y: np.ndarray, size: int, normalizer: Normalizer, *, workers: int) -> None:
        # one bytes array, not a list of str: forked workers that touch a Python object copy its page (reference
        # counts), so a list of a million paths would be copied into every worker (pytorch/pytorch#13246)
        self.paths = np.array([p.encode() for p in paths], dtype=np.bytes_)
        self.labels, self.size, self.normalizer, self.workers = y, size, normalizer, workers
        limit_malloc_growth()
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.paths), 3, self.size, self.size

    def _loader(self, order: list[list[int]], *, train: bool, flip: bool = False, seed: int = 0, epoch: int = 0) -> DataLoader:
        dataset = _Decoded(self.paths, self.labels, self.size, train=train, flip=flip, seed=seed, epoch=epoch)
        workers = min(self.workers, len(order))
        return DataLoader(dataset, batch_sampler=order, num_workers=workers, collate_fn=_collate,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                          persistent_workers=False, worker_init_fn=_worker_init)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalizer(images.to(self.device, non_blocking=True))

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        picks = np.arange(len(self))[index.cpu().numpy() if isinstance(index, torch.Tensor) else index]
        single = np.ndim(picks) == 0
        images = torch.stack([_Decoded(self.paths, self.labels, self.size, train=False, flip=False, seed=0, epoch=0)[int(i)][0]
                              for i in np.atleast_1d(picks)]) if np.size(picks) else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        x = self._normalized(images)
        return x[0] if single else x

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        order = [list(range(start, min(start + batch_size, len(self)))) for start in range(0, len(self), batch_size)]
        for images, _ in self._loader(order, train=False):
            yield self._normalized(images)

    def train_batches(self, batches: list[torch.Tensor], *, start: int, epoch: int, seed: int, augment: bool,
                      flip: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        order = [batch.tolist() for batch in batches[start:]]
        if not order:
            return
        loader = self._loader(order, train=augment, flip=flip, seed=seed, epoch=epoch)
        for b, (images, idx) in enumerate(loader, start=start):
            yield b, idx.to(self.device), self._normalized(images)

    def to(self, device: torch.device | str) -> "StreamingImages":
        self.y = self.y.to(device)
        return self


def sample_stats(paths: list[str], size: int, *, limit: int = 2000, workers: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``limit`` evaluation-transformed training images (a fixed, spread pick)."""
    from kd_core.data.images import channel_stats

    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(limit, len(paths))).round().astype(int)).tolist()
    sample = np.array([paths[i].encode() for i in picks], dtype=np.bytes_)
    dataset = _Decoded(sample, np.zeros(len(picks), dtype=np.int64), size, train=False, flip=False, seed=0, epoch=0)
    order = [list(range(i, min(i + 256, len(picks)))) for i in range(0, len(picks), 256)]
    loader = DataLoader(dataset, batch_sampler=order, num_workers=min(workers, len(order)), collate_fn=_collate)
    images = np.concatenate([batch.numpy() for batch, _ in loader])
    return channel_stats(images, 255)


def streamed_splits(index: "FolderIndex", flip: bool, size: int, *, val_fraction: float, subset: int | None, seed: int,
                    classes: "ClassSelection | None", workers: int | None) -> "DataSplits":
    """The splits of an indexed image folder, streamed (same subset, hold-out and class selection as resident)."""
    from kd_core.data.splits import DataSplits, class_selection, pick_train_val, selected_names

    workers = default_workers() if workers is None else workers
    mean, std = sample_stats(index.train_paths, size, workers=workers)
    normalizer = Normalizer(255, mean, std)
    train_paths, train_y, test_paths, test_y, names = index.train_paths, index.train_y, index.test_paths, index.test_y, index.class_names
    if classes is not None:
        train_keep, train_y = class_selection(train_y, classes, len(names))
        test_keep, test_y = class_selection(test_y, classes, len(names))
        train_paths, test_paths = [train_paths[i] for i in train_keep], [test_paths[i] for i in test_keep]
        names = selected_names(names, classes)
    train, val = pick_train_val(train_y, val_fraction=val_fraction, subset=subset, seed=seed)

    def split(picks: np.ndarray | None, paths: list[str], y: np.ndarray) -> StreamingImages:
        if picks is not None:
            paths, y = [paths[i] for i in picks], y[picks]
        return StreamingImages(paths, y, size, normalizer, workers=workers)

    return DataSplits("imagefolder", split(train, train_paths, train_y), split(val, train_paths, train_y), split(None, test_paths, test_y),
                      names, mean, std, flip)
