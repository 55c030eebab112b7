"""Run detail, Runs, Compare and Analysis in a real browser (issue 10, "Truth on the live page" and "Compare, Runs,
Analysis").

Runs are written into the server's database the way a worker writes them, so each page can be watched while
its run changes; the Analysis page gets one real tiny run with its analysis artifacts. The supervisor's reconcile
loop is slowed down so it leaves these worker-less runs alone.
"""

from __future__ import annotations

import math
import time

import pytest

from tests.test_browser import SHOTS, browser_page, serve, settle

pytestmark = pytest.mark.browser
LONG_NAMES = 13  # more runs than the palette has colours
LIVE_S, CHART_S = 3.0, 12.0  # the server's poll and chart intervals, shorter than the defaults to keep the tests short


def _tiny_analysed_run(store) -> int:
    import torch

    from kd_core.config import validate_config
    from kd_core.engine import run_experiment
    from kd_core.settings import run_dir
    from storage import RunSink

    torch.set_num_threads(1)
    cfg = validate_config({
        "name": "tiny digits analysis", "seed": 0, "device": "cpu",
        "dataset": {"name": "digits", "subset": 300, "val_fraction": 0.1},
        "teacher": {"arch": "cnn_small", "epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003}},
        "student": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003}},
        "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
        "analysis": {"cka_checkpoints": 2, "samples": 200, "attribution_images": 4},
    })
    run_id = store.create_run(cfg.name, cfg.model_dump(mode="json"), status="running")
    store.update_run(run_id, started_at=time.time())
    run_experiment(cfg, RunSink(store, run_id), run_dir(store.get_run(run_id).uid))
    assert store.transition(run_id, ["running"], "completed", finished_at=time.time())
    return run_id


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The server, its store, a real analysed run and long-named runs with a loss curve each."""
    from storage import Store

    home = tmp_path_factory.mktemp("pages")
    mp = pytest.MonkeyPatch()
    for key, value in {"DISTILLERY_HOME": str(home), "DISTILLERY_ARTIFACTS": str(home / "artifacts")}.items():
        mp.setenv(key, value)
    store = Store(f"sqlite:///{home / 'distillery.db'}")
    analysed = _tiny_analysed_run(store)
    config = store.get_run(analysed).config
    curves = []
    for i in range(LONG_NAMES):
        rid = store.create_run(f"mnist5k cnn_small -> cnn_tiny KD at temperature {i + 1}, a long name to wrap", config, status="completed")
        store.append_metrics(rid, [{"phase": "student", "step": s, "epoch": s // 10, "key": "loss/total",
                                    "value": math.exp(-s / (20 + i)) + 0.01 * i, "time": 1e9 + s} for s in range(1, 60)])
        curves.append(rid)
    with serve(home, DISTILLERY_SUPERVISE_INTERVAL_S="3600", DISTILLERY_LIVE_REFRESH_S=str(LIVE_S),
               DISTILLERY_CHART_REFRESH_S=str(CHART_S)) as (url, _):
        yield {"url": url, "store": store, "analysed": analysed, "curves": curves, "config": config}
    store.dispose()
    mp.undo()


def header_line(page):
    """The Run detail line with the status badge, dataset, models and recipe."""
    return page.get_by_test_id("stMarkdownContainer").filter(has_text="· dataset").first


def test_the_live_page_follows_the_run(site):
    from playwright.sync_api import expect

    store = site["store"]
    with browser_page(height=1400) as page:
        page.goto(site["url"])  # the first page starts the server's supervisor, whose first pass fails worker-less runs
        settle(page)
        page.wait_for_timeout(2000)
        run_id = store.create_run("watched run", site["config"], status="starting")
        page.goto(f"{site['url']}/run_detail?run={run_id}")
        expect(header_line(page)).to_contain_text("starting")
        progress = {"phase": "student", "phase_index": 2, "phases": 4, "epoch": 3, "epochs": 8, "step": 100, "steps": 456,
                    "images_per_s": 500.0, "eta_s": 95.0, "eta_includes_analysis": False, "trained_s": 42.0}
        store.update_run(run_id, status="running", progress=progress, summary={"teacher_acc": 97.6}, heartbeat_at=time.time(),
                         started_at=time.time())
        expect(header_line(page)).to_contain_text("running")  # the page stays open: the badge follows the database
        expect(page.get_by_text("epoch 3/8 · step 100/456").first).to_be_visible()
        expect(page.get_by_text("the end-of-run analysis comes on top").first).to_be_visible()
        expect(page.get_by_test_id("stMetric").filter(has_text="Teacher").first).to_contain_text("97.6 %")
        page.screenshot(path=str(SHOTS / "run_detail_live.png"))
        store.update_run(run_id, status="completed", finished_at=time.time(),
                         progress={**progress, "finished": True, "ended": "completed, normally"},
                         summary={"teacher_acc": 97.6, "student_acc": 90.0, "baseline_acc": 88.0, "kd_gain": 2.0, "trained_s": 600.0})
        expect(header_line(page)).to_contain_text("completed")
        expect(page.get_by_text("epoch 3/8")).to_have_count(0)
        expect(page.get_by_text("trained 10m 00s (summed across resumes)").first).to_be_visible()


_POINTS = """() => [...document.querySelectorAll('svg text')].map(t => t.textContent).join(' ').match(/all (\\d+) points/)?.[1]"""
_STEP = """() => document.body.innerText.match(/step (\\d+)\\/456/)?.[1]"""


def _changes(samples: list[tuple[float, str | None]]) -> list[float]:
    """Times at which a sampled value changed (from one value to another, not from nothing)."""
    return [t for (_, a), (t, b) in zip(samples, samples[1:]) if a is not None and b is not None and a != b]


def test_live_pages_redraw_charts_every_chart_interval_and_the_status_every_poll(site):
    """While a run trains, Run detail's status follows each poll (DISTILLERY_LIVE_REFRESH_S) but its charts, and
    Compare's, are rebuilt every DISTILLERY_CHART_REFRESH_S: the browser redraws each chart every time, on the cores
    that train (bench/server_cpu.py)."""
    store = site["store"]
    progress = {"phase": "student", "phase_index": 2, "phases": 4, "epoch": 3, "epochs": 8, "step": 0, "steps": 456,
                "images_per_s": 500.0, "eta_s": 95.0, "eta_includes_analysis": False, "trained_s": 42.0}

    def train_to(run_id: int, step: int) -> None:  # as the worker logs: points, then the progress and the heartbeat
        store.append_metrics(run_id, [{"phase": "student", "step": s, "epoch": 0, "key": "loss/total", "value": 1.0 / s,
                                       "time": time.time()} for s in range(progress["step"] + 1, step + 1)])
        progress["step"] = step
        store.update_run(run_id, progress=progress, heartbeat_at=time.time(), started_at=time.time())

    with browser_page(height=1400) as detail:
        detail.goto(site["url"])  # the supervisor's first pass (started by a first page) fails worker-less runs
        settle(detail)
        detail.wait_for_timeout(2000)
        run_id = store.create_run("watched curves", site["config"], status="running")
        train_to(run_id, 10)
        compare = detail.context.new_page()
        for page, path in ((detail, f"run_detail?run={run_id}"), (compare, f"compare?runs={run_id}")):
            page.goto(f"{site['url']}/{path}")
            page.wait_for_function(f"() => ({_POINTS})() === '10'")
        samples: dict[str, list[tuple[float, str | None]]] = {"status": [], "detail chart": [], "compare chart": []}
        t0 = time.monotonic()
        while (now := time.monotonic() - t0) < CHART_S + 2 * LIVE_S:
            train_to(run_id, progress["step"] + 1)
            samples["status"].append((now, detail.evaluate(_STEP)))
            samples["detail chart"].append((now, detail.evaluate(_POINTS)))
            samples["compare chart"].append((now, compare.evaluate(_POINTS)))
            detail.wait_for_timeout(500)
        store.update_run(run_id, status="cancelled", finished_at=time.time())
    status = _changes(samples["status"])
    # several changes, none as far apart as the chart interval (margins for a loaded CI machine)
    assert len(status) >= 4 and max(b - a for a, b in zip(status, status[1:])) < CHART_S - 2, status
    for chart in ("detail chart", "compare chart"):
        redrawn = _changes(samples[chart])
        assert redrawn, f"the {chart} never showed new points"  # live, at the chart interval
        assert all(b - a > CHART_S - 2 for a, b in zip(redrawn, redrawn[1:])), (chart, redrawn)


def test_a_live_sweep_page_is_redrawn_when_a_run_finishes_and_not_between(site):
    """The Sweeps page of an active sweep reads its rows every poll but redraws (sends its tables and plots to the
    browser again) only when a run changed: between changes the browser receives nothing but the poll's own reruns."""
    from playwright.sync_api import expect

    store = site["store"]
    with browser_page(height=1400) as page:
        page.goto(site["url"])  # the supervisor's first pass (started by a first page) fails worker-less runs
        settle(page)
        page.wait_for_timeout(2000)
        sweep_id = store.create_sweep("watched sweep", {"base": site["config"], "axes": {"seed": [0, 1]}})
        run_ids = [store.create_run(f"watched sweep seed {seed}", {**site["config"], "seed": seed}, status=status,
                                    sweep_id=sweep_id) for seed, status in ((0, "running"), (1, "queued"))]
        received: list[tuple[float, int]] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: received.append((time.monotonic(), len(frame)))))
        page.goto(f"{site['url']}/sweep?sweep={sweep_id}")
        expect(page.get_by_text("0/2 done · 1 running · 1 queued").first).to_be_visible()
        settle(page)
        quiet_from = time.monotonic()
        page.wait_for_timeout(2 * LIVE_S * 1000 + 1000)  # two polls at least, nothing changed
        quiet = _bursts([frame for frame in received if frame[0] >= quiet_from])
        store.update_run(run_ids[0], status="completed", finished_at=time.time(), summary={"student_acc": 91.5, "teacher_acc": 97.0})
        changed_from = time.monotonic()
        expect(page.get_by_text("1/2 done · 1 queued").first).to_be_visible(timeout=(LIVE_S + 10) * 1000)
        settle(page)
        redraw = _bursts([frame for frame in received if frame[0] >= changed_from])
        quiet_again_from = time.monotonic()
        page.wait_for_timeout(2 * LIVE_S * 1000 + 1000)  # the redrawn page watches the new rows, not the first ones
        quiet_again = _bursts([frame for frame in received if frame[0] >= quiet_again_from])
        page.screenshot(path=str(SHOTS / "sweep_live.png"))
        store.update_run(run_ids[1], status="cancelled", finished_at=time.time())
    # a poll's rerun is a few small messages (about 1.1 kB); a redraw sends the progress, tables and links again
    assert len(quiet) >= 2 and max(quiet) < 2000, quiet
    assert max(redraw) > 10_000, redraw
    assert len(quiet_again) >= 2 and max(quiet_again) < 2000, quiet_again


