"""A run's data: train/validation/test splits of one dataset, resident on the device or streamed from disk.

``dataset.loader: auto`` keeps a dataset resident when its uint8 images fit the memory budget
(:func:`kd_core.settings.resident_budget_bytes`) and streams an image folder that does not; the choice and
its reason are recorded on the run (``DataSplits.loader``, ``DataSplits.loader_reason``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kd_core.data.images import ImageSet, Normalizer, ResidentImages, channel_stats
from kd_core.data.registry import DATASETS, RawImages, stratified_pick

# dataset.classes: which of a dataset's classes to keep, in the new label order; an entry that is a list merges
# those classes into one (e.g. [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]: even vs odd digits)
ClassSelection = list[int | list[int]]
LoaderChoice = Literal["auto", "resident", "streaming"]


@dataclass
class DataSplits:
    """The splits of a run (normalized float32 when read) plus what models and views need to know about them."""

    name: str
    train_x: ImageSet
    val_x: ImageSet
    test_x: ImageSet
    class_names: list[str]
    mean: list[float]
    std: list[float]
    flip: bool
    loader: str = "resident"
    loader_reason: str = ""

    @property
    def train_y(self) -> torch.Tensor:
        return self.train_x.y

    @train_y.setter
    def train_y(self, labels: torch.Tensor) -> None:
        self.train_x.y = labels

    @property
    def val_y(self) -> torch.Tensor:
        return self.val_x.y

    @val_y.setter
    def val_y(self, labels: torch.Tensor) -> None:
        self.val_x.y = labels

    @property
    def test_y(self) -> torch.Tensor:
        return self.test_x.y

    @test_y.setter
    def test_y(self, labels: torch.Tensor) -> None:
        self.test_x.y = labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    def eval_split(self) -> tuple[str, ImageSet, torch.Tensor]:
        """The held-out split used for per-epoch metrics: validation when there is one, else test."""
        if len(self.val_y):
            return "val", self.val_x, self.val_y
        return "test", self.test_x, self.test_y

    def to(self, device: torch.device | str) -> "DataSplits":
        for split in (self.train_x, self.val_x, self.test_x):
            split.to(device)
        return self

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixel values, for thumbnails."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    val_fraction: float = 0.0,
    subset: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    classes: ClassSelection | None = None,
    loader: LoaderChoice = "auto",
    workers: int | None = None,
    device: torch.device | str = "cpu",
) -> DataSplits:
    """Load ``name``, cap the training set at ``subset`` (stratified), hold out ``val_fraction`` of it.

    ``classes`` keeps only those classes, relabelled 0, 1, ... in the given order (see :data:`ClassSelection`).
    ``loader`` picks resident or streamed images (see the module doc); ``workers`` are the streaming loader's processes.
    """
    try:
        info = DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
    from kd_core.data.choice import choose_loader
    from kd_core.settings import default_dataset_root

    root = root or default_dataset_root()
    kind, reason, index = choose_loader(info, root, image_size, loader, torch.device(device))
    if kind == "streaming":
        from kd_core.data.streaming import streamed_splits

        splits = streamed_splits(index, info.flip, image_size or info.image_size, val_fraction=val_fraction, subset=subset,
                                 seed=seed, classes=classes, workers=workers)
    else:
        splits = _resident_splits(name, _load_raw(name, root, image_size), info.flip, val_fraction=val_fraction, subset=subset,
                                  seed=seed, classes=classes)
    splits.loader, splits.loader_reason = kind, reason
    return splits.to(device)


def pick_train_val(train_y: np.ndarray, *, val_fraction: float, subset: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the training split of the kept training images and of the validation hold-out."""
    rng = np.random.default_rng(seed)
    keep = np.arange(len(train_y))
    if subset is not None and subset < len(train_y):
        keep = stratified_pick(train_y, subset, rng)
    kept_y = train_y[keep]
    val = stratified_pick(kept_y, int(round(val_fraction * len(kept_y))), rng) if val_fraction > 0 else np.array([], dtype=int)
    train_mask = np.ones(len(kept_y), dtype=bool)
    train_mask[val] = False
    return keep[train_mask], keep[val]


def _resident_splits(name: str, raw: RawImages, flip: bool, *, val_fraction: float, subset: int | None, seed: int,
                     classes: ClassSelection | None) -> DataSplits:
    # normalization constants of the dataset's whole training split: the same for every run on it, whatever
    # its seed, subset, class selection or validation hold-out, so a teacher reused by another run sees the inputs
    # it was trained on
    mean, std = channel_stats(raw.train_x, raw.levels)
    normalizer = Normalizer(raw.levels, mean, std)
    train_x, train_y, test_x, test_y, class_names = raw.train_x, raw.train_y, raw.test_x, raw.test_y, raw.class_names
    if classes is not None:
        train_keep, train_y = class_selection(train_y, classes, len(class_names))
        test_keep, test_y = class_selection(test_y, classes, len(class_names))
        train_x, test_x, class_names = train_x[train_keep], test_x[test_keep], selected_names(class_names, classes)
    train, val = pick_train_val(train_y, val_fraction=val_fraction, subset=subset, seed=seed)

    def split(x: np.ndarray, y: np.ndarray) -> ResidentImages:
        return ResidentImages(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)), normalizer)

    return DataSplits(name, split(train_x[train], train_y[train]), split(train_x[val], train_y[val]), split(test_x, test_y),
                      class_names, mean, std, flip)


def _groups(classes: ClassSelection) -> list[list[int]]:
    return [[int(c)] if isinstance(c, (int, np.integer)) else [int(v) for v in c] for c in classes]


def class_selection(y: np.ndarray, classes: ClassSelection, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the samples of the selected classes (original order kept) and their new labels (entry positions)."""
    new_label = np.full(max(num_classes, int(y.max()) + 1), -1, dtype=np.int64)
    for label, group in enumerate(_groups(classes)):
        unknown = [c for c in group if not 0 <= c < num_classes]
        if unknown:
            raise ValueError(f"dataset.classes: class {unknown[0]} does not exist (labels run from 0 to {num_classes - 1})")
        new_label[group] = label
    keep = np.flatnonzero(new_label[y] >= 0)
    return keep, new_label[y[keep]]


def select_classes(x: np.ndarray, y: np.ndarray, classes: ClassSelection, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The samples of the selected classes (original order kept), labelled by their entry's position."""
    keep, labels = class_selection(y, classes, num_classes)
    return x[keep], labels


def selected_names(class_names: list[str], classes: ClassSelection) -> list[str]:
    """Names of the selected classes; a merged entry is named by its members joined with '+'."""
    return ["+".join(class_names[c] if c < len(class_names) else str(c) for c in group) for group in _groups(classes)]


def num_classes_of(name: str, classes: ClassSelection | None = None) -> int:
    """How many classes a run on dataset ``name`` has (0 when only reading the data tells: imagefolder)."""
    return len(classes) if classes else DATASETS[name].num_classes


@functools.lru_cache(maxsize=4)
def _load_raw(name: str, root: str, image_size: int | None) -> RawImages:
    """Decoded uint8 images, kept per process: several runs in one process (tests, the bench) decode once."""
    return DATASETS[name].loader(root, image_size)
