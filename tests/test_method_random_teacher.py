"""Random-teacher self-distillation: a frozen random teacher, a student that starts as the teacher, a training
loss no label reaches, k-NN and linear-probe accuracies checked against scikit-learn, and real runs (in-process
and through the worker)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd_core.config import ConfigError, validate_config
from kd_core.data import load_dataset
from kd_core.engine import Callback, PhaseRun, run_experiment
from kd_core.engine.evaluation import outputs_with_embedding
from kd_core.features import probe_shapes
from kd_core.methods import MethodContext, create_method
from kd_core.methods.probes import Standardizer, fit_linear_probe, knn_predict
from kd_core.methods.random_teacher import ProjectionHead, dino_ce, freeze_as_buffers
from kd_core.models import create_model
from kd_core.sink import MemorySink

SHIPPED = Path("configs/methods/mnist5k_random_teacher.yaml")
HEAD = {"hidden_dims": [64], "bottleneck_dim": 16, "out_dim": 256, "knn_k": 5, "probe_epochs": 300}  # 320 training images: 2 probe steps an epoch


def small(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "random teacher", "seed": 3, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 400},
        "teacher": {"arch": "cnn_tiny", "source": "random", "epochs": 0},
        "student": {"arch": "cnn_tiny", "epochs": 3, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0},
                    "scheduler": "none"},
        "recipe": [], "method": {"name": "random_teacher", "params": HEAD}, "baseline": False, "analysis": {"enabled": False}, **overrides,
    }


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Watch(Callback):
    """The student phase's teacher, student and method at its start and after every epoch."""

    def __init__(self) -> None:
        self.start: dict[str, dict[str, torch.Tensor]] = {}
        self.epochs: list[dict[str, dict[str, torch.Tensor]]] = []
        self.teacher: torch.nn.Module | None = None

    def snapshot(self, run: PhaseRun) -> dict[str, dict[str, torch.Tensor]]:
        assert run.teacher is not None and run.method is not None
        return {"teacher": state(run.teacher), "student": state(run.model), "method": state(run.method)}

    def on_phase_start(self, run: PhaseRun) -> None:
        if run.method is not None:
            self.start, self.teacher = self.snapshot(run), run.teacher

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.method is not None:
            self.epochs.append(self.snapshot(run))


@pytest.fixture(scope="module")
def rt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemorySink, Watch, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("random_teacher")
    sink, watch = MemorySink(), Watch()
    summary = run_experiment(validate_config(small()), sink, out, callbacks=[watch])
    return sink, watch, out, summary


def series(sink: MemorySink, key: str, phase: str = "student") -> list[float]:
    return [r["value"] for r in sink.rows if r["phase"] == phase and r["key"] == key]


# --------------------------------------------------------------------------- the teacher and the student's start


