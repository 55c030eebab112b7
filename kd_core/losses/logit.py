"""Logit-based distillation losses: terms that compare the student's and the teacher's class scores.

Every function takes raw logits ``[B, C]`` and returns a scalar. The teacher side is always detached inside
the function: a teacher is never trained through a distillation term, and detaching here (rather than
trusting every caller) keeps a stray ``requires_grad`` teacher from leaking gradients.

Reductions follow the authors' released code: sum over classes, mean over the batch — never
PyTorch's default ``reduction="mean"`` over B·C, which silently divides by C.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from kd_core.losses.base import DistillLoss, LossInputs, register_loss

# ---------------------------------------------------------------------------------------------------
# Shared pieces


def tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(z / T)`` over classes (dim 1)."""
    return F.log_softmax(logits / temperature, dim=1)


def kl_rows(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p_t ‖ p_s)`` from log-probabilities, shape ``[B]``.

    ``log_target=True`` avoids ``0·log 0`` NaNs when a teacher probability underflows.
    """
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1)


def soft_cross_entropy_rows(weights: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """Per-row ``−Σ_c w_c · log p_s,c``, shape ``[B]`` (CE against a soft or re-weighted target)."""
    return -(weights * log_p_student).sum(1)


def class_index(target: torch.Tensor) -> torch.Tensor:
    """Integer labels ``[B]``; soft/mixed label rows ``[B, C]`` are reduced by argmax (as NKD's code does)."""
    if target.dim() > 1:
        target = target.argmax(dim=1)
    return target.long()


def drop_column(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Remove column ``index[b]`` from each row: ``[B, C] → [B, C−1]``, other columns keep their order.

    Exact form of the reference code's "subtract 1000 from the target logit" mask (DKD, NKD). Built with
    ``gather`` rather than boolean indexing, which would force a host-device sync on GPU.
    """
    cols = torch.arange(values.shape[1] - 1, device=values.device).unsqueeze(0)
    return values.gather(1, cols + (cols >= index.unsqueeze(1)).long())


# ---------------------------------------------------------------------------------------------------
# Functional forms


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton et al. 2015: ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``, summed over classes, mean over batch."""
    kl = kl_rows(
        tempered_log_softmax(student_logits, temperature),
        tempered_log_softmax(teacher_logits.detach(), temperature),
    )
    # T² keeps the soft-target gradient magnitude independent of T (Hinton 2015, §2)
    return kl.mean() * temperature**2


def _binary_log_probs(log_p: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``log [p_y, 1 − p_y]`` per row, ``[B, 2]``; ``log(1 − p_y)`` as a logsumexp of the others (no log 0)."""
    log_target = log_p.gather(1, label.unsqueeze(1))
    log_rest = torch.logsumexp(drop_column(log_p, label), dim=1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=1)


def dkd_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(TCKD, NCKD)`` of DKD, both ``[B]`` and without T² or weights.

    ``KL(p_t ‖ p_s) = TCKD + (1 − p_t[y])·NCKD`` holds row by row (Zhao et al. 2022, Eq. 7).
    """
    label = class_index(target)
    teacher_logits = teacher_logits.detach()
    log_p_s = tempered_log_softmax(student_logits, temperature)
    log_p_t = tempered_log_softmax(teacher_logits, temperature)
    tckd = kl_rows(_binary_log_probs(log_p_s, label), _binary_log_probs(log_p_t, label))
    nckd = kl_rows(
        tempered_log_softmax(drop_column(student_logits, label), temperature),
        tempered_log_softmax(drop_column(teacher_logits, label), temperature),
    )
    return tckd, nckd


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Zhao et al. 2022: ``T²·mean_b(α·TCKD + β·NCKD)`` (the epoch warm-up is the engine's job)."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return (alpha * tckd + beta * nckd).mean() * temperature**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation as in the DIST code: centred cosine with ``‖a‖‖b‖ + eps``."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Huang et al. 2022: ``τ²·(β·(1 − mean_b ρ(rows)) + γ·(1 − mean_c ρ(columns)))`` of softmax(z/τ)."""
    y_s = F.softmax(student_logits / temperature, dim=1)
    y_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()  # per class across the batch
    return temperature**2 * (beta * inter + gamma * intra)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-row z-score ``(z − mean)/(eps + std)`` with the unbiased std, as the LS code uses ``torch.std``."""
    return (logits - logits.mean(1, keepdim=True)) / (eps + logits.std(1, keepdim=True))


def logit_std_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Sun et al. 2024: KD (with T²) between z-scored logits, ``KD(Z(z_s), Z(z_t), T)``."""
    return kd_loss(standardize_logits(student_logits), standardize_logits(teacher_logits), temperature)


def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
) -> torch.Tensor:
    """Yang et al. 2023: ``−mean(p_t[y]·log p_s[y]) + γ·T²·mean CE(p̂_t^T, p̂_s^T)`` on non-target classes.

    The target part uses T=1 softmaxes over all classes; the non-target part drops column y first.
    """
    label = class_index(target).unsqueeze(1)
    teacher_logits = teacher_logits.detach()
    log_p_s_y = F.log_softmax(student_logits, dim=1).gather(1, label)
    p_t_y = F.softmax(teacher_logits, dim=1).gather(1, label)
    target_term = -(p_t_y * log_p_s_y).mean()
    label = label.squeeze(1)
    p_t_rest = F.softmax(drop_column(teacher_logits, label) / temperature, dim=1)
    log_p_s_rest = tempered_log_softmax(drop_column(student_logits, label), temperature)
    non_target = soft_cross_entropy_rows(p_t_rest, log_p_s_rest).mean()
    return target_term + gamma * temperature**2 * non_target


def plackett_luce_order(teacher_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Class order ``[B, C]``: other classes by ascending teacher logit (stable), then the true label last.

    This is the reverse of PLD's teacher-optimal permutation π* (label first, then descending), so a
    forward ``logcumsumexp`` yields π*'s suffix log-sum-exps. Giving the label a +inf key moves it last
    in one sort.
    """
    keys = teacher_logits.scatter(1, label.unsqueeze(1), math.inf)
    return torch.argsort(keys, dim=1, stable=True)


def pld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Bassam et al. 2025: ``Σ_k α_k (log Σ_{l≥k} exp s_{π*_l} − s_{π*_k})``, α = softmax(t/τ)[π*].

    No T² and the student logits are not divided by τ (τ only shapes the weights), per the paper's code.
    """
    teacher_logits = teacher_logits.detach()
    order = plackett_luce_order(teacher_logits, class_index(target))
    s_perm = student_logits.gather(1, order)
    weights = F.softmax(teacher_logits.gather(1, order) / temperature, dim=1)
    per_position = torch.logcumsumexp(s_perm, dim=1) - s_perm
    return (per_position * weights).sum(1).mean()


def ofa_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    eps: float = 1.0,
) -> torch.Tensor:
    """Hao et al. 2023 (code form): ``mean_b Σ_c −[(p_t + m)^γ − m]_c · log p_s,c``, m = one-hot(y), γ = eps.

    Target weight ``(1 + p_t[y])^γ − 1``, non-target ``p_t[c]^γ``; γ=1 is CE against the teacher. No T².
    """
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    one_hot = F.one_hot(class_index(target), p_t.shape[1]).to(p_t.dtype)
    weights = (p_t + one_hot).pow(eps) - one_hot
    return soft_cross_entropy_rows(weights, tempered_log_softmax(student_logits, temperature)).mean()


# ---------------------------------------------------------------------------------------------------
# Registered recipe terms


@register_loss
class CrossEntropy(DistillLoss):
    """Cross-entropy with the labels: the student's own supervised term (not a distillation paper).

    When a method mixes samples (mixup), the mixed label probabilities replace the hard labels.
    """

    name = "ce"
    needs = frozenset(["target"])
    summary: ClassVar[str] = "Ordinary cross-entropy with the true labels."
    paper: ClassVar[str] = ""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        target = inputs.target if inputs.soft_target is None else inputs.soft_target
        return F.cross_entropy(inputs.student_logits, target, label_smoothing=self.label_smoothing)


@register_loss
class KD(DistillLoss):
    """Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 DL Workshop (arXiv 2015).

    Default T=4 from the CIFAR-100 benchmarks (RepDistiller / mdistiller ``CFG.KD``), used there with
    CE 0.1 + KD 0.9.
    """

    name = "kd"
    needs = frozenset(["logits"])
    summary: ClassVar[str] = "Match the teacher's softened class probabilities."
    paper: ClassVar[str] = (
        'Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2014'
    )

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return kd_loss(inputs.student_logits, inputs.teacher_logits, self.temperature)


@register_loss
class DKD(DistillLoss):
    """Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022.

    Defaults α=1, β=8, T=4 from mdistiller ``CFG.DKD`` (res32x4→res8x4; other CIFAR pairs use β=2 or 6,
    ImageNet T=1, β=0.5). The paper's 20-epoch linear warm-up is applied by the engine from the recipe's
    ``warmup_epochs``, so this module computes the un-ramped loss.
    """

    name = "dkd"
    needs = frozenset(["logits", "target"])
    summary: ClassVar[str] = "KD split into target-class and non-target-class parts, weighted separately."
    paper: ClassVar[str] = (
        'Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022'
    )

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return dkd_loss(
            inputs.student_logits,
            inputs.teacher_logits,
            inputs.target,
            self.alpha,
            self.beta,
            self.temperature,
        )


@register_loss
class DIST(DistillLoss):
    """Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.

    Defaults β=γ=τ=1 from the ImageNet config (image_classification_sota ``resnet_dist.yaml``); the
    CIFAR-100 config ``dist_cifar.yaml`` uses τ=4 with term weight 2 and CE 1.
    """

    name = "dist"
    needs = frozenset(["logits"])
    summary: ClassVar[str] = (
        "Match how the teacher ranks classes per image and images per class (correlation, not exact values)."
    )
    paper: ClassVar[str] = (
        'Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022'
    )

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return dist_loss(
            inputs.student_logits, inputs.teacher_logits, self.beta, self.gamma, self.temperature
        )


@register_loss
class LogitStandardKD(DistillLoss):
    """Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024.

    Default base temperature 2 from the LS repo (``--base-temp 2``; used with KD weight 9, CE 0.1).
    """

    name = "logit_std"
    needs = frozenset(["logits"])
    summary: ClassVar[str] = (
        "KD on z-scored logits, so the student matches the teacher's logit shape, not its scale."
    )
    paper: ClassVar[str] = (
        'Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024'
    )

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return logit_std_kd_loss(inputs.student_logits, inputs.teacher_logits, self.temperature)


@register_loss
class NKD(DistillLoss):
    """Yang, Zeng, Yuan, Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
    Approach with Normalized Loss and Customized Soft Labels", ICCV 2023.

    Defaults T=1, γ=1.5 from the official ImageNet config (cls_KD ``res34_distill_res18_img.py``);
    the CIFAR-100 config uses T=3, γ=3.5. The student's own CE is a separate recipe term.
    """

    name = "nkd"
    needs = frozenset(["logits", "target"])
    summary: ClassVar[str] = (
        "Teacher-weighted true-class term plus KD on the re-normalized non-target classes."
    )
    paper: ClassVar[str] = (
        'Yang, Zeng, Yuan, Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified '
        'Approach with Normalized Loss and Customized Soft Labels", ICCV 2023'
    )

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5) -> None:
        super().__init__()
        self.temperature, self.gamma = temperature, gamma

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return nkd_loss(
            inputs.student_logits,
            inputs.teacher_logits,
            inputs.target,
            self.temperature,
            self.gamma,
        )


@register_loss
class PLD(DistillLoss):
    """Bassam, Zhu, Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", arXiv 2506.12542, 2025.

    Default τ=1 (the paper's best on ImageNet, R152→R50); its CIFAR-100 recipe uses τ=4. PLD replaces
    CE: the paper's recipes have no separate CE term.
    """

    name = "pld"
    needs = frozenset(["logits", "target"])
    summary: ClassVar[str] = (
        "Teach the student the teacher's full ranking of classes (true class first), weighted by confidence."
    )
    paper: ClassVar[str] = (
        'Bassam, Zhu, Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", arXiv 2506.12542, 2025'
    )

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return pld_loss(
            inputs.student_logits, inputs.teacher_logits, inputs.target, self.temperature
        )


@register_loss
class OFA(DistillLoss):
    """Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous
    Architectures in Knowledge Distillation", NeurIPS 2023.

    Code form of the loss (Hao840/OFAKD ``distillers/ofa.py``) on the student's final logits only (the
    ``kd_w·L_OFA`` term); the complete method, with per-stage projector branches, is ``kd_core.methods.ofa``. Defaults T=1, γ (``eps``)=1 from
    the official ``train.py`` arguments; README commands use γ=1.5 (ImageNet) and 1.0 (CIFAR-100).
    """

    name = "ofa"
    needs = frozenset(["logits", "target"])
    summary: ClassVar[str] = (
        "CE against the teacher's probabilities with the true class boosted by an exponent."
    )
    paper: ClassVar[str] = (
        'Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous '
        'Architectures in Knowledge Distillation", NeurIPS 2023'
    )

    def __init__(self, temperature: float = 1.0, eps: float = 1.0) -> None:
        super().__init__()
        self.temperature, self.eps = temperature, eps

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return ofa_loss(
            inputs.student_logits, inputs.teacher_logits, inputs.target, self.temperature, self.eps
        )
