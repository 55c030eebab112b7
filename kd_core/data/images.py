"""One split of a dataset as the engine sees it: uint8 images, normalized to float32 batch by batch.

Two kinds share this interface. :class:`ResidentImages` keeps the whole split as one uint8 tensor on the
training device (4× smaller than float32; on a GPU no host copies and no workers). Streaming splits
(:mod:`kd_core.data.streaming`) decode image files in DataLoader workers. Indexing either one
(``split[idx]``, ``split[:n]``) gives normalized float32 images, so analysis code reads both alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import numpy as np
import torch

from kd_core.data.augment import augment_batch, augmentation_generator


class Normalizer:
    """uint8 level -> ``(level / levels - mean) / std`` per channel, elementwise in float32."""

    def __init__(self, levels: int, mean: list[float], std: list[float]) -> None:
        self.levels, self.mean, self.std = levels, mean, std
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._tensors:
            def channels(values: list[float]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)

            self._tensors[device] = (torch.tensor(float(self.levels), device=device), channels(self.mean), channels(self.std))
        return self._tensors[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # a tensor divisor, not a Python scalar: some backends turn "/ scalar" into "* (1 / scalar)", which rounds differently
        levels, mean, std = self._on(images.device)
        return images.to(torch.float32).div_(levels).sub_(mean).div_(std)


def channel_stats(images: np.ndarray, levels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (+1e-6) of ``images / levels``, exact, from each channel's histogram of levels.

    Memory stays at one channel's worth of uint8 whatever the split's size (no float copy of the images).
    """
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / levels
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        mean = float((counts * values).sum() / counts.sum())
        means.append(mean)
        stds.append(float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())) + 1e-6)
    return means, stds


class ImageSet(ABC):
    """A split's images (normalized float32 when read) and labels ``y`` (int64, on the training device)."""

    y: torch.Tensor
    normalizer: Normalizer
    kind: str  # "resident" or "streaming"

    def __len__(self) -> int:
        return len(self.y)

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int, int]: ...

    @property
    def device(self) -> torch.device:
        return self.y.device

    @abstractmethod
    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """Normalized images (un-augmented) at ``index``, on the training device."""

    @abstractmethod
    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The whole split in order, ``batch_size`` normalized images at a time (evaluation)."""

    @abstractmethod
    def train_batches(self, batches: list[torch.Tensor], *, start: int, epoch: int, seed: int, augment: bool,
                      flip: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(b, idx, x)`` for the epoch's batches of indices from ``start`` on; ``x`` augmented when asked.

        Augmentation is seeded by (seed, epoch, b) or per image, never by the global RNG, so a run resumed
        mid-epoch sees the same images as one that never stopped.
        """

    @abstractmethod
    def to(self, device: torch.device | str) -> "ImageSet": ...


class ResidentImages(ImageSet):
    """The whole split as one uint8 tensor on the training device; normalized and augmented there per batch."""

    kind = "resident"

    def __init__(self, images: torch.Tensor, y: torch.Tensor, normalizer: Normalizer) -> None:
        self.images, self.y, self.normalizer = images, y, normalizer

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.images.shape
        return n, c, h, w

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.to(self.images.device)
        return self.normalizer(self.images[index])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def train_batches(self, batches: list[torch.Tensor], *, start: int, epoch: int, seed: int, augment: bool,
                      flip: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for b in range(start, len(batches)):
            idx = batches[b].to(self.device)
            x = self[idx]
            if augment:
                # normalized first, so the crop's padding is the dataset's mean colour, as before uint8 storage
                x = augment_batch(x, flip=flip, generator=augmentation_generator(seed, epoch, b))
            yield b, idx, x

    def to(self, device: torch.device | str) -> "ResidentImages":
        self.images, self.y = self.images.to(device), self.y.to(device)
        return self