def _bursts(frames: list[tuple[float, int]]) -> list[int]:
    """Bytes per burst of websocket messages (one rerun's messages arrive within a few ms of each other)."""
    sizes: list[int] = []
    last = -1.0
    for t, size in frames:
        if t - last > 0.5:
            sizes.append(0)
        sizes[-1] += size
        last = t
    return sizes


def test_the_runs_grid_shows_accuracy_and_kd_gain_without_scrolling(site):
    from playwright.sync_api import expect

    with browser_page(width=1400, height=1000) as page:
        page.goto(site["url"] + "/")
        grid = page.get_by_test_id("stDataFrame").first
        expect(grid).to_be_visible()
        settle(page)
        headers = grid.locator("th").all_inner_texts()
        assert {"Best acc", "KD gain", "Teacher acc"} <= {h.strip() for h in headers}, headers
        width, visible = grid.locator(".dvn-scroller").evaluate("e => [e.scrollWidth, e.clientWidth]")
        assert width <= visible, (width, visible)  # no horizontal scrolling at 1400 px
        assert page.get_by_role("button", name="Deploy").count() == 0
        icons = page.get_by_test_id("stSidebarNav").get_by_test_id("stIconMaterial")
        expect(icons).to_have_count(7)  # one bundled Material icon per page, no emoji
        page.screenshot(path=str(SHOTS / "runs_1400.png"))


