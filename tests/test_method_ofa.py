"""OFA-KD, complete: branch shapes per architecture family, gradients into every branch, the total against
``ofa_loss`` by hand, branches saved with the method and absent from the student's prediction, and real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kd_core.config import ConfigError, validate_config
from kd_core.engine import Callback, PhaseRun, run_experiment
from kd_core.engine.evaluation import predict
from kd_core.features import FeatureTap, probe_shapes
from kd_core.losses.base import LossInputs
from kd_core.losses.logit import ofa_loss
from kd_core.methods import MethodContext, StudentOutputs, create_method
from kd_core.methods.ofa import OFA
from kd_core.methods.ofa_branches import ConvBranch, TokenBranch
from kd_core.models import create_model
from kd_core.sink import MemorySink
from tests.test_methods import turned_down

VIT = "timm:vit_tiny_patch16_224"
PAIRS = [("cnn_small", VIT), (VIT, "cnn_tiny")]


def built(teacher_arch: str, student_arch: str, channels: int, size: int, classes: int = 10, **params: Any) -> tuple[OFA, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student, teacher = create_model(student_arch, classes, channels, size), create_model(teacher_arch, classes, channels, size)
    method = create_method("ofa", params)
    assert isinstance(method, OFA)
    method.build(MethodContext(student=probe_shapes(student, channels, size), teacher=probe_shapes(teacher, channels, size),
                               num_classes=classes, num_train=100, in_channels=channels, image_size=size))
    method.init_student(student, teacher)
    return method, student, teacher


def forward(student: torch.nn.Module, x: torch.Tensor) -> StudentOutputs:
    with FeatureTap(student, stages=True) as tap:
        logits = student(x)
        return StudentOutputs(logits, None, list(tap.stages))


@pytest.mark.parametrize("shape", [(1, 28), (3, 32)], ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("pair", PAIRS, ids=["cnn_to_vit", "vit_to_cnn"])
def test_one_branch_per_stage_gives_class_logits(pair: tuple[str, str], shape: tuple[int, int]) -> None:
    (teacher_arch, student_arch), (channels, size) = pair, shape
    method, student, _ = built(teacher_arch, student_arch, channels, size, classes=7)
    out = forward(student, torch.randn(3, channels, size, size))
    branches = method.branch_logits(out.stages)
    assert list(branches) == [f"stage{i}" for i in range(1, len(out.stages) + 1)]  # every stage by default
    assert all(z.shape == (3, 7) for z in branches.values())
    family = TokenBranch if student_arch == VIT else ConvBranch  # token mixers for a ViT student, convolutions for a CNN
    assert all(isinstance(b, family) for b in method.branches.values())
    if student_arch == VIT:  # 7x7 / 8x8 grids need no patch merging; 3, 2, 1, 1 transformer blocks as in the released code
        assert [len(b.blocks) for b in method.branches.values()] == [3, 2, 1, 1]
    else:  # cnn_tiny's two stages: one stride-2 SepConv block, then a 1x1 conv, to max(D_s, D_t) = the ViT's width
        assert [len(b.down) for b in method.branches.values()] == [1, 1] and method.branches["stage2"].head.in_features == 192


def test_chosen_stages_only() -> None:
    method, student, _ = built("cnn_small", "cnn_small", 1, 28, stages=[2, 3])
    assert list(method.branches) == ["stage2", "stage3"]
    branches = method.branch_logits(forward(student, torch.randn(2, 1, 28, 28)).stages)
    assert list(branches) == ["stage2", "stage3"]


@pytest.mark.parametrize("pair", PAIRS, ids=["cnn_to_vit", "vit_to_cnn"])
def test_every_branch_receives_gradients_and_passes_them_to_the_student(pair: tuple[str, str]) -> None:
    method, student, teacher = built(*pair, 1, 28)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    out = forward(student, x)
    with torch.no_grad():
        z_t = teacher(x)
    terms = method.losses(LossInputs(student_logits=out.logits, teacher_logits=z_t, target=y), out, 0.0)
    terms["branches"].backward()  # the branch term alone
    for key, branch in method.branches.items():
        grads = [p.grad for p in branch.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), key
        assert all(g.abs().sum() > 0 for g in grads if g is not None), key
    # the branches train the student's layers below them, not its head
    head = student.get_submodule("fc" if pair[1] == "cnn_tiny" else "head")
    assert head.weight.grad is None or head.weight.grad.abs().sum() == 0
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


def test_the_total_is_ofa_loss_on_every_branch_plus_the_final_logits_by_hand() -> None:
    method, student, _ = built(VIT, "cnn_tiny", 1, 28, temperature=2.0, eps=1.3, kd_weight=0.5, branch_weight=2.0)
    torch.manual_seed(1)
    x, y, z_t = torch.randn(5, 1, 28, 28), torch.tensor([3, 1, 4, 1, 5]), torch.randn(5, 10)
    out = forward(student, x)
    terms = method.losses(LossInputs(student_logits=out.logits, teacher_logits=z_t, target=y), out, 0.0)

    def by_hand(z_s: torch.Tensor) -> torch.Tensor:  # mean_b sum_c -[(p_t + m)^gamma - m]_c log p_s,c at T=2
        p_t, m = F.softmax(z_t / 2.0, 1), F.one_hot(y, 10).float()
        return (-((p_t + m) ** 1.3 - m) * F.log_softmax(z_s / 2.0, 1)).sum(1).mean()

    branches = method.branch_logits(out.stages)
    assert set(terms) == {"logits", "branches"}
    assert terms["logits"].item() == pytest.approx(0.5 * by_hand(out.logits).item(), rel=1e-5)
    assert terms["branches"].item() == pytest.approx(2.0 * sum(by_hand(z).item() for z in branches.values()), rel=1e-5)
    assert terms["branches"].item() == pytest.approx(2.0 * sum(ofa_loss(z, z_t, y, 2.0, 1.3).item() for z in branches.values()), rel=1e-5)


def test_refused_configs_say_why() -> None:
    from tests.test_methods import small

    def errors(**overrides: Any) -> list[tuple[str, str]]:
        with pytest.raises(ConfigError) as info:
            validate_config(small(**overrides))
        return info.value.errors

    assert errors(method={"name": "ofa"}, student={"arch": "mlp", "epochs": 1})[0][0] == "student.arch"
    assert errors(method={"name": "ofa", "params": {"stages": [1, 3]}})[-1] == ("method.params.stages", "'cnn_tiny' has stages 1..2; got [3]")
    assert errors(method={"name": "ofa"}, recipe=[{"loss": "ce"}, {"loss": "ofa"}])[0][0] == "recipe[1].loss"
    assert errors(method={"name": "ofa", "params": {"kd_weight": 0, "branch_weight": 0}})[0][0] == "method.params"
    config = validate_config(small(method={"name": "ofa"}, recipe=[]))  # the method's own terms are a training signal
    assert config.method.params == {"stages": [], "temperature": 1.0, "eps": 1.0, "kd_weight": 1.0, "branch_weight": 1.0}


# --------------------------------------------------------------------------- real runs


class Snapshots(Callback):
    """The method's state at the start of the student phase and after each epoch; the checkpoint's method keys."""

    def __init__(self) -> None:
        self.method: list[dict[str, torch.Tensor]] = []
        self.checkpointed: list[set[str]] = []

    def on_phase_start(self, run: PhaseRun) -> None:
        if run.method is not None:
            self.method.append({k: v.clone() for k, v in run.method.state_dict().items()})

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.method is not None:
            self.method.append({k: v.clone() for k, v in run.method.state_dict().items()})
            if epoch > 1:  # the previous epoch's checkpoint, written by the engine after its callbacks
                state = torch.load(run.experiment.dir / "checkpoint.pt", weights_only=True)
                self.checkpointed.append(set(state["method"]))


@pytest.fixture(scope="module")
def ofa_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemorySink, Snapshots, Path, dict[str, Any], Any]:
    from tests.test_methods import small

    out = tmp_path_factory.mktemp("ofa")
    config = validate_config(small(method={"name": "ofa"}, recipe=[{"loss": "ce", "weight": 1.0}]))
    sink, snaps = MemorySink(), Snapshots()
    summary = run_experiment(config, sink, out, callbacks=[snaps])
    return sink, snaps, out, summary, config


def test_a_run_trains_every_branch_and_saves_them_with_the_method(ofa_run: tuple[MemorySink, Snapshots, Path, dict[str, Any], Any]) -> None:
    sink, snaps, out, summary, _ = ofa_run
    first, last = snaps.method[0], snaps.method[-1]
    branch_weights = [k for k in first if k.startswith("branches.") and k.endswith("weight")]
    assert {k.split(".")[1] for k in branch_weights} == {"stage1", "stage2"}
    assert all(not torch.equal(first[k], last[k]) for k in branch_weights)  # every branch trained
    saved = load_file(str(out / "student_method.safetensors"))
    assert set(saved) == set(last) and all(torch.equal(saved[k], last[k]) for k in saved)
    assert snaps.checkpointed and all(keys == set(saved) for keys in snaps.checkpointed)  # resumable with its branches
    assert summary["recipe_extra_params"] == sum(v.numel() for k, v in saved.items() if "running" not in k and "num_batches" not in k)
    # per step: each term and each branch's own loss; the total is the recipe's CE plus the method's two terms
    rows = {(r["key"], r["step"]): r["value"] for r in sink.rows if r["phase"] == "student"}
    steps = sorted(s for k, s in rows if k == "loss/total")
    for step in steps:
        total = rows[("loss/ce", step)] + rows[("loss/ofa.logits", step)] + rows[("loss/ofa.branches", step)]
        assert rows[("loss/total", step)] == pytest.approx(total, rel=1e-5)
        assert rows[("loss/ofa.branches", step)] == pytest.approx(rows[("ofa_stage1_loss", step)] + rows[("ofa_stage2_loss", step)], rel=1e-5)
    assert len(sink.series("val/ofa_stage1_top1", "student")) == 3 and all(math.isfinite(v) for v in sink.series("val/ofa_stage2_top1", "student"))
    assert not [r for r in sink.rows if r["phase"] == "baseline" and "ofa" in r["key"]]


def test_the_saved_student_alone_reproduces_the_runs_accuracy(ofa_run: tuple[MemorySink, Snapshots, Path, dict[str, Any], Any]) -> None:
    from kd_core.data import load_dataset

    _, _, out, summary, config = ofa_run
    data = load_dataset("digits", val_fraction=0.2, subset=400, seed=config.seed)
    for name, key, report in (("student_best", "student_acc", "student_best"), ("student", "student_last_acc", "student_last")):
        model = create_model("cnn_tiny", 10, 1, 8)
        model.load_state_dict(load_file(str(out / f"{name}.safetensors")))
        acc = 100.0 * float((predict(model, data.test_x).argmax(1) == data.test_y).float().mean())
        assert acc == pytest.approx(summary[key]), name
        assert json.loads((out / f"{report}_report.json").read_text())["top1"] == pytest.approx(acc)


def test_a_heterogeneous_pair_trains_token_branches_on_a_vit_student(tmp_path: Path) -> None:
    from tests.test_methods import small

    config = validate_config(small(method={"name": "ofa", "params": {"stages": [1, 4]}}, recipe=[{"loss": "ce"}], baseline=False,
                                   dataset={"name": "digits", "val_fraction": 0.2, "subset": 100},
                                   teacher={"arch": "cnn_small", "source": "random", "epochs": 0},
                                   student={"arch": VIT, "epochs": 1, "batch_size": 40}))
    sink, snaps = MemorySink(), Snapshots()
    summary = run_experiment(config, sink, tmp_path, callbacks=[snaps])
    first, last = snaps.method[0], snaps.method[-1]
    assert {k.split(".")[1] for k in first} == {"stage1", "stage4"}
    assert all(not torch.equal(first[k], last[k]) for k in first if k.endswith("head.weight"))
    assert all(math.isfinite(v) for v in sink.series("loss/ofa.branches", "student")) and summary["student_acc"] is not None


def test_an_ofa_run_through_the_worker_logs_every_branch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.worker_runs import metric, train_in_worker

    config = validate_config(turned_down(Path("configs/methods/mnist5k_ofa.yaml")))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    for key in ("loss/ofa.logits", "loss/ofa.branches", "ofa_stage1_loss", "ofa_stage2_loss"):
        values = metric(store, run, key)
        assert values and all(math.isfinite(v) and v > 0 for v in values), key
    assert len(metric(store, run, "val/ofa_stage2_top1")) == config.student.epochs
    assert run.summary["student_acc"] is not None and run.summary["recipe_extra_params"] > 0
