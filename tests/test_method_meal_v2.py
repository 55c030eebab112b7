"""MEAL V2: the ensemble's soft target, teachers trained in their own phases and frozen after, run:<id> teachers
in an ensemble, the discriminator (gradients, no reversal, checkpoint) and the per-teacher/ensemble accuracies."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kd_core.config import ConfigError, validate_config
from kd_core.data import load_dataset, num_batches
from kd_core.engine import Callback, PhaseRun, run_experiment
from kd_core.engine.evaluation import predict
from kd_core.losses import LossInputs, create_loss
from kd_core.losses.base import ModelShapes
from kd_core.losses.logit import kd_loss
from kd_core.methods import Batch, MethodContext, StudentOutputs, create_method
from kd_core.methods.meal_v2 import (
    MEALV2,
    LogitDiscriminator,
    TeacherEnsemble,
    discriminator_targets,
)
from kd_core.models import create_model
from kd_core.sink import MemorySink

DATA = {"name": "digits", "val_fraction": 0.2, "subset": 400}
STEPS = num_batches(320, 32)  # an epoch: 400 digits, 20 % held out for validation


def meal_config(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "meal", "seed": 4, "device": "cpu", "dataset": DATA,
        "teacher": {"arch": "cnn_small", "epochs": 2, "batch_size": 32},
        "teachers": [{"arch": "lenet5", "epochs": 2, "batch_size": 32, "optimizer": {"lr": 0.05}}],
        "student": {"arch": "cnn_tiny", "epochs": 3, "batch_size": 32},
        "recipe": [{"loss": "kd", "weight": 1.0, "params": {"temperature": 1}}],
        "method": {"name": "meal_v2"}, "baseline": False, "analysis": {"enabled": False}, **overrides,
    }


def context(num_classes: int = 10) -> MethodContext:
    shapes = ModelShapes(num_classes=num_classes, embedding_dim=16, stage_shapes=[])
    return MethodContext(student=shapes, teacher=shapes, num_classes=num_classes, num_train=100, in_channels=1, image_size=8)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- the soft target


def test_the_ensemble_output_is_the_log_of_the_mean_of_the_teachers_softmaxes() -> None:
    torch.manual_seed(0)
    teachers = [create_model("cnn_small", 10, 1, 8).eval(), create_model("lenet5", 10, 1, 8).eval(), create_model("mlp", 10, 1, 8).eval()]
    x = torch.randn(16, 1, 8, 8)
    ensemble = MEALV2().distill_teacher(teachers)
    with torch.no_grad():
        out = ensemble(x)
        by_hand = torch.stack([F.softmax(t(x), 1) for t in teachers]).mean(0)
    torch.testing.assert_close(F.softmax(out, 1), by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.exp(), by_hand, rtol=0, atol=1e-6)  # already normalised: softmax(log p̄) = p̄
    # MEAL V2's similarity loss is the cross-entropy with p̄ (no labels, no T²); kd at T=1 differs by H(p̄) only
    z_s = torch.randn(16, 10, requires_grad=True)
    similarity = -(by_hand * F.log_softmax(z_s, 1)).sum(1).mean()
    entropy = -(by_hand * by_hand.log()).sum(1).mean()
    kd = kd_loss(z_s, out, temperature=1.0)
    torch.testing.assert_close(kd, similarity - entropy, rtol=1e-5, atol=1e-6)
    g_kd, = torch.autograd.grad(kd, z_s)
    g_sim, = torch.autograd.grad(similarity, z_s)
    torch.testing.assert_close(g_kd, g_sim, rtol=1e-5, atol=1e-7)


def test_the_ensemble_target_stays_finite_when_a_probability_underflows() -> None:
    class Fixed(torch.nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(len(x), -1)

    ensemble = TeacherEnsemble([Fixed(torch.tensor([[300.0, 0.0, -300.0]])), Fixed(torch.tensor([[0.0, 300.0, -300.0]]))])
    out = ensemble(torch.zeros(2, 1))
    assert torch.isfinite(out).all()  # softmax(-300 − 300) underflows to 0 in float32; its log would be −inf
    torch.testing.assert_close(out.exp()[0, :2], torch.tensor([0.5, 0.5]))
    loss = create_loss("kd", {"temperature": 1.0})(LossInputs(student_logits=torch.zeros(2, 3), teacher_logits=out))
    assert math.isfinite(float(loss))


def test_the_ensemble_stays_in_eval_mode_and_has_no_feature_layers() -> None:
    from kd_core.features import FeatureTap

    teachers = [create_model("cnn_small", 10, 1, 8).eval(), create_model("cnn_small", 10, 1, 8).eval()]
    ensemble = TeacherEnsemble(teachers)
    predict(ensemble, torch.randn(4, 1, 8, 8))  # predict() puts a module back in its former mode afterwards
    ensemble.train()
    assert not ensemble.training and not any(t.training for t in teachers)
    with FeatureTap(ensemble) as tap:  # what the engine's teacher cache does: works, taps nothing
        ensemble(torch.randn(2, 1, 8, 8))
    assert tap.embedding is None and tap.stages == []


# --------------------------------------------------------------------------- the discriminator


def test_the_discriminator_trains_jointly_without_gradient_reversal() -> None:
    torch.manual_seed(1)
    teachers = [create_model("cnn_small", 10, 1, 8).eval(), create_model("cnn_small", 10, 1, 8).eval()]
    method = MEALV2(discriminator_weight=0.5)
    method.build(context())
    method.distill_teacher(teachers)
    assert isinstance(method.discriminator, LogitDiscriminator)
    assert [m.out_features for m in method.discriminator.layers if isinstance(m, torch.nn.Linear)] == [16, 4, 2]
    assert all(isinstance(m, torch.nn.ReLU) for m in list(method.discriminator.layers)[1::2])  # ReLU after every layer, as released
    # the ensemble never joins the method's parameters, hence never the optimizer or the checkpoint
    assert set(method.state_dict()) == {f"discriminator.layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    x = torch.randn(8, 1, 8, 8)
    method.prepare_batch(Batch(x, torch.zeros(8, dtype=torch.long), torch.arange(8)), torch.Generator())
    z_s = torch.randn(8, 10, requires_grad=True)
    loss = method.losses(LossInputs(student_logits=z_s), StudentOutputs(z_s), 0.0)["disc"]
    loss.backward()
    grads = [p.grad for p in method.discriminator.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)  # type: ignore[union-attr]
    # the student gets the plain gradient of the same BCE (the released code has no gradient reversal)
    with torch.no_grad():
        mean_logits = torch.stack([t(x) for t in teachers]).mean(0)
    z = z_s.detach().clone().requires_grad_(True)
    by_hand = 0.5 * F.binary_cross_entropy_with_logits(method.discriminator(torch.cat([z, mean_logits])), discriminator_targets(8, z.device))
    by_hand.backward()
    torch.testing.assert_close(loss.detach(), by_hand.detach())
    torch.testing.assert_close(z_s.grad, z.grad)
    assert method._memo is not None and method._known is not None and int(method._known.sum()) == 8  # no live forward: kept per sample
    # a live step: the ensemble has just run on this batch, and its mean logits are used as they are
    live = MEALV2()
    live.build(context())
    live_ensemble = live.distill_teacher(teachers)
    x2 = torch.randn(8, 1, 8, 8)
    live.prepare_batch(Batch(x2, torch.zeros(8, dtype=torch.long), torch.arange(8)), torch.Generator())
    with torch.no_grad():
        live_ensemble(x2)
        expected = torch.stack([t(x2) for t in teachers]).mean(0)
    torch.testing.assert_close(live.teacher_mean_logits(x2, torch.arange(8)), expected)
    assert live._memo is None


def test_without_the_discriminator_there_is_nothing_to_train_or_save() -> None:
    method = MEALV2(discriminator=False)
    method.build(context())
    assert method.discriminator is None and not list(method.parameters())
    assert method.losses(LossInputs(student_logits=torch.zeros(2, 10)), StudentOutputs(torch.zeros(2, 10)), 0.0) == {}


# --------------------------------------------------------------------------- config checks


def test_meal_v2_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(meal_config(teachers=[]))
    assert [e[0] for e in info.value.errors] == ["teachers"] and "at least one further teacher" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:
        validate_config(meal_config(recipe=[{"loss": "ce"}]))
    assert info.value.errors[0][0] == "recipe" and "temperature: 1" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:
        validate_config(meal_config(method={"name": "meal_v2", "params": {"discriminator_weight": -1}}))
    assert info.value.errors == [("method.params", "discriminator_weight must be a finite number >= 0, got -1")]
    with pytest.raises(ConfigError) as info:
        validate_config(meal_config(method={"name": "meal_v2", "params": {"discriminator_reduction": 0}}))
    assert info.value.errors[0][0] == "method.params" and "discriminator_reduction" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:  # one teacher's features cannot stand for an ensemble
        validate_config(meal_config(recipe=[{"loss": "kd", "params": {"temperature": 1}}, {"loss": "fitnet"}]))
    assert info.value.errors[0][0] == "recipe[1].loss"
    stored = validate_config(meal_config()).method
    assert stored is not None and stored.params == {"discriminator": True, "discriminator_weight": 1.0, "discriminator_reduction": 8}
    assert create_method("meal_v2", {"discriminator_reduction": 4.0}).discriminator_reduction == 4
    with pytest.raises(ValueError, match="discriminator must be true or false"):
        create_method("meal_v2", {"discriminator": "yes"})


# --------------------------------------------------------------------------- a real run


class Watch(Callback):
    """Phases, the teachers around the student phase, what the recipe's KD term saw, the method at each epoch end."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.teachers_at_student_start: list[dict[str, torch.Tensor]] = []
        self.teachers: list[torch.nn.Module] = []
        self.frozen_during_steps: list[bool] = []
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dataset indices, teacher logits the recipe saw)
        self.method_at_epoch_end: list[dict[str, torch.Tensor]] = []
        self.method: MEALV2 | None = None

    def on_phase_start(self, run: PhaseRun) -> None:
        self.phases.append(run.phase.name)
        if run.phase.name != "student":
            return
        self.teachers = list(run.experiment.teachers)
        self.teachers_at_student_start = [snapshot(t) for t in self.teachers]
        method = run.method
        assert isinstance(method, MEALV2)
        self.method = method
        original = method.distill_inputs

        def spy(inputs: LossInputs, student: StudentOutputs) -> LossInputs:
            assert inputs.teacher_logits is not None and inputs.index is not None
            self.seen.append((inputs.index.clone(), inputs.teacher_logits.clone()))
            return original(inputs, student)

        method.distill_inputs = spy  # type: ignore[method-assign]

    def on_step(self, run: PhaseRun, idx: torch.Tensor) -> None:
        if run.phase.name == "student":
            self.frozen_during_steps.append(all(not t.training and not any(p.requires_grad for p in t.parameters()) for t in self.teachers))

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.phase.name == "student" and run.method is not None:
            self.method_at_epoch_end.append(snapshot(run.method))


