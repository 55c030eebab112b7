"""TGeo-KD: α(x) per sample from the trilateral geometry, the student's loss as defined, the hypergradient
against finite differences, α's network trained on the validation split only (never the test split, never by
the student's optimizer), exact resume, and a real run through the worker."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kd_core.config import ConfigError, validate_config
from kd_core.engine import Callback, PhaseRun, StopRequested, run_experiment
from kd_core.features import probe_shapes
from kd_core.losses.base import LossInputs
from kd_core.methods import Batch, MethodContext, StudentOutputs, create_method
from kd_core.methods.tgeo_kd import TGeoKD
from kd_core.models import create_model
from kd_core.sink import MemorySink
from tests.test_methods import turned_down


def built(classes: int = 10, n_val: int = 12, dtype: torch.dtype = torch.float32, **params: Any) -> tuple[TGeoKD, torch.nn.Module]:
    torch.manual_seed(0)
    student = create_model("cnn_tiny", classes, 1, 8)
    method = create_method("tgeo_kd", params)
    assert isinstance(method, TGeoKD)
    shapes = probe_shapes(student, 1, 8)
    student = student.to(dtype)
    method.build(MethodContext(student=shapes, teacher=shapes, num_classes=classes, num_train=50, in_channels=1, image_size=8,
                               val_x=torch.randn(n_val, 1, 8, 8, dtype=dtype), val_y=torch.randint(0, classes, (n_val,))))
    method.init_student(student, student)
    return method.to(dtype), student


def test_alpha_is_a_ratio_per_sample_that_depends_on_the_sample() -> None:
    method, _ = built()
    torch.manual_seed(3)
    z_s, z_t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    method._observe_teacher(z_t, y)
    state = method.state(z_s, z_t, y)
    assert state.shape == (16, 90) and not state.requires_grad
    alpha = method.alpha(state)
    assert alpha.shape == (16,) and bool(((alpha > 0) & (alpha < 1)).all())
    assert alpha.std() > 0  # not one ratio for the whole batch
    z_s2 = z_s.clone()
    z_s2[5] *= 4  # only sample 5's student prediction moves: only its ratio moves
    alpha2 = method.alpha(method.state(z_s2, z_t, y))
    assert alpha2[5] != alpha[5] and torch.equal(torch.cat([alpha2[:5], alpha2[6:]]), torch.cat([alpha[:5], alpha[6:]]))


def test_the_geometry_state_and_the_students_loss_are_as_defined() -> None:
    method, _ = built(temperature=2.0, weight=1.0)
    method.eval()  # no hypergradient step: the loss alone
    torch.manual_seed(4)
    batches = [(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 3, (8,))) for _ in range(2)]
    seen_t: list[torch.Tensor] = []
    seen_y: list[torch.Tensor] = []
    for z_s, z_t, y in batches:
        z_s.requires_grad_(True)
        terms = method.losses(LossInputs(student_logits=z_s, teacher_logits=z_t, target=y), StudentOutputs(z_s), 0.0)
        seen_t.append(F.softmax(z_t, 1))
        seen_y.append(y)
        # by hand: t̄ = the teacher's mean prediction over every training sample of the class seen so far
        p_t_all, y_all = torch.cat(seen_t), torch.cat(seen_y)
        t_bar = torch.stack([p_t_all[y_all == c].mean(0) for c in y.tolist()])
        p_s, p_t, g = F.softmax(z_s.detach(), 1), F.softmax(z_t, 1), F.one_hot(y, 10).float()
        state = torch.cat([p_s, p_t, g, t_bar, (t_bar - p_s) ** 2, (g - p_s) ** 2, (p_t - p_s) ** 2, (p_t - g) ** 2, (t_bar - g) ** 2], 1)
        assert torch.allclose(method.state(z_s, z_t, y), state, atol=1e-6)
        alpha = method.alpha_net(state).detach()
        kl = 4.0 * F.kl_div(F.log_softmax(z_s / 2, 1), F.softmax(z_t / 2, 1), reduction="none").sum(1)
        ce = F.cross_entropy(z_s, y, reduction="none")
        assert terms["fused"].item() == pytest.approx((alpha * kl + (1 - alpha) * ce).mean().item(), rel=1e-5)
        # α is a constant for the student's loss: its gradient is α-weighted KL plus (1 − α)-weighted CE
        terms["fused"].backward()
        z_ref = z_s.detach().clone().requires_grad_(True)
        kl_ref = 4.0 * F.kl_div(F.log_softmax(z_ref / 2, 1), F.softmax(z_t / 2, 1), reduction="none").sum(1)
        ((alpha * kl_ref + (1 - alpha) * F.cross_entropy(z_ref, y, reduction="none")).mean()).backward()
        assert torch.allclose(z_s.grad, z_ref.grad, atol=1e-6)
    assert all(p.grad is None for p in method.alpha_net.parameters())  # never through the student's loss


def test_the_hypergradient_matches_finite_differences_of_the_unrolled_step() -> None:
    """d/dφ of L_val(θ − η ∇θ L_train(θ, α_φ)) by autograd against a central difference along a random direction."""
    method, student = built(dtype=torch.float64, temperature=1.5)
    method.virtual_lr.fill_(0.3)
    torch.manual_seed(5)
    x, y, z_t = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,)), torch.randn(6, 10, dtype=torch.float64)
    xv, yv = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (7,))
    with torch.no_grad():
        state = method.state(student(x), z_t, y)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    hyper, val_loss = method.hypergradient(x, state, z_t, y, xv, yv)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the student is untouched
    assert all(p.grad is None for p in student.parameters())

    def unrolled(phi: list[torch.Tensor]) -> float:
        net = copy.deepcopy(method.alpha_net)
        with torch.no_grad():
            for p, value in zip(net.parameters(), phi):
                p.copy_(value)
            alpha = net(state)
        model = copy.deepcopy(student)
        z = model(x)
        kl = 1.5**2 * F.kl_div(F.log_softmax(z / 1.5, 1), F.softmax(z_t / 1.5, 1), reduction="none").sum(1)
        loss = (alpha * kl + (1 - alpha) * F.cross_entropy(z, y, reduction="none")).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.3 * g
            return float(F.cross_entropy(model(xv), yv))

    phi = [p.detach().clone() for p in method.alpha_net.parameters()]
    direction = [torch.randn_like(p) for p in phi]
    eps = 1e-4
    numeric = (unrolled([p + eps * d for p, d in zip(phi, direction)]) - unrolled([p - eps * d for p, d in zip(phi, direction)])) / (2 * eps)
    analytic = sum(float((h * d).sum()) for h, d in zip(hyper, direction))
    assert float(val_loss) == pytest.approx(unrolled(phi), rel=1e-9)
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10) and abs(analytic) > 1e-8


def test_a_training_step_moves_alpha_only_through_its_own_update() -> None:
    method, student = built()
    torch.manual_seed(6)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    idx = torch.arange(8)
    method.prepare_batch(Batch(x, y, idx), torch.Generator())
    before = [p.detach().clone() for p in method.alpha_net.parameters()]
    z_s = student(x)
    z_t = torch.randn(8, 10)
    terms = method.losses(LossInputs(student_logits=z_s, teacher_logits=z_t, target=y, index=idx, step=0), StudentOutputs(z_s), 0.0)
    after = [p.detach().clone() for p in method.alpha_net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)) and int(method.adam_step) == 1
    terms["fused"].backward()
    assert all(p.grad is None for p in method.alpha_net.parameters())
    assert torch.isfinite(method.logged_values()["tgeo_hyper_val_loss"])
    # the ratios recorded for the epoch's distribution are those of the updated network, per training sample
    assert torch.equal(method.epoch_alpha[:8], method.alpha(method.state(z_s, z_t, y)).detach())
    assert bool(torch.isnan(method.epoch_alpha[8:]).all())


def test_a_config_without_a_validation_split_is_refused() -> None:
    from tests.test_methods import small

    with pytest.raises(ConfigError) as info:
        validate_config(small(method={"name": "tgeo_kd"}, recipe=[], dataset={"name": "digits", "val_fraction": 0.0}))
    assert info.value.errors[0][0] == "dataset.val_fraction" and "validation split" in info.value.errors[0][1]
    config = validate_config(small(method={"name": "tgeo_kd"}, recipe=[]))
    assert config.method.params == {"temperature": 1.5, "alpha_lr": 0.001, "alpha_weight_decay": 0.0, "val_batch_size": 64, "weight": 1.0}


# --------------------------------------------------------------------------- real runs


def tiny(**params: Any) -> Any:
    return validate_config({
        "name": "tgeo", "seed": 1, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 200},
        "teacher": {"arch": "cnn_small", "epochs": 1, "batch_size": 32}, "student": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 32},
        "recipe": [], "method": {"name": "tgeo_kd", "params": {"val_batch_size": 16, **params}}, "baseline": False,
        "analysis": {"enabled": False},
    })


class AlphaNet(Callback):
    """The method's state when the student phase starts and at every epoch end."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_phase_start(self, run: PhaseRun) -> None:
        if run.method is not None:
            self.states.append({k: v.clone() for k, v in run.method.state_dict().items()})

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.method is not None:
            self.states.append({k: v.clone() for k, v in run.method.state_dict().items()})


