"""Analysis page (pages/analysis.py) with AppTest on a real tiny run that wrote its analysis artifacts.

One experiment per module (digits, 300 images; teacher cnn_small 1 epoch, student cnn_tiny 2 epochs, baseline;
analysis on 200 test images, CKA at 2 checkpoints, 4 attribution images), trained with
kd_core.engine.run_experiment into a temporary database through storage.RunSink.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 90
from ui.analysis.common import TABS as TAB_LABELS  # noqa: E402

TABS = tuple(TAB_LABELS.values())


def _config() -> dict:
    return {
        "name": "tiny digits analysis",
        "seed": 0,
        "device": "cpu",
        "dataset": {"name": "digits", "subset": 300, "val_fraction": 0.1},
        "teacher": {"arch": "cnn_small", "epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003}},
        "student": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003}},
        "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
        "baseline": True,
        "analysis": {"enabled": True, "cka_checkpoints": 2, "samples": 200, "attribution_images": 4},
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("analysis_page")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLERY_DB_URL", f"sqlite:///{tmp / 'db.sqlite'}")
    mp.setenv("DISTILLERY_ARTIFACTS", str(tmp / "artifacts"))
    from kd_core.config import validate_config
    from kd_core.settings import run_dir
    from kd_core.engine import run_experiment
    from storage import RunSink, Store

    torch.set_num_threads(1)
    store = Store(None)
    cfg = validate_config(_config())
    run_id = store.create_run(cfg.name, cfg.model_dump(mode="json"), status="running")
    store.update_run(run_id, started_at=time.time())
    run_experiment(cfg, RunSink(store, run_id), run_dir(store.get_run(run_id).uid))
    assert store.transition(run_id, ["running"], "completed", finished_at=time.time())
    # an older run: finished, but no analysis artifacts at all
    old = dict(_config(), name="old run")
    old.pop("analysis")
    old_id = store.create_run("old run", old, status="completed")
    # a run still training: one CKA checkpoint so far, copied from the real run
    live_id = store.create_run("live run", _config(), status="running")
    cka = sorted((a for a in store.artifacts(run_id, "cka") if a.meta.get("phase") == "student"),
                 key=lambda a: a.meta.get("epoch", 0))[0]
    store.add_artifact(live_id, "cka", cka.path, cka.meta)
    yield {"store": store, "run": run_id, "old": old_id, "live": live_id}
    store.dispose()
    mp.undo()


def _app(run_id: int, tab: str | None = None, **state):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)  # through the app's navigation, as a user
    at.switch_page("pages/analysis.py")
    at.query_params["run"] = str(run_id)
    if tab is not None:
        at.session_state["an_tab"] = tab
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def _no_exceptions(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _figures(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def _title(fig: dict) -> str:
    title = fig["layout"].get("title") or {}
    return title.get("text", "") if isinstance(title, dict) else str(title)


def _array(v) -> np.ndarray:
    """A Plotly JSON array: a plain list or the typed-array form {"dtype", "bdata", "shape"}."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return a.reshape([int(x) for x in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v)


def _analysis(env) -> dict:
    art = env["store"].artifacts(env["run"], "analysis")[0]
    return json.loads(Path(art.path).read_text())


def test_cka_tab_heatmap_with_checkpoint_slider(env):
    at = _app(env["run"])
    _no_exceptions(at)
    slider = at.select_slider(key="an_a_cka_epoch_student")
    assert slider.label.startswith("Checkpoint — 2 computed during training")
    assert len(slider.options) == 2
    figs = _figures(at)
    heat = next(f for f in figs if _title(f).startswith("Teacher vs student — epoch 2"))
    assert heat["data"][0]["type"] == "heatmap"
    assert heat["data"][0]["zmin"] == 0 and heat["data"][0]["zmax"] == 1
    assert heat["data"][0]["y"][-1] == "embedding" and heat["data"][0]["x"][-1] == "embedding"
    over_time = next(f for f in figs if "CKA with the matching teacher layer" in _title(f))
    names = {tr["name"].split(" · ")[0] for tr in over_time["data"]}
    assert names == {"Student", "Baseline"}  # KD student and baseline in one chart
    assert all(len(tr["x"]) == 2 for tr in over_time["data"])
    assert not any(_title(f) == "Teacher vs teacher" for f in figs)  # self-similarity on request
    at.toggle(key="an_a_cka_self").set_value(True).run()
    assert any(_title(f) == "Teacher vs teacher" for f in _figures(at))
    # slide back to epoch 1
    slider.set_value(1).run()
    _no_exceptions(at)
    assert any(_title(f).startswith("Teacher vs student — epoch 1") for f in _figures(at))