@pytest.fixture(scope="module")
def meal_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemorySink, Watch, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("meal")
    sink, watch = MemorySink(), Watch()
    summary = run_experiment(validate_config(meal_config()), sink, out, callbacks=[watch])
    return sink, watch, out, summary


def test_each_teacher_trains_in_its_own_phase_and_stays_frozen(meal_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    sink, watch, out, summary = meal_run
    assert watch.phases == ["teacher", "teacher_2", "student"]
    for name in ("teacher", "teacher_2"):
        assert len(sink.series("loss/ce", name)) == 2 * STEPS, name  # 2 epochs of its own
    for teacher, start, name in zip(watch.teachers, watch.teachers_at_student_start, ("teacher", "teacher_2")):
        trained = load_file(str(out / f"{name}.safetensors"))
        assert all(torch.equal(start[k], trained[k]) for k in trained), name  # the student learns from the trained weights
        assert all(torch.equal(v, start[k]) for k, v in teacher.state_dict().items()), name  # unchanged by the student phase
    assert watch.frozen_during_steps and all(watch.frozen_during_steps)
    assert set(summary["teacher_accs"]) == {"teacher", "teacher_2"} and summary["teacher_acc"] == summary["teacher_accs"]["teacher"]


def test_the_recipe_learns_from_the_mean_of_the_teachers_softmaxes(meal_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    _, watch, _, _ = meal_run
    data = load_dataset("digits", val_fraction=0.2, subset=400, seed=4)
    assert len(watch.seen) == 3 * STEPS
    for idx, teacher_logits in watch.seen[:: 7]:
        x = data.train_x[idx]
        with torch.no_grad():
            mean = torch.stack([F.softmax(t(x), 1) for t in watch.teachers]).mean(0)
        torch.testing.assert_close(F.softmax(teacher_logits, 1), mean, rtol=0, atol=1e-6)
    # teacher outputs were cached, so the discriminator's teacher rows (mean logits) were kept per sample too
    method = watch.method
    assert method is not None and method._memo_complete and method._memo is not None
    with torch.no_grad():
        mean_logits = torch.stack([t(data.train_x[:]) for t in watch.teachers]).mean(0)
    torch.testing.assert_close(method._memo, mean_logits, rtol=1e-5, atol=1e-5)


def test_the_discriminator_learns_and_is_checkpointed(meal_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    sink, watch, out, summary = meal_run
    first, last = watch.method_at_epoch_end[0], watch.method_at_epoch_end[-1]
    assert not all(torch.equal(first[k], last[k]) for k in first)  # it received gradients and moved
    saved = load_file(str(out / "student_method.safetensors"))
    assert set(saved) == set(last) and all(torch.equal(saved[k], last[k]) for k in saved)
    d = LogitDiscriminator(10)
    assert summary["recipe_extra_params"] == sum(p.numel() for p in d.parameters()) == 10 * 16 + 16 + 16 * 4 + 4 + 4 * 2 + 2
    disc = sink.series("loss/meal_v2.disc", "student")
    assert len(disc) == 3 * STEPS and all(math.isfinite(v) for v in disc)
    total, kd = sink.series("loss/total", "student"), sink.series("loss/kd", "student")
    assert all(t == pytest.approx(k + d_, rel=1e-5) for t, k, d_ in zip(total, kd, disc))  # L = L_sim + L_disc, as released


def test_per_teacher_and_ensemble_accuracies_are_logged(meal_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    sink, watch, _, _ = meal_run
    data = load_dataset("digits", val_fraction=0.2, subset=400, seed=4)

    def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
        return 100.0 * float((logits.argmax(1) == y).float().mean())

    expected = {f"val/meal_{name}_top1": top1(predict(t, data.val_x), data.val_y) for name, t in zip(("teacher", "teacher_2"), watch.teachers)}
    ensemble = TeacherEnsemble(watch.teachers)
    expected["val/meal_ensemble_top1"] = top1(predict(ensemble, data.val_x), data.val_y)
    for key, value in expected.items():
        assert sink.series(key, "student") == pytest.approx([value] * 3), key
    assert sink.summary["teacher_ensemble_acc"] == pytest.approx(top1(predict(ensemble, data.test_x), data.test_y))
    # the student's agreement is measured against the ensemble, the target it learns
    assert len(sink.series("val/agreement", "student")) == 3


def test_a_run_teacher_joins_an_ensemble(meal_run: tuple[MemorySink, Watch, Path, dict[str, Any]], tmp_path: Path) -> None:
    sink, _, out, summary = meal_run
    asked: list[int] = []

    def run_teachers(run_id: int) -> Path:
        asked.append(run_id)
        return out / "teacher.safetensors"  # run 7's own trained teacher (cnn_small)

    config = meal_config(teacher={"arch": "lenet5", "source": f"file:{out / 'teacher_2.safetensors'}"},
                         teachers=[{"arch": "cnn_small", "source": "run:7"}], student={"arch": "cnn_tiny", "epochs": 1, "batch_size": 32})
    config = validate_config(config, run_teachers=run_teachers)
    again = MemorySink()
    result = run_experiment(config, again, tmp_path, run_teachers=run_teachers)
    assert 7 in asked
    assert {r["phase"] for r in again.rows} == {"teacher", "teacher_2", "student"}
    assert not again.series("loss/ce", "teacher_2") and not again.series("loss/ce", "teacher")  # reused, not retrained
    # the same two teachers, in the other order: the same accuracies and the same ensemble
    assert result["teacher_accs"] == {"teacher": summary["teacher_accs"]["teacher_2"], "teacher_2": summary["teacher_accs"]["teacher"]}
    assert again.summary["teacher_ensemble_acc"] == pytest.approx(sink.summary["teacher_ensemble_acc"])


def test_a_meal_v2_run_through_the_worker_logs_every_teacher_and_the_ensemble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_methods import turned_down
    from tests.worker_runs import metric, train_in_worker

    config = validate_config(turned_down(Path("configs/methods/mnist5k_meal_v2.yaml")))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    epochs = config.student.epochs
    for key in ("val/meal_teacher_top1", "val/meal_teacher_2_top1", "val/meal_ensemble_top1", "val/top1"):
        values = metric(store, run, key)
        assert len(values) == epochs and all(0 <= v <= 100 for v in values), key
    assert len(metric(store, run, "loss/ce", "teacher")) > 0 and len(metric(store, run, "loss/ce", "teacher_2")) > 0
    assert all(math.isfinite(v) for v in metric(store, run, "loss/meal_v2.disc"))
    assert set(run.summary["teacher_accs"]) == {"teacher", "teacher_2"}
    assert 0 <= run.summary["teacher_ensemble_acc"] <= 100 and run.summary["student_acc"] is not None
    assert run.summary["recipe_extra_params"] > 0  # the discriminator

    # a second run reuses both teachers: run <id>'s own teacher through the database, its second one as a file
    second = {a.meta["model"]: a.path for a in store.artifacts(run.id, "checkpoint") if a.meta.get("which") == "last"}["teacher_2"]
    raw = turned_down(Path("configs/methods/mnist5k_meal_v2.yaml"))
    raw.update(teacher={"arch": "lenet5", "source": f"file:{second}"}, teachers=[{"arch": "cnn_small", "source": f"run:{run.id}"}], baseline=False)
    raw["student"]["epochs"] = 1
    store, reuse = train_in_worker(validate_config(raw), tmp_path, monkeypatch)
    assert reuse.id != run.id and not metric(store, reuse, "loss/ce", "teacher") and not metric(store, reuse, "loss/ce", "teacher_2")
    assert reuse.summary["teacher_accs"] == {"teacher": run.summary["teacher_accs"]["teacher_2"], "teacher_2": run.summary["teacher_accs"]["teacher"]}
    assert reuse.summary["teacher_ensemble_acc"] == pytest.approx(run.summary["teacher_ensemble_acc"])  # the same ensemble
