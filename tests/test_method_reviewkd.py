"""ReviewKD: ABF shapes on heterogeneous pairs, HCL against a hand computation, pre-activation teacher
features, the warm-up, trainable and saved ABF modules, and real runs (in-process and through the worker)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kd_core.config import ConfigError, validate_config
from kd_core.engine import Callback, PhaseRun, run_experiment
from kd_core.features import FeatureTap, probe_shapes
from kd_core.losses import LossInputs
from kd_core.methods import MethodContext, StudentOutputs, create_method
from kd_core.methods.preact import PreActivationTap
from kd_core.methods.reviewkd import ABF, hcl_loss, warmup_factor
from kd_core.models import create_model
from kd_core.sink import MemorySink

SHIPPED = Path("configs/methods/mnist5k_reviewkd.yaml")


def small(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "reviewkd", "seed": 2, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 400},
        "teacher": {"arch": "cnn_small", "epochs": 2, "batch_size": 32}, "student": {"arch": "lenet5", "epochs": 3, "batch_size": 32},
        "recipe": [{"loss": "ce", "weight": 1.0}], "method": {"name": "reviewkd", "params": {"weight": 2.0, "warmup_epochs": 2}},
        "baseline": False, "analysis": {"enabled": False}, **overrides,
    }


def built(teacher_arch: str, student_arch: str, channels: int, size: int, **params: Any) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = create_model(teacher_arch, 10, channels, size).eval().requires_grad_(False)
    student = create_model(student_arch, 10, channels, size)
    method = create_method("reviewkd", params)
    method.build(MethodContext(student=probe_shapes(student, channels, size), teacher=probe_shapes(teacher, channels, size),
                               num_classes=10, num_train=100, in_channels=channels, image_size=size))
    method.distill_teacher([teacher])
    return method, teacher, student


def forward_both(method: Any, teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> tuple[LossInputs, StudentOutputs]:
    with FeatureTap(teacher, embedding=True, stages=True) as t_tap, torch.no_grad():
        teacher(x)
    with FeatureTap(student, embedding=True, stages=True) as s_tap:
        logits = student(x)
    inputs = LossInputs(student_logits=logits, teacher_embedding=t_tap.embedding, teacher_stages=t_tap.stages)
    return inputs, StudentOutputs(logits, s_tap.embedding, s_tap.stages)


# --------------------------------------------------------------------------- shapes on heterogeneous pairs


@pytest.mark.parametrize(("teacher_arch", "student_arch", "channels", "size"), [
    ("resnet8", "lenet5", 3, 32),  # 3 stages (16/32/64 ch, 32/16/8 px) -> 2 stages (6/16 ch, 16/8 px), embeddings 64 vs 84
    ("cnn_small", "cnn_tiny", 1, 28),  # 3 stages -> 2, the student's deepest map larger than the teacher's
    ("cnn_tiny", "vgg8", 3, 32),  # the student has more stages than the teacher
    ("wrn_16_2", "resnet8x4", 3, 32),
])
def test_abf_outputs_have_the_teachers_shapes_on_heterogeneous_pairs(teacher_arch: str, student_arch: str, channels: int, size: int) -> None:
    method, teacher, student = built(teacher_arch, student_arch, channels, size)
    t_shapes, s_shapes = probe_shapes(teacher, channels, size), probe_shapes(student, channels, size)
    k = min(len(t_shapes.stage_shapes), len(s_shapes.stage_shapes))
    assert method.num_stages == k and len(method.abfs) == k + 1  # the pooled level plus the paired stages
    inputs, outputs = forward_both(method, teacher, student, torch.randn(4, channels, size, size))
    fused, targets = method.fuse(outputs.stages, outputs.embedding), method.targets(inputs)
    expected = [(t_shapes.embedding_dim, 1, 1), *t_shapes.stage_shapes[-k:][::-1]]  # deepest first
    assert [tuple(f.shape[1:]) for f in fused] == [tuple(t.shape[1:]) for t in targets] == [tuple(e) for e in expected]
    # each ABF takes the student's channels of its level; the deepest one does not fuse
    assert [abf.conv1[0].in_channels for abf in method.abfs] == [s_shapes.embedding_dim, *[s[0] for s in s_shapes.stage_shapes[-k:][::-1]]]
    assert method.abfs[0].att_conv is None and all(abf.att_conv is not None for abf in method.abfs[1:])
    # the loss reaches every ABF parameter and the student
    loss = method.losses(inputs, outputs, epoch_progress=30.0)["hcl"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for name, p in student.named_parameters() if not name.startswith("fc."))


def test_abf_blends_the_upsampled_residual_with_the_attention_weights() -> None:
    torch.manual_seed(0)
    abf = ABF(in_channels=3, mid_channels=2, out_channels=5, fuse=True).eval()  # eval: BN is the identity at init
    with torch.no_grad():
        abf.conv1[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([0.5, -1.0]))
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)
    out, fused = abf(x, residual, out_size=(8, 8))
    eps = abf.conv1[1].eps
    a0, a1 = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(-1.0))
    up = residual.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest upsampling 2x2 -> 4x4
    expected = (x[:, :2] / math.sqrt(1 + eps)) * a0 + up * a1
    expected = expected.repeat_interleave(2, 2).repeat_interleave(2, 3)  # to the teacher's 8x8
    assert torch.allclose(fused, expected, atol=1e-6)
    assert out.shape == (2, 5, 8, 8)


# --------------------------------------------------------------------------- HCL by hand


def test_hcl_equals_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    fs = [rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 2, 1, 1)), rng.normal(size=(2, 1, 6, 6))]
    ft = [rng.normal(size=f.shape) for f in fs]

    def pool(a: np.ndarray, size: int) -> np.ndarray:  # adaptive average pooling when size divides the side
        n, c, h, w = a.shape
        return a.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))

    def mse(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a - b) ** 2).mean())

    # 4x4: levels 2 (weight 1/2) and 1 (1/4), 4 is skipped (not smaller than the map); 1x1: MSE alone
    hand = (mse(fs[0], ft[0]) + mse(pool(fs[0], 2), pool(ft[0], 2)) / 2 + mse(pool(fs[0], 1), pool(ft[0], 1)) / 4) / 1.75
    hand += mse(fs[1], ft[1])
    # 6x6 with the pyramid [3, 1]: weights 1/2 and 1/4
    hand_36 = (mse(fs[2], ft[2]) + mse(pool(fs[2], 3), pool(ft[2], 3)) / 2 + mse(pool(fs[2], 1), pool(ft[2], 1)) / 4) / 1.75
    t = [torch.tensor(a) for a in fs], [torch.tensor(a) for a in ft]
    assert float(hcl_loss(t[0][:2], t[1][:2])) == pytest.approx(hand, rel=1e-12)
    assert float(hcl_loss(t[0][2:], t[1][2:], pyramid=[3, 1])) == pytest.approx(hand_36, rel=1e-12)
    assert float(hcl_loss(t[0][:1], t[1][:1], pyramid=[])) == pytest.approx(mse(fs[0], ft[0]), rel=1e-12)


# --------------------------------------------------------------------------- the teacher's pre-activations


def test_teacher_targets_are_pre_activation_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    resnet = create_model("resnet8x4", 10, 3, 32).eval()
    with PreActivationTap(resnet) as tap, FeatureTap(resnet, stages=True) as post, torch.no_grad():
        resnet(x)
        # by hand: the last block of layer1 before its final ReLU
        h = resnet.relu(resnet.bn1(resnet.conv1(x)))
        block = resnet.layer1[-1]
        by_hand = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h))))) + block.downsample(h)
    assert tap.ended_in_relu == [True, True, True]
    assert torch.allclose(tap.stages[0], by_hand, atol=1e-6) and (tap.stages[0] < 0).any()
    assert all(torch.equal(F.relu(pre), out) for pre, out in zip(tap.stages, post.stages))

    cnn = create_model("cnn_small", 10, 1, 28).eval()  # conv-BN-ReLU-maxpool: the pooling is replayed on the pre-activation
    x1 = torch.randn(3, 1, 28, 28)
    with PreActivationTap(cnn) as tap, torch.no_grad():
        cnn(x1)
        by_hand = F.max_pool2d(cnn.stage1[1](cnn.stage1[0](x1)), 2, ceil_mode=True)
    assert tap.ended_in_relu == [True, True, True] and torch.allclose(tap.stages[0], by_hand, atol=1e-6)

    wrn = create_model("wrn_16_1", 10, 3, 32).eval()  # WRN blocks end in an addition: their output is the pre-activation
    with PreActivationTap(wrn) as tap, FeatureTap(wrn, stages=True) as post, torch.no_grad():
        wrn(x)
    assert tap.ended_in_relu == [False, False, False] and all(torch.equal(a, b) for a, b in zip(tap.stages, post.stages))


def test_an_in_place_relu_does_not_overwrite_the_pre_activation() -> None:
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 3, 32).eval()  # torchvision blocks end in nn.ReLU(inplace=True)
    with PreActivationTap(model) as tap, FeatureTap(model, stages=True) as post, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert tap.ended_in_relu == [True] * 4
    assert all((pre < 0).any() and torch.equal(F.relu(pre), out) for pre, out in zip(tap.stages, post.stages))


def test_post_activation_targets_can_be_chosen() -> None:
    method, teacher, student = built("cnn_small", "cnn_tiny", 1, 28, teacher_preact=False)
    inputs, _ = forward_both(method, teacher, student, torch.randn(2, 1, 28, 28))
    assert all((t >= 0).all() for t in method.targets(inputs))


# --------------------------------------------------------------------------- warm-up


def test_the_loss_weight_warms_up_per_epoch_from_epoch_one() -> None:
    assert [warmup_factor(e + 0.5, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0.0, 20) == 1 / 20 and warmup_factor(3.99, 0) == 1.0
    method, teacher, student = built("cnn_small", "cnn_tiny", 1, 28, weight=5.0, warmup_epochs=4)
    inputs, outputs = forward_both(method, teacher, student, torch.randn(4, 1, 28, 28))
    with torch.no_grad():
        hcl = hcl_loss(method.fuse(outputs.stages, outputs.embedding), method.targets(inputs))
        for progress, factor in ((0.3, 0.25), (2.9, 0.75), (7.0, 1.0)):
            assert float(method.losses(inputs, outputs, progress)["hcl"]) == pytest.approx(5.0 * factor * float(hcl), rel=1e-6)
            assert method.logged_values()["reviewkd_weight"] == pytest.approx(5.0 * factor)


# --------------------------------------------------------------------------- config checks


def test_reviewkd_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(small(student={"arch": "mlp", "epochs": 1}))
    assert info.value.errors == [("student.arch", "reviewkd fuses stage feature maps, and 'mlp' has none: use a convolutional student")]
    with pytest.raises(ConfigError) as info:
        validate_config(small(recipe=[]))
    assert info.value.errors[0][0] == "recipe" and "{loss: ce" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:
        validate_config(small(method={"name": "reviewkd", "params": {"pyramid": [4, 0]}}))
    assert info.value.errors[0][0] == "method.params" and "pyramid" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:
        validate_config(small(method={"name": "reviewkd", "params": {"weight": -1}}))
    assert "weight must be a number >= 0" in info.value.errors[0][1]
    stored = validate_config(small(method={"name": "reviewkd"})).method
    assert stored.params == {"weight": 1.0, "warmup_epochs": 20, "pyramid": [4, 2, 1], "max_mid_channels": 512, "teacher_preact": True}


# --------------------------------------------------------------------------- a real run


class Watch(Callback):
    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.in_optimizer = False
        self.end: dict[str, torch.Tensor] = {}
        self.teacher: torch.nn.Module | None = None

    def on_phase_start(self, run: PhaseRun) -> None:
        if run.method is not None:
            self.start = {k: v.clone() for k, v in run.method.state_dict().items()}
            self.teacher = run.teacher
            optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
            self.in_optimizer = all(id(p) in optimized for p in run.method.parameters())

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.method is not None:
            self.end = {k: v.clone() for k, v in run.method.state_dict().items()}


@pytest.fixture(scope="module")
def reviewkd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemorySink, Watch, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("reviewkd")
    sink, watch = MemorySink(), Watch()
    summary = run_experiment(validate_config(small()), sink, out, callbacks=[watch])
    return sink, watch, out, summary


def test_abf_modules_train_are_saved_and_counted(reviewkd_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    sink, watch, out, summary = reviewkd_run
    assert watch.in_optimizer
    abf_weights = [k for k in watch.start if k.startswith("abfs.") and k.endswith("weight")]
    assert abf_weights and all(not torch.equal(watch.start[k], watch.end[k]) for k in abf_weights)  # every ABF conv and BN moved
    saved = load_file(str(out / "student_method.safetensors"))
    assert set(saved) == set(watch.end) and all(k.startswith("abfs.") for k in saved)
    assert all(torch.equal(saved[k], watch.end[k]) for k in saved)
    method = create_method("reviewkd")
    teacher, student = create_model("cnn_small", 10, 1, 8), create_model("lenet5", 10, 1, 8)
    method.build(MethodContext(probe_shapes(student, 1, 8), probe_shapes(teacher, 1, 8), 10, 1, 1, 8))
    assert summary["recipe_extra_params"] == sum(p.numel() for p in method.parameters()) > 0
    assert sink.summary["reviewkd_teacher_preact"] == [True, True]
    # the pre-activation hooks are gone once the student phase is over
    assert watch.teacher is not None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in watch.teacher.modules())


def test_a_run_logs_the_warmed_up_hcl(reviewkd_run: tuple[MemorySink, Watch, Path, dict[str, Any]]) -> None:
    sink, _, _, summary = reviewkd_run
    rows = [r for r in sink.rows if r["phase"] == "student"]
    weight_by_epoch = {r["epoch"]: r["value"] for r in rows if r["key"] == "reviewkd_weight"}
    assert weight_by_epoch == {0: 1.0, 1: 2.0, 2: 2.0}  # weight 2, warm-up 2 epochs
    terms = [r for r in rows if r["key"] == "loss/reviewkd.hcl"]
    hcl = {(r["step"]): r["value"] for r in rows if r["key"] == "reviewkd_hcl"}
    assert terms and all(math.isfinite(r["value"]) for r in terms)
    assert all(r["value"] == pytest.approx(weight_by_epoch[r["epoch"]] * hcl[r["step"]], rel=1e-5) for r in terms)
    assert summary["student_acc"] is not None


def test_a_reviewkd_run_through_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_methods import turned_down
    from tests.worker_runs import metric, train_in_worker

    config = validate_config(turned_down(SHIPPED))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    hcl, weight = metric(store, run, "loss/reviewkd.hcl"), metric(store, run, "reviewkd_weight")
    assert hcl and all(math.isfinite(v) for v in hcl) and len(weight) == len(hcl)
    assert len(metric(store, run, "val/top1")) == config.student.epochs
    assert run.summary["student_acc"] is not None and run.summary["recipe_extra_params"] > 0
    assert run.summary["reviewkd_teacher_preact"] == [True, True]
