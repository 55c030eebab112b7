"""The soft-label store: augmented epochs' teacher logits written once, read back by later runs instead of the
teacher, never reused across a different teacher or different data, never read when damaged or incomplete.

Every run here is real training on offline data; the teacher is watched with a forward hook on the module the
engine distils from, and the store is the real folder on disk (a per-test one, see conftest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from kd_core.config import config_fingerprint, validate_config
from kd_core.engine import Callback, Experiment, PhaseRun, StopRequested, run_experiment
from kd_core.engine.phases import Progress
from kd_core.engine.soft_labels import MANIFEST, SoftLabelStore, StoreUnreadable, compress_top_k, reconstruct_logits
from kd_core.sink import MemorySink

AUGMENTED = {"name": "digits", "val_fraction": 0.2, "subset": 300, "augment": True}
TINY = {
    "name": "soft",
    "seed": 3,
    "device": "cpu",
    "dataset": AUGMENTED,
    "teacher": {"arch": "cnn_small", "source": "random", "epochs": 0},
    "student": {"arch": "cnn_tiny", "epochs": 3, "batch_size": 32},  # 240 training images: 8 batches an epoch
    "recipe": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "params": {"temperature": 4}}],
    "baseline": False,
    "checkpoint_every_s": 1000,
    "analysis": {"enabled": False},
}


def tiny(**overrides: Any):  # type: ignore[no-untyped-def]
    return validate_config({**TINY, **overrides})


class TeacherWatch(Callback):
    """Counts and keeps the distilled-from teacher's forward outputs during the student's training steps."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def on_phase_start(self, run: PhaseRun) -> None:
        if run.phase.name == "student":
            run.target_teacher.register_forward_hook(lambda module, args, out: self.outputs.append(out.detach().float().clone()))


def store_of(summary: dict[str, Any]) -> SoftLabelStore:
    """The store a run reported, opened from its own manifest (as another run would find it)."""
    folder = Path(summary["teacher_outputs_store"]["path"])
    manifest = json.loads((folder / MANIFEST).read_text())
    return SoftLabelStore(folder.parent, manifest["fields"], manifest["num_classes"], manifest["batch_sizes"])