def test_the_teacher_never_changes(rt_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    _, watch, _, _ = rt_run
    first = watch.start["teacher"]
    assert any("running_mean" in k for k in first)  # BN statistics are part of what must not move
    assert all(same(first, epoch["teacher"]) for epoch in watch.epochs)
    assert watch.teacher is not None and same(first, state(watch.teacher))  # after the whole run
    teacher_head = {k: v for k, v in watch.start["method"].items() if k.startswith("teacher_head.")}
    assert teacher_head and all(torch.equal(v, epoch["method"][k]) for epoch in watch.epochs for k, v in teacher_head.items())
    # while the student moved
    assert not same(watch.start["student"], watch.epochs[-1]["student"])


def test_the_student_starts_as_the_teacher(rt_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    _, watch, _, _ = rt_run
    assert same(watch.start["student"], watch.start["teacher"])
    method = watch.start["method"]
    head = {k.removeprefix("head."): v for k, v in method.items() if k.startswith("head.")}
    teacher_head = {k.removeprefix("teacher_head."): v for k, v in method.items() if k.startswith("teacher_head.")}
    assert head and same(head, teacher_head)


def test_a_neighbourhood_start_is_the_teacher_plus_eps_times_a_fresh_initialisation() -> None:
    torch.manual_seed(0)
    teacher, student = create_model("cnn_tiny", 10, 1, 8), create_model("cnn_tiny", 10, 1, 8)
    shapes = probe_shapes(student, 1, 8)
    method = create_method("random_teacher", {**HEAD, "student_init": "neighborhood", "student_init_eps": 0.1})
    method.build(MethodContext(shapes, shapes, 10, 100, 1, 8))
    before, head_before = state(student), state(method.head)
    method.init_student(student, teacher)
    for name, p in student.named_parameters():
        assert torch.allclose(p, teacher.state_dict()[name] + 0.1 * before[name]), name
    for name, buffer in student.named_buffers():
        assert torch.equal(buffer, teacher.state_dict()[name]), name
    for name, p in method.head.named_parameters():
        assert torch.allclose(p, method.teacher_head.state_dict()[name] + 0.1 * head_before[name]), name
    assert max(float((p.detach() - teacher.state_dict()[n]).abs().max()) for n, p in student.named_parameters()) > 0
    # 'random' keeps the student's own initialisation
    other = create_model("cnn_tiny", 10, 1, 8)
    kept = state(other)
    random_start = create_method("random_teacher", {**HEAD, "student_init": "random"})
    random_start.build(MethodContext(shapes, shapes, 10, 100, 1, 8))
    random_start.init_student(other, teacher)
    assert same(kept, state(other))


def test_the_teacher_head_is_frozen_and_only_the_student_head_is_trainable(rt_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    _, _, out, summary = rt_run
    head = ProjectionHead(16, [64], 16, 256)
    assert summary["recipe_extra_params"] == sum(p.numel() for p in head.parameters())  # the student's head alone
    frozen = freeze_as_buffers(ProjectionHead(16, [64], 16, 256))
    assert not list(frozen.parameters()) and set(frozen.state_dict()) == set(head.state_dict())
    saved = load_file(str(out / "student_method.safetensors"))
    assert {"probe_weight", "probe_bias", "probe_mean", "probe_std", "teacher_scores"} <= set(saved)
    assert any(k.startswith("head.") for k in saved) and any(k.startswith("teacher_head.") for k in saved)


# --------------------------------------------------------------------------- no labels in the training loss


def test_the_dino_loss_is_the_cross_entropy_to_the_teachers_softmax() -> None:
    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    p_t = np.exp([1.0, 0, 0]) / np.exp([1.0, 0, 0]).sum()
    log_p_s = np.array([0.0, 1, 2]) - np.log(np.exp([0.0, 1, 2]).sum())
    assert float(dino_ce(s, t)) == pytest.approx(float(-(p_t * log_p_s).sum()), rel=1e-6)


def test_no_label_reaches_the_students_training_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_core.engine import experiment

    config = validate_config(small(student={**small()["student"], "epochs": 2}))
    first = MemorySink()
    run_experiment(config, first, tmp_path / "labels")

    def permuted(*args: Any, **kwargs: Any) -> Any:
        data = load_dataset(*args, **kwargs)
        data.train_y = data.train_y[torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))]
        return data

    monkeypatch.setattr(experiment, "load_dataset", permuted)
    second = MemorySink()
    run_experiment(config, second, tmp_path / "permuted")
    for key in ("loss/random_teacher.ce", "loss/total", "random_teacher_kl"):
        assert series(first, key) and series(first, key) == series(second, key), key
    # the permutation did reach the data: the probe, which is fitted with labels, changed
    assert series(first, "val/probe_top1") != series(second, "val/probe_top1")


# --------------------------------------------------------------------------- k-NN and probe, as stated


def embeddings(weights: dict[str, torch.Tensor], x: torch.Tensor, logits: bool = False) -> np.ndarray:
    model = create_model("cnn_tiny", 10, 1, 8)
    model.load_state_dict(weights)
    return outputs_with_embedding(model, x)[0 if logits else 1].double().numpy()


def test_knn_and_probe_accuracies_match_an_independent_computation(rt_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    sink, watch, _, _ = rt_run
    data = load_dataset("digits", val_fraction=0.2, subset=400, seed=3)
    train_y, val_y = data.train_y.numpy(), data.val_y.numpy()
    knn, probe, top1 = series(sink, "val/knn_top1"), series(sink, "val/probe_top1"), series(sink, "val/top1")
    assert len(knn) == len(probe) == len(watch.epochs) == 3
    for epoch, seen in enumerate(watch.epochs):
        train, val = embeddings(seen["student"], data.train_x), embeddings(seen["student"], data.val_x)
        mean, std = train.mean(0), train.std(0, ddof=1)  # fitted on the training split only
        std[std < 10 * np.finfo(np.float32).eps] = 1
        method = seen["method"]
        assert np.allclose(method["probe_mean"].numpy(), mean, atol=1e-5) and np.allclose(method["probe_std"].numpy(), std, rtol=1e-4)
        z_train, z_val = (train - mean) / std, (val - mean) / std
        sk = KNeighborsClassifier(n_neighbors=5).fit(z_train, train_y)
        assert knn[epoch] == pytest.approx(100 * sk.score(z_val, val_y), abs=1e-4), epoch
        logits = z_val @ method["probe_weight"].double().numpy().T + method["probe_bias"].double().numpy()
        assert probe[epoch] == pytest.approx(100 * (logits.argmax(1) == val_y).mean(), abs=1e-4), epoch
        # the run's student prediction is that probe, and it is folded into the student's own classifier
        assert top1[epoch] == pytest.approx(probe[epoch], abs=1e-4)
        raw = embeddings(seen["student"], data.val_x, logits=True)
        assert np.allclose(raw, logits, atol=1e-4) and (raw.argmax(1) == logits.argmax(1)).mean() >= 0.99


def test_the_teachers_probe_is_scored_once_and_reported(rt_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    sink, watch, _, summary = rt_run
    data = load_dataset("digits", val_fraction=0.2, subset=400, seed=3)
    teacher_knn = series(sink, "val/knn_top1", phase="teacher")
    assert len(teacher_knn) == 1 and len(series(sink, "val/probe_top1", phase="teacher")) == 1
    assert len(set(series(sink, "val/teacher_probe_top1"))) == 1 and series(sink, "val/teacher_knn_top1")[0] == teacher_knn[0]
    train, val = embeddings(watch.start["teacher"], data.train_x), embeddings(watch.start["teacher"], data.val_x)
    mean, std = train.mean(0), train.std(0, ddof=1)
    sk = KNeighborsClassifier(n_neighbors=5).fit((train - mean) / std, data.train_y.numpy())
    assert teacher_knn[0] == pytest.approx(100 * sk.score((val - mean) / std, data.val_y.numpy()), abs=1e-4)
    assert 0 <= sink.summary["teacher_probe_acc"] <= 100 and 0 <= sink.summary["teacher_knn_acc"] <= 100
    assert summary["student_acc"] is not None


def test_the_linear_probe_fits_as_well_as_scikit_learns_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=1.5, size=(4, 12))
    y = rng.integers(0, 4, size=1200)
    x = centres[y] + rng.normal(size=(1200, 12))
    scaler = Standardizer.fit(torch.tensor(x[:1000], dtype=torch.float32))
    z = scaler(torch.tensor(x, dtype=torch.float32))
    # 500 epochs of 4 batches: about the 2,000 steps 10 epochs are on CIFAR-10
    weight, bias = fit_linear_probe(z[:1000], torch.tensor(y[:1000]), 4, epochs=500, generator=torch.Generator().manual_seed(0))
    ours = 100 * float(((z[1000:] @ weight.T + bias).argmax(1).numpy() == y[1000:]).mean())
    theirs = 100 * LogisticRegression(max_iter=2000).fit(z[:1000].numpy(), y[:1000]).score(z[1000:].numpy(), y[1000:])
    assert abs(ours - theirs) <= 2.0, (ours, theirs)
    again = fit_linear_probe(z[:1000], torch.tensor(y[:1000]), 4, epochs=500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], weight)  # seeded: the same probe twice


def test_knn_votes_break_ties_towards_the_smallest_label() -> None:
    train = torch.tensor([[0.0], [1.0], [-1.0], [5.0]])
    labels = torch.tensor([2, 1, 2, 1])
    assert knn_predict(train, labels, torch.tensor([[0.1], [4.0]]), k=2, num_classes=3).tolist() == [1, 1]
    assert knn_predict(train, labels, torch.tensor([[0.1]]), k=3, num_classes=3).tolist() == [2]


# --------------------------------------------------------------------------- config checks


def test_random_teacher_config_checks_name_the_field_and_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(small(teacher={"arch": "cnn_small", "source": "train", "epochs": 1},
                              recipe=[{"loss": "ce", "weight": 1.0}, {"loss": "kd", "weight": 1.0}]))
    assert [path for path, _ in info.value.errors] == ["teacher.source", "teacher.arch", "recipe[0].loss"]
    assert "teacher.source: random" in info.value.errors[0][1] and "teacher.arch: cnn_tiny" in info.value.errors[1][1]
    with pytest.raises(ConfigError) as info:
        validate_config(small(method={"name": "random_teacher", "params": {"student_init": "neighborhood"}}))
    assert info.value.errors[0][0] == "method.params" and "student_init_eps must be > 0" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:
        validate_config(small(method={"name": "random_teacher", "params": {"student_init": "copy"}}))
    assert "student_init must be one of teacher, neighborhood, random" in info.value.errors[0][1]
    stored = validate_config(small(method={"name": "random_teacher"})).method
    assert stored.params["hidden_dims"] == [2048, 2048] and stored.params["out_dim"] == 65536
    assert stored.params["teacher_temperature"] == stored.params["student_temperature"] == 1.0 and stored.params["teacher_centering"] is False


# --------------------------------------------------------------------------- through the worker


def test_a_random_teacher_run_through_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_methods import turned_down
    from tests.worker_runs import metric, train_in_worker

    config = validate_config(turned_down(SHIPPED))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    probe, knn = metric(store, run, "val/probe_top1"), metric(store, run, "val/knn_top1")
    assert len(probe) == len(knn) == config.student.epochs and all(0 <= v <= 100 for v in probe + knn)
    assert metric(store, run, "val/top1") == probe  # the student's accuracy is the probe's
    assert len(metric(store, run, "val/probe_top1", phase="teacher")) == 1
    assert len(set(metric(store, run, "val/teacher_probe_top1"))) == 1
    losses = metric(store, run, "loss/random_teacher.ce")
    assert losses and all(math.isfinite(v) for v in losses)
    assert run.summary["teacher_probe_acc"] is not None and run.summary["student_acc"] is not None
