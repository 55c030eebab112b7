"""Both data paths: uint8 images resident on the device, and image files streamed by worker processes.

Each is checked the way a user would notice a problem: the same images and labels whichever way they are
read, a resumed run bit-identical to one that never stopped, the loader's choice stated on the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kd_core.config import ConfigError, validate_config
from kd_core.data import augment_batch, augmentation_generator, batch_indices, load_dataset
from kd_core.engine import StopRequested, run_experiment
from kd_core.sink import MemorySink


def write_folder(root: Path, classes: int = 3, per_class: int = 30, seed: int = 0) -> Path:
    """Class sub-folders of PNGs, each class a different mean colour plus noise, of varying sizes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(18, 30, size=2)
            base = np.zeros(3)
            base[c % 3] = 200
            pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


def config(root: Path, analysis: dict | None = None, **dataset: Any) -> Any:
    return validate_config({
        "name": "streamed", "seed": 5, "device": "cpu",
        "dataset": {"name": "imagefolder", "root": str(root), "image_size": 16, "val_fraction": 0.2, "augment": True, **dataset},
        "teacher": {"arch": "cnn_tiny", "epochs": 1, "batch_size": 16},
        "student": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 16},
        "recipe": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5}],
        "baseline": False, "checkpoint_every_s": 1000, "analysis": analysis or {"enabled": False},
    })


def test_both_paths_hold_the_same_labels_splits_and_class_names(folder: Path) -> None:
    resident = load_dataset("imagefolder", str(folder), image_size=16, val_fraction=0.2, seed=1, loader="resident")
    streamed = load_dataset("imagefolder", str(folder), image_size=16, val_fraction=0.2, seed=1, loader="streaming", workers=0)
    assert (resident.loader, streamed.loader) == ("resident", "streaming")
    assert resident.class_names == streamed.class_names == ["class0", "class1", "class2"]
    for split in ("train_y", "val_y", "test_y"):
        assert torch.equal(getattr(resident, split), getattr(streamed, split)), split
    assert resident.train_x.images.dtype == torch.uint8  # 1 byte a pixel, normalized per batch
    # streamed evaluation images are normalized to about zero mean and unit spread too
    x = streamed.test_x[:]
    assert x.shape == (len(streamed.test_y), 3, 16, 16) and abs(float(x.mean())) < 0.3 and 0.6 < float(x.std()) < 1.5


def test_streamed_batches_are_the_same_for_any_worker_count_and_replay_from_any_batch(folder: Path) -> None:
    def epoch(workers: int, start: int, epoch: int = 0) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        data = load_dataset("imagefolder", str(folder), image_size=16, seed=1, loader="streaming", workers=workers)
        batches = batch_indices(len(data.train_y), 8, shuffle=True, seed=1, epoch=epoch)
        return list(data.train_x.train_batches(batches, start=start, epoch=epoch, seed=1, augment=True, flip=True))

    full, parallel, resumed = epoch(0, 0), epoch(2, 0), epoch(2, 3)
    assert [b for b, _, _ in full] == list(range(len(full)))
    for (b1, i1, x1), (b2, i2, x2) in zip(full, parallel):
        assert b1 == b2 and torch.equal(i1, i2) and torch.equal(x1, x2)
    assert all(torch.equal(x1, x2) for (_, _, x1), (_, _, x2) in zip(full[3:], resumed))
    # a new epoch crops the same images differently
    assert not torch.equal(full[0][2], epoch(0, 0, epoch=1)[0][2])


def test_resident_batches_are_normalized_then_augmented_per_batch_seed() -> None:
    data = load_dataset("digits", seed=0, loader="resident")
    batches = batch_indices(len(data.train_y), 32, shuffle=True, seed=0, epoch=2)
    b, idx, x = next(data.train_x.train_batches(batches, start=1, epoch=2, seed=0, augment=True, flip=False))
    expected = augment_batch(data.train_x[batches[1]], flip=False, generator=augmentation_generator(0, 2, 1))
    assert b == 1 and torch.equal(idx, batches[1]) and torch.equal(x, expected)


