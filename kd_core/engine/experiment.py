"""The engine's orchestration: the phases of a run (teacher, distilled student, CE-only baseline), each
trained epoch by epoch, resumable mid-epoch, then the end-of-run callbacks."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from kd_core.config import ExperimentConfig, LossTerm, config_fingerprint
from kd_core.data import DataSplits, augment_batch, batch_indices, iterate, load_dataset, num_batches
from kd_core.engine.callbacks import AnalysisBundle, Callback, CKAAtCheckpoints
from kd_core.engine.checkpoint import Checkpointer, load_weights, save_weights
from kd_core.engine.errors import StopRequested, TrainingError
from kd_core.engine.evaluation import EVAL_BATCH, classification_metrics, confusion_matrix, predict
from kd_core.engine.guard import NonFiniteGuard
from kd_core.engine.optim import make_optimizer, make_scheduler
from kd_core.engine.phases import Phase, Progress, plan_phases
from kd_core.engine.precision import PrecisionError, resolve_precision
from kd_core.engine.reporting import ProgressReporter
from kd_core.engine.step import TrainStep, term_keys
from kd_core.engine.teacher import TeacherOutputs, cache_blocker
from kd_core.features import FeatureTap, probe_shapes
from kd_core.losses import BuildContext, DistillLoss, create_loss
from kd_core.models import count_parameters, create_model
from kd_core.sink import MetricLogger, MetricsSink
from kd_core.teachers import RunTeachers, load_teacher_weights


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device: cuda was requested but no CUDA GPU is visible; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Experiment:
    """One run: loads the data once, trains each phase, writes checkpoints, reports through ``sink``."""

    def __init__(self, config: ExperimentConfig, sink: MetricsSink, artifacts_dir: Path, stop_requested: Callable[[], bool], *,
                 run_teachers: RunTeachers | None = None, run_uid: str | None = None, callbacks: Iterable[Callback] = (),
                 analysis_estimate_s: float | None = None) -> None:
        self.config = config
        self.sink = sink
        self.dir = Path(artifacts_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stop_requested = stop_requested
        self.run_teachers = run_teachers
        self.device = resolve_device(config.device)
        try:
            self.precision = resolve_precision(config.precision, self.device)
        except PrecisionError as exc:
            raise TrainingError(str(exc)) from None
        self.guard = NonFiniteGuard()
        self.logger = MetricLogger(sink, on_flush=self.guard.check)
        self.phases = plan_phases(config)
        self.data: DataSplits = load_dataset(
            config.dataset.name, config.dataset.root, val_fraction=config.dataset.val_fraction, subset=config.dataset.subset,
            image_size=config.dataset.image_size, seed=config.seed,
        ).to(self.device)
        self.checkpointer = Checkpointer(self.dir, config_fingerprint(config), run_uid)
        self.callbacks: list[Callback] = [*callbacks]
        if config.analysis.enabled:
            self.callbacks += [CKAAtCheckpoints(self), AnalysisBundle(self)]
        self.reporter = ProgressReporter(sink, self.phases, len(self.data.train_y), config.analysis.enabled, analysis_estimate_s)
        self.teacher: nn.Module | None = None
        self._resume_state: dict[str, Any] | None = None
        self._clock = time.monotonic()
        self._last_checkpoint = time.monotonic()

    # ---- models

    def new_model(self, arch: str, seed_offset: int = 0) -> nn.Module:
        seed_everything(self.config.seed + seed_offset)
        model = create_model(arch, self.data.num_classes, self.data.in_channels, self.data.image_size).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_teacher(self, progress: Progress) -> None:
        """Build the teacher: trained in its own phase, or loaded/randomly initialised per ``source``."""
        cfg = self.config.teacher
        self.teacher = self.new_model(cfg.arch, seed_offset=1)
        trained_here = self.phases[0].name == "teacher"
        if trained_here and "teacher" in progress.results:
            load_weights(self.teacher, self.dir / "teacher.safetensors")
        elif cfg.source not in ("train", "random"):
            load_teacher_weights(self.teacher, cfg.source, cfg.arch, self.data.num_classes, run_teachers=self.run_teachers)

    def freeze_teacher(self) -> nn.Module:
        assert self.teacher is not None
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        return self.teacher

    def build_losses(self, recipe: list[LossTerm], model: nn.Module, teacher: nn.Module | None) -> list[DistillLoss]:
        losses = [create_loss(term.loss, term.params) for term in recipe]
        if teacher is None:
            return [loss.to(self.device) for loss in losses]
        d = self.data
        context = BuildContext(
            student=probe_shapes(model, d.in_channels, d.image_size),
            teacher=probe_shapes(teacher, d.in_channels, d.image_size),
            num_train=len(d.train_y),
        )
        if any("class_means" in loss.needs for loss in losses):
            context.class_means = self.teacher_class_means(teacher)
        for loss in losses:
            loss.build(context)
        return [loss.to(self.device) for loss in losses]

    @torch.no_grad()
    def teacher_class_means(self, teacher: nn.Module) -> torch.Tensor:
        """Mean teacher embedding per class over the training set, in one vectorized pass (ND)."""
        with FeatureTap(teacher, embedding=True) as tap:
            embeddings = []
            for xb, _ in iterate(self.data.train_x, self.data.train_y, EVAL_BATCH):
                teacher(xb)
                embeddings.append(tap.embedding.float())
        emb = torch.cat(embeddings)
        y = self.data.train_y
        sums = torch.zeros(self.data.num_classes, emb.shape[1], device=emb.device).index_add_(0, y, emb)
        return sums / torch.bincount(y, minlength=self.data.num_classes).clamp(min=1)[:, None].float()

    # ---- the run

    def run(self, resume: bool) -> dict[str, Any]:
        progress = self.load_checkpoint() if resume else Progress()
        self.prepare_teacher(progress)
        sizes = self.model_sizes()
        self.sink.update_summary(sizes)
        if not any(p.name == "teacher" for p in self.phases) and "teacher" not in progress.results:
            self.evaluate_fixed_teacher(progress)
        while progress.phase_index < len(self.phases):
            phase = self.phases[progress.phase_index]
            progress.results[phase.name] = PhaseRun(self, phase, progress).run()
            if phase.name == "teacher":
                self.sink.update_summary({"teacher_acc": progress.results["teacher"]["last"]})
            progress.next_phase()
            self.save_checkpoint(progress)
        summary = self.final_summary(progress)
        self.sink.update_summary(summary)
        for callback in self.callbacks:
            summary.update(callback.on_run_end(self))
        self.sink.update_summary(summary)
        self.logger.flush()
        return {**sizes, **summary}

    def model_sizes(self) -> dict[str, Any]:
        student = create_model(self.config.student.arch, self.data.num_classes, self.data.in_channels, self.data.image_size)
        t, s = count_parameters(self.teacher), count_parameters(student)
        return {"teacher_params": t, "student_params": s, "compression": round(t / s, 2), "device": str(self.device), "precision": self.precision.name}

    def evaluate_fixed_teacher(self, progress: Progress) -> None:
        teacher = self.freeze_teacher()
        split, x, y = self.data.eval_split()
        metrics = classification_metrics(predict(teacher, x, self.precision), y, self.data.num_classes)
        self.logger.log("teacher", 0, 0, {f"{split}/{k}": v for k, v in metrics.items()})
        progress.results["teacher"] = {"last": self.test_report("teacher", teacher)["top1"]}
        self.sink.update_summary({"teacher_acc": progress.results["teacher"]["last"]})

    def test_report(self, name: str, model: nn.Module) -> dict[str, Any]:
        """Accuracy, per-class accuracy and confusion matrix of ``model`` on the test split (saved as JSON)."""
        logits = predict(model, self.data.test_x, self.precision)
        metrics = classification_metrics(logits, self.data.test_y, self.data.num_classes)
        report = {
            "split": "test",
            "top1": metrics["top1"],
            "top5": metrics.get("top5"),
            "class_acc": [metrics[f"class_acc/{c}"] for c in range(self.data.num_classes)],
            "confusion": confusion_matrix(logits.argmax(1), self.data.test_y, self.data.num_classes),
            "class_names": self.data.class_names,
        }
        path = self.dir / f"{name}_report.json"
        path.write_text(json.dumps(report))
        self.sink.add_artifact("report", str(path), {"model": name, "split": "test"})
        return report

    def final_summary(self, progress: Progress) -> dict[str, Any]:
        self.tick(progress)
        r = progress.results
        summary: dict[str, Any] = {
            "teacher_acc": r.get("teacher", {}).get("last"),
            "student_acc": r["student"]["best"],
            "student_last_acc": r["student"]["last"],
            "recipe_extra_params": r["student"]["extra_params"],
            "selection_split": self.data.eval_split()[0],
            "trained_s": round(progress.trained_s, 1),
        }
        if "baseline" in r:
            summary["baseline_acc"] = r["baseline"]["best"]
            summary["baseline_last_acc"] = r["baseline"]["last"]
            summary["kd_gain"] = round(summary["student_acc"] - summary["baseline_acc"], 2)
        return summary

    def report_analysis(self, stage: str) -> None:
        self.reporter.analysis_stage(stage)

    # ---- checkpoint / resume

    def tick(self, progress: Progress) -> None:
        """Add the time since the last tick to the run's trained time (summed across resumes)."""
        now = time.monotonic()
        progress.trained_s += now - self._clock
        self._clock = now

    def trained_s(self, progress: Progress) -> float:
        """Time trained so far, across resumes, without moving the clock."""
        return round(progress.trained_s + time.monotonic() - self._clock, 1)

    def save_checkpoint(self, progress: Progress, phase_state: dict[str, Any] | None = None) -> None:
        self.logger.flush()  # also the non-finite check: a diverged state is never checkpointed
        self.tick(progress)
        state: dict[str, Any] = {"progress": progress.counters(), "results": json.dumps(progress.results), "rng": torch.get_rng_state()}
        self.checkpointer.save({**state, **(phase_state or {})})
        self._last_checkpoint = time.monotonic()

    def load_checkpoint(self) -> Progress:
        self._resume_state = self.checkpointer.load(self.device)
        if self._resume_state is None:
            return Progress()
        return Progress(**self._resume_state["progress"], results=json.loads(self._resume_state["results"]))

    def resume_state(self) -> dict[str, Any] | None:
        """The mid-phase state a resumed run restores once (model, optimizer...); None after that."""
        state, self._resume_state = self._resume_state, None
        return state if state is not None and "model" in state else None


