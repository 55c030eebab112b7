"""Several devices for one run (``student.devices``), tested the way CI can: 2 CPU processes with gloo.

The 2-process runs are real torchrun launches of the engine (tests/ddp_run.py) or of the queue's worker;
the 1-process reference is the same config trained in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kd_core.config import ConfigError, validate_config
from kd_core.engine import StopRequested, run_experiment
from kd_core.runner import cancel, resume, submit
from kd_core.runner.base import visible_gpus, worker_command
from kd_core.runner.local import pid_alive
from kd_core.sink import MemorySink
from storage import Store
from tests.polling import wait_for
from tests.worker_runs import FINISH_TIMEOUT_S, train_in_worker

DONE = ("completed", "failed", "cancelled")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# An MLP (no BatchNorm, no dropout: nothing that sees a rank's shard differently from the global batch),
# augmented data (the crops must be the global batch's), a KD term from a fixed teacher.
DDP_CONFIG: dict[str, Any] = {
    "name": "ddp", "seed": 3, "device": "cpu",
    "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 600, "augment": True},
    "teacher": {"source": "random", "arch": "lenet5", "epochs": 0},
    "student": {"arch": "mlp", "epochs": 4, "batch_size": 32, "devices": 2, "optimizer": {"lr": 0.1}},
    "recipe": [{"loss": "ce", "weight": 1.0}, {"loss": "kd", "weight": 0.2}],
    "baseline": False, "checkpoint_every_s": 1000, "analysis": {"enabled": False},
}
# Float sums in another order (two half-batch gradients averaged vs one batch): per-step losses agree to
# about 1e-6; allow 1e-4 after 4 epochs. Accuracies must be the same to 0.5 points (a few validation images).
LOSS_TOL = 1e-4
ACC_TOL = 0.5


def ddp_config(devices: int, **student: Any) -> dict[str, Any]:
    return {**DDP_CONFIG, "student": {**DDP_CONFIG["student"], "devices": devices, **student}}


def torchrun(config: dict[str, Any], out: Path, result: Path, stop_after: int | None = None) -> dict[str, Any]:
    """Train ``config`` on 2 gloo ranks; rank 0's result (summary, metric rows, whether it stopped)."""
    cfg = result.with_suffix(".config.json")
    cfg.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "ddp_run.py"),
           str(cfg), str(out), str(result), *([str(stop_after)] if stop_after else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


def in_process(config: dict[str, Any], out: Path, resume: bool = False) -> tuple[dict[str, Any], MemorySink]:
    sink = MemorySink()
    return run_experiment(validate_config(config), sink, out, resume=resume), sink


def series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r["value"] for r in rows if r["key"] == key and r["phase"] == "student"]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], MemorySink, dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: conftest's per-test soft-label folder is not set yet
        patch.setenv("DISTILLERY_SOFT_LABELS", str(tmp / "soft_labels"))
        summary1, sink1 = in_process(ddp_config(1), tmp / "one")
        two = torchrun(ddp_config(2), tmp / "two", tmp / "two.json")
    return summary1, sink1, two, tmp


def test_two_processes_train_what_one_process_trains(one_and_two: Any) -> None:
    summary1, sink1, two, _ = one_and_two
    loss1, loss2 = series(sink1.rows, "loss/total"), series(two["rows"], "loss/total")
    val1, val2 = series(sink1.rows, "val/top1"), series(two["rows"], "val/top1")
    numbers = (f"1 process: acc {summary1['student_acc']:.2f}, val/top1 {val1}, last loss {loss1[-1]:.6f}; "
               f"2 processes: acc {two['summary']['student_acc']:.2f}, val/top1 {val2}, last loss {loss2[-1]:.6f}; "
               f"max loss diff {max(abs(a - b) for a, b in zip(loss1, loss2)):.2e}")
    print(numbers)
    assert summary1["student_acc"] > 50, numbers  # the comparison means something only if the model learned
    assert len(loss1) == len(loss2), numbers
    assert loss2 == pytest.approx(loss1, abs=LOSS_TOL), numbers
    assert val2 == pytest.approx(val1, abs=ACC_TOL), numbers
    assert two["summary"]["student_acc"] == pytest.approx(summary1["student_acc"], abs=ACC_TOL), numbers


