"""LELP (kd_core.methods.lelp) and the few-class tasks it ships with (dataset.classes)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kd_core.config import ConfigError, config_fingerprint, validate_config
from kd_core.data import load_dataset
from kd_core.engine import Callback, PhaseRun, run_experiment
from kd_core.engine.evaluation import outputs_with_embedding, predict
from kd_core.engine.experiment import Experiment
from kd_core.engine.phases import Progress, plan_phases
from kd_core.methods import lelp as lelp_module
from kd_core.methods.base import Batch
from kd_core.methods.lelp import (
    class_log_probs,
    classifier_weight,
    fit_subspaces,
    null_space_basis,
    pseudo_subclass_targets,
)
from kd_core.sink import MemorySink

PARITY = [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


def small(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "lelp", "seed": 1, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 400, "classes": PARITY},
        "teacher": {"arch": "cnn_small", "epochs": 2, "batch_size": 32}, "student": {"arch": "cnn_tiny", "epochs": 3, "batch_size": 32},
        "recipe": [], "method": {"name": "lelp"}, "analysis": {"enabled": False}, **overrides,
    }


# --------------------------------------------------------------------------- dataset.classes (few-class tasks)


def test_selected_classes_keep_their_images_relabelled_in_order_and_merged() -> None:
    full = load_dataset("digits")
    parity = load_dataset("digits", classes=PARITY)
    assert parity.class_names == ["0+2+4+6+8", "1+3+5+7+9"]
    assert torch.equal(parity.test_x[:], full.test_x[:]) and torch.equal(parity.test_y, full.test_y % 2)
    pair = load_dataset("digits", classes=[7, 3])
    keep = (full.test_y == 7) | (full.test_y == 3)
    assert pair.class_names == ["7", "3"]
    assert torch.equal(pair.test_x[:], full.test_x[keep]) and torch.equal(pair.test_y, (full.test_y[keep] == 3).long())
    assert set(pair.train_y.tolist()) == {0, 1} and pair.num_classes == 2
    # normalized with the whole dataset's constants, so a teacher reused across tasks sees the same inputs
    assert pair.mean == full.mean and pair.std == full.std


@pytest.mark.parametrize("classes, message", [([3], "at least 2"), ([3, 3], "once"), ([0, 10], "classes 0 to 9"), ([[], [1]], "empty")])
def test_bad_class_selections_are_refused_with_the_field(classes: list[Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(small(dataset={"name": "digits", "classes": classes}))
    assert info.value.errors[0][0] == "dataset.classes" and message in info.value.errors[0][1]


def test_a_teacher_must_have_the_selected_number_of_classes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from kd_core.models import create_model

    ten, two = tmp_path / "ten.safetensors", tmp_path / "two.safetensors"
    save_file(create_model("cnn_small", 10, 1, 8).state_dict(), str(ten))
    save_file(create_model("cnn_small", 2, 1, 8).state_dict(), str(two))
    with pytest.raises(ConfigError) as info:
        validate_config(small(teacher={"arch": "cnn_small", "source": f"file:{ten}"}))
    assert info.value.errors[0][0] == "teacher.source" and "10 classes but the dataset has 2" in info.value.errors[0][1]
    assert validate_config(small(teacher={"arch": "cnn_small", "source": f"file:{two}"})).teacher.source == f"file:{two}"


def test_class_selection_is_part_of_the_fingerprint_and_absent_when_unused() -> None:
    plain = validate_config(small(dataset={"name": "digits"}))
    assert config_fingerprint(plain) != config_fingerprint(validate_config(small()))


def test_a_config_leaving_later_keys_at_their_defaults_keeps_its_stored_fingerprint() -> None:
    """Checkpoints of runs stored before a config key existed still resume: the fingerprint below was computed by
    the code of 2026-11-30 (before dataset.loader, channels_last, compile, ...)."""
    config = validate_config({"name": "x", "seed": 1, "dataset": {"name": "digits", "root": "/data/x"}, "teacher": {"arch": "cnn_small"},
                              "student": {"arch": "cnn_tiny"}, "recipe": [{"loss": "kd"}]})
    assert config_fingerprint(config) == "d10cec26c967838caaa763b03b67c3f75ab3b1aea057d7948f2cc64ee3e17caf"
    assert config_fingerprint(config.model_copy(update={"name": "renamed"})) == config_fingerprint(config)
    streamed = config.model_copy(update={"dataset": config.dataset.model_copy(update={"loader": "resident"})})
    assert config_fingerprint(streamed) != config_fingerprint(config)


# --------------------------------------------------------------------------- the subspaces


def clustered(n_per: int, classes: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per)
    h = torch.randn(classes, dim, generator=g)[y] * 3 + torch.randn(len(y), dim, generator=g) * torch.linspace(2, 0.1, dim)
    return h, y


def test_subspaces_lie_in_the_null_space_of_the_teachers_classifier_and_are_orthonormal() -> None:
    h, y = clustered(60, 3, 24)
    weight = torch.randn(3, 24, generator=torch.Generator().manual_seed(5))
    sub = fit_subspaces(h, y, weight, 3, 4)
    assert sub.directions.shape == (3, 24, 4) and sub.centers.shape == (3, 24)
    assert (weight @ sub.directions).abs().max() < 1e-4  # W v = 0 for every direction of every class
    for c in range(3):
        gram = sub.directions[c].T @ sub.directions[c]
        assert torch.allclose(gram, torch.eye(4), atol=1e-5)
        assert torch.allclose(sub.centers[c], h[y == c].mean(0), atol=1e-5)
    basis = null_space_basis(weight)
    assert basis.shape == (24, 21) and (weight.double() @ basis).abs().max() < 1e-10
    # without the null-space step the top directions are not orthogonal to W (this data's variance is not)
    assert (weight @ fit_subspaces(h, y, weight, 3, 4, null_space=False).directions).abs().max() > 1e-2


def test_the_random_rotation_keeps_the_pca_subspace_and_spreads_its_variance() -> None:
    h, y = clustered(200, 2, 16)
    weight = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    plain = fit_subspaces(h, y, weight, 2, 3, rotation=False)
    rotated = fit_subspaces(h, y, weight, 2, 3, rotation=True, seed=7)
    for c in range(2):
        a, b = plain.directions[c].double(), rotated.directions[c].double()
        assert torch.allclose(a @ a.T, b @ b.T, atol=1e-5)  # the same 3-d subspace, other axes
        var_plain = (plain.project(h[y == c])[:, c] * plain.scales[c]).var(0)
        var_rot = (rotated.project(h[y == c])[:, c] * rotated.scales[c]).var(0)
        assert var_plain[0] / var_plain[-1] > var_rot.max() / var_rot.min()  # PCA's are sorted apart; rotation mixes them
    assert not torch.allclose(plain.directions, rotated.directions)


def test_targets_split_each_class_probability_into_its_subclasses() -> None:
    h, y = clustered(40, 3, 12)
    sub = fit_subspaces(h, y, torch.randn(3, 12), 3, 4)
    logits = torch.randn(len(y), 3)
    target = pseudo_subclass_targets(logits, h, sub, beta=0.5)
    assert target.shape == (len(y), 12)
    assert torch.allclose(target.view(-1, 3, 4).sum(2), torch.softmax(logits, 1), atol=1e-6)
    # a sharper beta concentrates the class mass on fewer subclasses
    sharp = pseudo_subclass_targets(logits, h, sub, beta=0.05).view(-1, 3, 4).max(2).values.sum(1)
    assert (sharp >= target.view(-1, 3, 4).max(2).values.sum(1) - 1e-6).all()
    # the student's class prediction sums its subclass probabilities
    z = torch.randn(5, 12)
    assert torch.allclose(class_log_probs(z, 3).exp(), torch.softmax(z, 1).view(5, 3, 4).sum(2), atol=1e-6)


# --------------------------------------------------------------------------- through the engine


def student_phase_run(config: Any, tmp_path: Path, teacher_state: dict[str, torch.Tensor] | None = None) -> PhaseRun:
    experiment = Experiment(config, MemorySink(), tmp_path, lambda: False)
    experiment.prepare_teacher(Progress())
    if teacher_state is not None:
        experiment.teachers[0].load_state_dict(teacher_state)
    phase = next(p for p in plan_phases(config) if p.name == "student")
    return PhaseRun(experiment, phase, Progress())


def test_pseudo_subclass_labels_come_from_the_teachers_embedding_not_the_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = lelp_module.pseudo_subclass_targets

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(original(*args, **kwargs).detach().clone())
        return seen[-1]

    monkeypatch.setattr(lelp_module, "pseudo_subclass_targets", recording)
    config = validate_config(small(teacher={"arch": "cnn_small", "source": "random"}))
    run = student_phase_run(config, tmp_path / "a")
    idx = torch.arange(32)
    batch = Batch(run.experiment.data.train_x[idx], run.experiment.data.train_y[idx], idx)
    run.step.compute_terms(batch, epoch=0, step=0, total_steps=1)
    with torch.no_grad():  # another student: the targets stay exactly the same
        for p in run.model.parameters():
            p.add_(torch.randn_like(p))
    run.step.compute_terms(batch, epoch=0, step=0, total_steps=1)
    assert torch.equal(seen[0], seen[1])
    # they are the formula applied to this teacher's own logits and embedding of the batch
    teacher = run.experiment.teachers[0]
    logits, embedding = outputs_with_embedding(teacher, batch.x)
    assert torch.allclose(seen[0], original(logits, embedding, run.method.subspaces, run.method.beta), atol=1e-6)
    # another teacher: other subspaces, other embeddings, other targets
    state = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.state_dict().items()}
    other = student_phase_run(config, tmp_path / "b", teacher_state=state)
    other.step.compute_terms(batch, epoch=0, step=0, total_steps=1)
    assert not torch.allclose(seen[0], seen[-1], atol=1e-3)
    assert (classifier_weight(other.experiment.teachers[0]) @ other.method.directions).abs().max() < 1e-4


def test_the_students_own_head_follows_the_prediction_without_touching_the_backbone(tmp_path: Path) -> None:
    run = student_phase_run(validate_config(small(teacher={"arch": "cnn_small", "source": "random"})), tmp_path)
    idx = torch.arange(16)
    _, terms = run.step.compute_terms(Batch(run.experiment.data.train_x[idx], run.experiment.data.train_y[idx], idx), epoch=0, step=0, total_steps=1)
    assert set(terms) == {"lelp.subclass_ce", "lelp.own_head"}
    terms["lelp.own_head"].backward()
    grads = {name: p.grad for name, p in run.model.named_parameters()}
    assert grads["fc.weight"] is not None and grads["fc.weight"].abs().sum() > 0
    assert all(g is None for name, g in grads.items() if not name.startswith("fc."))  # the backbone gets nothing from it
    assert all(p.grad is None for p in run.method.parameters())  # nor does the pseudo-subclass head
    assert not any(p is run.model.fc.weight for p in run.method.parameters())  # and the method does not own the student's head


class HeadWatcher(Callback):
    def __init__(self) -> None:
        self.heads: list[torch.Tensor] = []

    def on_phase_start(self, run: PhaseRun) -> None:
        if run.method is not None:
            self.heads.append(run.method.head.weight.detach().clone())

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.method is not None:
            self.heads.append(run.method.head.weight.detach().clone())
            self.run = run


def test_the_subclass_head_trains_and_the_prediction_sums_subclasses_back_to_the_classes(tmp_path: Path) -> None:
    config = validate_config(small())
    sink, watcher = MemorySink(), HeadWatcher()
    summary = run_experiment(config, sink, tmp_path, callbacks=[watcher])
    assert summary["recipe_extra_params"] == 16 * 2 * 5 + 2 * 5  # cnn_tiny's 16-d embedding -> S*C = 10 pseudo-subclasses
    assert watcher.heads[0].shape == (10, 16) and not torch.equal(watcher.heads[0], watcher.heads[-1])
    losses = sink.series("loss/lelp.subclass_ce", "student")
    assert losses and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert len(sink.series("val/lelp_subclass_agreement", "student")) == config.student.epochs
    run = watcher.run
    data = run.experiment.data
    out = predict(run.model, data.val_x, method=run.method)
    assert out.shape == (len(data.val_y), 2)  # back to the 2 classes
    _, s_emb = outputs_with_embedding(run.model, data.val_x)
    with torch.no_grad():
        summed = torch.softmax(run.method.subclass_logits(s_emb), 1).view(-1, 2, 5).sum(2)
    assert torch.allclose(out.exp(), summed, atol=1e-5)
    # the best epoch's weights are loaded at the end: its validation accuracy is the best logged
    assert max(sink.series("val/top1", "student")) == pytest.approx(100.0 * float((summed.argmax(1) == data.val_y).float().mean()))
    # the student's own head, trained on detached embeddings, predicts like the summed subclasses: the checkpoint alone classifies
    own = predict(run.model, data.val_x)
    assert float((own.argmax(1) == summed.argmax(1)).float().mean()) > 0.8
    assert not sink.series("val/lelp_subclass_agreement", "baseline")  # the baseline is a plain student


def test_lelp_configs_are_checked_before_anything_trains() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(small(recipe=[{"loss": "ce"}, {"loss": "kd"}]))
    assert info.value.errors[0][0] == "recipe[0].loss" and "alpha" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:  # cnn_tiny as teacher: a 16-d embedding, 14 directions outside 2 classes
        validate_config(small(teacher={"arch": "cnn_tiny"}, method={"name": "lelp", "params": {"subclasses": 15}}))
    message = ("the teacher 'cnn_tiny' has a 16-d embedding, 14 dimensions outside its classifier's span for 2 classes: "
               "at most that many subclasses")
    assert info.value.errors == [("method.params.subclasses", message)]
    for params, field in (({"beta": 0}, "beta"), ({"alpha": 2}, "alpha"), ({"subclasses": 0}, "subclasses")):
        with pytest.raises(ConfigError, match=field):
            validate_config(small(method={"name": "lelp", "params": params}))
    stored = validate_config(small(recipe=[{"loss": "kd"}])).method
    assert stored.params == {"subclasses": 5, "beta": 1.0, "temperature": 1.0, "alpha": 0.0, "null_space": True, "rotation": True, "seed": 0}


def test_a_lelp_run_through_the_worker_logs_its_term_and_subclass_agreement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_methods import turned_down
    from tests.worker_runs import metric, train_in_worker

    raw = turned_down(Path("configs/methods/mnist5k_lelp.yaml"))
    assert raw["dataset"]["classes"] == PARITY and yaml.safe_load(Path("configs/methods/mnist5k_lelp_3class.yaml").read_text())["dataset"]["classes"]
    config = validate_config(raw)
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    losses = metric(store, run, "loss/lelp.subclass_ce")
    assert losses and all(math.isfinite(v) for v in losses)
    assert len(metric(store, run, "val/lelp_subclass_agreement")) == config.student.epochs
    assert len(metric(store, run, "val/top1")) == config.student.epochs
    assert run.summary["student_acc"] is not None and run.summary["baseline_acc"] is not None
    assert run.summary["recipe_extra_params"] == 16 * 2 * 5 + 2 * 5
