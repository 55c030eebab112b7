"""Contrastive Representation Distillation (CRD): an NCE objective over memory banks of the training set.

Port of RepDistiller ``crd/{criterion,memory}.py``. Two trainable embedding heads map the student and
teacher pooled features to a shared 128-d unit sphere; two memory banks (one per side, ``N × 128``
buffers, N = training-set size) hold a momentum average of every sample's embedding. Each anchor is scored
against its own row in the *other* side's bank (the positive) and K random rows (negatives).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import BuildContext, DistillLoss, LossInputs, register_loss

_NCE_EPS = 1e-7  # RepDistiller ``ContrastLoss`` eps
PAPER_NEGATIVES = 16384  # K in RepDistiller ``train_student.py`` (``--nce_k``)


class Embed(nn.Module):
    """CRD's head: Linear(D → dim) followed by L2 normalization."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def sample_contrast_indices(
    index: torch.Tensor, num_negatives: int, num_train: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[B, K+1]`` bank rows: column 0 the positive (the sample itself), then K uniform negatives.

    Negatives exclude the anchor (draw from N−1 rows and skip over it); RepDistiller's default "exact"
    mode also excludes same-class rows, which would need every training label here.
    """
    draws = torch.randint(
        0, num_train - 1, (index.shape[0], num_negatives), device=index.device, generator=generator
    )
    negatives = draws + (draws >= index.unsqueeze(1)).long()
    return torch.cat([index.unsqueeze(1), negatives], dim=1)


def nce_loss(scores: torch.Tensor, num_train: int) -> torch.Tensor:
    """CRD Eq. 18: ``−(1/B)[Σ_b log(P_pos/(P_pos + K·Pn + ε)) + Σ_{b,k} log(K·Pn/(P_neg + K·Pn + ε))]``.

    ``scores`` is ``[B, K+1]`` (positive first) of normalized exp-similarities; Pn = 1/N.
    """
    noise = (scores.shape[1] - 1) / num_train
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + _NCE_EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + _NCE_EPS))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


def crd_scores(anchor: torch.Tensor, bank_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """Un-normalized scores ``exp(<m_k, v_b>/τ)`` of anchors ``[B, d]`` against rows ``[B, K+1, d]``."""
    return torch.exp(torch.bmm(bank_rows, anchor.unsqueeze(2)).squeeze(2) / temperature)


@register_loss
class CRD(DistillLoss):
    """Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020.

    Defaults from RepDistiller ``train_student.py``: 128-d heads, K=16384 negatives (``num_negatives``
    left empty: min(16384, N−1); a value above N−1 is refused), τ=0.07, memory momentum 0.5; used with term weight 0.8 and CE 1 on CIFAR-100. The
    normalization constants Z are estimated at the first training call (``mean(score)·N``) and then frozen,
    as in the official ``ContrastMemory``; banks and Z are buffers so a resume continues with them.
    Negatives come from the global torch RNG (seeded by the engine).
    """

    name = "crd"
    needs = frozenset(["embedding", "index"])
    summary: ClassVar[str] = (
        "Contrastive: the student's feature of an image should pick out the teacher's feature of the same image."
    )
    paper: ClassVar[str] = 'Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020'

    memory_student: torch.Tensor | None
    memory_teacher: torch.Tensor | None
    z_constants: torch.Tensor | None

    def __init__(
        self,
        embed_dim: int = 128,
        num_negatives: int | None = None,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_negatives = embed_dim, num_negatives
        self.temperature, self.momentum = temperature, momentum
        self.num_train = 0
        self._z_frozen = False
        self.embed_student: Embed | None = None
        self.embed_teacher: Embed | None = None
        for buffer in ("memory_student", "memory_teacher", "z_constants"):
            self.register_buffer(buffer, None)

    def build(self, context: BuildContext) -> None:
        if context.num_train < 2:
            raise ValueError("loss 'crd' needs at least 2 training samples")
        self.num_train = context.num_train
        if self.num_negatives is None:  # the paper's K, or every other sample when the training set is smaller
            self.num_negatives = min(PAPER_NEGATIVES, context.num_train - 1)
        elif self.num_negatives > context.num_train - 1:
            raise ValueError(
                f"num_negatives is {self.num_negatives} but the training set has only {context.num_train} samples; "
                f"use at most {context.num_train - 1}, or leave it empty for min(16384, samples − 1)"
            )
        self.embed_student = Embed(context.student.embedding_dim, self.embed_dim)
        self.embed_teacher = Embed(context.teacher.embedding_dim, self.embed_dim)
        # RepDistiller init: uniform in ±1/sqrt(dim/3) (unit expected norm), not re-normalized
        bound = 1.0 / math.sqrt(self.embed_dim / 3)
        shape = (context.num_train, self.embed_dim)
        self.memory_student = torch.rand(shape).mul_(2 * bound).sub_(bound)
        self.memory_teacher = torch.rand(shape).mul_(2 * bound).sub_(bound)
        self.z_constants = torch.full((2,), -1.0)  # [Z_student_anchor, Z_teacher_anchor]; <0 = unset
        self._z_frozen = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._z_frozen = False  # the loaded constants may be unset (<0): look at them again on the next call

    def _partition_constants(self, scores_s: torch.Tensor, scores_t: torch.Tensor) -> torch.Tensor:
        """``[Z_s, Z_t]``, estimated once from the first batch as ``mean(score)·N`` and then frozen."""
        if not self._z_frozen:  # a Python flag avoids a device sync on every step
            if bool((self.z_constants < 0).any()):
                estimate = torch.stack([scores_s.detach().mean(), scores_t.detach().mean()])
                self.z_constants.copy_(estimate * self.num_train)
            self._z_frozen = True
        # a copy, so a later in-place write cannot invalidate the graph that divided by it
        return self.z_constants.clone()

    @torch.no_grad()
    def _update_bank(self, bank: torch.Tensor, index: torch.Tensor, embedding: torch.Tensor) -> None:
        """Momentum update of the batch's rows, re-normalized to the unit sphere."""
        rows = bank.index_select(0, index).mul_(self.momentum).add_(embedding, alpha=1 - self.momentum)
        bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if self.embed_student is None or self.embed_teacher is None or self.memory_student is None:
            raise RuntimeError("loss 'crd' must be built (build(context)) before use")
        index = inputs.index.long().to(self.memory_student.device)
        v_s = self.embed_student(inputs.student_embedding)
        v_t = self.embed_teacher(inputs.teacher_embedding.detach())
        rows = sample_contrast_indices(index, self.num_negatives, self.num_train).view(-1)
        batch, width = index.shape[0], self.num_negatives + 1
        # each anchor is contrasted against the other side's bank (bank rows carry no gradient)
        teacher_rows = self.memory_teacher.index_select(0, rows).view(batch, width, -1)
        student_rows = self.memory_student.index_select(0, rows).view(batch, width, -1)
        scores_s = crd_scores(v_s, teacher_rows, self.temperature)
        scores_t = crd_scores(v_t, student_rows, self.temperature)
        z = self._partition_constants(scores_s, scores_t)
        out_s, out_t = scores_s / z[0], scores_t / z[1]
        if self.training:
            self._update_bank(self.memory_student, index, v_s.detach())
            self._update_bank(self.memory_teacher, index, v_t.detach())
        return nce_loss(out_s, self.num_train) + nce_loss(out_t, self.num_train)
