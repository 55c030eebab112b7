"""Result pages (run detail, compare, playground) and their helpers, with AppTest on a real finished run.

One tiny real experiment per module (digits, 300 images, 1 epoch each for teacher, student and baseline),
trained with kd_core.engine.run_experiment into a temporary database through storage.RunSink.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "pages"
TIMEOUT = 90


def _config(seed: int, temperature: float) -> dict:
    return {
        "name": f"tiny digits T={temperature:g}",
        "seed": seed,
        "device": "cpu",
        "dataset": {"name": "digits", "subset": 300, "val_fraction": 0.1},
        "teacher": {"arch": "cnn_small", "epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003}},
        "student": {"arch": "cnn_tiny", "epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003}},
        "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": temperature}}],
        "baseline": True,
        "analysis": {"enabled": False},
    }


def _train(store, seed: int, temperature: float) -> int:
    import torch

    from kd_core.config import validate_config
    from kd_core.settings import run_dir
    from kd_core.engine import run_experiment
    from storage import RunSink

    torch.set_num_threads(1)
    cfg = validate_config(_config(seed, temperature))
    run_id = store.create_run(cfg.name, cfg.model_dump(mode="json"), status="running")
    store.update_run(run_id, started_at=time.time())
    run_experiment(cfg, RunSink(store, run_id), run_dir(store.get_run(run_id).uid))
    assert store.transition(run_id, ["running"], "completed", finished_at=time.time())
    return run_id


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A temp database with two real finished runs and one synthetic run with a long series."""
    tmp = tmp_path_factory.mktemp("results")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLERY_DB_URL", f"sqlite:///{tmp / 'db.sqlite'}")
    mp.setenv("DISTILLERY_ARTIFACTS", str(tmp / "artifacts"))
    from storage import Store

    store = Store(None)
    a = _train(store, seed=0, temperature=4.0)
    b = _train(store, seed=1, temperature=2.0)
    # a finished run with a 5,000-step series: the chart must say it stands for 5,000 points
    long_id = store.create_run("long series", _config(0, 4.0), status="running")
    store.append_metrics(long_id, [
        {"phase": "student", "step": s, "epoch": s // 1000, "key": "loss/total", "value": 1.0 / s + (s % 7) * 0.01, "time": 1e9 + s}
        for s in range(1, 5001)
    ])
    store.update_run(long_id, status="completed", finished_at=time.time())
    yield {"store": store, "a": a, "b": b, "long": long_id, "tmp": tmp}
    store.dispose()
    mp.undo()


def _app(page: str, **query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGES / page), default_timeout=TIMEOUT)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _figures(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def _title(fig: dict) -> str:
    title = fig["layout"].get("title") or {}
    return title.get("text", "") if isinstance(title, dict) else str(title)


def _open_tab(at, name: str):
    """Click the tab whose label ends with ``name`` (the page reruns and draws that tab only)."""
    label = next(t.label for t in at.tabs if t.label.endswith(name))
    at.session_state["rd_tab"] = label
    return at.run()


def _no_exceptions(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


# --------------------------------------------------------------------------- run detail


def test_run_detail_renders_summary_accuracy_and_confusions(env):
    at = _app("run_detail.py", run=str(env["a"]))
    _no_exceptions(at)
    summary = env["store"].get_run(env["a"]).summary
    shown = {m.label: m.value for m in at.metric}
    assert shown["Student (best)"] == f"{summary['student_acc']:.1f} %"
    assert shown["KD gain"] == f"{summary['kd_gain']:+.2f} pts"
    assert "Teacher" in shown and "Baseline (best)" in shown
    student_delta = next(m.delta for m in at.metric if m.label == "Student (best)")
    assert student_delta.endswith("pts")
    assert any("Total loss" in _title(f) for f in _figures(at))  # the first tab, Curves, is open
    config = json.loads(at.get("plotly_chart")[0].proto.config)  # every chart exports a 2x PNG with a meaningful name
    figures = _figures(_open_tab(at, "Accuracy"))
    titles = [_title(f) for f in figures]
    assert not any("Total loss" in t for t in titles)  # only the open tab is drawn
    acc = next(f for f in figures if _title(f).startswith("Top-1 accuracy per epoch"))
    assert {tr["name"] for tr in acc["data"]} >= {"Teacher", "Student (distilled)", "Baseline (CE only)"}
    assert any("Agreement with the teacher" in t for t in titles)
    assert any("Accuracy per class" in _title(f) for f in _figures(_open_tab(at, "Per class")))
    confusions = [f for f in _figures(_open_tab(at, "Confusion")) if f["data"] and f["data"][0]["type"] == "heatmap"]
    assert [_title(f).split(":")[0] for f in confusions] == ["Teacher", "Student (distilled, best)", "Baseline (best)"]
    assert config["toImageButtonOptions"]["scale"] == 2 and config["toImageButtonOptions"]["filename"].startswith(f"run{env['a']}_")
    assert st_query(at) == str(env["a"])


def st_query(at) -> str:
    return at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"]


def test_run_detail_falls_back_to_selectbox(env):
    at = _app("run_detail.py")
    _no_exceptions(at)
    assert at.selectbox(key="rd_run").value == env["long"]  # newest first
    at.selectbox(key="rd_run").select(env["b"]).run()
    _no_exceptions(at)
    assert any(m.label == "KD gain" for m in at.metric)


def test_bucketed_chart_reports_its_point_count(env):
    from ui import charts, metrics

    run = env["store"].get_run(env["long"])
    df = metrics.bucketed_series(env["store"], run, "loss/total", "student", max_points=500)
    assert len(df) <= 500 and int(df["count"].sum()) == 5000
    assert (df["min"] <= df["value"]).all() and (df["value"] <= df["max"]).all()
    fig = charts.curves_figure([charts.Curve("student", charts.role_color("student"), df)], title="loss")
    assert metrics.points_caption(fig).startswith(f"{len(df):,} buckets of 5,000 points")
    assert any(tr.fill == "tonexty" for tr in fig.data)  # the min–max band is drawn

    at = _app("run_detail.py", run=str(env["long"]))
    _no_exceptions(at)
    loss = next(f for f in _figures(at) if "Total loss" in _title(f))
    assert "buckets of 5,000 points" in _title(loss)
    assert loss["layout"]["meta"]["points"] == 5000


# --------------------------------------------------------------------------- compare


def test_compare_two_runs_shows_differing_fields(env):
    a, b = env["a"], env["b"]
    at = _app("compare.py", runs=f"{a},{b}")
    _no_exceptions(at)
    assert at.multiselect(key="cmp_runs").value == [a, b]
    table = at.dataframe[-1].value
    assert set(table.index) == {"seed", "recipe[1].params.temperature"}
    assert list(table.loc["recipe[1].params.temperature"]) == ["4", "2"]
    curve = next(f for f in _figures(at) if "top1" in _title(f))
    colors = {tr["name"]: tr["line"]["color"] for tr in curve["data"] if tr.get("showlegend", True) is not False}
    from ui.charts import run_colors

    assert colors[next(n for n in colors if n.startswith(f"#{a} "))] == run_colors([a, b])[a]
    at.toggle(key="cmp_diff").set_value(False).run()
    assert "dataset.name" in at.dataframe[-1].value.index


# --------------------------------------------------------------------------- playground


def test_playground_reacts_to_temperature(env):
    at = _app("playground.py")
    _no_exceptions(at)

    def shown() -> dict[str, str]:
        return {m.label: m.value for m in at.metric}

    before = shown()
    assert at.slider(key="pg_T").value == 4.0
    at.slider(key="pg_T").set_value(0.5).run()  # a 1-epoch teacher is already soft at T = 4: sharpen it
    _no_exceptions(at)
    after = shown()
    assert before["Entropy"] != after["Entropy"]
    assert before["P(true class)"] != after["P(true class)"]
    assert float(after["Entropy"].split()[0]) < float(before["Entropy"].split()[0])
    assert after["Entropy at T = 1"] == before["Entropy at T = 1"]
    kd = next(f for f in _figures(at) if _title(f).startswith("KD loss"))
    assert any(s.get("x0") == 0.5 for s in kd["layout"].get("shapes", []))  # the current T is marked


def test_playground_without_runs_offers_the_preset(env, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLERY_DB_URL", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    at = _app("playground.py")
    _no_exceptions(at)
    info = " ".join(i.value for i in at.info)
    assert "finished experiment" in info
    assert "(65.3× smaller)" in info  # computed from the preset's architectures, as the form computes it
    assert at.button(key="pg_preset").label == "Set up the default preset"


# --------------------------------------------------------------------------- helpers


def test_playground_kd_gradient_maths():
    import torch

    src = (PAGES / "playground.py").read_text().rsplit("\n_ensure_app = ", 1)[0]
    ns: dict = {"__name__": "pg_math", "__file__": str(PAGES / "playground.py")}
    exec(compile(src, str(PAGES / "playground.py"), "exec"), ns)  # noqa: S102 - our own page, without its main()
    s, t = torch.randn(4, 10).numpy(), torch.randn(4, 10).numpy()
    temps = np.array([1.0, 4.0, 16.0])
    loss, g_with, g_without = ns["kd_over_t"](s, t, temps)
    # analytic gradient of T²·KL wrt student logits is T·(p_s − p_t) per image
    for i, temp in enumerate(temps):
        ps, pt = ns["softmax_t"](s, temp), ns["softmax_t"](t, temp)
        expected = np.linalg.norm(temp * (ps - pt), axis=1).mean()
        assert math.isclose(g_with[i], expected, rel_tol=1e-6)
        assert math.isclose(g_without[i], expected / temp**2, rel_tol=1e-6)
    assert g_without[2] < g_without[0] / 20  # without T² the push fades as T grows


def test_ema_flatten_groups_and_colors():
    from ui import charts, results

    assert charts.ema([5.0, 5.0, 5.0], 0.9).tolist() == [5.0, 5.0, 5.0]  # debiased: no pull towards 0
    assert np.allclose(charts.ema([1.0, 2.0], 0.0), [1.0, 2.0])
    # every run of a chart has its own colour, however many (ids 7 and 19 once shared one)
    assert len(set(charts.run_colors([7, 19]).values())) == 2 and len(set(charts.run_colors(range(1, 41)).values())) == 40
    flat = results.flatten({"a": {"b": 1}, "recipe": [{"loss": "kd", "params": {"temperature": 4}}], "m": [1, 2]})
    assert flat == {"a.b": 1, "recipe[0].loss": "kd", "recipe[0].params.temperature": 4, "m": "1, 2"}

    class R:
        def __init__(self, i, seed, lr, acc):
            self.id, self.name, self.status = i, f"r{i}", "completed"
            self.config = {"name": f"r{i}", "seed": seed, "student": {"lr": lr}}
            self.summary = {"student_acc": acc, "kd_gain": acc - 90}

    runs = [R(1, 0, 0.1, 91.0), R(2, 1, 0.1, 93.0), R(3, 0, 0.2, 95.0)]
    groups = results.seed_groups_frame(runs)
    assert list(groups["n"]) == [2, 1]
    assert groups.iloc[0]["student best (test %)"] == "92.00 ± 1.41"
    assert results.differing_fields(runs) == ["name", "seed", "student.lr"]
    assert list(results.numeric_differing(runs).columns) == ["seed", "student.lr"]
    assert results.parse_run_ids("1, 2,x,3") == [1, 2, 3]
    assert isinstance(results.results_frame(runs), pd.DataFrame)
