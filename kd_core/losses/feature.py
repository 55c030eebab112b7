"""Feature-based distillation losses: terms that match intermediate maps or the penultimate embedding.

The teacher side is detached inside every function (the teacher is never trained by a distillation term).
The engine caches teacher embeddings (never stage maps) when inputs do not vary between epochs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import BuildContext, DistillLoss, LossInputs, register_loss

# ---------------------------------------------------------------------------------------------------
# Adapters


class ConvReg(nn.Module):
    """FitNet's regressor from a student map to the teacher map's shape: conv → BN → ReLU.

    Conv choice as in RepDistiller ``models/util.py`` / mdistiller ``_common.py``: stride-2 3×3 conv when
    the student map is twice as large, stride-2 transposed conv when half as large, a valid conv whose kernel
    absorbs the size difference when larger, and (our addition, for heterogeneous pairs) a 1×1 conv plus
    bilinear resize otherwise. The final ReLU matches the post-ReLU teacher hint.
    """

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]) -> None:
        super().__init__()
        s_c, s_h, s_w = student_shape
        t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:  # other ratios (heterogeneous pairs): 1×1 conv, then resize to the teacher's grid
            self.conv = nn.Sequential(nn.Conv2d(s_c, t_c, kernel_size=1), nn.Upsample(size=(t_h, t_w), mode="bilinear"))
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def embedding_projector(student_dim: int, teacher_dim: int, dropout: float = 0.5) -> nn.Module:
    """ND's ``EmbTrans``: BatchNorm1d → Dropout → Linear(D_s → D_t) (official ``embtrans_cifar.py``)."""
    return nn.Sequential(
        nn.BatchNorm1d(student_dim), nn.Dropout(dropout), nn.Linear(student_dim, teacher_dim)
    )


# ---------------------------------------------------------------------------------------------------
# Functional forms


def fitnet_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Romero et al. 2015 (one-stage benchmark form): MSE, mean over all elements, of r(f_s) and f_t."""
    return F.mse_loss(student_feature, teacher_feature.detach())


def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """AT's spatial attention ``normalize_L2(mean_c f_c^p)``, flattened to ``[B, H·W]``."""
    return F.normalize(feature.pow(p).mean(1).flatten(1), dim=1)


def match_spatial(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two maps to the smaller one's H×W (RepDistiller/mdistiller AT)."""
    s_size, t_size = student_feature.shape[-2:], teacher_feature.shape[-2:]
    if s_size[0] > t_size[0]:
        student_feature = F.adaptive_avg_pool2d(student_feature, tuple(t_size))
    elif s_size[0] < t_size[0]:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, tuple(s_size))
    return student_feature, teacher_feature


def at_loss(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor], p: float = 2
) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 (code form): ``Σ_stages mean_{b,hw} (a(f_s) − a(f_t))²``."""
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"AT pairs stages one to one; got {len(student_features)} student and "
            f"{len(teacher_features)} teacher maps"
        )
    total = student_features[0].new_zeros(())
    for f_s, f_t in zip(student_features, teacher_features):
        f_s, f_t = match_spatial(f_s, f_t.detach())
        total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
    return total


def nd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    class_means: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Wang et al. 2024: ``mean_b [1 − <s_b, c_y/‖c_y‖> / max(‖s_b‖, ‖t_b‖)]``.

    Vectorized form of the official per-sample loop: index the ``[C, D]`` class means by the labels.
    """
    directions = F.normalize(class_means.detach()[target.long()], dim=1)
    max_norm = torch.maximum(student_embedding.norm(dim=1), teacher_embedding.detach().norm(dim=1))
    return (1.0 - (student_embedding * directions).sum(1) / max_norm).mean()


# ---------------------------------------------------------------------------------------------------
# Registered recipe terms


def _require_built(module: nn.Module | None, loss_name: str) -> nn.Module:
    if module is None:
        raise RuntimeError(f"loss {loss_name!r} must be built (build(context)) before use")
    return module


