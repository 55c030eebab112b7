"""Dashboard pages New experiment and Runs, driven headless with streamlit.testing.v1.AppTest.

Each test gets its own SQLite file and artifacts folder (env vars set before the app runs). The runner's
``dispatch`` is replaced by a no-op except in the one launch test, so runs created with the Store stay where
the test put them and no worker processes start behind the tests' back.
"""

from __future__ import annotations

import time

import pytest
import yaml

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.ui_apptest import (  # noqa: E402,F401 - fixtures
    ROOT, TINY_YAML, app, env, errors, launch_button, new_experiment, no_dispatch, paste_yaml, shown_yaml,
)


# --------------------------------------------------------------------------- New experiment


def test_form_rejects_bad_values(env, no_dispatch):
    at = new_experiment()
    assert errors(at) == "" and not launch_button(at).disabled
    at.number_input(key="nx_s_lr").set_value(0.0).run()
    assert "student.optimizer.lr: Input should be greater than 0" in errors(at)
    assert launch_button(at).disabled
    at.number_input(key="nx_s_lr").set_value(0.05).run()
    assert errors(at) == ""
    # an unknown loss parameter (from an imported config) is kept and named, with the allowed ones
    paste_yaml(at, TINY_YAML.replace("temperature: 2", "temprature: 2"))
    assert "recipe[1].params.temprature: unknown parameter of loss 'kd'; allowed: temperature" in errors(at)
    assert launch_button(at).disabled
    # typed paths outside the allowed folders are refused, naming the field
    at.text_input(key="nx_ds_root").set_value("/etc").run()
    assert "dataset.root: '/etc' is outside the folders" in errors(at)


def test_import_fills_form_and_export_round_trips(env, no_dispatch):
    from kd_core.config import validate_config

    at = new_experiment()
    paste_yaml(at, TINY_YAML)
    ss = at.session_state
    assert ss["nx_name"] == "tiny digits" and ss["nx_seed"] == 3 and ss["nx_device"] == "cpu"
    assert ss["nx_ds_name"] == "digits" and ss["nx_ds_subset"] == 200 and ss["nx_t_src"] == "random"
    assert ss["nx_s_opt"] == "adamw" and ss["nx_s_lr"] == pytest.approx(0.003) and ss["nx_s_sched"] == "none"
    assert at.selectbox(key="nx_s_arch").value == "cnn_tiny"
    assert errors(at) == ""
    exported = at.code[-1].value
    assert not at.download_button(key="nx_export").disabled
    assert validate_config(yaml.safe_load(exported)) == validate_config(yaml.safe_load(TINY_YAML))
    # the exported file loads back into the same form
    paste_yaml(at, exported)
    assert at.code[-1].value == exported


def test_presets_load(env, no_dispatch):
    """Every shipped config is offered, named after what it trains; the default and the digits demo come first."""
    from kd_core.config import validate_config

    at = new_experiment()
    labels = at.selectbox(key="nx_preset_choice").options
    assert labels[0] == "mnist5k · cnn_small → cnn_tiny · 0.1·ce + 0.9·kd(T=4)"
    assert labels[1].startswith("digits · cnn_small → cnn_tiny")
    single_runs = [f for f in (ROOT / "configs").rglob("*.yaml") if "sweep:" not in f.read_text()]  # sweeps: the CLI
    assert len(labels) == len(single_runs)
    dkd = next(label for label in labels if "dkd" in label and label.startswith("mnist5k"))
    dho = next(label for label in labels if label.endswith("· method dho"))  # a method that changes the training loop
    for label in [*labels[:2], dho, dkd]:
        at.selectbox(key="nx_preset_choice").set_value(label)
        next(b for b in at.button if b.label == "Load preset").click().run()
        assert not at.exception and errors(at) == "", (label, errors(at))
        config = validate_config(shown_yaml(at))
        assert at.session_state["nx_name"] == config.name
    assert any(t.loss == "dkd" for t in config.recipe)  # the DKD preset was loaded last
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Compression"] == "65.3×"


def test_launch_submits_a_run(env):
    import kd_core.runner as runner

    at = new_experiment()
    paste_yaml(at, TINY_YAML)
    launch_button(at).click().run()
    runs = env.list_runs(include_hidden=True)
    try:
        assert len(runs) == 1 and runs[0].name == "tiny digits"
        assert runs[0].config["dataset"]["subset"] == 200
        assert runs[0].status in ("queued", "starting", "running", "completed")
    finally:  # stop the worker the runner may have started
        for run in runs:
            if env.get_run(run.id).status in runner.ACTIVE_STATUSES:
                runner.cancel(env, run.id)
        deadline = time.time() + 40
        while time.time() < deadline and any(r.status in runner.ACTIVE_STATUSES for r in env.list_runs(include_hidden=True)):
            runner.reconcile(env)
            time.sleep(0.5)
    assert all(r.status not in runner.ACTIVE_STATUSES for r in env.list_runs(include_hidden=True))


# --------------------------------------------------------------------------- Runs


def make_runs(store) -> dict[str, int]:
    base = yaml.safe_load(TINY_YAML)
    ids = {}
    ids["done"] = store.create_run("alpha digits", base, status="completed")
    store.update_run(ids["done"], summary={"student_acc": 91.5, "student_last_acc": 90.0, "kd_gain": 1.25, "trained_s": 12},
                     tags=["sweep-a"], started_at=time.time() - 20, finished_at=time.time() - 8)
    other = {**base, "dataset": {"name": "mnist5k"}, "recipe": [{"loss": "dkd", "weight": 1.0}]}
    ids["failed"] = store.create_run("beta mnist", other, status="failed")
    ids["queued"] = store.create_run("gamma queued", base, status="queued")
    return ids


