"""Methods: distillation that changes the training loop, composable with the recipe's weighted loss terms.

A recipe term only sees the student's logits and features. A *method* (``method: {name, params}`` in a
config) may also, in the student phase:

* own trainable modules (heads, branches, fusion blocks): they are parameters of the method, so they join
  the optimizer, the checkpoint and ``recipe_extra_params``, and are saved next to the student;
* transform a training batch before the forward passes (inputs and targets) -- which makes the teacher's
  outputs vary, so the engine runs the teacher live and says why;
* change what the recipe's distillation terms see (another head's logits, rescaled logits);
* add loss terms of its own, logged as ``loss/<method>.<term>``;
* define the student's prediction for evaluation (a blend of two heads) and log extra per-epoch values;
* initialise the student from the teacher.

In the spirit of mdistiller's ``Distiller`` (megvii-research/mdistiller), but the recipe stays in charge
of the loss terms it already has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from kd_core.losses.base import LossInputs, ModelShapes

if TYPE_CHECKING:
    from kd_core.data import ImageSet
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision


@dataclass
class MethodContext:
    """What a method may size its modules by (and fit to, on the training split only), once, before the student phase trains."""

    student: ModelShapes
    teacher: ModelShapes
    num_classes: int
    num_train: int
    in_channels: int
    image_size: int
    # the validation split (None when the config holds none out): normalized images when indexed, on the
    # training device, resident or streamed; a method never sees the test split
    val_x: ImageSet | None = None
    val_y: torch.Tensor | None = None
    # the run's config (seed, the student's batch size and optimizer), for methods that need more than shapes
    config: ExperimentConfig | None = None
    # the training split as the student phase sees it (normalized when indexed, never augmented);
    # for methods that fit something to the teacher before training (LELP's per-class subspaces)
    train_x: ImageSet | None = None
    train_y: torch.Tensor | None = None


@dataclass
class Batch:
    """One training batch as the forward passes see it; ``soft_target`` replaces ``y`` for CE when set."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    soft_target: torch.Tensor | None = None


@dataclass
class StudentOutputs:
    """The student's forward: logits plus whatever features were tapped, in float32."""

    logits: torch.Tensor
    embedding: torch.Tensor | None = None
    stages: list[torch.Tensor] = field(default_factory=list)


class Method(nn.Module):
    """Base class of every method; each hook defaults to "change nothing"."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for the form and `python -m kd_core methods`
    paper: ClassVar[str] = ""
    paper_url: ClassVar[str] = ""
    caveat: ClassVar[str] = ""  # what differs from the paper, shown next to the method in the form
    # student features the method reads ("embedding", "stages"); the engine taps them for it
    student_needs: ClassVar[frozenset[str]] = frozenset()
    # teacher features the method reads besides logits
    teacher_needs: ClassVar[frozenset[str]] = frozenset()
    # the teacher sees transformed inputs, so its outputs cannot be cached; the reason shown to the user
    varies_teacher_inputs: ClassVar[str | None] = None
    # the method adds loss terms of its own, so a recipe may be empty
    has_own_loss: ClassVar[bool] = False
    # a config may list further teachers (an ensemble)
    takes_teachers: ClassVar[bool] = False

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        """Cross-field checks on the whole config (field path, message); empty when it can run."""
        return []

    def build(self, context: MethodContext) -> None:  # noqa: B027 - optional hook
        """Create trainable modules from the shapes a dummy forward found."""

    def distill_teacher(self, teachers: list[nn.Module]) -> nn.Module:
        """The module whose outputs the student learns from (e.g. an ensemble of ``teachers``); default the first."""
        return teachers[0]

    def soft_label_store_blocker(self) -> str | None:
        """Why the teacher's logits of augmented batches may not come from the soft-label store (the method reads the
        teacher's live forward outside ``LossInputs``), or None when they may."""
        return None

    def init_student(self, student: nn.Module, teacher: nn.Module) -> None:  # noqa: B027 - optional hook
        """Initialise the student (e.g. from the teacher) before its first step."""

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Transform a training batch before the forward passes (``generator`` is seeded per batch)."""
        return batch

    def distill_inputs(self, inputs: LossInputs, student: StudentOutputs) -> LossInputs:
        """What the recipe's teacher-reading terms see; CE and label-only terms always get ``inputs``."""
        return inputs

    def losses(self, inputs: LossInputs, student: StudentOutputs, epoch_progress: float) -> dict[str, torch.Tensor]:
        """The method's own weighted loss terms, by name; they are added to the recipe's total."""
        return {}

    def student_logits(self, logits: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """The student's prediction at evaluation, from its logits and embedding (default: the logits)."""
        return logits

    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, float]:
        """Per-epoch values to log next to the validation metrics (e.g. a chosen blend, probe accuracy)."""
        return {}

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        """Per-step values to log (tensors are fine: they reach the host once a second)."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def create_method(name: str, params: dict[str, Any] | None = None) -> Method:
    try:
        cls = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
    return cls(**(params or {}))