@register_loss
class FitNet(DistillLoss):
    """Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    Benchmark (one-stage) form from RepDistiller/mdistiller: MSE between ConvReg(student stage map) and
    the teacher's map at the same stage. Default ``stage`` = the middle stage (``len // 2``: stage 2 of 3
    on CIFAR ResNets, the benchmarks' hint layer); used there with weight 100 and CE 1.
    """

    name = "fitnet"
    needs = frozenset(["stages"])
    summary: ClassVar[str] = "Make a middle feature map of the student (after a small adapter) copy the teacher's."
    paper: ClassVar[str] = (
        'Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015'
    )

    def __init__(self, stage: int | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.stage_index = self.teacher_index = -1  # resolved in build
        self.regressor: ConvReg | None = None

    def build(self, context: BuildContext) -> None:
        student, teacher = context.student.stage_shapes, context.teacher.stage_shapes
        index = len(student) // 2 if self.stage is None else self.stage
        if not 0 <= index < len(student):
            raise ValueError(f"fitnet stage {index} out of range (the student has {len(student)} stages)")
        # the teacher's hint at the same relative depth (the same index when both have as many stages)
        self.stage_index = index
        self.teacher_index = round(index * (len(teacher) - 1) / max(len(student) - 1, 1))
        self.regressor = ConvReg(student[index], teacher[self.teacher_index])

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        regressor = _require_built(self.regressor, self.name)
        f_s = inputs.student_stages[self.stage_index]
        return fitnet_loss(regressor(f_s), inputs.teacher_stages[self.teacher_index])


@register_loss
class AT(DistillLoss):
    """Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017.

    Code form (RepDistiller/mdistiller) over every stage map; p=2 from the paper and both codebases; used
    with weight 1000 and CE 1 on CIFAR-100.
    """

    name = "at"
    needs = frozenset(["stages"])
    summary: ClassVar[str] = "Match where in the image each stage of the network is 'looking' (attention maps)."
    paper: ClassVar[str] = (
        'Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the Performance of '
        'Convolutional Neural Networks via Attention Transfer", ICLR 2017'
    )

    def __init__(self, p: float = 2) -> None:
        super().__init__()
        self.p = p

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        # heterogeneous pairs may have different stage counts: pair the deepest stages one to one
        k = min(len(inputs.student_stages), len(inputs.teacher_stages))
        return at_loss(inputs.student_stages[-k:], inputs.teacher_stages[-k:], self.p)


@register_loss
class ND(DistillLoss):
    """Wang, Cheng, Duan, Wang, Feng, Kong, "Improving Knowledge Distillation via Regularizing Feature
    Direction and Norm", ECCV 2024.

    Official ``DirectNormLoss`` without its factor (the recipe weight plays ``nd_loss_factor``: 2.0 for
    res32x4→res8x4 KD++, ``CIFAR/train_cifar.sh``). The teacher class means ``[C, D_t]`` arrive in
    ``build`` and are kept as a buffer. When the student and teacher embedding dims differ, the student
    embedding goes through ``EmbTrans`` (BN → Dropout 0.5 → Linear), as in the official code.
    """

    name = "nd"
    needs = frozenset(["embedding", "target", "class_means"])
    summary: ClassVar[str] = (
        "Pull the student's feature towards its class's teacher mean direction and up to the teacher's norm."
    )
    paper: ClassVar[str] = (
        'Wang, Cheng, Duan, Wang, Feng, Kong, "Improving Knowledge Distillation via Regularizing Feature '
        'Direction and Norm", ECCV 2024'
    )

    class_means: torch.Tensor | None

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = dropout
        self.projector: nn.Module | None = None
        self.register_buffer("class_means", None)

    def build(self, context: BuildContext) -> None:
        if context.class_means is None:
            raise ValueError("loss 'nd' needs the teacher's class means (context.class_means)")
        self.class_means = context.class_means.detach().clone().float()
        d_s, d_t = context.student.embedding_dim, context.teacher.embedding_dim
        if d_s != d_t:
            self.projector = embedding_projector(d_s, d_t, self.dropout)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if self.class_means is None:
            raise RuntimeError("loss 'nd' must be built (build(context)) before use")
        student = inputs.student_embedding
        if self.projector is not None:
            student = self.projector(student)
        return nd_loss(student, inputs.teacher_embedding, self.class_means, inputs.target)
