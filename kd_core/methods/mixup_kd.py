"""Mixup-KD: partial mixup and a per-sample temperature (Choi, Jeon, Shukla, Turaga, "Understanding the Role
of Mixup in Knowledge Distillation: An Empirical Study", WACV 2023, arXiv 2211.03946; code hchoi71/MIX-KD).

Partial mixup (PMU, ``helper/loops_mixstd.py`` of the released code): a fraction of each training batch is
replaced by convex mixtures of two samples, ``x' = λ·x_i + (1 − λ)·x_j`` with ``λ ~ Beta(a, a)`` drawn per
sample, and the one-hot labels are mixed with the same λ. The teacher labels the *mixed* images, so its
outputs are computed live. The rest of the batch is left as it is.

Per-sample temperature (``distiller_zoo/MIXSTD.py``): every row of logits is divided by its own standard
deviation over the classes (unbiased, as ``torch.std``), the student's by the student's and the teacher's
by the teacher's, before the distillation loss; the std is not detached. The released loss is
``0.1·CE(softmax(z_s/σ_s), y_mix) + 0.9·KL(softmax(z_t/σ_t) ‖ softmax(z_s/σ_s))`` without T²: with
``{loss: kd, params: {temperature: 1}}`` in the recipe (T² = 1) the distillation part is exactly that. Any
logit term of the recipe (kd, dkd, dist, ...) sees the rescaled logits, on top of its own temperature.

What differs from the released code:

* the recipe's CE term (and any term that reads only labels) sees the raw student logits; MIXSTD divides
  them by σ_s for its CE too;
* exactly the fraction asked is mixed: ``floor(B·f + u)`` rows, ``u ~ U(0, 1)``, so ``B·f`` on average
  (stochastic rounding), drawn without replacement. The released code sets λ = 1 for ``int(B·0.9)`` row
  indices drawn *with* replacement and calls that "10 %"; for a batch of 64 it leaves ≈ 59 % unmixed, so
  it mixes ≈ 41 %;
* rows keep their place (and their dataset index), and each mixed row's partner is the next row on a random
  cycle through the batch, so no row is "mixed" with itself; the released code mixes two random
  permutations of the batch;
* a row whose logits are all equal (std 0) is divided by 1e-7 instead of 0.

Labels: ``soft_target`` holds the mixed one-hot labels (the recipe's CE learns from them) and ``y`` becomes
the label with the larger share (λ ≥ ½ keeps the row's own), for terms that need one class per row (DKD's
target class). The mixing draws from the per-batch generator the engine seeds by (seed, epoch, batch), so a
resumed run replays the same mixing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kd_core.losses.base import LossInputs
from kd_core.methods.base import (
    Batch,
    Method,
    MethodContext,
    StudentOutputs,
    register_method,
)

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig

STD_EPS = 1e-7


def per_sample_temperature(logits: torch.Tensor) -> torch.Tensor:
    """Each row's standard deviation over classes (unbiased), ``[B, 1]``: MIXSTD's per-sample temperature."""
    return logits.std(dim=1, keepdim=True).clamp_min(STD_EPS)


def std_scaled(logits: torch.Tensor) -> torch.Tensor:
    """``z / σ(z)`` row by row (gradients flow through σ, as in the released loss)."""
    return logits / per_sample_temperature(logits)


@register_method
class MixupKD(Method):
    name = "mixup_kd"
    summary: ClassVar[str] = ("Partial mixup: a fraction of each batch is mixed with partners (λ ~ Beta(a, a)), the teacher labels "
                              "the mixed images, and distillation divides each row's logits by their own std.")
    paper: ClassVar[str] = ('Choi, Jeon, Shukla, Turaga, "Understanding the Role of Mixup in Knowledge Distillation: An Empirical '
                            'Study", WACV 2023')
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2211.03946"
    caveat: ClassVar[str] = ("CE sees the raw student logits (the released loss divides them by their std too). Exactly the fraction "
                             "asked is mixed; the released code draws the unmixed rows with replacement, so its '10 %' mixes about "
                             "41 % of a batch of 64. Use kd at temperature 1 for the released loss (no T²).")
    varies_teacher_inputs: ClassVar[str | None] = "mixup_kd mixes training images, so the teacher labels each mixed batch live"

    def __init__(self, mix_fraction: float = 0.1, beta_a: float = 1.0, std_temperature: bool = True) -> None:
        super().__init__()
        if isinstance(mix_fraction, bool) or not isinstance(mix_fraction, (int, float)) or not 0 <= mix_fraction <= 1:
            raise ValueError(f"mix_fraction must be a number in [0, 1] (the share of each batch that is mixed), got {mix_fraction!r}")
        if isinstance(beta_a, bool) or not isinstance(beta_a, (int, float)) or not math.isfinite(beta_a) or beta_a <= 0:
            raise ValueError(f"beta_a must be a finite number > 0 (λ ~ Beta(beta_a, beta_a)), got {beta_a!r}")
        if not isinstance(std_temperature, bool):
            raise ValueError(f"std_temperature must be true or false, got {std_temperature!r}")  # noqa: TRY004 - the config check reports ValueErrors
        self.mix_fraction = float(mix_fraction)
        self.beta_a = float(beta_a)
        self.std_temperature = std_temperature
        self.num_classes = 0
        self._logged: dict[str, torch.Tensor | float] = {}

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        from kd_core.losses import LOSSES

        teacher_fields = {"logits", "embedding", "stages", "class_means"}
        if not any(term.loss in LOSSES and LOSSES[term.loss].needs & teacher_fields and term.weight > 0 for term in config.recipe):
            return [("recipe", "mixup_kd distils on mixed images: add a distillation term, e.g. {loss: kd, weight: 0.9, params: {temperature: 1}}")]
        return []

    def build(self, context: MethodContext) -> None:
        self.num_classes = context.num_classes

    def mixing(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which rows are mixed, their partners and their λ (CPU tensors), all drawn from ``generator``."""
        k = 0 if batch_size < 2 else min(batch_size, int(batch_size * self.mix_fraction + float(torch.rand((), generator=generator))))
        rows = torch.randperm(batch_size, generator=generator)[:k]
        cycle = torch.randperm(batch_size, generator=generator)
        partner = torch.empty(batch_size, dtype=torch.long)
        partner[cycle] = cycle.roll(-1)  # the next row on a random cycle: a permutation without fixed points
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        lam = torch.from_numpy(np.random.default_rng(seed).beta(self.beta_a, self.beta_a, size=k)).float()
        return rows, partner[rows], lam

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        rows, partners, lam = self.mixing(len(batch.y), generator)
        device = batch.x.device
        rows, partners, lam = rows.to(device), partners.to(device), lam.to(device)
        x = batch.x.clone()
        shape = (-1,) + (1,) * (x.dim() - 1)
        x[rows] = (lam.view(shape) * batch.x[rows] + (1 - lam.view(shape)) * batch.x[partners]).to(x.dtype)
        one_hot = F.one_hot(batch.y, self.num_classes).float()
        soft = one_hot.clone()
        soft[rows] = lam[:, None] * one_hot[rows] + (1 - lam[:, None]) * one_hot[partners]
        y = batch.y.clone()
        y[rows] = torch.where(lam >= 0.5, batch.y[rows], batch.y[partners])
        self._logged = {"mixup_mixed_fraction": len(rows) / max(len(batch.y), 1)}
        return Batch(x, y, batch.idx, soft)

    def distill_inputs(self, inputs: LossInputs, student: StudentOutputs) -> LossInputs:
        if not self.std_temperature or inputs.teacher_logits is None:
            return inputs
        sigma_s, sigma_t = per_sample_temperature(inputs.student_logits), per_sample_temperature(inputs.teacher_logits)
        self._logged.update({"mixup_std_student": sigma_s.detach().mean(), "mixup_std_teacher": sigma_t.detach().mean()})
        return LossInputs(**{**inputs.__dict__, "student_logits": inputs.student_logits / sigma_s, "teacher_logits": inputs.teacher_logits / sigma_t})

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        return dict(self._logged)