def test_streaming_on_several_devices_is_refused_by_name() -> None:
    """Streamed folders on 2 gloo processes failed intermittently in testing, so the combination is refused."""
    dataset = {"name": "imagefolder", "root": "/tmp", "image_size": 16, "loader": "streaming"}
    with pytest.raises(ConfigError, match=r"dataset\.loader: streaming is not supported on several devices yet"):
        validate_config({**ddp_config(2), "dataset": dataset})


def test_only_rank_0_reports_and_no_step_is_logged_twice(one_and_two: Any) -> None:
    _, sink1, two, tmp = one_and_two
    assert json.loads((tmp / "two.json.rank1").read_text())["rows"] == 0
    keys = [(r["phase"], r["step"], r["key"]) for r in two["rows"]]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted((r["phase"], r["step"], r["key"]) for r in sink1.rows)


def test_weights_of_a_2_process_run_are_the_plain_models(one_and_two: Any) -> None:
    """No DDP ``module.`` prefix: the student loads as a 1-device model (and so as a ``run:<id>`` teacher)."""
    from safetensors.torch import load_file

    from kd_core.models import create_model

    tmp = one_and_two[3]
    for name in ("student.safetensors", "student_best.safetensors"):
        saved = load_file(str(tmp / "two" / name))
        assert not any(k.startswith("module.") for k in saved)
        create_model("mlp", 10, 1, 8).load_state_dict(saved)  # digits: 10 classes, 1 channel, 8x8


def test_a_run_stopped_on_2_processes_resumes_on_1_gap_free(one_and_two: Any) -> None:
    summary1, sink1, _, tmp = one_and_two
    out = tmp / "resumed"
    stopped = torchrun(ddp_config(2), out, tmp / "stopped.json", stop_after=20)
    assert stopped["stopped"]
    assert json.loads((tmp / "stopped.json.rank1").read_text())["steps"] == 20  # rank 1 stopped at the same step
    summary, sink = in_process(ddp_config(1), out, resume=True)
    steps = sorted({r["step"] for r in stopped["rows"] + sink.rows if r["key"] == "loss/total"})
    assert steps == list(range(1, len(series(sink1.rows, "loss/total")) + 1))
    assert summary["student_acc"] == pytest.approx(summary1["student_acc"], abs=ACC_TOL), (summary["student_acc"], summary1["student_acc"])


def test_a_run_on_2_processes_through_the_queue_is_recorded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = validate_config(ddp_config(2, epochs=2))
    store, run = train_in_worker(config, tmp_path, monkeypatch)
    assert [r.id for r in store.list_runs(include_hidden=True)] == [run.id]
    steps = store.metric_series(run.id, "loss/total", "student")["step"].tolist()
    assert steps == list(range(1, len(steps) + 1)), steps
    log = Path(run.log_path).read_text()
    assert log.count("=== worker ended:") == 1, log[-2000:]
    assert run.summary["student_acc"] > 30


