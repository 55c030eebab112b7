"""Config validation: every problem is refused before training, naming the field and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from kd_core.config import ConfigError, ExperimentConfig, load_config, validate_config

CONFIGS = sorted(p for p in Path("configs").rglob("*.yaml") if p.parent.name != "sweeps")  # sweeps: tests/test_sweeps.py

BASE = {
    "name": "t",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn_small", "epochs": 1},
    "student": {"arch": "cnn_tiny", "epochs": 1},
    "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}],
}


def with_changes(**paths: object) -> dict:
    """BASE with dotted-path overrides, e.g. with_changes(**{"student.optimizer.lr": 0})."""
    data = copy.deepcopy(BASE)
    for path, value in paths.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = value
    return data


def errors_of(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    return dict(info.value.errors)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    # the YAML the dashboard exports is accepted again unchanged
    assert validate_config(__import__("yaml").safe_load(config.to_yaml())) == config


def test_defaults_fill_a_minimal_config() -> None:
    config = validate_config(BASE)
    assert config.seed == 0 and config.device == "auto" and config.baseline
    assert config.student.optimizer.name == "sgd" and config.student.scheduler.name == "cosine"


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"dataset.name": "imagenet22k"}, "dataset.name", "allowed: "),
        ({"student.arch": "resnet9000"}, "student.arch", "unknown architecture"),
        ({"student.optimizer.lr": 0}, "student.optimizer.lr", "greater than 0"),
        ({"student.optimizer.name": "lion"}, "student.optimizer.name", "'sgd' or 'adamw'"),
        ({"device": "tpu"}, "device", "'auto', 'cpu' or 'cuda'"),
        ({"dataset.val_fraction": 0.9}, "dataset.val_fraction", "less than or equal to 0.5"),
        ({"teacher.source": "http://x/y.pt"}, "teacher.source", "allowed: train, random, torchvision, timm, run:<id>, file:<path>"),
        ({"teacher.source": "file:/no/such/file.safetensors"}, "teacher.source", "no file at"),
        ({"teacher.source": "torchvision"}, "teacher.source", "torchvision weights exist only for"),
        ({"teacher.source": "timm"}, "teacher.source", "timm weights exist only for timm: architectures"),
        ({"student.scheduler": {"name": "step"}}, "student.scheduler", "needs milestones"),
        ({"recipe.1.loss": "kdd"}, "recipe[1].loss", "unknown loss 'kdd'"),
        ({"recipe.1.params": {"temprature": 4}}, "recipe[1].params.temprature", "allowed: temperature"),
        ({"recipe.0.weight": -1}, "recipe[0].weight", "greater than or equal to 0"),
        ({"studnet": {}}, "studnet", "Extra inputs are not permitted"),
        ({"teacher.epochs": 0}, "teacher.epochs", "at least 1 epoch"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(changes: dict, field: str, fragment: str) -> None:
    errors = errors_of(with_changes(**changes))
    assert field in errors, errors
    assert fragment in errors[field]


def test_every_problem_is_reported_at_once() -> None:
    errors = errors_of(with_changes(**{"student.optimizer.lr": -1, "dataset.name": "nope", "student.batch_size": 1}))
    assert {"student.optimizer.lr", "dataset.name", "student.batch_size"} <= set(errors)


def test_empty_recipe_and_ce_only_baseline_are_refused() -> None:
    assert "recipe" in errors_of(with_changes(recipe=[]))
    assert "baseline" in errors_of(with_changes(recipe=[{"loss": "ce"}]))


def test_feature_loss_on_an_architecture_without_stages_is_refused() -> None:
    from kd_core.losses import LOSSES

    stage_losses = [name for name, cls in LOSSES.items() if "stages" in cls.needs]
    if not stage_losses:
        pytest.skip("no stage-map loss registered")
    errors = errors_of(with_changes(**{"student.arch": "mlp", "recipe": [{"loss": "ce"}, {"loss": stage_losses[0]}]}))
    assert "has none" in errors["recipe[1].loss"]


def test_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of fields"):
        load_config(bad)


def test_teacher_weights_that_do_not_fit_are_refused_at_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    from kd_core.models import create_model

    hundred = tmp_path / "cifar100_teacher.safetensors"
    save_file(create_model("cnn_small", 100, 1, 8).state_dict(), str(hundred))
    errors = errors_of(with_changes(**{"teacher.source": f"file:{hundred}"}))
    assert "100 classes but the dataset has 10" in errors["teacher.source"]

    fits = tmp_path / "digits_teacher.safetensors"
    save_file(create_model("cnn_small", 10, 1, 8).state_dict(), str(fits))
    assert validate_config(with_changes(**{"teacher.source": f"file:{fits}"})).teacher.source == f"file:{fits}"
    errors = errors_of(with_changes(**{"teacher.source": f"file:{fits}", "teacher.arch": "lenet5"}))
    assert "does not match teacher.arch 'lenet5'" in errors["teacher.source"]

    # run:<id> is looked up in the runs database (never by a folder name built from the id)
    from storage import Store

    from kd_core.teachers import run_teachers_in

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    with pytest.raises(ConfigError, match="there is no run 7 in this database"):
        validate_config(with_changes(**{"teacher.source": "run:7"}), run_teachers=run_teachers_in(store))
    untrained = store.create_run("no teacher yet", {})
    with pytest.raises(ConfigError, match=f"run {untrained} has no teacher trained by itself"):
        validate_config(with_changes(**{"teacher.source": f"run:{untrained}"}), run_teachers=run_teachers_in(store))
    store.add_artifact(untrained, "checkpoint", str(fits), {"model": "teacher", "which": "last"})
    assert validate_config(with_changes(**{"teacher.source": f"run:{untrained}"}), run_teachers=run_teachers_in(store))
    store.dispose()