def test_prototype_tab_tables_and_embeddings(env):
    at = _app(env["run"], TABS[1])
    _no_exceptions(at)
    table = at.dataframe[0].value
    assert list(table["model"]) == ["Teacher", "Student (distilled)", "Baseline (CE only)"]
    assert {"NCM accuracy (%)", "mean norm", "norm ÷ teacher's", "spread", "cosine to prototype"} <= set(table.columns)
    assert table["norm ÷ teacher's"].iloc[0] == 1.0
    labels = {m.label for m in at.metric}
    assert "Student norm ÷ teacher norm" in labels
    titles = [_title(f) for f in _figures(at)]
    assert titles[:3] == ["Teacher", "Student", "Student − teacher"]
    emb = [f for f in _figures(at) if "PCA" in _title(f)]
    assert len(emb) == 2  # teacher and student side by side
    protos = [tr for tr in emb[0]["data"] if tr["name"].endswith("prototypes")]
    assert len(protos) == 1 and len(protos[0]["text"]) == 10 and protos[0]["marker"]["size"] >= 20
    assert "label" in emb[0]["data"][0]["text"][0] and "student" in emb[0]["data"][0]["text"][0]
    # one space: the student mapped into the teacher's PCA
    at.session_state["an_a_emb_layout"] = "joint"
    at.run()
    _no_exceptions(at)
    assert any("teacher's PCA space" in _title(f) for f in _figures(at))


def test_attribution_gallery(env):
    at = _app(env["run"], TABS[2])
    _no_exceptions(at)
    shown = " ".join(i.value for i in at.info)
    assert "|attribution| with a light Gaussian blur" in shown and "each map scaled on its own" in shown
    assert at.multiselect(key="an_a_attr_methods").value == ["smoothgrad", "gradcam"]  # smooth maps by default
    gallery = [f for f in _figures(at) if _title(f).startswith("image ")]
    assert len(gallery) == 4
    maps = [tr for tr in gallery[0]["data"] if tr["type"] == "heatmap" and tr.get("colorscale") != "gray"]
    assert all(_array(tr["z"]).min() >= 0 for tr in maps)  # absolute values, blurred
    summary = next(f for f in _figures(at) if "agree with the teacher" in _title(f))
    assert any(s.get("type") == "line" for s in summary["layout"].get("shapes", []))  # random-map IoU reference
    at.radio(key="an_a_attr_norm").set_value("joint").run()
    at.toggle(key="an_a_attr_smooth").set_value(False).run()
    _no_exceptions(at)
    shown = " ".join(i.value for i in at.info)
    assert "maps of an image on one scale" in shown and "raw signed attribution" in shown


def test_display_smoothing_keeps_where_the_map_is():
    from ui.analysis.attribution import for_display

    spike = np.zeros((28, 28))
    spike[10, 20] = -3.0
    shown = for_display(spike)
    assert shown.min() >= 0 and np.unravel_index(shown.argmax(), shown.shape) == (10, 20)
    assert 0 < shown[10, 20] < 3 and shown[10, 21] > 0  # spread to the neighbours
    checker = np.indices((28, 28)).sum(0) % 2 * 2.0 - 1  # the checkerboard of raw gradients
    assert for_display(checker).std() < 0.05 * np.abs(checker).std() + 1e-9


def test_agreement_counts_sum_to_n(env):
    at = _app(env["run"], TABS[3])
    _no_exceptions(at)
    n = _analysis(env)["n"]
    table = at.dataframe[0].value
    assert list(table["model"]) == ["Student (distilled)", "Baseline (CE only)"]
    parts = table[["both right", "teacher right, model wrong", "teacher wrong, model right", "both wrong"]].sum(axis=1)
    assert (parts == n).all() and (table["total (n)"] == n).all()
    for f in _figures(at):
        if f["data"][0]["type"] == "heatmap":
            assert _array(f["data"][0]["z"]).sum() == n
    assert {m.label for m in at.metric} >= {"ECE teacher", "ECE student", "ECE baseline"}
    assert any(_title(f).startswith("Reliability diagram") for f in _figures(at))


def test_explorer_lists_images_of_a_bucket(env):
    from ui.analysis.data import BUCKETS

    data = _analysis(env)
    counts = data["agreement"]["student"]
    bucket = max(BUCKETS, key=lambda b: counts[b])  # a bucket that surely holds images
    at = _app(env["run"], TABS[4], an_a_exp_bucket=bucket)
    _no_exceptions(at)
    images = at.get("image")
    expected = min(counts[bucket], 24)
    assert len(images) == expected + 1  # the thumbnails, plus the enlarged image under "Look closer"
    assert any(f"({counts[bucket]} images)" in o for o in at.selectbox(key="an_a_exp_bucket").options)
    assert any(_title(f).startswith("What each model predicts") for f in _figures(at))
    # the lasso selection from the embedding feeds the explorer
    at = _app(env["run"], TABS[4], **{f"an_sel_{env['run']}": [0, 1, 2], "an_a_exp_source": "selection"})
    _no_exceptions(at)
    assert len(at.get("image")) == 3 + 1