def table(at: AppTest):
    return at.dataframe[0].value


def select(at: AppTest, *positions: int) -> None:
    at.session_state["runs_table"] = {"selection": {"rows": list(positions), "columns": [], "cells": []}}
    at.run()


def click(at: AppTest, label: str) -> None:
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception


def test_runs_table_lists_and_filters(env, no_dispatch):
    ids = make_runs(env)
    at = app()
    df = table(at)
    assert list(df["id"]) == [ids["queued"], ids["failed"], ids["done"]]  # newest first
    row = df[df["id"] == ids["done"]].iloc[0]
    assert row["recipe"] == "0.5·ce + 0.5·kd(T=2)" and row["models"] == "cnn_tiny → cnn_tiny"
    assert row["best_acc"] == pytest.approx(91.5) and row["kd_gain"] == pytest.approx(1.25) and row["progress"] == 100
    assert list(row["status"]) == ["completed"] and row["time"] == "12s"
    at.multiselect(key="runs_status").set_value(["failed", "queued"]).run()
    assert set(table(at)["id"]) == {ids["failed"], ids["queued"]}
    at.multiselect(key="runs_status").set_value([]).run()
    at.multiselect(key="runs_dataset").set_value(["mnist5k"]).run()
    assert list(table(at)["id"]) == [ids["failed"]]
    at.multiselect(key="runs_dataset").set_value([]).run()
    at.text_input(key="runs_search").set_value("SWEEP").run()  # tags, case-insensitive
    assert list(table(at)["id"]) == [ids["done"]]
    at.text_input(key="runs_search").set_value("").run()
    at.selectbox(key="runs_sort").set_value("Best student accuracy").run()
    assert table(at)["id"].iloc[0] == ids["done"]


def test_runs_actions_change_status(env, no_dispatch, tmp_path):
    ids = make_runs(env)
    at = app()
    # cancel the queued run (row 0)
    select(at, 0)
    click(at, "Cancel")
    assert env.get_run(ids["queued"]).status == "cancelled"
    # resume it again -> queued
    select(at, list(table(at)["id"]).index(ids["queued"]))
    click(at, "Resume")
    assert env.get_run(ids["queued"]).status == "queued"
    # hide the failed run: gone from the default list, back with "Show hidden"
    select(at, list(table(at)["id"]).index(ids["failed"]))
    click(at, "Hide")
    assert ids["failed"] not in set(table(at)["id"]) and env.get_run(ids["failed"]).hidden
    at.checkbox(key="runs_show_hidden").check().run()
    assert ids["failed"] in set(table(at)["id"])
    at.checkbox(key="runs_show_hidden").uncheck().run()
    # tag
    select(at, list(table(at)["id"]).index(ids["done"]))
    at.text_input(key="runs_tag").set_value("keep")
    click(at, "Add tag")
    assert env.get_run(ids["done"]).tags == ["sweep-a", "keep"]
    # rerun as is -> a new queued run with the same config and the old one as parent
    select(at, list(table(at)["id"]).index(ids["done"]))
    click(at, "Rerun as is")
    child = [r for r in env.list_runs(include_hidden=True) if r.parent_id == ids["done"]]
    from kd_core.config import validate_config

    assert len(child) == 1 and validate_config(child[0].config) == validate_config(env.get_run(ids["done"]).config)
    # delete the completed run with its files, after confirming
    from kd_core.settings import run_dir

    folder = run_dir(env.get_run(ids["done"]).uid)
    folder.mkdir(parents=True)
    (folder / "student.safetensors").write_bytes(b"x")
    env.add_artifact(ids["done"], "checkpoint", str(folder / "student.safetensors"), {"model": "student"})
    select(at, list(table(at)["id"]).index(ids["done"]))
    click(at, "Delete…")
    assert any("cannot be undone" in w.value for w in at.warning)
    click(at, "Yes, delete")
    with pytest.raises(KeyError):
        env.get_run(ids["done"])
    assert not folder.exists()
    assert ids["done"] not in set(table(at)["id"])


def test_edit_and_rerun_prefills_the_form(env, no_dispatch):
    ids = make_runs(env)
    at = app()
    select(at, list(table(at)["id"]).index(ids["failed"]))
    click(at, "Edit and rerun")
    assert at.session_state["nx_ds_name"] == "mnist5k"
    first = at.session_state["nx_recipe_ids"][0]
    assert at.session_state[f"nx_r{first}_loss"] == "dkd"
    assert any("Editing a copy of run" in i.value for i in at.info)


def test_runs_page_lists_1000_runs(env, no_dispatch):
    """Every run is in the table (how fast it renders is measured by bench/dashboard.py, not asserted here)."""
    from sqlalchemy import insert

    from storage.schema import runs as runs_table

    base = yaml.safe_load(TINY_YAML)
    now = time.time()
    rows = [
        {"name": f"run {i}", "status": ["completed", "failed", "cancelled"][i % 3], "config": base, "parent_id": None,
         "created_at": now - i, "summary": {"student_acc": 50 + i % 50, "kd_gain": 0.5, "trained_s": 60}, "progress": {},
         "tags": ["bulk"], "hidden": False}
        for i in range(1000)
    ]
    with env.engine.begin() as conn:
        conn.execute(insert(runs_table), rows)
    at = app()
    assert len(table(at)) == 1000
