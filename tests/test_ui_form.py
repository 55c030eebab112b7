"""The New-experiment form as a first-time user meets it (issues 9 and 10), driven with AppTest.

What the user typed is what runs, the errors on screen are the current ones, a dataset that is not on disk is
flagged before launch, the run name follows the config until it is typed, launched configs are complete, the
precision can be chosen, and the default preset launches where Docker puts the data (DISTILLERY_HOME=/data).
The real-browser half (typing into the fields) is in test_browser_form.py.
"""

from __future__ import annotations

import pytest
import yaml

from tests.ui_apptest import (  # noqa: F401 - fixtures
    ROOT, TINY_YAML, env, errors, launch_button, new_experiment, no_dispatch, paste_yaml, shown_yaml, stop_runs, warnings,
)


def test_a_refused_value_is_kept_and_blocks_launch(env, no_dispatch):
    at = new_experiment()
    at.number_input(key="nx_s_lr").set_value(-0.1).run()
    assert at.number_input(key="nx_s_lr").value == pytest.approx(-0.1)  # kept as typed, not replaced
    assert "student.optimizer.lr: Input should be greater than 0" in errors(at)
    assert launch_button(at).disabled and at.download_button(key="nx_export").disabled
    assert shown_yaml(at)["student"]["optimizer"]["lr"] == pytest.approx(-0.1)
    at.number_input(key="nx_s_bs").set_value(0).run()
    assert "student.batch_size: Input should be greater than or equal to 2" in errors(at)


def test_only_current_errors_after_a_refused_upload(env, no_dispatch):
    at = new_experiment()
    at.selectbox(key="nx_t_src").set_value("upload").run()
    assert errors(at).count("teacher.source") == 2  # next to the field and in the list above Launch
    assert "upload a checkpoint file" in errors(at)
    at.file_uploader(key="nx_t_upload").upload("junk.pt", b"this is not a checkpoint", "application/octet-stream").run()
    shown = errors(at)
    assert "teacher.source: junk.pt is not a plain torch state dict" in shown
    assert "upload a checkpoint file" not in shown and "is not a teacher source" not in shown
    assert shown.count("teacher.source") == 2
    at.selectbox(key="nx_t_src").set_value("train").run()
    assert errors(at) == ""