def test_a_second_run_reads_the_store_bit_equal_and_never_runs_the_teacher(tmp_path: Path) -> None:
    """(a) and (b): the teacher trained in run 1 is loaded from its file in run 2; run 2 reads every epoch."""
    trained_teacher = {"arch": "cnn_small", "epochs": 1, "batch_size": 32}
    watch_1 = TeacherWatch()
    first = run_experiment(tiny(teacher=trained_teacher), MemorySink(), tmp_path / "first", callbacks=[watch_1])
    assert first["teacher_outputs"] == "live" and "augmentation" in first["teacher_outputs_reason"]
    assert first["teacher_outputs_store"]["written_epochs"] == [0, 1, 2] and first["teacher_outputs_store"]["read_epochs"] == []
    assert len(watch_1.outputs) == 3 * 8  # the teacher ran on every training batch

    from_file = {"arch": "cnn_small", "source": f"file:{tmp_path / 'first' / 'teacher.safetensors'}", "epochs": 0}
    watch_2 = TeacherWatch()
    second = run_experiment(tiny(teacher=from_file), MemorySink(), tmp_path / "second", callbacks=[watch_2])
    assert second["teacher_outputs"] == "stored" and second["teacher_outputs_store"]["read_epochs"] == [0, 1, 2]
    assert second["teacher_outputs_store"]["key"] == first["teacher_outputs_store"]["key"]
    assert watch_2.outputs == []  # the teacher did not run once during training

    store = store_of(second)
    for step, live in enumerate(watch_1.outputs):
        assert torch.equal(store.read_epoch(step // 8).batch(step % 8), live), step  # bit-equal, batch by batch
    assert second["student_acc"] == first["student_acc"] and second["student_last_acc"] == first["student_last_acc"]
    a, b = load_file(str(tmp_path / "first" / "student.safetensors")), load_file(str(tmp_path / "second" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_store_is_used_only_when_augmentation_alone_blocks_the_cache(tmp_path: Path) -> None:
    plain = run_experiment(tiny(dataset={**AUGMENTED, "augment": False}, student={**TINY["student"], "epochs": 1}), MemorySink(), tmp_path / "a")
    assert plain["teacher_outputs"] == "cached" and "teacher_outputs_store" not in plain
    off = run_experiment(tiny(soft_labels={"store": False}, student={**TINY["student"], "epochs": 1}), MemorySink(), tmp_path / "b")
    assert off["teacher_outputs"] == "live" and "soft_labels.store is off" in off["teacher_outputs_reason"]
    rkd = run_experiment(tiny(recipe=[{"loss": "ce"}, {"loss": "rkd"}], student={**TINY["student"], "epochs": 1}), MemorySink(), tmp_path / "c")
    assert rkd["teacher_outputs"] == "live" and "keeps logits only" in rkd["teacher_outputs_reason"]


def test_top_k_reconstruction_keeps_the_top_probabilities_and_spreads_the_rest() -> None:
    """(c) on 150 classes: softmax of the reconstruction is the kept probabilities plus an even tail."""
    logits = torch.randn(64, 150, generator=torch.Generator().manual_seed(0)) * 3
    probs, indices, tail = compress_top_k(logits, 5)
    q = torch.softmax(reconstruct_logits(probs, indices, 150, tail), dim=1)
    true = torch.softmax(logits, dim=1)
    assert torch.allclose(q.gather(1, indices.long()), true.gather(1, indices.long()), atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)
    tail = q.clone().scatter_(1, indices.long(), float("nan"))
    expected_tail = (1 - true.gather(1, indices.long()).sum(1, keepdim=True)) / 145
    assert torch.allclose(tail.nan_to_num(0) + (tail.isnan() * expected_tail), expected_tail.expand(64, 150), atol=1e-6)
    assert torch.equal(q.argmax(1), logits.argmax(1))
    # all the mass in the top k: the tail is floored, never log(0) (a NaN in the KL term)
    peaked = torch.zeros(2, 150)
    peaked[:, 7] = 200.0
    assert torch.isfinite(reconstruct_logits(*compress_top_k(peaked, 2)[:2], 150)).all()
    # a confident teacher: the tail is summed, not 1 - sum(top k), which rounds to 0 or to float32 noise
    confident = torch.zeros(1, 150)
    confident[0, 0], confident[0, 1:] = 30.0, torch.linspace(0, 10, 149)
    probs, indices, tail = compress_top_k(confident, 3)
    assert torch.allclose(tail, torch.softmax(confident.double(), 1)[0].sort().values[:-3].sum().float()[None], rtol=1e-4)


def many_class_folder(root: Path, classes: int = 110, per_class: int = 4) -> Path:
    """An imagefolder dataset with more than 100 classes (the only case where top_k applies)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        template = rng.integers(0, 256, (8, 8, 3))
        for i in range(per_class):
            pixels = np.clip(template + rng.integers(-40, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
            (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / f"c{c:03d}" / f"{i}.png")
    return root


def test_a_top_k_store_on_many_classes_is_written_read_and_trains_the_same_both_times(tmp_path: Path) -> None:
    """(c) end to end: 110 classes, top-3 kept; the writing run already learns from the reconstruction."""
    dataset = {"name": "imagefolder", "root": str(many_class_folder(tmp_path / "images")), "val_fraction": 0.0, "augment": True}
    config = tiny(dataset=dataset, soft_labels={"top_k": 3}, student={**TINY["student"], "epochs": 2})
    first = run_experiment(config, MemorySink(), tmp_path / "first")
    second = run_experiment(config, MemorySink(), tmp_path / "second")
    assert first["teacher_outputs_store"]["format"] == {"format": "topk", "k": 3}
    assert second["teacher_outputs"] == "stored" and second["student_acc"] == first["student_acc"]
    tensors = load_file(str(Path(first["teacher_outputs_store"]["path"]) / "epoch_0000.safetensors"))
    assert tensors["probs"].shape == tensors["indices"].shape == (352, 3) and tensors["indices"].dtype == torch.int32
    assert tensors["tail"].shape == (352,)
    full = run_experiment(tiny(dataset=dataset, student={**TINY["student"], "epochs": 1}), MemorySink(), tmp_path / "full")
    assert full["teacher_outputs_store"]["format"] == {"format": "logits"} and full["teacher_outputs_store"]["key"] != first["teacher_outputs_store"]["key"]
    assert config_fingerprint(config) != config_fingerprint(tiny(dataset=dataset, student={**TINY["student"], "epochs": 2}))
    # 10 classes: logits are small, top_k is not used (and the fingerprint does not pretend it is)
    assert run_experiment(tiny(soft_labels={"top_k": 3}, student={**TINY["student"], "epochs": 1}), MemorySink(),
                          tmp_path / "ten")["teacher_outputs_store"]["format"] == {"format": "logits"}


def student_phase(tmp_path: Path, config: Any, nudge_teacher: bool = False) -> PhaseRun:
    experiment = Experiment(config, MemorySink(), tmp_path / "probe", lambda: False)
    experiment.prepare_teacher(Progress())
    if nudge_teacher:
        with torch.no_grad():
            next(experiment.teachers[0].parameters()).view(-1)[0] += 1e-3
    return PhaseRun(experiment, experiment.phases[0], Progress())


def test_anything_that_changes_the_teachers_inputs_or_weights_changes_the_key(tmp_path: Path) -> None:
    """(d) no wrong reuse: seed, batch size, teacher weights, subset, precision each give another key."""
    def key(config: Any, nudge: bool = False) -> str:
        return student_phase(tmp_path, config, nudge).teacher_outputs.stored.store.key

    base = key(tiny())
    assert key(tiny(name="renamed", student={**TINY["student"], "epochs": 5})) == base  # name and epochs change nothing seen
    changed = {
        "seed": key(tiny(seed=4)),
        "batch size": key(tiny(student={**TINY["student"], "batch_size": 16})),
        "teacher weights": key(tiny(), nudge=True),
        "subset": key(tiny(dataset={**AUGMENTED, "subset": 200})),
        "classes": key(tiny(dataset={**AUGMENTED, "classes": [0, 1, 2]})),
    }
    assert len({base, *changed.values()}) == len(changed) + 1, changed


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_or_incomplete_epoch_is_ignored_with_the_reason_and_rewritten(tmp_path: Path) -> None:
    """(e) a flipped byte, a wrong-shaped file and a stray half-written temp file: the teacher runs live, never a crash."""
    first = run_experiment(tiny(), MemorySink(), tmp_path / "first")
    folder = Path(first["teacher_outputs_store"]["path"])
    corrupt(folder / "epoch_0001.safetensors")
    (folder / ".epoch_0002.safetensors.123.tmp").write_bytes(b"half an epoch")
    again = run_experiment(tiny(), MemorySink(), tmp_path / "again")
    store = again["teacher_outputs_store"]
    assert again["teacher_outputs"] == "live" and store["read_epochs"] == [0, 2] and store["live_epochs"] == [1]
    assert len(store["problems"]) == 1 and "SHA-256" in store["problems"][0] and "ran live" in store["problems"][0]
    assert store["written_epochs"] == [1] and again["student_acc"] == first["student_acc"]  # repaired; same training

    reader = store_of(again)
    reader.read_epoch(1)  # readable again
    wrong = save({"logits": torch.zeros(5, 10), "batch_sizes": torch.tensor(reader.batch_sizes)})
    (folder / "epoch_0001.safetensors").write_bytes(wrong)
    manifest = json.loads((folder / MANIFEST).read_text())
    import hashlib

    manifest["epochs"]["1"]["sha256"] = hashlib.sha256(wrong).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreUnreadable, match="do not match the manifest"):
        reader.read_epoch(1)
    (folder / MANIFEST).write_text("{not json")
    assert reader.complete_epochs() == []
    third = run_experiment(tiny(), MemorySink(), tmp_path / "third")
    assert third["teacher_outputs_store"]["written_epochs"] == [0, 1, 2] and third["student_acc"] == first["student_acc"]


def test_a_run_resumed_mid_epoch_stores_only_whole_epochs_and_they_are_correct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(f) stopped inside epoch 1 and resumed: epoch 1 is not written by that run; what is written equals a straight run's."""
    monkeypatch.setenv("DISTILLERY_SOFT_LABELS", str(tmp_path / "straight_store"))
    straight = run_experiment(tiny(), MemorySink(), tmp_path / "straight")
    monkeypatch.setenv("DISTILLERY_SOFT_LABELS", str(tmp_path / "resumed_store"))
    calls = {"n": 0}

    def stop_mid_epoch() -> bool:
        calls["n"] += 1
        return calls["n"] == 11  # 8 steps an epoch: batch 3 of epoch 1

    with pytest.raises(StopRequested):
        run_experiment(tiny(), MemorySink(), tmp_path / "resumed", stop_requested=stop_mid_epoch)
    resumed = run_experiment(tiny(), MemorySink(), tmp_path / "resumed", resume=True)
    assert resumed["teacher_outputs_store"]["written_epochs"] == [2] and resumed["teacher_outputs_store"]["live_epochs"] == [1, 2]
    reference, partial = store_of(straight), store_of(resumed)
    assert partial.complete_epochs() == [0, 2]
    for epoch in (0, 2):
        assert all(torch.equal(partial.read_epoch(epoch).batch(b), reference.read_epoch(epoch).batch(b)) for b in range(8))
    # the next run reads 0 and 2 and fills in epoch 1, from its first batch
    filled = run_experiment(tiny(), MemorySink(), tmp_path / "filled")
    assert filled["teacher_outputs_store"]["read_epochs"] == [0, 2] and filled["teacher_outputs_store"]["written_epochs"] == [1]
    assert all(torch.equal(partial.read_epoch(1).batch(b), reference.read_epoch(1).batch(b)) for b in range(8))
    assert resumed["student_acc"] == filled["student_acc"] == straight["student_acc"]


def test_a_bad_top_k_is_refused_with_its_field_path() -> None:
    from kd_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"soft_labels\.top_k: keep fewer than the dataset's 10 classes"):
        tiny(soft_labels={"top_k": 10})
    with pytest.raises(ConfigError, match=r"soft_labels\.top_k"):
        tiny(soft_labels={"top_k": 0})


def test_the_run_page_line_says_where_the_teacher_outputs_came_from(tmp_path: Path) -> None:
    from ui.method_view import teacher_outputs_line

    first = run_experiment(tiny(student={**TINY["student"], "epochs": 1}), MemorySink(), tmp_path / "first")
    second = run_experiment(tiny(student={**TINY["student"], "epochs": 1}), MemorySink(), tmp_path / "second")
    key = first["teacher_outputs_store"]["key"][:12]
    assert teacher_outputs_line(first) == (f"teacher outputs live (augmentation changes the teacher's input every epoch); "
                                           f"epochs 0 written to the soft-label store for later runs (key {key})")
    assert teacher_outputs_line(second) == f"teacher outputs stored: read from the soft-label store, the teacher did not run (key {key})"
    assert teacher_outputs_line({"teacher_outputs": "cached"}) == "teacher outputs cached in memory (computed once before training)"


def test_the_form_keeps_the_soft_label_settings() -> None:
    from ui.form_state import config_to_state, state_to_config

    state, problems = config_to_state(tiny(soft_labels={"store": False, "top_k": 3}).model_dump(mode="json"))
    assert problems == []
    config, problems = state_to_config(state)
    assert problems == [] and config["soft_labels"] == {"store": False, "top_k": 3}


def test_a_method_that_reads_the_live_teacher_outside_the_losses_keeps_it_live() -> None:
    from kd_core.methods import create_method

    assert "discriminator" in create_method("meal_v2", {"discriminator": True}).soft_label_store_blocker()
    assert create_method("meal_v2", {"discriminator": False}).soft_label_store_blocker() is None