def test_cancelling_a_2_process_run_checkpoints_and_resume_finishes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel signals torchrun (the recorded pid), which stops both ranks at the same step; rank 0 checkpoints."""
    store = queue_in(tmp_path, monkeypatch)
    run_id = submit(store, validate_config(ddp_config(2, epochs=40)))  # about 10 s of training: the cancel lands mid-run
    wait_for(store, "30 steps", lambda: store.get_run(run_id).progress.get("step", 0) >= 30 or store.get_run(run_id).status in DONE,
             FINISH_TIMEOUT_S)
    assert pid_alive(store.get_run(run_id).pid)  # torchrun's pid: its cmdline names kd_core
    cancel(store, run_id)
    wait_for(store, "the cancel", lambda: store.get_run(run_id).status in DONE, FINISH_TIMEOUT_S)
    assert store.get_run(run_id).status == "cancelled", store.get_run(run_id).error
    resume(store, run_id)
    wait_for(store, "the resumed run", lambda: store.get_run(run_id).status in DONE, FINISH_TIMEOUT_S)
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    steps = store.metric_series(run_id, "loss/total", "student")["step"].tolist()
    assert steps == list(range(1, len(steps) + 1))
    assert "resuming from its checkpoint" in Path(run.log_path).read_text()


def test_a_run_stopped_on_1_process_resumes_on_2_gap_free(one_and_two: Any) -> None:
    summary1, sink1, _, tmp = one_and_two
    out, sink, calls = tmp / "resumed_on_2", MemorySink(), [0]

    def stop_after_20() -> bool:
        calls[0] += 1
        return calls[0] >= 20

    with pytest.raises(StopRequested):
        run_experiment(validate_config(ddp_config(1)), sink, out, stop_requested=stop_after_20)
    resumed = torchrun(ddp_config(2), out, tmp / "resumed_on_2.json")
    steps = sorted({r["step"] for r in sink.rows + resumed["rows"] if r["key"] == "loss/total"})
    assert steps == list(range(1, len(series(sink1.rows, "loss/total")) + 1))
    assert resumed["summary"]["student_acc"] == pytest.approx(summary1["student_acc"], abs=ACC_TOL)


def test_every_phase_and_the_analysis_run_on_2_processes(tmp_path: Path) -> None:
    """A teacher trained here (BatchNorm: per-shard statistics on CPU), the student, the baseline, then CKA and the
    end-of-run analysis on rank 0 while rank 1 waits."""
    config = {**ddp_config(2, epochs=2), "teacher": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 32, "devices": 2}, "baseline": True,
              "analysis": {"enabled": True, "samples": 100, "attribution_images": 2, "cka_checkpoints": 2}}
    result = torchrun(config, tmp_path / "out", tmp_path / "full.json")
    summary = result["summary"]
    assert {"teacher_acc", "student_acc", "baseline_acc", "kd_gain", "analysis_s"} <= summary.keys() and "analysis_error" not in summary
    assert (tmp_path / "out" / "analysis.json").exists() and (tmp_path / "out" / "cka_student_e2.json").exists()
    assert json.loads((tmp_path / "full.json.rank1").read_text())["rows"] == 0
    phases = {r["phase"] for r in result["rows"]}
    assert phases == {"teacher", "student", "baseline"}


def queue_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    for name, value in {"DISTILLERY_DB_URL": f"sqlite:///{tmp_path / 'runs.db'}", "DISTILLERY_ARTIFACTS": str(tmp_path / "artifacts"),
                        "DISTILLERY_EXECUTOR": "local", "DISTILLERY_SLOTS": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    return Store(None)


def ranks_of(store: Store, run_id: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun (the run's recorded pid) started."""
    wait_for(store, "30 steps", lambda: store.get_run(run_id).progress.get("step", 0) >= 30 or store.get_run(run_id).status in DONE,
             FINISH_TIMEOUT_S)
    pid = store.get_run(run_id).pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    environ = {int(c): Path(f"/proc/{c}/environ").read_bytes().split(b"\0") for c in children}
    return {int(next(v for v in env if v.startswith(b"RANK=")).removeprefix(b"RANK=")): c for c, env in environ.items()}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_a_rank_that_dies_fails_the_run_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = queue_in(tmp_path, monkeypatch)
    run_id = submit(store, validate_config(ddp_config(2, epochs=40)))
    os.kill(ranks_of(store, run_id)[1], signal.SIGKILL)  # as the kernel's OOM killer would
    wait_for(store, "the failure", lambda: store.get_run(run_id).status in DONE, 60)
    run = store.get_run(run_id)
    assert run.status == "failed" and "Connection" in (run.error or ""), run.error


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_killing_torchrun_takes_its_ranks_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun starts each rank in its own session: a kill of the worker's process group would miss them without PDEATHSIG."""
    store = queue_in(tmp_path, monkeypatch)
    run_id = submit(store, validate_config(ddp_config(2, epochs=300)))  # a minute or more of training left
    ranks = ranks_of(store, run_id)
    os.killpg(store.get_run(run_id).pid, signal.SIGKILL)  # what the executor's kill does
    wait_for(store, "the ranks to go", lambda: not any(pid_alive(pid) for pid in ranks.values()), 5)


