"""Relation-based distillation losses: terms that match how samples of a batch relate to each other.

Student and teacher features may have different widths; only B×B (or B×B×B) relation matrices are
compared. The teacher side is detached inside every function. The engine caches teacher embeddings
(not stage maps) when inputs do not vary between epochs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kd_core.losses.base import DistillLoss, LossInputs, register_loss

# ---------------------------------------------------------------------------------------------------
# Functional forms


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    """SP's batch similarity: ``row_normalize_L2(Q Qᵀ)`` with ``Q = f.view(B, −1)``, ``[B, B]``."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Tung & Mori 2019: ``‖G_t − G_s‖_F² / B²``."""
    batch = student_feature.shape[0]
    diff = similarity_matrix(teacher_feature.detach()) - similarity_matrix(student_feature)
    return diff.pow(2).sum() / batch**2


def pairwise_distances(embedding: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``[B, B]`` with a zero diagonal, squared distances clamped at eps before sqrt.

    The clamp keeps sqrt's gradient finite; the diagonal is masked (not computed) because
    ``‖e_i‖² + ‖e_i‖² − 2<e_i, e_i>`` is rounding noise there.
    """
    sq_norm = embedding.pow(2).sum(1)
    squared = (sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0) - 2 * embedding @ embedding.t()).clamp(min=eps)
    eye = torch.eye(embedding.shape[0], dtype=torch.bool, device=embedding.device)
    return squared.sqrt().masked_fill(eye, 0.0)


def _normalized_distances(embedding: torch.Tensor) -> torch.Tensor:
    """RKD's ψ_D: pairwise distances divided by their mean over the positive entries.

    sum / count instead of ``dist[dist > 0].mean()``: same value, no host-device sync on GPU.
    """
    dist = pairwise_distances(embedding)
    return dist / (dist.sum() / (dist > 0).sum())


def _angles(embedding: torch.Tensor) -> torch.Tensor:
    """RKD's ψ_A: ``<normalize(e_i − e_j), normalize(e_k − e_j)>`` for all triples, flattened ``[B³]``."""
    diffs = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diffs, diffs.transpose(1, 2)).flatten()


def rkd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Park et al. 2019: ``w_d·smoothL1(ψ_D^s, ψ_D^t) + w_a·smoothL1(ψ_A^s, ψ_A^t)`` (means over entries).

    The angle term materializes ``[B, B, D]`` and ``[B, B, B]`` tensors (memory grows as B³).
    """
    student = student_embedding.flatten(1)
    with torch.no_grad():
        teacher = teacher_embedding.flatten(1)
        t_dist, t_angle = _normalized_distances(teacher), _angles(teacher)
    loss_d = F.smooth_l1_loss(_normalized_distances(student), t_dist)
    loss_a = F.smooth_l1_loss(_angles(student), t_angle)
    return distance_weight * loss_d + angle_weight * loss_a


def _cosine_conditional_probs(embedding: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's ``P(i, j)``: cosine similarities mapped to [0, 1] by (S+1)/2, then row-normalized."""
    unit = embedding / (embedding.norm(dim=1, keepdim=True) + eps)
    unit = torch.nan_to_num(unit, nan=0.0)  # the reference code zeroes NaNs from all-zero rows
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(1, keepdim=True)


def pkt_loss(
    student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """Passalis & Tefas 2018: ``mean_{i,j} P_t·log((P_t + eps)/(P_s + eps))`` — a mean over B² entries."""
    p_s = _cosine_conditional_probs(student_embedding.flatten(1), eps)
    p_t = _cosine_conditional_probs(teacher_embedding.detach().flatten(1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ---------------------------------------------------------------------------------------------------
# Registered recipe terms


@register_loss
class SP(DistillLoss):
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

    On the last stage map (RepDistiller ``feat[-2]`` = mdistiller ``feats[-1]``); no parameters. Used
    with weight 3000 and CE 1 on CIFAR-100 (RepDistiller ``run_cifar_distill.sh``).
    """

    name = "sp"
    needs = frozenset(["stages"])
    summary: ClassVar[str] = "Images the teacher finds similar (last feature map) should look similar to the student."
    paper: ClassVar[str] = 'Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019'

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return sp_loss(inputs.student_stages[-1], inputs.teacher_stages[-1])


@register_loss
class RKD(DistillLoss):
    """Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019.

    On the pooled embeddings; distance weight 25 and angle weight 50 from RepDistiller/mdistiller
    (term weight 1 on CIFAR-100).
    """

    name = "rkd"
    needs = frozenset(["embedding"])
    summary: ClassVar[str] = "Match the distances and angles between the images' features in a batch."
    paper: ClassVar[str] = 'Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019'

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return rkd_loss(
            inputs.student_embedding,
            inputs.teacher_embedding,
            self.distance_weight,
            self.angle_weight,
        )


@register_loss
class PKT(DistillLoss):
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.

    On the pooled embeddings; eps 1e-7 from RepDistiller ``PKT.py``. Because the loss is a mean over B²
    entries, the CIFAR-100 term weight is 30000.
    """

    name = "pkt"
    needs = frozenset(["embedding"])
    summary: ClassVar[str] = "Match the teacher's neighbour probabilities (cosine similarity) between images."
    paper: ClassVar[str] = (
        'Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018'
    )

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return pkt_loss(inputs.student_embedding, inputs.teacher_embedding, self.eps)
