"""What a run trains (its phases) and where it stands (its progress), as checkpoints record it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kd_core.config import PRETRAINED_SOURCES, ExperimentConfig, LossTerm, TrainingConfig

CE_ONLY = [LossTerm(loss="ce", weight=1.0)]


@dataclass
class Phase:
    """One model trained from start to end: a teacher, the distilled student or the baseline."""

    name: str  # "teacher", "teacher_2"... | "student" | "baseline"
    model_config: TrainingConfig
    recipe: list[LossTerm]
    teacher_index: int | None = None  # which of the config's teachers this phase trains


def teacher_name(index: int) -> str:
    """The first teacher is "teacher"; further ones (an ensemble) are "teacher_2", "teacher_3"..."""
    return "teacher" if index == 0 else f"teacher_{index + 1}"


def trained_here(teacher: TrainingConfig) -> bool:
    return getattr(teacher, "source", "train") in ("train", *PRETRAINED_SOURCES) and teacher.epochs > 0


def plan_phases(config: ExperimentConfig) -> list[Phase]:
    phases = [Phase(teacher_name(i), t, CE_ONLY, i) for i, t in enumerate(config.all_teachers) if trained_here(t)]
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