def test_the_cli_run_command_trains_on_2_processes_in_the_foreground(tmp_path: Path) -> None:
    path = tmp_path / "ddp.yaml"
    path.write_text(json.dumps(ddp_config(2, epochs=1)))  # JSON is YAML
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DISTILLERY_ARTIFACTS": str(tmp_path / "artifacts"), "OMP_NUM_THREADS": "1"}
    env.pop("DISTILLERY_DB_URL", None)
    proc = subprocess.run([sys.executable, "-m", "kd_core", "run", str(path), "--db", url], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = Store(url)
    (run,) = store.list_runs(include_hidden=True)
    assert proc.stdout.split() == [str(run.id)] and run.status == "completed" and run.executor == "inline"
    assert "on 2 processes" in proc.stderr and "KD gain" not in proc.stderr  # the summary table, without a baseline
    steps = store.metric_series(run.id, "loss/total", "student")["step"].tolist()
    assert steps == list(range(1, len(steps) + 1))


def test_on_a_gpu_host_a_run_holds_one_slot_per_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two GPUs visible: a 2-device run holds both slots, so no other run is put on its GPUs; a CPU run holds one."""
    from kd_core.runner.local import LocalExecutor
    from storage import RunRecord

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("DISTILLERY_SLOTS", raising=False)

    def record(config: dict[str, Any]) -> RunRecord:
        return RunRecord(id=1, uid="u", name="r", status="running", config=config, parent_id=None, created_at=0.0, started_at=None,
                         finished_at=None, heartbeat_at=None, host=None, pid=None, executor="local", executor_ref=None, error=None, log_path=None)

    local = LocalExecutor()
    on_two, on_one = record(ddp_config(2) | {"device": "auto"}), record(ddp_config(1) | {"device": "auto"})
    assert local.slots() == 2
    assert (local.slots_needed(on_two), local.slots_needed(on_one), local.slots_needed(record(ddp_config(2)))) == (2, 1, 1)
    assert local.occupied([on_two]) == 2 and local.occupied([on_one]) == 1


def test_the_worker_starts_one_process_per_device_through_torchrun() -> None:
    assert worker_command(7, 1)[1:] == ["-m", "kd_core", "work", "7"]
    command = worker_command(7, 2)
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in command
    assert command[-4:] == ["-m", "kd_core", "work", "7"]  # the cmdline names kd_core: pid_alive recognises it


@pytest.mark.skipif(visible_gpus() >= 2, reason="this host has 2 GPUs: 2 CUDA devices are allowed")
def test_more_cuda_devices_than_visible_are_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({**ddp_config(2), "device": "cuda"})
    assert "student.devices" in str(err.value) and "visible" in str(err.value), str(err.value)
    validate_config(ddp_config(2))  # on CPU any number of processes is fine


def test_a_teacher_trained_here_must_use_the_students_devices() -> None:
    config = {**ddp_config(2), "teacher": {"arch": "mlp", "epochs": 1}}
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert "teacher.devices" in str(err.value), str(err.value)
    validate_config({**config, "teacher": {"arch": "mlp", "epochs": 1, "devices": 2}})
