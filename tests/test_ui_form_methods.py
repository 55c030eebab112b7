"""The New-experiment form's method section: the paper link, MEAL V2's further teachers (``teachers:``), the
architectures' parameter counts and the "Which student?" (DisWOT) panel -- driven as a user would, in AppTest."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.ui_apptest import ROOT, TINY_YAML, errors, launch_button, new_experiment, paste_yaml, shown_yaml
from tests.ui_apptest import env as _env_fixture  # noqa: F401 - the fixture, under this name
from tests.ui_apptest import no_dispatch as _no_dispatch_fixture  # noqa: F401 - the fixture, under this name



@pytest.fixture
def app_store(_env_fixture, _no_dispatch_fixture):  # noqa: F811 - the imported fixtures, requested by name
    """The app's fresh database (``env``), with the runner kept from starting workers (``no_dispatch``)."""
    return _env_fixture


MEAL_YAML = ROOT / "configs" / "methods" / "mnist5k_meal_v2.yaml"


def _choose_meal(at) -> None:
    at.selectbox(key="nx_method").set_value("meal_v2").run()
    assert not at.exception, at.exception


def test_meal_v2_shows_its_paper_link_and_a_second_teacher_launches_into_teachers(app_store):
    at = new_experiment()
    paste_yaml(at, TINY_YAML)
    _choose_meal(at)
    caption = next(c.value for c in at.caption if "Paper:" in c.value and "ensemble" in c.value.lower())
    assert re.search(r"Paper: \[.+\]\(https?://\S+\)", caption), caption
    at.button(key="mui_add_teacher").click().run()
    (uid,) = at.session_state["nx_ens_ids"]
    at.selectbox(key=f"nx_e{uid}_arch").set_value("lenet5").run()
    at.text_input(key=f"nx_e{uid}_train").set_value("{epochs: 1, batch_size: 32, optimizer: {name: adamw, lr: 0.002}}").run()
    assert errors(at) == "" and not launch_button(at).disabled
    launch_button(at).click().run()
    (run,) = app_store.list_runs(include_hidden=True)
    (second,) = run.config["teachers"]
    assert (second["arch"], second["source"], second["epochs"], second["batch_size"]) == ("lenet5", "train", 1, 32)
    assert second["optimizer"]["lr"] == 0.002 and run.config["method"]["name"] == "meal_v2"


def test_a_second_teacher_reused_from_a_run_on_another_dataset_is_refused_like_the_first(app_store):
    elsewhere = yaml.safe_load(TINY_YAML) | {"dataset": {"name": "mnist5k"}, "teacher": {"arch": "lenet5", "source": "train", "epochs": 1}}
    earlier = app_store.create_run("lenet5 teacher on mnist5k", elsewhere, status="completed")
    at = new_experiment()
    paste_yaml(at, TINY_YAML)
    _choose_meal(at)
    at.button(key="mui_add_teacher").click().run()
    (uid,) = at.session_state["nx_ens_ids"]
    at.selectbox(key=f"nx_e{uid}_src").set_value("run").run()
    assert "choose the run whose teacher to reuse" in errors(at) and launch_button(at).disabled
    at.selectbox(key=f"nx_e{uid}_src_run").set_value(earlier).run()
    assert at.session_state[f"nx_e{uid}_arch"] == "lenet5"  # taken from that run, as for the first teacher
    assert f"run {earlier}'s teacher was trained on mnist5k, not digits" in errors(at) and launch_button(at).disabled


def test_the_meal_v2_config_round_trips_through_yaml_import(app_store):
    from kd_core.config import validate_config

    shipped = yaml.safe_load(MEAL_YAML.read_text())
    at = new_experiment()
    paste_yaml(at, MEAL_YAML.read_text())
    assert "was not loaded" not in errors(at), errors(at)
    (uid,) = at.session_state["nx_ens_ids"]
    assert at.selectbox(key=f"nx_e{uid}_arch").value == "lenet5"
    exported = shown_yaml(at)  # the YAML the form would launch
    assert exported["teachers"][0]["optimizer"]["lr"] == shipped["teachers"][0]["optimizer"]["lr"] == 0.05  # not the first teacher's 0.1
    assert exported == validate_config(shipped).model_dump(mode="json")  # the shipped file, defaults filled in


def test_architectures_show_parameter_counts_for_the_dataset_timm_included(app_store):
    from kd_core.models import count_parameters, create_model

    at = new_experiment()
    paste_yaml(at, TINY_YAML)  # digits: 1×8×8 images, 10 classes
    timm_label = next(label for label in at.selectbox(key="nx_s_arch").options if label.startswith("timm:convnext_atto"))
    shown = re.search(r"— ([\d.]+) (k|M) parameters", timm_label)
    real = count_parameters(create_model("timm:convnext_atto", 10, 1, 8))
    assert shown, timm_label
    value = float(shown.group(1)) * (1e3 if shown.group(2) == "k" else 1e6)
    assert abs(value - real) / real < 0.01, (timm_label, real)


def test_diswot_ranks_two_candidates_and_uses_the_top_one(app_store):
    at = new_experiment()
    paste_yaml(at, TINY_YAML)
    at.multiselect(key="nx_diswot_candidates").set_value(["cnn_tiny", "lenet5"]).run()
    at.button(key="mui_diswot_rank").click().run()
    assert not at.exception, at.exception
    table = at.dataframe[-1].value
    assert sorted(table["student"]) == ["cnn_tiny", "lenet5"] and list(table["rank"]) == [1, 2]
    assert table["DisWOT score"].is_monotonic_decreasing and (table["parameters"] > 0).all()
    assert any(re.search(r"in \d+\.\d\d s \(measured", c.value) for c in at.caption)
    top = table["student"].iloc[0]
    at.button(key="mui_diswot_use").click().run()
    assert at.selectbox(key="nx_s_arch").value == top


def test_checking_the_diswot_ranking_queues_one_run_per_top_candidate_with_one_teacher(app_store):
    from storage import Store

    config = yaml.safe_load(TINY_YAML)
    config["teacher"]["source"] = "train"
    at = new_experiment()
    paste_yaml(at, yaml.safe_dump(config))
    at.multiselect(key="nx_diswot_candidates").set_value(["cnn_tiny", "lenet5", "mlp", "resnet8"]).run()
    at.button(key="mui_diswot_rank").click().run()
    ranked = list(at.dataframe[-1].value["student"])
    at.button(key="mui_diswot_verify").click().run()
    assert not at.exception, at.exception
    store = Store(None)
    (sweep,) = store.list_sweeps()
    assert sweep.name == "DisWOT check: " + " > ".join(ranked[:3])  # the predicted order, to read the results against
    runs = sorted(store.list_runs(sweep_id=sweep.id, include_hidden=True), key=lambda r: r.id)
    assert [r.config["student"]["arch"] for r in runs] == ranked[:3]
    assert all(r.config["student"]["epochs"] == config["student"]["epochs"] for r in runs)  # the form's settings, as typed
    assert [r.config["teacher"]["source"] for r in runs] == ["train"] + [f"run:{runs[0].id}"] * 2  # one teacher, shared
    store.dispose()
