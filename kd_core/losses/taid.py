"""TAID (Shing et al., ICLR 2025): distillation towards a target that slides from the student's own
prediction to the teacher's, with the adaptive schedule of the interpolation parameter t."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import DistillLoss, LossInputs, register_loss
from kd_core.losses.logit import soft_cross_entropy_rows


def taid_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float | torch.Tensor
) -> torch.Tensor:
    """Shing et al. 2025: CE of the student against ``softmax((1−t)·sg(z_s) + t·z_t)`` (no temperature)."""
    mixed = (1.0 - t) * student_logits.detach() + t * teacher_logits.detach()
    target = F.softmax(mixed, dim=1)
    return soft_cross_entropy_rows(target, F.log_softmax(student_logits, dim=1)).mean()


class TAIDSchedule(nn.Module):
    """The adaptive schedule of TAID's interpolation parameter t (Shing et al., ICLR 2025; official
    ``src/distil_losses/taid.py``).

    After each step with (detached) loss ℓ: ``rel = (ℓ_prev − ℓ)/(ℓ_prev + 1e-15)``,
    ``m ← β·m + (1−β)·rel``, ``t ← min(t_end, max(t_lin, t + α·sigmoid(m)·(1 − t)))`` where ``t_lin``
    rises linearly from t_start to t_end over training. The first call only stores ℓ (official code).
    t, ℓ_prev and m are buffers: they follow the module's device and are saved by ``state_dict`` so a
    resumed run continues the schedule instead of restarting at t_start.
    """

    t: torch.Tensor
    prev_loss: torch.Tensor
    momentum: torch.Tensor

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        super().__init__()
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.adaptive = adaptive
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("prev_loss", torch.tensor(math.inf))  # inf = "no loss seen yet"
        self.register_buffer("momentum", torch.tensor(0.0))

    def linear_target(self, step: int, total_steps: int) -> float:
        """The non-adaptive floor ``t_start + (t_end − t_start)·step/total_steps``."""
        return self.t_start + (self.t_end - self.t_start) * step / max(total_steps, 1)

    def update(self, loss_value: torch.Tensor | float, step: int, total_steps: int) -> None:
        """Advance t after an optimizer step, on the device and without waiting for it (no host sync)."""
        t_lin = self.linear_target(step, total_steps)
        if not self.adaptive:
            self.t.fill_(min(self.t_end, t_lin))
            return
        loss = torch.as_tensor(loss_value, dtype=self.prev_loss.dtype, device=self.prev_loss.device).detach()
        seen = torch.isfinite(self.prev_loss)  # the first call only stores the loss
        rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
        t = (self.t + self.alpha * torch.sigmoid(momentum) * (1.0 - self.t)).clamp(min=t_lin).clamp(max=self.t_end)
        self.momentum.copy_(torch.where(seen, momentum, self.momentum))
        self.t.copy_(torch.where(seen, t, self.t))
        self.prev_loss.copy_(loss)


@register_loss
class TAID(DistillLoss):
    """Shing, Misaki, Bao, Yokoi, Akiba, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025.

    Defaults t_start 0.4, t_end 1.0, α 5e-4, β 0.99 from the official scripts (SakanaAI/TAID
    ``src/arguments.py``). Batch mean replaces the token mask for classification. ``after_step`` must be
    given this term's own (unweighted) loss value, as the official code feeds the distillation loss.
    """

    name = "taid"
    needs = frozenset(["logits"])
    summary: ClassVar[str] = (
        "Distill towards a target that slides from the student's own prediction to the teacher's."
    )
    paper: ClassVar[str] = (
        'Shing, Misaki, Bao, Yokoi, Akiba, "TAID: Temporally Adaptive Interpolated Distillation for '
        'Efficient Knowledge Transfer in Language Models", ICLR 2025'
    )

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        super().__init__()
        self.schedule = TAIDSchedule(t_start, t_end, alpha, beta, adaptive)
        # progress of the step being taken; the schedule reads it in after_step
        self._step, self._total_steps = 0, 1

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        self._step, self._total_steps = inputs.step, inputs.total_steps
        return taid_loss(inputs.student_logits, inputs.teacher_logits, self.schedule.t)

    def after_step(self, loss_value: torch.Tensor) -> None:
        self.schedule.update(loss_value, self._step, self._total_steps)

    def logged_values(self) -> dict[str, torch.Tensor]:
        return {"taid_t": self.schedule.t.detach().clone()}
