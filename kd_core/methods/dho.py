"""DHO: dual-head optimization (Kang, Lee, Jang, Hwang, arXiv 2505.07675, 2025; code erjui/DHO).

The student gets a second linear head on its pooled feature. The model's own head learns from the labels
(the recipe's CE term), the second head from the teacher (every distillation term of the recipe sees its
logits). At evaluation the two are blended, ``p = α·softmax(z_ce) + (1 − α)·softmax(z_kd / T)``, with α
and T chosen on the validation split after every epoch, as ``train_others.py`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import LossInputs
from kd_core.methods.base import Method, MethodContext, StudentOutputs, register_method

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision

ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))  # α ∈ {0, 0.05, ..., 1} (README of erjui/DHO)
TEMPERATURES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def blend(z_ce: torch.Tensor, z_kd: torch.Tensor, alpha: float | torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``α·softmax(z_ce) + (1 − α)·softmax(z_kd / T)`` (argmax = the blended prediction)."""
    p = alpha * F.softmax(z_ce, 1) + (1 - alpha) * F.softmax(z_kd / temperature, 1)
    return p.clamp_min(1e-12).log()


def choose_blend(z_ce: torch.Tensor, z_kd: torch.Tensor, y: torch.Tensor, alphas: Sequence[float], temperatures: Sequence[float]) -> tuple[float, float, float]:
    """The (α, T) with the best accuracy on ``y`` (first in grid order on ties) and that accuracy in %."""
    best = (-1.0, alphas[0], temperatures[0])
    for temperature in temperatures:
        for alpha in alphas:
            acc = 100.0 * float((blend(z_ce, z_kd, alpha, temperature).argmax(1) == y).float().mean())
            if acc > best[0]:
                best = (acc, alpha, temperature)
    return best[1], best[2], best[0]


@register_method
class DHO(Method):
    name = "dho"
    summary: ClassVar[str] = ("Two heads on the student: one learns from the labels, one from the teacher; their predictions are "
                              "blended with a weight and temperature chosen on the validation split.")
    paper: ClassVar[str] = ('Kang, Lee, Jang, Hwang, "Simple yet Effective Semi-supervised Knowledge Distillation from '
                            'Vision-Language Models via Dual-Head Optimization", arXiv 2505.07675 (2025)')
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2505.07675"
    caveat: ClassVar[str] = "Supervised setting: the paper's unlabeled batch is the labeled batch itself."
    student_needs: ClassVar[frozenset[str]] = frozenset(["embedding"])

    alpha: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, alphas: Sequence[float] = ALPHAS, temperatures: Sequence[float] = TEMPERATURES) -> None:
        super().__init__()
        self.alphas, self.temperatures = list(alphas), list(temperatures)
        if not self.alphas or any(not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be numbers in [0, 1], got {self.alphas}")
        if not self.temperatures or any(not isinstance(t, (int, float)) or t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be numbers > 0, got {self.temperatures}")
        self.kd_head: nn.Linear | None = None
        # until the first validation, the blend is the CE head alone
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("temperature", torch.tensor(1.0))

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        if config.dataset.val_fraction <= 0:
            return [("dataset.val_fraction", "dho chooses its blend on the validation split: set val_fraction > 0 (e.g. 0.1)")]
        if not any(term.loss != "ce" for term in config.recipe):
            return [("recipe", "dho's second head learns from the recipe's distillation terms: add one, e.g. {loss: kd, params: {temperature: 2}}")]
        return []

    def build(self, context: MethodContext) -> None:
        self.kd_head = nn.Linear(context.student.embedding_dim, context.num_classes)

    def kd_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        assert self.kd_head is not None
        return self.kd_head(embedding.flatten(1)).float()

    def distill_inputs(self, inputs: LossInputs, student: StudentOutputs) -> LossInputs:
        assert student.embedding is not None
        return LossInputs(**{**inputs.__dict__, "student_logits": self.kd_logits(student.embedding)})

    def student_logits(self, logits: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        assert embedding is not None
        return blend(logits.float(), self.kd_logits(embedding), self.alpha, self.temperature)

    @torch.no_grad()
    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, Any]:
        from kd_core.engine.evaluation import outputs_with_embedding

        z_ce, embedding = outputs_with_embedding(run.model, run.experiment.data.val_x, precision)
        z_kd = self.kd_logits(embedding)
        y = run.experiment.data.val_y
        alpha, temperature, blended = choose_blend(z_ce, z_kd, y, self.alphas, self.temperatures)
        self.alpha.fill_(alpha)
        self.temperature.fill_(temperature)
        return {
            "val/dho_ce_head_top1": 100.0 * float((z_ce.argmax(1) == y).float().mean()),
            "val/dho_kd_head_top1": 100.0 * float((z_kd.argmax(1) == y).float().mean()),
            "val/dho_blend_top1": blended,
            "dho_alpha": alpha,
            "dho_temperature": temperature,
        }