def test_run_without_artifacts_says_so(env):
    at = _app(env["old"])
    _no_exceptions(at)
    assert any("no analysis artifacts" in w.value for w in at.warning)
    assert not at.tabs
    live = _app(env["live"])
    _no_exceptions(live)
    assert any("computed when training ends" in i.value for i in live.info)
    assert any(_title(f).startswith("Teacher vs student — epoch") for f in _figures(live))  # CKA so far


def test_compare_two_runs_side_by_side(env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("pages/analysis.py")
    at.query_params["run"] = str(env["run"])
    at.query_params["with"] = str(env["live"])
    at.run()
    _no_exceptions(at)
    assert at.selectbox(key="an_with").value == env["live"]
    titles = [_title(f) for f in _figures(at)]
    assert sum(t.startswith("Teacher vs student — epoch") for t in titles) == 2  # one heatmap per run
    at.session_state["an_tab"] = TABS[3]
    at.run()
    _no_exceptions(at)
    assert any("computed when training ends" in i.value for i in at.info)  # the live run's column says why it is empty


def test_widget_values_survive_switching_tabs(env):
    at = _app(env["run"])
    at.select_slider(key="an_a_cka_epoch_student").set_value(1).run()
    at.session_state["an_tab"] = TABS[1]
    at.run()
    at.session_state["an_tab"] = TABS[0]
    at.run()
    _no_exceptions(at)
    assert at.select_slider(key="an_a_cka_epoch_student").value == 1
    assert not at.warning


def test_view_helpers():
    from ui.analysis.attribution import normalize_group
    from ui.analysis.cka import matching_rows
    from ui.analysis.data import thumbnail
    from ui.analysis.embeddings import selected_indices

    m = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.1, 0.7, 0.4]])
    assert matching_rows(m, "best").tolist() == [0, 2, 1]
    assert matching_rows(m, "depth").tolist() == [0, 1, 2]
    assert matching_rows(np.zeros((4, 3)), "depth").tolist() == [0, 2, 3]  # 0, 1.5 (rounds to even), 3
    weak, strong = np.full((4, 4), 0.1), np.full((4, 4), 1.0)
    per_map = normalize_group({"teacher": strong, "student": weak}, "per_map")
    joint = normalize_group({"teacher": strong, "student": weak}, "joint")
    assert np.allclose(per_map["student"], 1.0) and np.allclose(joint["student"], 0.1)  # joint keeps magnitudes
    sel = {"selection": {"points": [{"customdata": [5]}, {"customdata": 2}, {"customdata": -1}, {"x": 1}]}}
    assert selected_indices(sel) == [2, 5]  # prototype markers (-1) and points without an index are ignored
    assert thumbnail(np.ones((1, 8, 8)), 96).shape == (96, 96)
    assert thumbnail(np.ones((3, 32, 32)), 96).shape == (96, 96, 3)


def test_the_first_tab_never_reads_the_tensors(env, tmp_path):
    """A run whose analysis tensors are unreadable: the CKA tab still opens; the tabs that need them say why not."""
    store = env["store"]
    run = store.get_run(env["run"])
    broken = store.create_run("broken tensors", run.config, status="completed")
    for art in store.artifacts(env["run"], "cka"):
        store.add_artifact(broken, "cka", art.path, art.meta)
    summary = store.artifacts(env["run"], "analysis")[0]
    (tmp_path / "analysis.safetensors").write_bytes(b"not a safetensors file")
    store.add_artifact(broken, "analysis", summary.path, {**summary.meta, "tensors": str(tmp_path / "analysis.safetensors")})
    at = _app(broken)
    _no_exceptions(at)
    assert any(_title(f).startswith("Teacher vs student — epoch") for f in _figures(at)) and not at.info
    at.session_state["an_tab"] = TABS[1]
    at.run()
    _no_exceptions(at)
    assert any("Could not read" in i.value and "analysis.safetensors" in i.value for i in at.info)


def test_prototype_numbers_say_where_they_come_from(env):
    at = _app(env["run"], TABS[1])
    n = _analysis(env)["n"]
    assert any(f"Computed on {n} test images" in c.value for c in at.caption)
    assert "top-1 on these images (%)" in at.dataframe[0].value.columns


def test_explanations_agree_with_the_numbers_shown():
    from ui.analysis.prototypes import norm_sentence, sample_note

    assert "shorter than the teacher's" in norm_sentence(0.93)
    assert "as long as the teacher's" in norm_sentence(0.998) and "as long as the teacher's" in norm_sentence(1.004)
    assert "longer than the teacher's" in norm_sentence(1.2)
    note = sample_note({"n": 500, "split": "test", "accuracy": {"teacher": 97.2, "student": 87.2}},
                       {"teacher_acc": 97.6, "student_acc": 87.2})
    assert note.startswith("Computed on 500 test images") and "teacher 97.6 % there, 97.2 % here" in note
    assert "student (distilled)" not in note  # the same to one decimal: nothing to explain