def train(config: Any, out: Path, monkeypatch: pytest.MonkeyPatch | None = None, alter: str | None = None) -> tuple[MemorySink, AlphaNet, dict[str, Any]]:
    """A run; ``alter`` = "val" or "test" changes only that split's labels (shifted by one class)."""
    if alter is not None:
        assert monkeypatch is not None
        from kd_core.engine import experiment

        original = experiment.load_dataset

        def altered(*args: Any, **kwargs: Any) -> Any:
            data = original(*args, **kwargs)
            labels = getattr(data, f"{alter}_y")
            setattr(data, f"{alter}_y", (labels + 1) % data.num_classes)
            return data

        monkeypatch.setattr(experiment, "load_dataset", altered)
    sink, watcher = MemorySink(), AlphaNet()
    summary = run_experiment(config, sink, out, callbacks=[watcher])
    return sink, watcher, summary


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN equal to NaN (the epoch's α buffer holds NaN for samples not seen yet)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def net(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("alpha_net.")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemorySink, AlphaNet, dict[str, Any]]:
    return train(tiny(), tmp_path_factory.mktemp("tgeo"))


def test_a_run_trains_alpha_and_logs_its_distribution(straight: tuple[MemorySink, AlphaNet, dict[str, Any]]) -> None:
    sink, watcher, summary = straight
    first, last = net(watcher.states[0]), net(watcher.states[-1])
    assert all(not torch.equal(first[k], last[k]) for k in first)  # every layer of the ratio network moved
    for key in ("tgeo_alpha_mean", "tgeo_alpha_std", "tgeo_alpha_p10", "tgeo_alpha_p50", "tgeo_alpha_p90", "tgeo_alpha_min", "tgeo_alpha_max"):
        values = sink.series(key, "student")
        assert len(values) == 2 and all(0 <= v <= 1 for v in values), key
    p10, p50, p90 = (sink.series(f"tgeo_alpha_p{q}", "student")[-1] for q in (10, 50, 90))
    assert p10 <= p50 <= p90
    steps = len(sink.series("loss/total", "student"))
    assert len(sink.series("tgeo_hyper_val_loss", "student")) == steps and len(sink.series("tgeo_alpha_batch_mean", "student")) == steps
    assert sink.series("loss/total", "student") == sink.series("loss/tgeo_kd.fused", "student")  # the method's loss is the whole loss
    assert summary["recipe_extra_params"] == sum(v.numel() for v in first.values())


def test_alpha_learns_from_validation_labels_and_never_from_test_labels(
        straight: tuple[MemorySink, AlphaNet, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, reference, _ = straight
    _, test_altered, _ = train(tiny(), tmp_path / "test", monkeypatch, alter="test")
    assert len(reference.states) == len(test_altered.states) == 3
    assert all(same(a[k], b[k]) for a, b in zip(reference.states, test_altered.states) for k in a)  # bit-identical training
    monkeypatch.undo()
    _, val_altered, _ = train(tiny(), tmp_path / "val", monkeypatch, alter="val")
    assert torch.equal(net(val_altered.states[0])["alpha_net.net.0.weight"], net(reference.states[0])["alpha_net.net.0.weight"])
    assert not torch.equal(net(val_altered.states[-1])["alpha_net.net.0.weight"], net(reference.states[-1])["alpha_net.net.0.weight"])


def test_the_students_optimizer_never_moves_alpha(tmp_path: Path) -> None:
    """With α's own learning rate at 0, its network ends exactly where it started, though the student's SGD
    (momentum, weight decay) holds its parameters: nothing but the hypergradient update changes them."""
    _, watcher, _ = train(tiny(alpha_lr=0.0), tmp_path)
    first, last = net(watcher.states[0]), net(watcher.states[-1])
    assert all(torch.equal(first[k], last[k]) for k in first)


def test_a_resumed_run_continues_alpha_exactly(straight: tuple[MemorySink, AlphaNet, dict[str, Any]], tmp_path: Path) -> None:
    sink, reference, _ = straight
    calls = {"n": 0}

    def stop_in_the_second_epoch() -> bool:
        calls["n"] += 1
        return calls["n"] == 5 + 5 + 2  # teacher 5 steps, then 5 steps an epoch for the student

    with pytest.raises(StopRequested):
        run_experiment(tiny(), MemorySink(), tmp_path, stop_requested=stop_in_the_second_epoch)
    resumed_sink, watcher = MemorySink(), AlphaNet()
    run_experiment(tiny(), resumed_sink, tmp_path, resume=True, callbacks=[watcher])
    final, expected = watcher.states[-1], reference.states[-1]
    assert final.keys() == expected.keys() and all(same(final[k], expected[k]) for k in final)  # α's net, Adam, t̄, epoch α
    assert resumed_sink.series("tgeo_alpha_mean", "student")[-1] == sink.series("tgeo_alpha_mean", "student")[-1]


def test_a_tgeo_run_through_the_worker_logs_alpha_per_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.worker_runs import metric, train_in_worker

    config = validate_config(turned_down(Path("configs/methods/mnist5k_tgeo_kd.yaml")))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    means, stds = metric(store, run, "tgeo_alpha_mean"), metric(store, run, "tgeo_alpha_std")
    assert len(means) == config.student.epochs and all(0 < m < 1 for m in means) and all(s >= 0 for s in stds)
    assert all(math.isfinite(v) for v in metric(store, run, "tgeo_hyper_val_loss"))
    assert run.summary["student_acc"] is not None and run.summary["recipe_extra_params"] > 0
