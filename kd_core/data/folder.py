"""A folder of class sub-folders (torchvision's ImageFolder layout), indexed without decoding anything.

``root/<class>/<image>`` is split 80/20 into train and test by a fixed stratified pick; ``root/train/<class>/...``
and ``root/test/<class>/...`` are used as given. Only paths and labels are kept, so indexing a million
images costs a few hundred MB at most, and images are decoded when a batch needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from kd_core.data.registry import DatasetUnavailable, split_fixed

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderIndex:
    train_paths: list[str]
    train_y: np.ndarray
    test_paths: list[str]
    test_y: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.train_paths) + len(self.test_paths)


def _scan(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DatasetUnavailable(f"dataset.root {folder.resolve()} has no class sub-folders (expected <root>/<class>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(entry.path for entry in os.scandir(folder / name) if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DatasetUnavailable(f"dataset.root {folder.resolve()} has class sub-folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths, np.asarray(labels, dtype=np.int64), classes


def index_folder(root: str | Path) -> FolderIndex:
    """Paths and labels of every image under ``root``, split into train and test."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetUnavailable(f"dataset.root {base.resolve()} is not a folder of class sub-folders")
    if (base / "train").is_dir() and (base / "test").is_dir():
        train_paths, train_y, classes = _scan(base / "train")
        test_paths, test_y, _ = _scan(base / "test")
        return FolderIndex(train_paths, train_y, test_paths, test_y, classes)
    paths, y, classes = _scan(base)
    train, test = split_fixed(y, 0.2)
    return FolderIndex([paths[i] for i in train], y[train], [paths[i] for i in test], y[test], classes)


def decode_rgb(path: str) -> torch.Tensor:
    """The image at ``path`` as uint8 RGB, CHW."""
    with Image.open(path) as image:
        pixels = np.array(image.convert("RGB"))  # a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def decode_resized(path: str, size: int) -> torch.Tensor:
    """The image at ``path`` squashed to ``size``×``size`` (how a resident folder is stored)."""
    return TF.resize(decode_rgb(path), [size, size], antialias=True)
