"""Every shipped method config (configs/methods/), turned down to a tiny run on digits and trained by a real worker,
then shown the way a user looks at it: Run detail's Method tab (AppTest and, for DHO and TGeo-KD, a real browser
with screenshots), Compare with all of them, and Analysis for each.

The runs are trained once for the module (one worker slot, one after the other); each is a teacher epoch and two
student epochs on 300 images.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.ui_apptest import ROOT, open_page, texts
from tests.worker_runs import metric, train_many_in_worker

METHOD_CONFIGS = ("dho", "meal_v2", "mixup_kd", "random_teacher", "reviewkd", "ofa", "tgeo_kd", "lelp")
ANALYSED = ("dho", "tgeo_kd")


def tiny(method: str) -> dict:
    """configs/methods/mnist5k_<method>.yaml on 300 digits images: 1 teacher epoch, 2 student epochs, no baseline."""
    config = yaml.safe_load((ROOT / "configs" / "methods" / f"mnist5k_{method}.yaml").read_text())
    config.update(name=f"{method} tiny digits", device="cpu", baseline=False)
    config["dataset"].update(name="digits", subset=300, val_fraction=0.2)
    for teacher in [config["teacher"], *config.get("teachers", [])]:
        if teacher.get("source", "train") == "train":
            teacher["epochs"] = 1
    config["student"]["epochs"] = 2
    if method == "random_teacher":  # the shipped heads (8192 outputs, 100 probe epochs) are sized for a real run
        config["method"]["params"].update(hidden_dims=[64], bottleneck_dim=32, out_dim=256, probe_epochs=5)
    # the analysis views of two runs are enough for the Analysis page; the others skip it (seconds per run)
    config["analysis"] = {"enabled": method in ANALYSED, "samples": 120, "cka_checkpoints": 2, "attribution_images": 2}
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{method: finished run} of one database, shared by every test here; the app reads that database."""
    import streamlit as st

    home = tmp_path_factory.mktemp("methods")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLERY_THREADS", "1")  # two workers at a time on two cores: one torch thread each
    started = time.perf_counter()
    store, runs = train_many_in_worker([tiny(m) for m in METHOD_CONFIGS], home, mp, slots=2)
    print(f"{len(runs)} method runs trained by the worker in {time.perf_counter() - started:.1f} s")  # measured, not asserted
    st.cache_data.clear()
    st.cache_resource.clear()  # the app's store is cached per process: this module's database from here on
    yield {"home": home, "store": store, "runs": dict(zip(METHOD_CONFIGS, runs))}
    st.cache_resource.clear()
    store.dispose()
    mp.undo()


def method_tab(run_id: int):
    at = open_page("pages/run_detail.py", run=str(run_id))
    label = next(t.label for t in at.tabs if t.label.endswith("Method"))
    at.session_state["rd_tab"] = label
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def figures(at) -> dict[str, dict]:
    """{chart title (first line): plotly figure} of the page."""
    out = {}
    for el in at.get("plotly_chart"):
        fig = json.loads(el.proto.spec)
        out[fig["layout"]["title"]["text"].split("<br>")[0]] = fig
    return out


def trace(fig: dict, name: str) -> dict:
    return next(t for t in fig["data"] if t.get("name") == name)


def values(array) -> list[float]:
    """A Plotly JSON array: a plain list or the typed-array form {"dtype", "bdata"}."""
    import base64

    import numpy as np

    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_the_method_tab_states_the_method_and_draws_its_values(trained, method):
    from kd_core.methods import describe_method

    run = trained["runs"][method]
    at = method_tab(run.id)
    shown = texts(at)
    info = describe_method(method)
    assert f"**{method}**: {info['summary']}" in shown and f"]({info['paper_url']})" in shown
    assert figures(at), f"no chart on {method}'s Method tab"


def test_dho_draws_three_accuracy_lines_with_the_logged_values(trained):
    store, run = trained["store"], trained["runs"]["dho"]
    fig = figures(method_tab(run.id))["Accuracy of each head and of their blend"]
    for name, key in (("CE head", "val/dho_ce_head_top1"), ("KD head", "val/dho_kd_head_top1"),
                      ("blend (the student's prediction)", "val/dho_blend_top1")):
        assert values(trace(fig, name)["y"]) == pytest.approx(metric(store, run, key)), name
        assert values(trace(fig, name)["x"]) == [1, 2]


def test_tgeo_kd_draws_the_alpha_band_per_epoch(trained):
    store, run = trained["store"], trained["runs"]["tgeo_kd"]
    fig = figures(method_tab(run.id))["α per training sample over the epochs"]
    band, median = trace(fig, "10th–90th percentile"), trace(fig, "median")
    p10, p90 = metric(store, run, "tgeo_alpha_p10"), metric(store, run, "tgeo_alpha_p90")
    assert band["fill"] == "toself" and values(band["y"]) == pytest.approx(p90 + p10[::-1])  # upper edge, then the lower one back
    assert values(median["y"]) == pytest.approx(metric(store, run, "tgeo_alpha_p50"))


