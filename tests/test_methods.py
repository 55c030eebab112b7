"""The method layer and each method's mechanics, with real (small) runs through the engine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kd_core.config import ConfigError, validate_config
from kd_core.engine import Callback, PhaseRun, run_experiment
from kd_core.engine.evaluation import outputs_with_embedding, predict
from kd_core.methods import METHODS, describe_method
from kd_core.methods.dho import blend, choose_blend
from kd_core.models import create_model
from kd_core.sink import MemorySink

SHIPPED = sorted(Path("configs/methods").glob("mnist5k_*.yaml"))


def small(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "method", "seed": 2, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 400},
        "teacher": {"arch": "cnn_small", "epochs": 2, "batch_size": 32}, "student": {"arch": "cnn_tiny", "epochs": 3, "batch_size": 32},
        "recipe": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "params": {"temperature": 2}}],
        "analysis": {"enabled": False}, **overrides,
    }


def turned_down(path: Path) -> dict[str, Any]:
    """A shipped method config with a small subset and few epochs: it must still be a valid, trainable config."""
    raw = yaml.safe_load(path.read_text())
    raw["device"] = "cpu"
    raw["dataset"]["subset"] = 300
    for section in [raw["teacher"], *raw.get("teachers", []), raw["student"]]:
        section["epochs"] = min(section["epochs"], 2)
    raw["analysis"] = {"enabled": False}
    return raw


def test_every_method_is_described_with_its_paper() -> None:
    for name in METHODS:
        info = describe_method(name)
        assert info["summary"] and info["paper"] and info["paper_url"].startswith("https://"), name
        assert any(p.name == f"mnist5k_{name}.yaml" for p in SHIPPED), f"no shipped config for {name}"


@pytest.mark.parametrize("path", [p for p in SHIPPED if yaml.safe_load(p.read_text()).get("method")], ids=lambda p: p.stem)
def test_shipped_method_configs_train_when_turned_down(path: Path, tmp_path: Path) -> None:
    config = validate_config(turned_down(path))
    sink = MemorySink()
    summary = run_experiment(config, sink, tmp_path)
    losses = [r["value"] for r in sink.rows if r["phase"] == "student" and r["key"].startswith("loss/")]
    assert losses and all(math.isfinite(v) for v in losses) and summary["student_acc"] is not None


def test_unknown_methods_and_parameters_are_refused_with_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(small(method={"name": "dhoo"}))
    assert info.value.errors[0][0] == "method.name" and "allowed: " in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:
        validate_config(small(method={"name": "dho", "params": {"alphas": [0.5, 2]}}))
    assert info.value.errors == [("method.params", "alphas must be numbers in [0, 1], got [0.5, 2]")]
    with pytest.raises(ConfigError, match="dataset.val_fraction"):
        validate_config(small(method={"name": "dho"}, dataset={"name": "digits", "val_fraction": 0.0}))
    stored = validate_config(small(method={"name": "dho"})).method
    assert stored.params["temperatures"] == [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0]  # defaults written into the stored config


# --------------------------------------------------------------------------- DHO


class EpochEnds(Callback):
    """The student phase at each epoch end: the method's chosen blend and a copy of the weights."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.method is not None:
            self.epochs.append({"alpha": float(run.method.alpha), "temperature": float(run.method.temperature),
                                "model": {k: v.clone() for k, v in run.model.state_dict().items()},
                                "method": {k: v.clone() for k, v in run.method.state_dict().items()}})


@pytest.fixture(scope="module")
def dho_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemorySink, EpochEnds, Path, Any]:
    out = tmp_path_factory.mktemp("dho")
    config = validate_config(small(method={"name": "dho"}))
    sink, watcher = MemorySink(), EpochEnds()
    summary = run_experiment(config, sink, out, callbacks=[watcher])
    return sink, watcher, out, summary


