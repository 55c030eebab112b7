"""Every registered loss drives a real short run through the engine, and its terms land in the database."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_core.config import ConfigError, validate_config
from kd_core.losses import LOSSES
from kd_core.engine import run_experiment
from storage import RunSink, Store

PAIRS = {
    "same-family": ("cnn_small", "cnn_tiny"),
    "heterogeneous": ("resnet8", "lenet5"),  # residual CNN -> plain CNN with fewer, smaller stages
}
DISTILL_LOSSES = sorted(name for name in LOSSES if name != "ce")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(f"sqlite:///{tmp_path_factory.mktemp('recipes') / 'runs.db'}")


def recipe_config(loss: str, teacher: str, student: str) -> dict:
    return {
        "name": f"{loss} {teacher}->{student}",
        "device": "cpu",
        "dataset": {"name": "synthetic", "val_fraction": 0.1, "subset": 200},
        "teacher": {"arch": teacher, "source": "random", "epochs": 0},
        "student": {"arch": student, "epochs": 1, "batch_size": 32},
        "recipe": [{"loss": "ce", "weight": 1.0}, {"loss": loss, "weight": 1.0, "warmup_epochs": 2}],
        "baseline": False,
        "analysis": {"enabled": False},
    }


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("loss", DISTILL_LOSSES)
def test_each_loss_trains_through_the_engine(loss: str, pair: str, store: Store, tmp_path: Path) -> None:
    teacher, student = PAIRS[pair]
    config = validate_config(recipe_config(loss, teacher, student))
    run_id = store.create_run(config.name, config.model_dump(mode="json"), status="running")
    summary = run_experiment(config, RunSink(store, run_id), tmp_path)
    series = store.metric_series(run_id, f"loss/{loss}", "student")
    assert len(series) == 6 and series["value"].notna().all()  # 180 images / 32 -> 6 steps, each logged
    # what was optimised is the recipe: CE plus this term, its weight warming up over 2 epochs
    ce = store.metric_series(run_id, "loss/ce", "student")["value"].tolist()
    total = store.metric_series(run_id, "loss/total", "student")["value"].tolist()
    for b, (t, c, term) in enumerate(zip(total, ce, series["value"].tolist())):
        assert t == pytest.approx(c + min(1.0, (b / 6 + 1) / 2) * term, rel=1e-5, abs=1e-6), (loss, b)
    extras = summary["recipe_extra_params"]
    assert (extras > 0) == (loss in {"fitnet", "crd", "nd"}), extras  # nd: widths differ in both pairs


def test_stage_losses_are_refused_for_a_student_without_stages() -> None:
    with pytest.raises(ConfigError, match="needs stage feature maps"):
        validate_config(recipe_config("at", "resnet8", "mlp"))
