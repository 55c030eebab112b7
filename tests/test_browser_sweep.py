"""A sweep launched from the New-experiment form in a real browser, run by the dashboard's own supervisor and
local worker, and read on the Sweeps page (issue 15).

Two temperatures × two seeds on the bundled digits data with few epochs, so the four runs finish in about a
minute on two cores. The page's results (downloaded as the user would, as CSV) and its plotted points are checked
against the database, and the database is checked for one teacher training and one baseline per seed.
"""

from __future__ import annotations

import csv
import io
import statistics

import pytest

from tests.test_browser import SHOTS, browser_page, serve, settle, type_into

pytestmark = pytest.mark.browser
T_AXIS = "recipe[1].params.temperature"


@pytest.fixture(scope="module")
def sweep_site(tmp_path_factory):
    # two slots: both seeds' runs train side by side once the shared teacher exists; one thread each on 2 cores
    with serve(tmp_path_factory.mktemp("sweep"), DISTILLERY_SLOTS="2", DISTILLERY_THREADS="1") as served:
        yield served


def launch_from_the_form(page, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/new_experiment")
    expect(page.get_by_text("Start from a preset", exact=True)).to_be_visible()
    settle(page)
    page.get_by_test_id("stSelectbox").filter(has_text="Start from a preset").click()
    page.get_by_role("option", name="digits · cnn_small → cnn_tiny").click()
    page.get_by_role("button", name="Load preset").click()
    settle(page)
    type_into(page, "Epochs", "2", nth=0)  # teacher
    type_into(page, "Epochs", "2", nth=1)  # student and baseline
    page.get_by_text("Compute the analysis views").click()  # four runs on a shared 2-core machine: no analysis
    settle(page)
    page.get_by_text("Sweep: one run per combination of the values below").click()
    settle(page)
    type_into(page, "Values", "2, 8", nth=0)  # the first row is the KD term's temperature
    page.get_by_role("button", name="Add a field").click()
    settle(page)
    type_into(page, "Values", "0, 1", nth=1)  # the added row is the seed
    expect(page.get_by_text("Grid: 2 × 2 = 4 runs")).to_be_visible()
    page.screenshot(path=str(SHOTS / "new_experiment_sweep.png"))
    page.get_by_role("button", name="Launch sweep (4 runs)").click()
    page.wait_for_url("**/sweep?sweep=*")


def test_a_2x2_sweep_launched_from_the_form_runs_and_is_summarised(sweep_site, tmp_path):
    from playwright.sync_api import expect

    from storage import Store

    url, env = sweep_site
    with browser_page(width=1400, height=2400) as page:
        launch_from_the_form(page, url)
        expect(page.get_by_text("4/4 done").first).to_be_visible(timeout=600_000)
        settle(page)
        with page.expect_download() as download:
            page.get_by_role("button", name="Results (CSV)").click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        shown = list(csv.DictReader(io.StringIO(path.read_text())))
        chart = page.locator(".st-key-sw_student_acc .js-plotly-plot")
        expect(chart).to_be_visible()
        plotted = chart.evaluate("p => p.data.filter(t => t.name === 'student (distilled)').map(t => [t.x, t.y])[0]")
        page.screenshot(path=str(SHOTS / "sweep.png"), full_page=True)

    store = Store(env["DISTILLERY_DB_URL"])
    (sweep,) = store.list_sweeps()
    runs = sorted(store.list_runs(sweep_id=sweep.id, include_hidden=True), key=lambda r: r.id)
    assert [r.status for r in runs] == ["completed"] * 4, [r.error for r in runs]
    assert [(r.config["recipe"][1]["params"]["temperature"], r.config["seed"]) for r in runs] == [(2, 0), (2, 1), (8, 0), (8, 1)]
    trained = [{p for p, k in store.metric_keys(r.id) if k == "loss/total"} for r in runs]  # phases with training steps
    assert sum("teacher" in phases for phases in trained) == 1  # one teacher, shared by the other three runs
    assert sorted(r.config["seed"] for r, phases in zip(runs, trained) if "baseline" in phases) == [0, 1]  # one baseline per seed
    baseline = {r.config["seed"]: r.summary["baseline_acc"] for r in runs if "baseline_acc" in r.summary}
    for t, row, x, y in zip((2, 8), shown, plotted[0], plotted[1]):
        accs = [r.summary["student_acc"] for r in runs if r.config["recipe"][1]["params"]["temperature"] == t]
        gains = [r.summary["student_acc"] - baseline[r.config["seed"]] for r in runs if r.config["recipe"][1]["params"]["temperature"] == t]
        assert float(row["temperature of recipe term 2"]) == t == x and row["finished runs"] == "2 of 2"
        assert float(row["student acc (%) mean"]) == pytest.approx(statistics.mean(accs))
        assert float(row["student acc (%) std"]) == pytest.approx(statistics.stdev(accs))
        assert float(row["KD gain (points) mean"]) == pytest.approx(statistics.mean(gains))
        assert y == pytest.approx(statistics.mean(accs))
    store.dispose()
