"""The Sweep page, the Runs page's sweep groups and the form's "Sweep over" section (issue 15), with AppTest.

Sweeps are queued with ``kd_core.sweeps.submit_sweep`` (no worker starts: ``no_dispatch``) and their runs then
written into the database the way a worker writes them, so every number on the page can be checked against the
database.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

from kd_core.sweeps import submit_sweep
from tests.ui_apptest import env, errors, no_dispatch, open_page, texts  # noqa: F401 - fixtures

T_AXIS = "recipe[1].params.temperature"
BASE: dict[str, Any] = {
    "name": "T sweep", "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.1, "subset": 300},
    "teacher": {"arch": "cnn_small", "source": "train", "epochs": 1, "batch_size": 32},
    "student": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 32},
    "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}],
    "baseline": True, "analysis": {"enabled": False},
}
# what a worker would have measured, per (temperature, seed): student accuracy; the baseline per seed
STUDENT_ACC = {(1, 0): 90.0, (1, 1): 91.5, (4, 0): 93.25, (4, 1): 92.0, (8, 0): 89.0}
BASELINE_ACC = {0: 88.5, 1: 89.75}


def finished_sweep(store) -> int:
    """A T ∈ {1, 4, 8} × seed ∈ {0, 1} sweep: five runs completed as a worker completes them, one still queued."""
    sweep_id = submit_sweep(store, {**copy.deepcopy(BASE), "sweep": {T_AXIS: [1, 4, 8], "seed": [0, 1]}})
    for run in store.list_runs(sweep_id=sweep_id, include_hidden=True):
        key = (run.config["recipe"][1]["params"]["temperature"], run.config["seed"])
        if key not in STUDENT_ACC:
            continue
        summary = {"teacher_acc": 97.0, "student_acc": STUDENT_ACC[key], "trained_s": 12.5}
        if run.config["baseline"]:
            summary.update(baseline_acc=BASELINE_ACC[key[1]], kd_gain=round(STUDENT_ACC[key] - BASELINE_ACC[key[1]], 2))
        store.update_run(run.id, status="completed", summary=summary, started_at=time.time() - 20, finished_at=time.time())
    return sweep_id


def test_the_sweep_page_shows_the_means_of_the_runs_in_the_database(env, no_dispatch):  # noqa: F811
    store = env
    sweep_id = finished_sweep(store)
    at = open_page("pages/sweep.py", sweep=str(sweep_id))
    assert "5/6 done · 1 queued" in texts(at)
    overview = next(d.value for d in at.dataframe if "swept" in d.value.columns)  # the list of all sweeps
    assert overview["progress"].tolist() == ["5/6 done · 1 queued"]
    table = next(d.value for d in at.dataframe if "finished runs" in d.value.columns)  # the results table
    runs = store.list_runs(sweep_id=sweep_id, include_hidden=True)
    baseline = {r.config["seed"]: r.summary["baseline_acc"] for r in runs if r.config["baseline"]}
    for _, row in table.iterrows():
        t = row["temperature of recipe term 2"]
        done = [r for r in runs if r.status == "completed" and r.config["recipe"][1]["params"]["temperature"] == t]
        accs = [r.summary["student_acc"] for r in done]
        gains = [r.summary["student_acc"] - baseline[r.config["seed"]] for r in done]
        assert row["student acc (%) mean"] == statistics.mean(accs)
        assert row["KD gain (points) mean"] == statistics.mean(gains)
        assert row["finished runs"] == f"{len(done)} of 2"
        if len(done) > 1:
            assert row["student acc (%) std"] == statistics.stdev(accs)
            assert row["student acc (%) 95% CI ±"] > row["student acc (%) std"]  # t(0.975, 1 dof) · std / √2 = 8.98 · std
    assert [c.proto.label for c in at.get("page_link") if "compare" in c.proto.page][:3] == [
        "temperature=1 (2 runs)", "temperature=4 (2 runs)", "temperature=8 (2 runs)"]
    assert not at.exception


def sweep_rows(at) -> list[tuple[str, str]]:
    paths = [s for s in at.selectbox if str(s.key).endswith("_path") and str(s.key).startswith("nx_sw_")]
    values = [t for t in at.text_input if str(t.key).startswith("nx_sw_") and str(t.key).endswith("_values")]
    return [(p.value, v.value) for p, v in zip(paths, values)]


def launch_sweep_button(at):
    return next(b for b in at.button if b.label.startswith("Launch sweep"))


def test_the_form_refuses_bad_values_by_field_and_launches_the_grid_as_typed(env, no_dispatch):  # noqa: F811
    from tests.ui_apptest import new_experiment

    store = env
    at = new_experiment()
    at.toggle(key="nx_sw_on").set_value(True).run()
    (path, _), = sweep_rows(at)
    assert path == "recipe[1].params.temperature"  # the default preset's KD term
    row = next(t for t in at.text_input if str(t.key).endswith("_values"))
    row.set_value("1, 2, hot").run()
    assert "Sweep over · temperature of term 2 (kd) (`recipe[1].params.temperature`): 'hot' is not a number" in errors(at)
    assert launch_sweep_button(at).disabled
    row.set_value("2, -1").run()
    assert "recipe[1].params.temperature (sweep run temperature=-1)" in errors(at) and launch_sweep_button(at).disabled
    row.set_value("2, 8").run()
    at.button(key="nx_sw_add_btn").click().run()
    assert [p for p, _ in sweep_rows(at)] == ["recipe[1].params.temperature", "seed"]
    next(t for t in at.text_input if str(t.key).endswith("_values") and not t.value).set_value("0, 1").run()
    shown = texts(at)
    assert "2 × 2 = **4 runs**" in shown and "no estimate yet" in shown and "Trains the teacher 1× and the CE-only baseline 2×" in shown
    launch_sweep_button(at).click().run()
    (sweep,) = store.list_sweeps()
    assert sweep.spec["axes"] == {"recipe[1].params.temperature": [2, 8], "seed": [0, 1]}  # as typed: ints stay ints
    runs = sorted(store.list_runs(sweep_id=sweep.id, include_hidden=True), key=lambda r: r.id)
    assert [(r.config["recipe"][1]["params"]["temperature"], r.config["seed"]) for r in runs] == [(2, 0), (2, 1), (8, 0), (8, 1)]


def test_yaml_import_keeps_the_sweep_and_a_measured_run_gives_the_estimate(env, no_dispatch):  # noqa: F811
    from pathlib import Path

    from tests.ui_apptest import new_experiment, paste_yaml, shown_yaml

    store = env
    text = Path("configs/sweeps/mnist5k_temperature.yaml").read_text()
    config = {k: v for k, v in __import__("yaml").safe_load(text).items() if k != "sweep"}
    measured = store.create_run("measured", {**config, "baseline": True}, status="completed")
    store.update_run(measured, summary={"student_acc": 90.0, "trained_s": 60.0})
    at = new_experiment()
    paste_yaml(at, text)
    assert at.toggle(key="nx_sw_on").value
    assert sweep_rows(at) == [("recipe[1].params.temperature", "1, 2, 4, 8, 16"), ("seed", "0, 1")]
    assert shown_yaml(at)["sweep"] == {"recipe[1].params.temperature": [1, 2, 4, 8, 16], "seed": [0, 1]}
    shown = texts(at)
    assert "5 × 2 = **10 runs**" in shown
    # one run here trained teacher, student and baseline in 60 s: every run of the grid is timed from it (rough)
    assert "≈ 10m 00s of training in total" in shown and f"#{measured}" in shown and "rough" in shown


def test_the_runs_page_groups_a_sweeps_runs_under_it(env, no_dispatch):  # noqa: F811
    store = env
    sweep_id = finished_sweep(store)
    single = store.create_run("one run", {**BASE, "seed": 5}, status="completed")
    at = open_page("pages/runs.py")
    (group,) = [e for e in at.expander if e.label.startswith(f"Sweep #{sweep_id}")]
    assert group.label == f"Sweep #{sweep_id} T sweep — 5/6 done · 1 queued"
    assert list(at.dataframe[0].value["id"]) == [single]  # the single runs' table, as before
    sweep_table = group.dataframe[0].value
    assert sorted(sweep_table["id"]) == sorted(r.id for r in store.list_runs(sweep_id=sweep_id, include_hidden=True))
    link = group.get("page_link")[0].proto
    assert "sweep" in link.page and f"sweep={sweep_id}" in link.query_string


def test_two_swept_axes_get_a_heatmap_of_the_cell_means(env, no_dispatch):  # noqa: F811
    import json

    store = env
    sweep_id = submit_sweep(store, {**copy.deepcopy(BASE), "sweep": {T_AXIS: [2, 4], "recipe[1].weight": [0.5, 0.9], "seed": [0, 1]}})
    runs = sorted(store.list_runs(sweep_id=sweep_id, include_hidden=True), key=lambda r: r.id)
    for i, run in enumerate(runs):  # distinct accuracies, baselines on the runs that train them
        summary = {"student_acc": 80.0 + i, **({"baseline_acc": 70.0 + run.config["seed"]} if run.config["baseline"] else {})}
        store.update_run(run.id, status="completed", summary=summary)
    runs = store.list_runs(sweep_id=sweep_id, include_hidden=True)
    at = open_page("pages/sweep.py", sweep=str(sweep_id))
    figures = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    heat = next(f for f in figures if f["data"][0]["type"] == "heatmap")
    z = heat["data"][0]["z"]  # rows: weight 0.5, 0.9; columns: temperature 2, 4
    for (w, t), cell in {(0.5, 2): z[0][0], (0.9, 2): z[1][0], (0.5, 4): z[0][1], (0.9, 4): z[1][1]}.items():
        accs = [r.summary["student_acc"] for r in runs
                if r.config["recipe"][1]["weight"] == w and r.config["recipe"][1]["params"]["temperature"] == t]
        assert cell == statistics.mean(accs)


def test_the_temperature_preset_launches_from_the_sweep_page(env, no_dispatch):  # noqa: F811
    store = env
    at = open_page("pages/sweep.py")
    assert "No sweeps yet." in texts(at)
    at.button(key="sw_preset").click().run()
    assert not at.exception, at.exception
    (sweep,) = store.list_sweeps()
    assert sweep.spec["axes"] == {"recipe[1].params.temperature": [1, 2, 4, 8, 16], "seed": [0, 1]}
    runs = store.list_runs(sweep_id=sweep.id, include_hidden=True)
    assert len(runs) == 10 and sum(r.config["teacher"]["source"] == "train" for r in runs) == 1
    assert sum(bool(r.config["baseline"]) for r in runs) == 2  # one baseline per seed
    assert at.selectbox(key="sw_pick").value == sweep.id and "0/10 done · 10 queued" in texts(at)