def test_meal_v2_draws_each_teacher_and_the_ensemble_and_lists_them_in_the_summary(trained):
    run = trained["runs"]["meal_v2"]
    at = method_tab(run.id)
    fig = figures(at)["Each teacher, the ensemble and the student"]
    assert {"teacher", "teacher 2", "ensemble (what the student learns from)", "student"} <= {t["name"] for t in fig["data"]}
    accs = run.summary["teacher_accs"]
    assert f"teacher 2 {accs['teacher_2']:.1f} %" in texts(at) and f"ensemble {run.summary['teacher_ensemble_acc']:.1f} %" in texts(at)


def test_ofa_draws_one_accuracy_line_per_branch(trained):
    fig = figures(method_tab(trained["runs"]["ofa"].id))["Accuracy of each OFA branch and of the student"]
    assert {"branch on stage 1", "branch on stage 2", "student (final logits)"} <= {t["name"] for t in fig["data"]}


def test_random_teacher_draws_the_students_and_the_teachers_readouts(trained):
    store, run = trained["store"], trained["runs"]["random_teacher"]
    fig = figures(method_tab(run.id))["What the embeddings know: student vs the random teacher"]
    assert values(trace(fig, "student, linear probe")["y"]) == pytest.approx(metric(store, run, "val/probe_top1"))
    assert {"student, k-NN", "random teacher, linear probe", "random teacher, k-NN"} <= {t["name"] for t in fig["data"]}


@pytest.mark.parametrize(("method", "key"), [("lelp", "lelp_subclass_agreement"), ("random_teacher", "random_teacher_kl"),
                                             ("mixup_kd", "mixup_mixed_fraction"), ("reviewkd", "reviewkd_hcl")])
def test_other_methods_draw_their_logged_values_as_lines(trained, method, key):
    assert key in figures(method_tab(trained["runs"][method].id))


def test_mixup_kd_says_why_the_teacher_ran_live(trained):
    from kd_core.methods.mixup_kd import MixupKD

    run = trained["runs"]["mixup_kd"]
    assert run.summary["teacher_outputs"] == "live"
    note = "\n".join(i.value for i in method_tab(run.id).info)
    assert "outputs not cached" in note and MixupKD.varies_teacher_inputs in note


def test_compare_and_analysis_render_the_method_runs(trained):
    runs = trained["runs"].values()
    at = open_page("pages/compare.py", runs=",".join(str(r.id) for r in runs))
    assert not at.exception, [e.value for e in at.exception]
    for run in runs:
        at = open_page("pages/analysis.py", run=str(run.id))
        assert not at.exception, (run.name, [e.value for e in at.exception])


@pytest.mark.browser
def test_the_method_tab_and_the_form_in_a_browser(trained):
    """Screenshots a user would judge: the Method tab of a DHO and a TGeo-KD run, the MEAL V2 preset's further
    teachers and a DisWOT ranking in the form; and every method's run opened on Run detail (Method tab),
    Analysis and Compare without an error."""
    from playwright.sync_api import expect

    from tests.test_browser import SHOTS, browser_page, serve, settle

    with serve(Path(trained["home"]), DISTILLERY_SUPERVISE_INTERVAL_S="3600") as (url, _), browser_page(height=2600) as page:
        for method, title in (("dho", "Accuracy of each head"), ("tgeo_kd", "α per training sample")):
            page.goto(f"{url}/run_detail?run={trained['runs'][method].id}")
            page.get_by_role("tab", name="Method").click()
            expect(page.locator(".js-plotly-plot .gtitle").filter(has_text=title).first).to_be_visible()
            settle(page)
            expect(page.locator("[data-testid='stException']")).to_have_count(0)
            page.screenshot(path=str(SHOTS / f"run_detail_method_{method}.png"))
        for method, run in trained["runs"].items():  # every method's run renders as a user opens it
            page.goto(f"{url}/run_detail?run={run.id}")
            page.get_by_role("tab", name="Method").click()
            settle(page)
            expect(page.locator("[data-testid='stException']")).to_have_count(0)
            page.goto(f"{url}/analysis?run={run.id}")
            settle(page)
            expect(page.locator("[data-testid='stException']")).to_have_count(0)
            expect(page.get_by_text("analysis failed")).to_have_count(0)
        page.goto(f"{url}/compare?runs=" + ",".join(str(run.id) for run in trained["runs"].values()))
        settle(page)
        expect(page.locator("[data-testid='stException']")).to_have_count(0)
        page.goto(f"{url}/new_experiment")
        page.get_by_test_id("stSelectbox").filter(has_text="Start from a preset").click()
        page.keyboard.type("meal_v2")  # the list is long: filter it as a user would
        page.get_by_role("option", name="method meal_v2").click()
        page.get_by_role("button", name="Load preset").click()
        settle(page)
        teachers = page.get_by_text("Further teachers").first
        expect(teachers).to_be_visible()
        teachers.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "new_experiment_meal_teachers.png"))
        panel = page.get_by_test_id("stExpander").filter(has_text="Which student?")
        panel.get_by_text("Which student?").click()
        settle(page)
        panel.get_by_role("button", name="Rank the candidates").click()
        settle(page)
        expect(panel.get_by_text(re.compile(r"in \d+\.\d\d s \(measured"))).to_be_visible()
        page.mouse.move(0, 0)  # no tooltip over the panel
        panel.screenshot(path=str(SHOTS / "new_experiment_diswot.png"))
