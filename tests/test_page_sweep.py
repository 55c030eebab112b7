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
    table = at.dataframe[0].value  # the results table comes first
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