def test_timm_weights_say_where_the_file_goes(env, no_dispatch, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    at = new_experiment()
    at.selectbox(key="nx_t_src").set_value("timm").run()
    assert any("never downloaded" in c.value for c in at.caption)
    assert "teacher.source: timm weights exist only for timm: architectures" in errors(at)
    assert launch_button(at).disabled
    at.selectbox(key="nx_t_arch").set_value("timm:resnet18").run()
    assert f"place resnet18.safetensors in {tmp_path / 'data' / 'timm'}" in errors(at)
    assert shown_yaml(at)["teacher"]["source"] == "timm"


def test_uploaded_checkpoint_is_checked(env, no_dispatch, tmp_path):
    import torch

    from kd_core.models import create_model

    at = new_experiment()
    at.selectbox(key="nx_t_src").set_value("upload").run()
    path = tmp_path / "teacher.pt"
    torch.save(create_model("cnn_small", 10, 1, 28).state_dict(), path)  # mnist5k: 10 classes, 1×28×28
    at.file_uploader(key="nx_t_upload").upload("teacher.pt", path.read_bytes(), "application/octet-stream").run()
    assert errors(at) == "", errors(at)
    saved = list((tmp_path / "data" / "uploads").glob("*.pt"))
    assert len(saved) == 1 and len(saved[0].stem) == 64
    assert shown_yaml(at)["teacher"]["source"] == f"file:{saved[0]}"
    at.selectbox(key="nx_t_arch").set_value("cnn_tiny").run()  # same file, wrong architecture
    assert "does not match teacher.arch 'cnn_tiny'" in errors(at)


def test_a_dataset_missing_on_disk_is_flagged_when_picked(env, no_dispatch, tmp_path):
    at = new_experiment()
    at.selectbox(key="nx_ds_name").set_value("cifar10").run()
    note = warnings(at)
    root = tmp_path / "data" / "datasets"
    assert f"cifar10 is not in {root} yet" in note and "cifar-10-batches-py/data_batch_1" in note
    assert "offline it fails" in note
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"):
        (root / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        (root / "cifar-10-batches-py" / name).write_bytes(b"")
    at.run()
    assert "cifar10 is not in" not in warnings(at)


def test_the_name_follows_the_config_until_typed(env, no_dispatch):
    at = new_experiment()
    assert at.text_input(key="nx_name").value == "mnist5k cnn_small -> cnn_tiny KD"
    at.selectbox(key="nx_ds_name").set_value("cifar10").run()
    assert at.text_input(key="nx_name").value == "cifar10 cnn_small -> cnn_tiny KD"
    at.selectbox(key="nx_r{}_loss".format(at.session_state["nx_recipe_ids"][1])).set_value("dkd").run()
    assert at.text_input(key="nx_name").value == "cifar10 cnn_small -> cnn_tiny DKD"
    at.text_input(key="nx_name").set_value("my DKD try").run()
    at.selectbox(key="nx_ds_name").set_value("digits").run()
    assert at.text_input(key="nx_name").value == "my DKD try"
    paste_yaml(at, TINY_YAML)  # a loaded config keeps its own name until its config changes
    assert at.text_input(key="nx_name").value == "tiny digits"
    at.selectbox(key="nx_s_arch").set_value("lenet5").run()
    assert at.text_input(key="nx_name").value == "digits cnn_tiny -> lenet5 KD"


def test_a_launched_config_holds_every_parameter(env, no_dispatch):
    at = new_experiment()
    uid = at.session_state["nx_recipe_ids"][1]
    at.selectbox(key=f"nx_r{uid}_loss").set_value("dist").run()
    at.number_input(key=f"nx_r{uid}_p_temperature").set_value(4.0).run()
    launch_button(at).click().run()
    (run,) = env.list_runs(include_hidden=True)
    assert run.config["recipe"][1] == {"loss": "dist", "weight": 0.9, "params": {"beta": 1.0, "gamma": 1.0, "temperature": 4.0},
                                       "warmup_epochs": 0}
    assert run.config["precision"] == "auto"


def test_precision_is_a_field_with_its_meaning(env, no_dispatch):
    at = new_experiment()
    box = at.selectbox(key="nx_precision")
    assert box.options == ["auto", "fp32", "bf16", "fp16"] and box.value == "auto"
    assert "bf16 forward passes on GPUs that support it, fp32 on CPU; loss terms always run in fp32" in box.help
    box.set_value("fp32").run()
    assert shown_yaml(at)["precision"] == "fp32" and errors(at) == ""


def test_an_import_with_values_no_field_can_hold_changes_nothing(env, no_dispatch):
    at = new_experiment()
    before = shown_yaml(at)
    paste_yaml(at, TINY_YAML.replace("seed: 3", "seed: three").replace("name: tiny digits", "name: tiny\nbatch: 5"))
    shown = errors(at)
    assert "`seed`: expected a whole number, got 'three'" in shown and "`batch`: not a field of the config" in shown
    assert shown_yaml(at) == before


def test_the_docker_default_preset_launches(tmp_path, monkeypatch, no_dispatch):
    """The image sets DISTILLERY_HOME=/data (and the database and artifacts under it) and runs from /app."""
    import streamlit as st

    from storage import Store

    data = tmp_path / "data"  # stands for /data; the project folder is the working directory, as /app is
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DISTILLERY_HOME", str(data))
    monkeypatch.setenv("DISTILLERY_DB_URL", f"sqlite:///{data}/distillery.db")
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(data / "artifacts"))
    monkeypatch.delenv("DISTILLERY_ALLOWED_ROOTS", raising=False)
    data.mkdir()
    st.cache_resource.clear()
    st.cache_data.clear()
    at = new_experiment()
    assert errors(at) == "" and not launch_button(at).disabled
    assert at.text_input(key="nx_ds_root").value == str(data / "datasets")
    launch_button(at).click().run()
    store = Store(f"sqlite:///{data}/distillery.db")
    try:
        (run,) = store.list_runs(include_hidden=True)
        assert run.config["dataset"]["root"] == str(data / "datasets") and run.status == "queued"
    finally:
        stop_runs(store)
        store.dispose()
        st.cache_resource.clear()


def test_export_is_the_launched_config(env, no_dispatch):
    at = new_experiment()
    exported = yaml.safe_load(at.code[-1].value)
    launch_button(at).click().run()
    (run,) = env.list_runs(include_hidden=True)
    assert run.config == exported


def test_typed_paths_are_judged_before_anything_touches_them(env, monkeypatch, tmp_path):
    """Paths outside the allowed folders are refused without being stat'ed or opened (issue 9): a spy records every
    stat, lstat and open while the form is checked."""
    import builtins
    import os

    from ui.form_checks import check_form
    from ui.form_state import config_to_state

    state, _ = config_to_state(yaml.safe_load((ROOT / "configs" / "mnist5k_kd.yaml").read_text()))
    outside = tmp_path / "outside"  # not under DISTILLERY_HOME (tmp_path/data)
    state.update({"nx_ds_root": str(outside / "datasets"), "nx_ds_name": "cifar10", "nx_t_src": "file",
                  "nx_t_src_file": str(outside / "teacher.pt")})
    touched: list[str] = []
    for module, name in ((os, "stat"), (os, "lstat"), (builtins, "open")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda path, *a, _real=real, **k: (touched.append(str(path)), _real(path, *a, **k))[1])
    check = check_form(state, env)
    inside = tmp_path / "data" / "datasets"  # the same dataset under the allowed folder: its files are looked for
    check_form({**state, "nx_ds_root": str(inside)}, env)
    monkeypatch.undo()
    assert "is outside the folders" in check.errors["dataset.root"][0] and "is outside the folders" in check.errors["teacher.source"][0]
    assert not [p for p in touched if p.startswith(str(outside))], touched
    assert any(p.startswith(str(inside / "cifar-10-batches-py")) for p in touched)  # the spy does see file checks


def test_compare_shows_a_parameter_left_at_its_default(env, no_dispatch):
    """One DIST run launched with β left at its default, one with β = 2: Compare's "only what differs" names β."""
    from tests.ui_apptest import open_page

    at = new_experiment()
    uid = at.session_state["nx_recipe_ids"][1]
    at.selectbox(key=f"nx_r{uid}_loss").set_value("dist").run()
    launch_button(at).click().run()
    at = new_experiment()
    uid = at.session_state["nx_recipe_ids"][1]
    at.selectbox(key=f"nx_r{uid}_loss").set_value("dist").run()
    at.number_input(key=f"nx_r{uid}_p_beta").set_value(2.0).run()
    launch_button(at).click().run()
    first, second = sorted(r.id for r in env.list_runs(include_hidden=True))
    table = open_page("pages/compare.py", runs=f"{first},{second}").dataframe[-1].value
    assert list(table.loc["recipe[1].params.beta"]) == ["1", "2"]


def test_devices_are_set_per_model_and_a_mismatch_is_named(env, no_dispatch):
    """Several devices for one run (issue 13): the student's and a trained teacher's Devices fields."""
    at = new_experiment()
    assert shown_yaml(at)["student"]["devices"] == 1
    at.selectbox(key="nx_device").set_value("cpu").run()
    at.number_input(key="nx_s_devices").set_value(2).run()
    assert "teacher.devices: a teacher trained in the run uses the student's devices" in errors(at)
    at.number_input(key="nx_t_devices").set_value(2).run()
    assert errors(at) == "" and not launch_button(at).disabled
    assert (shown_yaml(at)["student"]["devices"], shown_yaml(at)["teacher"]["devices"]) == (2, 2)