class PhaseRun:
    """Trains one phase's model epoch by epoch; a resumed run continues at the exact batch."""

    def __init__(self, experiment: Experiment, phase: Phase, progress: Progress) -> None:
        exp = self.experiment = experiment
        self.phase, self.progress = phase, progress
        cfg = phase.model_config
        is_teacher = phase.name == "teacher"
        self.model = exp.teacher if is_teacher else exp.new_model(cfg.arch)
        assert self.model is not None
        self.teacher = None if is_teacher else exp.freeze_teacher()
        self.losses = exp.build_losses(phase.recipe, self.model, self.teacher)
        params = list(self.model.parameters()) + [p for loss in self.losses for p in loss.parameters()]
        self.optimizer = make_optimizer(params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.steps_per_epoch = num_batches(len(exp.data.train_y), cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        needs: set[str] = set().union(*(loss.needs for loss in self.losses))
        teacher_needed = self.teacher is not None and bool(needs & {"logits", "embedding", "stages"})
        why_live = cache_blocker(exp.config.cache_teacher, exp.config.dataset.augment, needs, self.losses)
        self.teacher_outputs = TeacherOutputs(self.teacher, needs, exp.precision, why_live, exp.data.train_x) if teacher_needed else None
        self.step = TrainStep(self.model, self.losses, phase.recipe, exp.precision, self.optimizer, self.teacher_outputs)
        self.restore()
        exp.sink.discard_metrics_after(phase.name, progress.step)
        self.split, self.eval_x, self.eval_y = exp.data.eval_split()
        self.eval_teacher_logits = predict(self.teacher, self.eval_x, exp.precision) if self.teacher is not None else None
        exp.guard.start_phase(phase.name, cfg.optimizer.lr, {key: term.weight for key, term in zip(term_keys(phase.recipe), phase.recipe)})

    def restore(self) -> None:
        state = self.experiment.resume_state() if self.progress.step > 0 or self.progress.epoch > 0 else None
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for loss, loss_state in zip(self.losses, state["losses"]):
            loss.load_state_dict(loss_state)
        if self.step.scaler is not None and "scaler" in state:
            self.step.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())

    def state(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "losses": [loss.state_dict() for loss in self.losses]}
        if self.step.scaler is not None:
            state["scaler"] = self.step.scaler.state_dict()
        return state

    @property
    def teacher_mode(self) -> dict[str, Any]:
        outputs = self.teacher_outputs
        if outputs is None:
            return {}
        return {"teacher_outputs": outputs.mode, "teacher_outputs_reason": outputs.why_live}

    def run(self) -> dict[str, Any]:
        exp = self.experiment
        for callback in exp.callbacks:
            callback.on_phase_start(self)
        self.model.train()
        exp.reporter.start_clock()
        try:
            for epoch in range(self.progress.epoch, self.phase.model_config.epochs):
                self.train_epoch(epoch)
                self.end_epoch(epoch)
        finally:
            self.step.close()
            if self.teacher_outputs is not None:
                self.teacher_outputs.close()
            exp.logger.flush()
        return self.finish()

    def train_epoch(self, epoch: int) -> None:
        exp, progress, cfg = self.experiment, self.progress, self.phase.model_config
        progress.epoch = epoch
        batches = batch_indices(len(exp.data.train_y), cfg.batch_size, shuffle=True, seed=exp.config.seed, epoch=epoch)
        on_step = [c for c in exp.callbacks if type(c).on_step is not Callback.on_step]
        for b in range(progress.batch, len(batches)):
            t0 = time.perf_counter()
            idx = batches[b].to(exp.device)
            x, y = exp.data.train_x[idx], exp.data.train_y[idx]
            if exp.config.dataset.augment:
                # seeded per batch, so a run resumed mid-epoch sees the same crops and flips
                aug_gen = torch.Generator().manual_seed((exp.config.seed * 7919 + epoch) * 100_003 + b)
                x = augment_batch(x, flip=exp.data.flip, generator=aug_gen)
            out = self.step(x, y, idx, epoch=epoch, epoch_progress=epoch + b / len(batches), step=progress.step, total_steps=self.total_steps)
            progress.step += 1
            progress.batch = b + 1
            values = self.step.logged_values(out)
            values["images_per_s"] = len(idx) / max(time.perf_counter() - t0, 1e-9)
            exp.logger.log(self.phase.name, progress.step, epoch, values)
            exp.reporter.images_seen += len(idx)
            exp.reporter.training(self.phase, progress, self.steps_per_epoch, {**self.teacher_mode, "trained_s": exp.trained_s(progress)})
            for callback in on_step:
                callback.on_step(self, idx)
            if exp.stop_requested():
                exp.save_checkpoint(progress, self.state())
                raise StopRequested()
            if time.monotonic() - exp._last_checkpoint > exp.config.checkpoint_every_s:
                exp.save_checkpoint(progress, self.state())

    def end_epoch(self, epoch: int) -> None:
        exp, progress = self.experiment, self.progress
        self.scheduler.step()
        progress.batch = 0
        exp.logger.flush()  # the non-finite check runs before this epoch can become "best"
        metrics = classification_metrics(predict(self.model, self.eval_x, exp.precision), self.eval_y, exp.data.num_classes, self.eval_teacher_logits)
        exp.logger.log(self.phase.name, progress.step, epoch, {f"{self.split}/{k}": v for k, v in metrics.items()})
        for callback in exp.callbacks:
            callback.on_epoch_end(self, epoch + 1)
        if metrics["top1"] > progress.best_top1:
            progress.best_top1 = metrics["top1"]
            save_weights(self.model, exp.dir / f"{self.phase.name}_best.safetensors")
        progress.epoch = epoch + 1
        exp.save_checkpoint(progress, self.state())

    def finish(self) -> dict[str, Any]:
        exp, phase = self.experiment, self.phase
        last_path = exp.dir / f"{phase.name}.safetensors"
        save_weights(self.model, last_path)
        exp.sink.add_artifact("checkpoint", str(last_path), {"model": phase.name, "which": "last", "arch": phase.model_config.arch})
        extras = nn.ModuleList(self.losses)
        extra_params = sum(p.numel() for p in extras.parameters())
        if extra_params:
            save_weights(extras, exp.dir / f"{phase.name}_recipe_extras.safetensors")
        result = {"last": exp.test_report(f"{phase.name}_last", self.model)["top1"], "extra_params": extra_params, **self.teacher_mode}
        best_path = exp.dir / f"{phase.name}_best.safetensors"
        if best_path.exists():
            load_weights(self.model, best_path)
            exp.sink.add_artifact("checkpoint", str(best_path), {"model": phase.name, "which": "best", "arch": phase.model_config.arch})
        result["best"] = exp.test_report(f"{phase.name}_best", self.model)["top1"]
        if phase.name == "teacher":
            load_weights(self.model, last_path)
        return result


def run_experiment(config: ExperimentConfig, sink: MetricsSink, artifacts_dir: str | Path, *, stop_requested: Callable[[], bool] = lambda: False,
                   resume: bool = False, run_teachers: RunTeachers | None = None, run_uid: str | None = None,
                   callbacks: Iterable[Callback] = (), analysis_estimate_s: float | None = None) -> dict[str, Any]:
    """Train every phase of ``config``; return the summary (accuracies in %, KD gain in points).

    ``resume`` continues from ``artifacts_dir/checkpoint.pt`` only if it records ``run_uid`` and this
    config's fingerprint (else :class:`~kd_core.engine.errors.CheckpointMismatch`, nothing overwritten).
    ``run_teachers`` resolves ``teacher.source: run:<id>``; ``callbacks`` watch or extend the run;
    ``analysis_estimate_s`` (measured on earlier runs) lets the ETA include the end-of-run analysis.
    """
    experiment = Experiment(config, sink, Path(artifacts_dir), stop_requested, run_teachers=run_teachers, run_uid=run_uid,
                            callbacks=callbacks, analysis_estimate_s=analysis_estimate_s)
    return experiment.run(resume)