def test_a_streamed_run_resumed_mid_epoch_is_bit_identical(folder: Path, tmp_path: Path) -> None:
    cfg = config(folder, loader="streaming", workers=2)
    straight = MemorySink()
    summary = run_experiment(cfg, straight, tmp_path / "straight")
    assert summary["data_loader"] == "streaming" and "dataset.loader: streaming" in summary["data_loader_reason"]
    calls = {"n": 0}

    def stop_in_the_students_first_epoch() -> bool:
        calls["n"] += 1
        return calls["n"] == 6  # 4 teacher steps, then inside the student's first epoch

    resumed = MemorySink()
    with pytest.raises(StopRequested):
        run_experiment(cfg, resumed, tmp_path / "resumed", stop_requested=stop_in_the_students_first_epoch)
    run_experiment(cfg, resumed, tmp_path / "resumed", resume=True)
    a, b = load_file(str(tmp_path / "straight" / "student.safetensors")), load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = sorted(r["step"] for r in resumed.rows if r["phase"] == "student" and r["key"] == "loss/total")
    assert steps == list(range(1, steps[-1] + 1))  # no gap, no repeat


def test_auto_streams_a_folder_over_the_memory_budget_and_says_so(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_RESIDENT_MAX_MB", "0.01")  # 10 kB: the 90 images at 16 px take 68 kB
    summary = run_experiment(config(folder, workers=0), MemorySink(), tmp_path / "auto")
    assert summary["data_loader"] == "streaming"
    assert "over the 0 MB budget" in summary["data_loader_reason"] and "90 images" in summary["data_loader_reason"]
    monkeypatch.setenv("DISTILLERY_RESIDENT_MAX_MB", "100")
    summary = run_experiment(config(folder), MemorySink(), tmp_path / "auto2")
    assert summary["data_loader"] == "resident" and "within the 100 MB budget" in summary["data_loader_reason"]


def test_streaming_a_dataset_that_is_not_image_files_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"dataset\.loader: .*mnist5k is not read from image files"):
        validate_config({"dataset": {"name": "mnist5k", "loader": "streaming"}, "student": {"arch": "cnn_tiny"}})


def test_the_analysis_of_a_streamed_run_reads_its_images_like_a_resident_one(folder: Path, tmp_path: Path) -> None:
    cfg = config(folder, {"samples": 20, "attribution_images": 2, "cka_checkpoints": 1}, loader="streaming", workers=1)
    summary = run_experiment(cfg, MemorySink(), tmp_path)
    assert "analysis_error" not in summary, summary.get("analysis_error")
    assert summary["data_loader"] == "streaming" and (tmp_path / "analysis.safetensors").exists()


def test_a_streamed_run_without_augmentation_caches_the_teachers_outputs(folder: Path, tmp_path: Path) -> None:
    """Un-augmented streamed images are the evaluation transform's, every epoch: the teacher runs once, and the
    student learns what it learns from a teacher run live every step."""
    cached = run_experiment(config(folder, loader="streaming", workers=0, augment=False), MemorySink(), tmp_path / "cached")
    live_cfg = config(folder, loader="streaming", workers=0, augment=False).model_copy(update={"cache_teacher": False})
    live = run_experiment(live_cfg, MemorySink(), tmp_path / "live")
    assert cached["teacher_outputs"] == "cached" and live["teacher_outputs"] == "live"
    a, b = load_file(str(tmp_path / "cached" / "student.safetensors")), load_file(str(tmp_path / "live" / "student.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_teacher_outputs_too_large_for_the_memory_budget_run_live_and_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_RESIDENT_MAX_MB", "0.001")  # 1 kB: the teacher's logits of 240 digits take 9.4 kB
    cfg = validate_config({"name": "budget", "device": "cpu", "dataset": {"name": "digits", "subset": 300, "val_fraction": 0.2},
                           "teacher": {"arch": "cnn_tiny", "source": "random", "epochs": 0},
                           "student": {"arch": "cnn_tiny", "epochs": 1, "batch_size": 32}, "recipe": [{"loss": "kd"}],
                           "baseline": False, "analysis": {"enabled": False}})
    summary = run_experiment(cfg, MemorySink(), tmp_path)
    assert summary["teacher_outputs"] == "live"
    assert "the teacher's logits of 240 images would take 0 MB, over the 0 MB budget" in summary["teacher_outputs_reason"]
