"""Sweeps: a grid from one config, validated whole before anything runs, with the teacher trained once and
each seed's baseline once, and results with spread over seeds."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd_core.config import ConfigError
from kd_core.sweeps import MAX_RUNS, parse_path, plan_sweep, submit_sweep, sweep_runs, sweep_summary
from storage import Store
from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "name": "T sweep", "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.1, "subset": 300},
    "teacher": {"arch": "cnn_small", "source": "train", "epochs": 1, "batch_size": 32},
    "student": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 32},
    "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}],
    "baseline": True, "analysis": {"enabled": False},
}


def sweep(**axes: list[Any]) -> dict[str, Any]:
    return {**copy.deepcopy(BASE), "sweep": {k.replace("__", "."): v for k, v in axes.items()}}


def test_paths_parse_like_the_error_messages_print_them() -> None:
    assert parse_path("recipe[1].params.temperature") == ["recipe", 1, "params", "temperature"]
    with pytest.raises(ValueError, match="not a field path"):
        parse_path("recipe[x]")


def test_the_grid_is_every_combination_and_shares_teacher_and_baselines() -> None:
    plan = plan_sweep({**copy.deepcopy(BASE), "sweep": {"recipe[1].params.temperature": [1, 2, 4], "seed": [0, 1]}})
    assert [c.values for c in plan.cells][:2] == [{"recipe[1].params.temperature": 1, "seed": 0}, {"recipe[1].params.temperature": 1, "seed": 1}]
    assert len(plan.cells) == 6 and [c.config.recipe[1].params["temperature"] for c in plan.cells] == [1, 1, 2, 2, 4, 4]
    assert plan.teacher_trainings == 1 and plan.cells[0].trains_teacher and {c.teacher_from for c in plan.cells[1:]} == {0}
    assert plan.baseline_trainings == 2  # one per seed
    assert [c.baseline_from for c in plan.cells] == [0, 1, 0, 1, 0, 1]
    # a student architecture on the grid needs one baseline per architecture and seed; a teacher setting, one teacher each
    assert plan_sweep(sweep(student__arch=["cnn_tiny", "mlp"], seed=[0, 1])).baseline_trainings == 4
    assert plan_sweep(sweep(teacher__epochs=[1, 2])).teacher_trainings == 2


def test_every_bad_value_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan_sweep(sweep(**{"recipe[1]__params__temperature": [2, -1, 0]}))
    fields = dict(info.value.errors)
    assert list(fields) == ["recipe[1].params.temperature (sweep run temperature=-1)", "recipe[1].params.temperature (sweep run temperature=0)"]
    assert all("must be > 0" in m for m in fields.values())
    for axes, message in (({"nonsense.path": [1]}, "the config has no 'nonsense'"), ({"seed": []}, "non-empty list"),
                          ({"seed": [1, 1]}, "listed twice"), ({"seed": list(range(MAX_RUNS + 1))}, f"at most {MAX_RUNS}")):
        with pytest.raises(ConfigError, match=message):
            plan_sweep({**copy.deepcopy(BASE), "sweep": axes})
    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    with pytest.raises(ConfigError):
        submit_sweep(store, sweep(**{"recipe[1]__params__temperature": [2, -1]}))
    assert store.list_runs(include_hidden=True) == [] and store.list_sweeps() == []  # nothing stored
    with pytest.raises(ConfigError, match="launch it with `python -m kd_core sweep FILE`"):
        from kd_core.config import validate_config

        validate_config(sweep(seed=[0, 1]))


def test_the_shipped_temperature_sweep_is_valid() -> None:
    plan = plan_sweep(yaml.safe_load(Path("configs/sweeps/mnist5k_temperature.yaml").read_text()))
    assert len(plan.cells) == 10 and plan.teacher_trainings == 1 and plan.baseline_trainings == 2


@pytest.mark.slow
def test_a_2x2_sweep_trains_one_teacher_and_one_baseline_per_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_DB_URL", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DISTILLERY_EXECUTOR", "local")
    monkeypatch.setenv("DISTILLERY_SLOTS", "2")  # the students must still wait for the shared teacher
    monkeypatch.setenv("DISTILLERY_THREADS", "1")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep(**{"recipe[1]__params__temperature": [1, 4], "seed": [0, 1]})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "kd_core", "sweep", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    sweep_id = int(out.stdout)  # stdout is only the id
    store = Store(None)
    ids = [r.id for r in store.list_runs(sweep_id=sweep_id)]
    wait_for(store, "the sweep to finish", lambda: all(store.get_run(i).status in ("completed", "failed", "cancelled") for i in ids), 600)
    runs = [store.get_run(i) for i in sorted(ids)]
    assert [r.status for r in runs] == ["completed"] * 4, [r.error for r in runs]
    trained = {r.id: {p for p, k in store.metric_keys(r.id) if k == "loss/total"} for r in runs}  # phases with training steps
    assert sum("teacher" in p for p in trained.values()) == 1  # the teacher was trained by one run only
    assert sum("baseline" in p for p in trained.values()) == 2  # one baseline per seed
    assert all(r.config["teacher"]["source"] == f"run:{runs[0].id}" for r in runs[1:])
    teacher_accs = {r.summary["teacher_acc"] for r in runs}
    assert len(teacher_accs) == 1  # every student learned from the same teacher

    table = sweep_runs(store, sweep_id)
    assert len(table) == 4 and table["kd_gain"].notna().all()
    for _, row in table.iterrows():  # each run is compared with the baseline of its own seed
        seed_baseline = [r.summary["baseline_acc"] for r in runs if r.config["seed"] == row["seed"] and r.config["baseline"]]
        assert row["kd_gain"] == pytest.approx(row["student_acc"] - seed_baseline[0])
    summary = sweep_summary(table, ["recipe[1].params.temperature", "seed"])
    assert summary["recipe[1].params.temperature"].tolist() == [1, 4] and summary["runs"].tolist() == [2, 2]
    t1 = table[table["recipe[1].params.temperature"] == 1]["student_acc"]
    assert summary["student_acc_mean"][0] == pytest.approx(t1.mean()) and summary["student_acc_ci95"][0] > 0

    listed = subprocess.run([sys.executable, "-m", "kd_core", "runs", "--sweep", str(sweep_id)], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0 and all(f"\n{i} " in "\n" + listed.stdout for i in ids), listed.stdout
    shown = subprocess.run([sys.executable, "-m", "kd_core", "sweeps", str(sweep_id)], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "student_acc_mean" in shown.stdout and "kd_gain_ci95" in shown.stdout, shown.stdout + shown.stderr
