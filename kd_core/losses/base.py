"""The contract between the training engine and every distillation loss.

A loss is a plain ``nn.Module`` registered by name. It declares what it ``needs`` so the engine taps only
those layers (a recipe of ``ce`` + ``kd`` never hooks a feature map). The engine fills a
:class:`LossInputs` with exactly the declared fields and calls ``forward(inputs)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

Need = Literal[
    "logits",  # the teacher's logits [B, C] (the student's are always given)
    "target",  # integer labels [B]
    "embedding",  # penultimate (pooled) vectors [B, D] of student and teacher
    "stages",  # lists of stage feature maps [B, C_i, H_i, W_i] of student and teacher
    "index",  # dataset indices of the batch's samples [B] (CRD's memory banks)
    "class_means",  # teacher's per-class mean embedding over the training set [C, D_t] (ND)
]
ALL_NEEDS: frozenset[str] = frozenset(
    ["logits", "target", "embedding", "stages", "index", "class_means"]
)


@dataclass
class LossInputs:
    """What one training step hands to the recipe's loss terms. Unrequested fields stay ``None``."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    target: torch.Tensor | None = None
    student_embedding: torch.Tensor | None = None
    teacher_embedding: torch.Tensor | None = None
    student_stages: list[torch.Tensor] | None = None
    teacher_stages: list[torch.Tensor] | None = None
    index: torch.Tensor | None = None
    soft_target: torch.Tensor | None = None  # [B, C] label probabilities when a method mixes samples (mixup)
    epoch: int = 0  # 0-based epoch of the student phase
    step: int = 0  # global optimizer step of the student phase
    total_steps: int = 1  # steps the student phase will take in all


@dataclass
class ModelShapes:
    """Shapes found by one dummy forward of a model, used to size trainable adapters."""

    num_classes: int
    embedding_dim: int
    stage_shapes: list[tuple[int, int, int]]  # (channels, height, width) per stage, shallow to deep


@dataclass
class BuildContext:
    """Everything a loss may need once, before training starts."""

    student: ModelShapes
    teacher: ModelShapes
    num_train: int  # size of the training set (CRD's memory banks)
    class_means: torch.Tensor | None = None  # [C, D_t], only when the loss needs "class_means"
    extra: dict[str, Any] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class of every recipe term.

    Subclasses set ``name`` and ``needs``, take their paper defaults as keyword arguments, and implement
    ``forward(inputs) -> scalar tensor``. Trainable adapters (regressors, projectors, embedding heads) are
    created in ``build`` from the shapes a dummy forward found; they become parameters of this module, so
    the engine adds them to the student's optimizer and saves them with the student checkpoint. State that
    must survive a resume lives in buffers (saved by ``state_dict``).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset(["logits"])
    # The engine caches teacher logits and embeddings (never stage maps) when inputs do not vary between
    # epochs; a loss that changes the teacher's input itself (mixup, masking) sets this to False.
    teacher_cacheable: ClassVar[bool] = True

    @property
    def reads_teacher(self) -> bool:
        """True for distillation terms; a method may change what these see (another head, rescaled logits)."""
        return bool(self.needs & {"logits", "embedding", "stages", "class_means"})

    def build(self, context: BuildContext) -> None:  # noqa: B027 - optional hook
        """Create adapters from shapes. Default: nothing to build."""

    def after_step(self, loss_value: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Update internal schedules after an optimizer step (TAID's t), given this term's detached value.

        It stays on the device: reading it on the host here would stall every GPU step. Default: nothing.
        """

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        """Extra scalars to log per step next to the term's value (e.g. ``taid_t``); tensors are fine."""
        return {}

    def forward(self, inputs: LossInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


LOSSES: dict[str, type[DistillLoss]] = {}


def register_loss(cls: type[DistillLoss]) -> type[DistillLoss]:
    """Class decorator: make a loss usable in recipes under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in LOSSES:
        raise ValueError(f"loss {cls.name!r} registered twice")
    unknown = set(cls.needs) - ALL_NEEDS
    if unknown:
        raise ValueError(f"{cls.__qualname__} declares unknown needs {sorted(unknown)}")
    LOSSES[cls.name] = cls
    return cls


def create_loss(name: str, params: dict[str, Any] | None = None) -> DistillLoss:
    """Instantiate a registered loss with the recipe's params (unknown params raise ``TypeError``)."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
    return cls(**(params or {}))

