"""The engine end to end: real training on offline data, metrics read back from the database."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_core.config import validate_config
from kd_core.models import create_model
from kd_core.sink import MemorySink
from kd_core.teachers import TeacherUnavailable, read_state_dict, run_teachers_in
from kd_core.engine import StopRequested, TrainingError, run_experiment
from storage import RunSink, Store

TINY = {
    "name": "tiny",
    "seed": 1,
    "device": "cpu",
    "dataset": {"name": "digits", "val_fraction": 0.1, "subset": 400},
    "teacher": {"arch": "cnn_small", "epochs": 2, "batch_size": 32},
    "student": {"arch": "cnn_tiny", "epochs": 3, "batch_size": 16},
    "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}],
    "checkpoint_every_s": 1000,
    "analysis": {"enabled": False},  # tested on its own below
}


def tiny(**overrides: object) -> dict:
    data = {**TINY, **overrides}
    return validate_config(data).model_dump()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'runs.db'}")


def run_in_store(store: Store, config: dict, artifacts: Path, **kwargs) -> tuple[int, dict]:
    cfg = validate_config(config, run_teachers=run_teachers_in(store))
    run_id = store.create_run(cfg.name, cfg.model_dump(mode="json"), status="running")
    summary = run_experiment(cfg, RunSink(store, run_id), artifacts / f"run-{run_id}", run_teachers=run_teachers_in(store), **kwargs)
    store.update_run(run_id, status="completed")
    return run_id, summary


def test_a_kd_run_trains_all_phases_and_lands_in_the_database(sqlite_store: Store, tmp_path: Path) -> None:
    run_id, summary = run_in_store(sqlite_store, tiny(), tmp_path)
    run = sqlite_store.get_run(run_id)
    assert run.summary["student_acc"] == summary["student_acc"] > 30  # 10 classes: chance is 10 %
    assert summary["teacher_acc"] > 50
    # the stated accuracies and gain are what the saved best checkpoints score on the test split
    from kd_core.data import load_dataset
    from kd_core.engine.evaluation import predict

    data = load_dataset("digits", val_fraction=0.1, subset=400, seed=1)
    scores = {}
    for phase in ("student", "baseline"):
        model = create_model("cnn_tiny", 10, 1, 8)
        model.load_state_dict(load_file(str(tmp_path / f"run-{run_id}" / f"{phase}_best.safetensors")))
        scores[phase] = 100.0 * float((predict(model, data.test_x).argmax(1) == data.test_y).float().mean())
    assert summary["student_acc"] == pytest.approx(scores["student"]) and summary["baseline_acc"] == pytest.approx(scores["baseline"])
    assert summary["kd_gain"] == pytest.approx(scores["student"] - scores["baseline"], abs=0.01)
    assert summary["compression"] == pytest.approx(summary["teacher_params"] / summary["student_params"], rel=0.01)

    keys = set(sqlite_store.metric_keys(run_id))
    for phase in ("teacher", "student", "baseline"):
        assert {(phase, "loss/total"), (phase, "lr"), (phase, "images_per_s"), (phase, "val/top1"), (phase, "val/class_acc/9")} <= keys
    assert {("student", "loss/kd"), ("student", "loss/ce"), ("student", "val/agreement"), ("student", "val/kl_teacher_student")} <= keys
    # one row per optimizer step: 360 training images / 16 = 23 steps an epoch, 3 epochs
    steps = sqlite_store.metric_series(run_id, "loss/kd", "student")["step"].tolist()
    assert steps == list(range(1, 70))
    assert sqlite_store.metric_series(run_id, "val/top1", "student")["epoch"].tolist() == [0, 1, 2]

    files = {Path(a.path).name for a in sqlite_store.artifacts(run_id)}
    assert {"teacher.safetensors", "student.safetensors", "student_best.safetensors", "baseline.safetensors", "student_best_report.json"} <= files
    student = create_model("cnn_tiny", 10, 1, 8)
    student.load_state_dict(load_file(str(tmp_path / f"run-{run_id}" / "student.safetensors")))


def test_stop_and_resume_gives_the_same_weights_and_a_continuous_series(tmp_path: Path) -> None:
    config = validate_config(tiny(baseline=False, dataset={"name": "digits", "val_fraction": 0.1, "subset": 400, "augment": True}))
    straight = MemorySink()
    run_experiment(config, straight, tmp_path / "straight")

    calls = {"n": 0}

    def stop_after_30_steps() -> bool:
        calls["n"] += 1
        return calls["n"] == 40  # the teacher takes 24 steps: stop mid-epoch of the student

    interrupted = MemorySink()
    with pytest.raises(StopRequested):
        run_experiment(config, interrupted, tmp_path / "resumed", stop_requested=stop_after_30_steps)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    run_experiment(config, interrupted, tmp_path / "resumed", resume=True)

    for name in ("teacher.safetensors", "student.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [r["step"] for r in interrupted.rows if r["key"] == "loss/total" and r["phase"] == "student"]
    assert steps == list(range(1, len(steps) + 1)) == [r["step"] for r in straight.rows if r["key"] == "loss/total" and r["phase"] == "student"]


def test_a_teacher_from_a_file_or_an_earlier_run_is_reused(sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_ARTIFACTS", str(tmp_path))
    first, summary = run_in_store(sqlite_store, tiny(baseline=False), tmp_path)
    teacher_file = tmp_path / f"run-{first}" / "teacher.safetensors"

    again = run_in_store(sqlite_store, tiny(baseline=False, teacher={"arch": "cnn_small", "source": f"run:{first}"}), tmp_path)[1]
    assert again["teacher_acc"] == summary["teacher_acc"]  # same weights, same test split

    as_pt = tmp_path / "teacher.pt"
    torch.save(load_file(str(teacher_file)), as_pt)
    from_file = run_in_store(sqlite_store, tiny(baseline=False, teacher={"arch": "cnn_small", "source": f"file:{as_pt}"}), tmp_path)[1]
    assert from_file["teacher_acc"] == summary["teacher_acc"]


def test_teacher_files_that_do_not_fit_are_refused_with_a_reason(tmp_path: Path) -> None:
    from kd_core.config import ConfigError

    teacher = tmp_path / "teacher.safetensors"
    save_file(create_model("cnn_small", 100, 1, 8).state_dict(), str(teacher))
    with pytest.raises(ConfigError, match="100 classes but the dataset has 10"):
        validate_config(tiny(teacher={"arch": "cnn_small", "source": f"file:{teacher}"}))

    # the engine checks again: the file may change between validation and the run
    save_file(create_model("cnn_small", 10, 1, 8).state_dict(), str(teacher))
    config = validate_config(tiny(teacher={"arch": "cnn_small", "source": f"file:{teacher}"}))
    save_file(create_model("lenet5", 10, 1, 8).state_dict(), str(teacher))
    with pytest.raises(TeacherUnavailable, match="does not match teacher.arch 'cnn_small'"):
        run_experiment(config, MemorySink(), tmp_path / "run")


class Boom:
    def __reduce__(self):  # what a malicious checkpoint does on unpickling
        return (Path("/tmp/distillery-pwned").touch, ())


def test_a_pickled_object_is_never_unpickled(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": Boom()}))
    torch.save({"w": Boom()}, tmp_path / "evil2.pt")
    for path in (evil, tmp_path / "evil2.pt"):
        with pytest.raises(TeacherUnavailable, match="cannot|not a plain"):
            read_state_dict(path)
    assert not Path("/tmp/distillery-pwned").exists()


def test_random_and_torchvision_teachers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = run_experiment(validate_config(tiny(baseline=False, teacher={"arch": "cnn_small", "source": "random", "epochs": 0})), MemorySink(), tmp_path / "r")
    assert summary["teacher_acc"] < 40  # an untrained teacher is near chance
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    config = validate_config(tiny(teacher={"arch": "resnet18", "source": "torchvision", "epochs": 1}))
    with pytest.raises(TeacherUnavailable, match="resnet18-.*pth in .*checkpoints"):
        run_experiment(config, MemorySink(), tmp_path / "tv")


def test_a_diverging_loss_stops_the_run_with_a_reason(tmp_path: Path) -> None:
    config = validate_config(
        tiny(
            teacher={"arch": "cnn_small", "source": "random", "epochs": 0},
            student={"arch": "mlp", "epochs": 2},
            recipe=[{"loss": "ce"}, {"loss": "kd", "weight": 1e30}],  # a typo'd weight blows up the step
        )
    )
    with pytest.raises(TrainingError, match=r"became non-finite at once \(student epoch 1.*lower student.optimizer.lr \(now 0.05\) or the recipe weights \(largest: kd 1e\+30\)"):
        run_experiment(config, MemorySink(), tmp_path)


def test_teacher_caching_is_exact_when_valid(tmp_path: Path) -> None:
    """Cached teacher logits must give the same student as computing the teacher every step."""
    results = []
    for cache in (True, False):
        sink = MemorySink()
        run_experiment(validate_config(tiny(baseline=False, cache_teacher=cache)), sink, tmp_path / str(cache))
        results.append(sink.series("loss/kd", "student"))
    assert results[0] == pytest.approx(results[1], rel=1e-4, abs=1e-6)


def test_analysis_artifacts_are_recorded_during_and_after_training(sqlite_store: Store, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file

    config = tiny(analysis={"enabled": True, "cka_checkpoints": 2, "samples": 120, "attribution_images": 3})
    run_id, summary = run_in_store(sqlite_store, config, tmp_path)
    assert "analysis_error" not in summary
    cka = {Path(a.path).name: a.meta for a in sqlite_store.artifacts(run_id, "cka")}
    # student has 3 epochs: checkpoints at epochs 1 and 3, for the KD student and for the baseline
    assert set(cka) == {"cka_teacher_self.json", "cka_student_e1.json", "cka_student_e3.json", "cka_baseline_e1.json", "cka_baseline_e3.json"}
    last = json.loads((tmp_path / f"run-{run_id}" / "cka_student_e3.json").read_text())
    assert last["rows"] == ["stage1", "stage2", "stage3", "embedding"] and last["cols"] == ["stage1", "stage2", "embedding"]
    assert all(-0.2 <= v <= 1.0001 for row in last["matrix"] for v in row)  # debiased CKA can dip slightly below 0
    assert all(abs(last["self_model"][i][i] - 1) < 1e-6 for i in range(3))

    (bundle,) = sqlite_store.artifacts(run_id, "analysis")
    report = json.loads(Path(bundle.path).read_text())
    tensors = load_file(bundle.meta["tensors"])
    assert report["models"] == ["teacher", "student", "baseline"] and report["n"] == 120
    counts = report["agreement"]["student"]
    assert counts["both_right"] + counts["teacher_right_model_wrong"] + counts["teacher_wrong_model_right"] + counts["both_wrong"] == 120
    assert tensors["student.embedding"].shape == (120, 16) and tensors["teacher.pca"].shape == (120, 2)
    assert tensors["joint.student_pca"].shape == (120, 2) and tensors["attr.student.gradcam"].shape == (3, 8, 8)
    # the accuracy in the bundle agrees with the predictions stored next to it
    predicted = tensors["student.logits"].argmax(1)
    assert report["accuracy"]["student"] == pytest.approx(100 * float((predicted == tensors["targets"]).float().mean()))


def test_teacher_outputs_are_cached_exactly_when_nothing_makes_them_vary(tmp_path: Path) -> None:
    """The equivalence test above would pass with caching never on; this one checks when it is on, and why not."""
    from kd_core.engine import Experiment, PhaseRun
    from kd_core.engine.evaluation import predict
    from kd_core.engine.phases import Progress

    def student_phase(loss: str, **overrides: object) -> PhaseRun:
        recipe = [{"loss": "ce"}, {"loss": loss}]
        experiment = Experiment(validate_config(tiny(recipe=recipe, **overrides)), MemorySink(), tmp_path / "probe", lambda: False)
        progress = Progress(phase_index=1)
        experiment.prepare_teacher(progress)
        return PhaseRun(experiment, experiment.phases[1], progress)

    run = student_phase("kd")
    outputs = run.teacher_outputs
    assert outputs is not None and outputs.mode == "cached" and outputs.cache is not None
    assert torch.equal(outputs.cache["logits"], predict(run.teacher, run.experiment.data.train_x))
    assert "embedding" in student_phase("rkd").teacher_outputs.cache  # embedding losses reuse cached embeddings too
    why = {
        "cache_teacher is off": student_phase("kd", cache_teacher=False),
        "augmentation": student_phase("kd", dataset={"name": "digits", "val_fraction": 0.1, "subset": 400, "augment": True}),
        "stage feature maps": student_phase("at"),
    }
    for reason, phase in why.items():
        assert phase.teacher_outputs.mode == "live" and reason in phase.teacher_outputs.why_live
        mode = {k: v for k, v in phase.teacher_mode.items() if k != "teacher_outputs_store"}
        assert mode == {"teacher_outputs": "live", "teacher_outputs_reason": phase.teacher_outputs.why_live}
        # only augmentation leaves the soft-label store (tests/test_soft_labels.py) in play
        assert ("teacher_outputs_store" in phase.teacher_mode) == (reason == "augmentation")