def test_compare_gives_every_run_its_colour_and_a_whole_png(site, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    runs = ",".join(map(str, site["curves"]))
    with browser_page(width=1400, height=1800) as page:
        page.goto(f"{site['url']}/compare?runs={runs}")
        chart = page.locator(".st-key-cmp_chart .js-plotly-plot")
        expect(chart.locator(".legend")).to_be_visible()
        settle(page)
        colors = chart.evaluate("p => p.data.filter(t => t.showlegend !== false).map(t => t.line.color)")
        assert len(colors) == LONG_NAMES and len(set(colors)) == LONG_NAMES
        svg, legend = chart.locator(".main-svg").first.bounding_box(), chart.locator(".legend").bounding_box()
        assert legend["y"] + legend["height"] <= svg["y"] + svg["height"] and legend["x"] + legend["width"] <= svg["x"] + svg["width"]
        for text in chart.locator(".legend text.legendtext").all():  # no entry is clipped by the legend's own box
            assert text.bounding_box()["x"] + text.bounding_box()["width"] <= legend["x"] + legend["width"] + 1
        with page.expect_download() as download:
            page.get_by_role("button", name="Download PNG").click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        png = Image.open(path)
        assert path.suffix == ".png" and png.size[1] >= 2 * svg["height"] - 2  # the whole chart, legend included, at 2×
        page.screenshot(path=str(SHOTS / "compare_many.png"))


def test_analysis_draws_only_the_open_tab(site):
    from playwright.sync_api import expect

    with browser_page(width=1400, height=1400) as page:
        started = time.perf_counter()
        page.goto(f"{site['url']}/analysis?run={site['analysed']}")
        charts = page.locator(".js-plotly-plot")
        expect(charts.first).to_be_visible()
        settle(page)
        print(f"Analysis page with the CKA tab drawn: {time.perf_counter() - started:.2f} s")  # measured, not asserted
        titles = charts.locator(".gtitle").all_text_contents()
        assert charts.count() == 2 and any(t.startswith("Teacher vs student") for t in titles), titles
        assert not any("PCA" in t for t in titles)  # the other tabs are not drawn
        page.get_by_role("tab", name="Prototypes & embeddings").click()
        expect(page.locator(".js-plotly-plot .gtitle").filter(has_text="PCA").first).to_be_visible()
        page.get_by_role("tab", name="Attribution maps").click()
        expect(page.get_by_text("|attribution| with a light Gaussian blur").first).to_be_visible()
        settle(page)
        page.screenshot(path=str(SHOTS / "analysis_attribution.png"))
