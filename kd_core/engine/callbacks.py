"""Work the engine does around training, as callbacks: CKA at checkpoints, the end-of-run analysis bundle.

A callback sees the running phase (:class:`~kd_core.engine.experiment.PhaseRun`) and the experiment;
tests use the same hooks to watch what the engine does (weights at a phase's start, batch order).
"""

from __future__ import annotations

import time
import traceback
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kd_core.analysis.report import AnalysisSettings, analysis_subset, build_analysis, cka_checkpoint, cka_epochs, cka_teacher_self
from kd_core.engine.checkpoint import load_weights

if TYPE_CHECKING:
    from kd_core.engine.experiment import Experiment, PhaseRun


class Callback:
    """Override what you need; every hook defaults to nothing."""

    def on_phase_start(self, run: PhaseRun) -> None:  # noqa: B027 - optional hook
        """The phase's model, losses and optimizer exist (restored when resuming); no step taken yet."""

    def on_step(self, run: PhaseRun, idx: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """A step on the samples ``idx`` was taken."""

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:  # noqa: B027 - optional hook
        """Epoch ``epoch`` (1-based) was evaluated; the checkpoint is written after this."""

    def on_run_end(self, experiment: Experiment) -> dict[str, Any]:
        """Every phase finished; return values to merge into the run's summary."""
        return {}


class CKAAtCheckpoints(Callback):
    """Teacher-vs-student CKA at evenly spaced epochs of each phase that has a teacher."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.samples = experiment.config.analysis.samples
        self.checkpoints = experiment.config.analysis.cka_checkpoints

    def on_epoch_end(self, run: PhaseRun, epoch: int) -> None:
        if run.teacher is None or epoch not in cka_epochs(run.phase.model_config.epochs, self.checkpoints):
            return
        exp = self.experiment
        x = run.eval_x[: self.samples]
        if not (exp.dir / "cka_teacher_self.json").exists():
            path, meta = cka_teacher_self(run.teacher, x, split=run.split, out_dir=exp.dir)
            exp.sink.add_artifact("cka", str(path), meta)
        path, meta = cka_checkpoint(run.teacher, run.model, x, phase=run.phase.name, epoch=epoch, step=run.progress.step, split=run.split, out_dir=exp.dir)
        exp.sink.add_artifact("cka", str(path), meta)


class AnalysisBundle(Callback):
    """The end-of-run views (prototypes, projections, agreement, calibration, attribution maps).

    Reported as its own phase, ``analysis``, with a line per stage. A failure here is recorded in the
    summary; the trained models and the completed run stay.
    """

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment

    def settings(self) -> AnalysisSettings:
        a, seed = self.experiment.config.analysis, self.experiment.config.seed
        return AnalysisSettings(a.cka_checkpoints, a.samples, a.attribution_images, tuple(a.projections), seed=seed)

    def on_run_end(self, experiment: Experiment) -> dict[str, Any]:
        started = time.monotonic()
        try:
            path, meta = self._build(experiment)
        except Exception as exc:  # noqa: BLE001 - the run's training results must survive an analysis bug
            traceback.print_exc()
            return {"analysis_error": f"{exc.__class__.__name__}: {exc}", "analysis_s": round(time.monotonic() - started, 1)}
        experiment.sink.add_artifact("analysis", str(path), meta)
        return {"analysis_s": round(time.monotonic() - started, 1)}

    def _build(self, exp: Experiment) -> tuple[Any, dict[str, Any]]:
        exp.report_analysis("loading the trained models")
        models: dict[str, nn.Module] = {"teacher": exp.freeze_teacher()}
        checkpoints = {"teacher": "teacher.safetensors"}
        for phase in exp.phases:
            if phase.name != "teacher":
                model = exp.new_model(phase.model_config.arch)
                load_weights(model, exp.dir / f"{phase.name}_best.safetensors")
                models[phase.name] = model.eval()
                checkpoints[phase.name] = f"{phase.name}_best.safetensors"
        d = exp.data
        idx = analysis_subset(len(d.test_y), self.settings().samples, exp.config.seed).to(exp.device)
        x = d.test_x[idx]
        return build_analysis(models, checkpoints, x, d.test_y[idx], d.denormalize(x), idx, d.class_names, self.settings(), exp.dir,
                              on_stage=exp.report_analysis)