def test_dho_trains_two_heads_on_different_signals(dho_run: tuple[MemorySink, EpochEnds, Path, Any]) -> None:
    sink, watcher, out, summary = dho_run
    first, last = watcher.epochs[0]["method"], watcher.epochs[-1]["method"]
    assert not torch.equal(first["kd_head.weight"], last["kd_head.weight"])  # the second head trains
    assert summary["recipe_extra_params"] == 16 * 10 + 10  # cnn_tiny's 16-d embedding -> 10 classes
    saved = load_file(str(out / "student_method.safetensors"))
    assert set(saved) == {"alpha", "temperature", "kd_head.weight", "kd_head.bias"}
    rows = [r for r in sink.rows if r["phase"] == "student"]
    for key in ("val/dho_ce_head_top1", "val/dho_kd_head_top1", "val/dho_blend_top1", "dho_alpha", "dho_temperature"):
        assert len([r for r in rows if r["key"] == key]) == 3, key
    # the baseline is a plain one-head student: no method there
    assert not [r for r in sink.rows if r["phase"] == "baseline" and r["key"].startswith(("dho", "val/dho"))]


def test_dho_blend_is_chosen_on_the_validation_split_only(dho_run: tuple[MemorySink, EpochEnds, Path, Any]) -> None:
    from kd_core.data import load_dataset
    from kd_core.methods import create_method

    sink, watcher, _, _ = dho_run
    data = load_dataset("digits", val_fraction=0.2, subset=400, seed=2)
    val_blend = [r["value"] for r in sink.rows if r["phase"] == "student" and r["key"] == "val/dho_blend_top1"]
    val_top1 = [r["value"] for r in sink.rows if r["phase"] == "student" and r["key"] == "val/top1"]
    for epoch, seen in enumerate(watcher.epochs):
        model = create_model("cnn_tiny", 10, 1, 8)
        model.load_state_dict(seen["model"])
        method = create_method("dho")
        method.kd_head = torch.nn.Linear(16, 10)
        method.load_state_dict(seen["method"])
        z_ce, emb = outputs_with_embedding(model, data.val_x)
        alpha, temperature, acc = choose_blend(z_ce, method.kd_logits(emb), data.val_y, method.alphas, method.temperatures)
        assert (seen["alpha"], seen["temperature"]) == pytest.approx((alpha, temperature)), epoch
        assert val_blend[epoch] == pytest.approx(acc) == pytest.approx(val_top1[epoch])  # the run's prediction is the blend
        # evaluating through the method gives exactly the blend of the two heads
        assert torch.equal(predict(model, data.val_x, method=method), blend(z_ce, method.kd_logits(emb), method.alpha, method.temperature))


def test_dho_student_accuracy_is_the_blend_of_the_best_epoch(dho_run: tuple[MemorySink, EpochEnds, Path, Any]) -> None:
    import json

    _, watcher, out, summary = dho_run
    report = json.loads((out / "student_best_report.json").read_text())
    assert report["top1"] == summary["student_acc"]
    best = load_file(str(out / "student_best_method.safetensors"))
    assert any(torch.equal(best["alpha"], e["method"]["alpha"]) and torch.equal(best["kd_head.weight"], e["method"]["kd_head.weight"])
               for e in watcher.epochs)


def test_a_dho_run_through_the_worker_logs_both_heads_and_the_blend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.worker_runs import metric, train_in_worker

    config = validate_config(turned_down(Path("configs/methods/mnist5k_dho.yaml")))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    blend_acc, ce_head, kd_head = (metric(store, run, f"val/dho_{k}_top1") for k in ("blend", "ce_head", "kd_head"))
    # alpha = 1 and alpha = 0 are in the grid: the blend chosen on validation is never worse there than either head
    assert len(blend_acc) == config.student.epochs and all(b >= max(c, k) - 1e-9 for b, c, k in zip(blend_acc, ce_head, kd_head))
    assert metric(store, run, "val/top1") == blend_acc  # the student's validation accuracy is the blend's
    assert run.summary["student_acc"] is not None and run.summary["recipe_extra_params"] > 0

