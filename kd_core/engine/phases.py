"""What a run trains (its phases) and where it stands (its progress), as checkpoints record it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kd_core.config import ExperimentConfig, LossTerm, TrainingConfig

CE_ONLY = [LossTerm(loss="ce", weight=1.0)]


@dataclass
class Phase:
    """One model trained from start to end: the teacher, the distilled student or the baseline."""

    name: str  # "teacher" | "student" | "baseline"
    model_config: TrainingConfig
    recipe: list[LossTerm]

    @property
    def distills(self) -> bool:
        """The student phase learns from the teacher; the teacher and the CE-only baseline do not."""
        return self.name == "student"


def plan_phases(config: ExperimentConfig) -> list[Phase]:
    phases = []
    if config.teacher.source in ("train", "torchvision") and config.teacher.epochs > 0:
        phases.append(Phase("teacher", config.teacher, CE_ONLY))
    phases.append(Phase("student", config.student, config.recipe))
    if config.baseline:
        phases.append(Phase("baseline", config.student, CE_ONLY))
    return phases


@dataclass
class Progress:
    """Where training stands, for checkpoints, resume and the progress report."""

    phase_index: int = 0
    epoch: int = 0
    batch: int = 0  # next batch of the epoch
    step: int = 0  # optimizer steps done in this phase
    best_top1: float = -1.0
    trained_s: float = 0.0  # time spent training, summed over every attempt (resumes included)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished phases

    def next_phase(self) -> None:
        self.phase_index += 1
        self.epoch = self.batch = self.step = 0
        self.best_top1 = -1.0

    def counters(self) -> dict[str, Any]:
        """Everything but the results, for the checkpoint."""
        return {k: v for k, v in asdict(self).items() if k != "results"}
