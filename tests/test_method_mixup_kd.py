"""Mixup-KD: the fraction asked is mixed with λ ~ Beta(a, a), soft targets are the λ-mix of one-hot labels, the
teacher labels the mixed images (live), the same seed replays the same mixing (resume), and the per-sample
temperature reaches every logit term of the recipe while CE sees the raw logits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import stats

from kd_core.config import ConfigError, LossTerm, validate_config
from kd_core.engine import Callback, PhaseRun, StopRequested, run_experiment
from kd_core.engine.precision import Precision
from kd_core.engine.step import TrainStep
from kd_core.engine.teacher import TeacherOutputs
from kd_core.losses import LossInputs, create_loss
from kd_core.losses.base import ModelShapes
from kd_core.losses.logit import dist_loss, dkd_loss, kd_loss
from kd_core.methods import Batch, MethodContext, StudentOutputs, create_method
from kd_core.methods.mixup_kd import MixupKD, std_scaled
from kd_core.models import create_model
from kd_core.sink import MemorySink


def built(num_classes: int = 10, **params: Any) -> MixupKD:
    method = create_method("mixup_kd", params)
    shapes = ModelShapes(num_classes=num_classes, embedding_dim=16, stage_shapes=[])
    method.build(MethodContext(student=shapes, teacher=shapes, num_classes=num_classes, num_train=1000, in_channels=1, image_size=4))
    assert isinstance(method, MixupKD)
    return method


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "mixup", "seed": 5, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 300},
        "teacher": {"arch": "cnn_small", "epochs": 2, "batch_size": 32}, "student": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 32},
        "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 1}}],
        "method": {"name": "mixup_kd", "params": {"mix_fraction": 0.25}}, "baseline": False, "analysis": {"enabled": False},
        "checkpoint_every_s": 1000, **overrides,
    }


# --------------------------------------------------------------------------- the mixing


def own_class_batch(b: int) -> Batch:
    """Row i is a constant image of value i with class i: λ and the partner can be read off the soft target."""
    x = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 1, 4, 4).contiguous()
    return Batch(x, torch.arange(b), torch.arange(b))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_the_fraction_asked_is_mixed_with_beta_distributed_lambdas(fraction: float) -> None:
    b, batches, a = 64, 300, 1.0
    method = built(num_classes=b, mix_fraction=fraction, beta_a=a)
    counts, lambdas = [], []
    for seed in range(batches):
        batch = own_class_batch(b)
        out = method.prepare_batch(batch, generator(seed))
        mixed = (out.x != batch.x).flatten(1).any(1)
        assert out.soft_target is not None
        own = out.soft_target.diagonal()
        assert torch.equal(mixed, own < 1)  # a row is mixed exactly when its own label lost weight
        partner = torch.where(mixed, (out.soft_target - torch.diag(own)).argmax(1), torch.arange(b))
        assert not (partner[mixed] == torch.arange(b)[mixed]).any()  # never mixed with itself
        lam = own[mixed]
        torch.testing.assert_close(out.x[mixed], lam[:, None, None, None] * batch.x[mixed] + (1 - lam[:, None, None, None]) * batch.x[partner[mixed]])
        torch.testing.assert_close(out.soft_target.sum(1), torch.ones(b))
        assert int(mixed.sum()) in (math.floor(b * fraction), math.ceil(b * fraction))  # every batch as close as a whole count gets
        counts.append(int(mixed.sum()))
        lambdas += lam.tolist()
    assert sum(counts) / (b * batches) == pytest.approx(fraction, abs=0.002)  # and exactly the fraction on average
    if fraction > 0:
        assert stats.kstest(lambdas, stats.beta(a, a).cdf).pvalue > 1e-3


def test_lambda_follows_the_beta_parameter() -> None:
    method = built(num_classes=64, mix_fraction=1.0, beta_a=0.2)
    lambdas = torch.cat([method.prepare_batch(own_class_batch(64), generator(s)).soft_target.diagonal() for s in range(100)])  # type: ignore[union-attr]
    assert stats.kstest(lambdas.tolist(), stats.beta(0.2, 0.2).cdf).pvalue > 1e-3
    assert stats.kstest(lambdas.tolist(), stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # a = 0.2 is U-shaped, not uniform


def test_soft_targets_are_the_lambda_mix_of_one_hot_labels() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    method = built(mix_fraction=0.5)
    out = method.prepare_batch(Batch(x, y, torch.arange(64)), generator(3))
    rows, partners, lam = method.mixing(64, generator(3))  # the same draws
    expected = F.one_hot(y, 10).float()
    expected[rows] = lam[:, None] * F.one_hot(y[rows], 10).float() + (1 - lam[:, None]) * F.one_hot(y[partners], 10).float()
    assert out.soft_target is not None
    torch.testing.assert_close(out.soft_target, expected)
    torch.testing.assert_close(out.x[rows], lam[:, None, None, None] * x[rows] + (1 - lam[:, None, None, None]) * x[partners])
    assert torch.equal(out.y, out.soft_target.argmax(1)) or torch.equal(out.y[rows], torch.where(lam >= 0.5, y[rows], y[partners]))
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(out.x[untouched], x[untouched]) and torch.equal(out.y[untouched], y[untouched]) and torch.equal(out.idx, torch.arange(64))


def test_the_same_seed_replays_the_same_mixing() -> None:
    torch.manual_seed(0)
    batch = Batch(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)), torch.arange(32))
    method = built(mix_fraction=0.5)
    first, again, other = (method.prepare_batch(batch, generator(s)) for s in (11, 11, 12))
    assert torch.equal(first.x, again.x) and torch.equal(first.soft_target, again.soft_target)  # type: ignore[arg-type]
    assert not torch.equal(first.x, other.x)


# --------------------------------------------------------------------------- the per-sample temperature


def test_each_row_is_divided_by_its_own_logit_std() -> None:
    torch.manual_seed(0)
    z_s = (torch.randn(8, 10) * torch.linspace(0.5, 5, 8)[:, None]).requires_grad_(True)
    z_t = torch.randn(8, 10) * torch.linspace(5, 0.5, 8)[:, None]
    method = built()
    seen = method.distill_inputs(LossInputs(student_logits=z_s, teacher_logits=z_t), StudentOutputs(z_s))
    sigma_s = torch.tensor([row.std().item() for row in z_s.detach()])  # unbiased, as torch.std in the released code
    sigma_t = torch.tensor([row.std().item() for row in z_t])
    torch.testing.assert_close(seen.student_logits, z_s / sigma_s[:, None])
    torch.testing.assert_close(seen.teacher_logits, z_t / sigma_t[:, None])
    torch.testing.assert_close(seen.student_logits.detach().std(1), torch.ones(8))
    # the released MIXSTD distillation part: KL_batchmean(softmax(z_t/σ_t) ‖ softmax(z_s/σ_s)), no T²
    released = F.kl_div(F.log_softmax(z_s / z_s.std(1, keepdim=True), 1), F.softmax(z_t / z_t.std(1, keepdim=True), 1), reduction="batchmean")
    ours = create_loss("kd", {"temperature": 1.0})(seen)
    torch.testing.assert_close(ours, released)
    g_ours, = torch.autograd.grad(ours, z_s)
    g_released, = torch.autograd.grad(released, z_s)
    torch.testing.assert_close(g_ours, g_released)  # gradients flow through σ_s, as released
    plain = built(std_temperature=False)
    inputs = LossInputs(student_logits=z_s, teacher_logits=z_t)
    assert plain.distill_inputs(inputs, StudentOutputs(z_s)) is inputs


@pytest.mark.parametrize(("term", "reference"), [
    ({"loss": "kd", "params": {"temperature": 2.0}}, lambda s, t, y: kd_loss(s, t, 2.0)),
    ({"loss": "dkd", "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}}, lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0)),
    ({"loss": "dist", "params": {"beta": 1.0, "gamma": 1.0, "temperature": 1.0}}, lambda s, t, y: dist_loss(s, t, 1.0, 1.0, 1.0)),
])
def test_every_logit_term_sees_the_scaled_logits_and_ce_the_raw_ones_with_mixed_labels(term: dict[str, Any], reference: Any) -> None:
    torch.manual_seed(0)
    student, teacher = create_model("cnn_tiny", 10, 1, 8), create_model("cnn_small", 10, 1, 8).eval()
    recipe = [LossTerm(loss="ce", weight=0.1), LossTerm(**term)]
    losses = [create_loss(t.loss, t.params) for t in recipe]
    method = built(mix_fraction=0.5)
    precision = Precision("fp32", "cpu")
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    outputs = TeacherOutputs(teacher, {"logits", "target"}, precision, method.varies_teacher_inputs, x)
    step = TrainStep(student, losses, recipe, precision, torch.optim.SGD(student.parameters(), lr=0.1), outputs, method)
    batch = method.prepare_batch(Batch(x, y, torch.arange(32)), generator(0))
    _, terms = step.compute_terms(batch, epoch=0, step=0, total_steps=10)
    with torch.no_grad():
        z_s, z_t = student(batch.x), teacher(batch.x)  # both on the mixed images
    assert outputs.mode == "live"
    torch.testing.assert_close(terms["ce"], F.cross_entropy(z_s, batch.soft_target))
    torch.testing.assert_close(terms[term["loss"]], reference(std_scaled(z_s), std_scaled(z_t), batch.y))
    step.close()
    outputs.close()


# --------------------------------------------------------------------------- real runs


class Spy(Callback):
    """In the student phase: each mixed batch, what the teacher was given, and the teacher logits the recipe saw."""

    def __init__(self) -> None:
        self.prepared: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dataset indices, mixed images)
        self.teacher_inputs: list[torch.Tensor] = []
        self.teacher_logits: list[torch.Tensor] = []
        self.teacher: torch.nn.Module | None = None
        self.mode: dict[str, Any] = {}
        self.hooks: list[Any] = []

    def on_phase_start(self, run: PhaseRun) -> None:
        if run.phase.name != "student" or run.method is None:
            return
        method, self.teacher, self.mode = run.method, run.target_teacher, run.teacher_mode
        prepare, distill = method.prepare_batch, method.distill_inputs

        def spy_prepare(batch: Batch, gen: torch.Generator) -> Batch:
            out = prepare(batch, gen)
            self.prepared.append((out.idx.clone(), out.x.clone()))
            return out

        def spy_distill(inputs: LossInputs, student: StudentOutputs) -> LossInputs:
            assert inputs.teacher_logits is not None
            self.teacher_logits.append(inputs.teacher_logits.clone())
            return distill(inputs, student)

        method.prepare_batch, method.distill_inputs = spy_prepare, spy_distill  # type: ignore[method-assign]
        assert self.teacher is not None
        self.hooks.append(self.teacher.register_forward_hook(lambda module, args, output: self.teacher_inputs.append(args[0].clone())))

    def on_run_end(self, experiment: Any) -> dict[str, Any]:
        for hook in self.hooks:
            hook.remove()
        return {}


def test_the_teacher_labels_the_mixed_images_live(tmp_path: Path) -> None:
    from kd_core.data import load_dataset

    spy = Spy()
    run_experiment(validate_config(small()), MemorySink(), tmp_path, callbacks=[spy])
    assert spy.mode == {"teacher_outputs": "live", "teacher_outputs_reason": MixupKD.varies_teacher_inputs}
    data = load_dataset("digits", val_fraction=0.2, subset=300, seed=5)
    assert len(spy.prepared) == len(spy.teacher_inputs) == len(spy.teacher_logits) > 0
    mixed_somewhere = 0
    for (idx, mixed), given, logits in zip(spy.prepared, spy.teacher_inputs, spy.teacher_logits):
        assert torch.equal(given, mixed)  # the teacher saw the mixed batch ...
        clean = data.train_x[idx]
        assert spy.teacher is not None
        with torch.no_grad():
            torch.testing.assert_close(logits, spy.teacher(mixed).float())  # ... and the recipe its outputs on it
            if not torch.equal(mixed, clean):
                mixed_somewhere += 1
                assert not torch.allclose(logits, spy.teacher(clean).float())  # not the clean images' (a cache's)
    assert mixed_somewhere == len(spy.prepared)  # with 25 % of 32 rows asked, every batch had mixed rows


@pytest.mark.parametrize("term", [{"loss": "dkd", "weight": 1.0}, {"loss": "dist", "weight": 2.0}])
def test_mixup_kd_trains_with_other_logit_losses(term: dict[str, Any], tmp_path: Path) -> None:
    sink = MemorySink()
    summary = run_experiment(validate_config(small(recipe=[{"loss": "ce", "weight": 1.0}, term],
                                                   teacher={"arch": "cnn_small", "source": "random", "epochs": 0})), sink, tmp_path)
    values = sink.series(f"loss/{term['loss']}", "student")
    assert values and all(math.isfinite(v) for v in values) and summary["student_acc"] is not None
    assert sink.series("mixup_std_teacher", "student") and sink.series("mixup_std_student", "student")


def test_a_resumed_run_replays_the_same_mixing(tmp_path: Path) -> None:
    config = validate_config(small(teacher={"arch": "cnn_small", "source": "random", "epochs": 0}))
    straight_spy = Spy()
    run_experiment(config, MemorySink(), tmp_path / "straight", callbacks=[straight_spy])
    calls = {"n": 0}

    def stop_mid_epoch() -> bool:
        calls["n"] += 1
        return calls["n"] == 11  # 8 steps an epoch: inside the second epoch

    resumed_spy = Spy()
    with pytest.raises(StopRequested):
        run_experiment(config, MemorySink(), tmp_path / "resumed", stop_requested=stop_mid_epoch, callbacks=[resumed_spy])
    run_experiment(config, MemorySink(), tmp_path / "resumed", resume=True, callbacks=[resumed_spy])
    assert len(resumed_spy.prepared) == len(straight_spy.prepared) + 0  # stopped after a step's checkpoint: nothing replayed twice
    for (i1, x1), (i2, x2) in zip(straight_spy.prepared, resumed_spy.prepared):
        assert torch.equal(i1, i2) and torch.equal(x1, x2)
    a, b = load_file(str(tmp_path / "straight" / "student.safetensors")), load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same mixing, so the same student, bit for bit


def test_mixup_kd_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(small(recipe=[{"loss": "ce"}], baseline=False))
    assert info.value.errors[0][0] == "recipe" and "distillation term" in info.value.errors[0][1]
    for params, message in [({"mix_fraction": 1.5}, "must be a number in [0, 1]"), ({"beta_a": 0}, "must be a finite number > 0"),
                            ({"std_temperature": 1}, "must be true or false")]:
        with pytest.raises(ConfigError) as info:
            validate_config(small(method={"name": "mixup_kd", "params": params}))
        (path, problem), = info.value.errors
        assert path.startswith("method.params") and next(iter(params)) in path + problem and message in problem, params
    stored = validate_config(small(method={"name": "mixup_kd"})).method
    assert stored is not None and stored.params == {"mix_fraction": 0.1, "beta_a": 1.0, "std_temperature": True}


def test_a_mixup_kd_run_through_the_worker_mixes_live_and_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_methods import turned_down
    from tests.worker_runs import metric, train_in_worker

    config = validate_config(turned_down(Path("configs/methods/mnist5k_mixup_kd.yaml")))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    fractions = metric(store, run, "mixup_mixed_fraction")
    assert fractions and sum(fractions) / len(fractions) == pytest.approx(0.1, abs=0.03)
    assert all(math.isfinite(v) for v in metric(store, run, "loss/kd")) and metric(store, run, "mixup_std_student")
    assert len(metric(store, run, "val/top1")) == config.student.epochs
    assert run.summary["student_acc"] is not None and run.summary["baseline_acc"] is not None
