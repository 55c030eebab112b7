"""One optimizer step of a phase: forward passes in the configured precision, loss terms in float32.

Nothing here waits for the device: term values stay tensors until the metrics are flushed (about once a
second), where a non-finite value is caught and named (:mod:`kd_core.engine.guard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kd_core.config import LossTerm
from kd_core.engine.precision import Precision
from kd_core.engine.teacher import TeacherOutputs
from kd_core.features import FeatureTap
from kd_core.losses import DistillLoss, LossInputs


def term_keys(recipe: list[LossTerm]) -> list[str]:
    """Log names of the recipe's terms: the loss name, suffixed with its index when it appears twice."""
    names = [term.loss for term in recipe]
    return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]


def term_weight(term: LossTerm, epoch_progress: float) -> float:
    """The term's weight, ramped up linearly over its first ``warmup_epochs`` epochs."""
    if term.warmup_epochs <= 0:
        return term.weight
    return term.weight * min(1.0, (epoch_progress + 1) / term.warmup_epochs)


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@dataclass
class StepOutput:
    inputs: LossInputs  # what the loss terms saw (float32)
    terms: dict[str, torch.Tensor]  # each term's unweighted value, by log name
    total: torch.Tensor  # the weighted sum that was back-propagated


class TrainStep:
    """Forward, loss terms, backward and optimizer update for one batch."""

    def __init__(self, model: nn.Module, losses: list[DistillLoss], recipe: list[LossTerm], precision: Precision,
                 optimizer: torch.optim.Optimizer, teacher: TeacherOutputs | None) -> None:
        self.model = model
        self.losses = losses
        self.recipe = recipe
        self.keys = term_keys(recipe)
        self.precision = precision
        self.optimizer = optimizer
        self.scaler = precision.grad_scaler()
        self.teacher = teacher
        self.needs: set[str] = set().union(*(loss.needs for loss in losses))
        self.tap = FeatureTap(model, stages="stages" in self.needs, embedding="embedding" in self.needs)
        # terms whose schedule follows their own value (TAID) get it after every step
        self.adaptive = [(key, loss) for key, loss in zip(self.keys, losses) if type(loss).after_step is not DistillLoss.after_step]

    def compute_terms(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *, epoch: int, step: int, total_steps: int) -> tuple[LossInputs, dict[str, torch.Tensor]]:
        """Forward passes under autocast; each loss term outside it, on float32 inputs."""
        with self.precision.autocast():
            self.tap.clear()
            logits = self.model(x)
            if self.teacher is not None:
                self.teacher.forward(x)
        inputs = LossInputs(student_logits=logits.float(), target=y, index=idx, epoch=epoch, step=step, total_steps=total_steps)
        if "embedding" in self.needs:
            inputs.student_embedding = _float(self.tap.embedding)
        if "stages" in self.needs:
            inputs.student_stages = [s.float() for s in self.tap.stages]
        if self.teacher is not None:
            self.teacher.fill(inputs, idx)
        return inputs, {key: loss(inputs).float() for key, loss in zip(self.keys, self.losses)}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *, epoch: int, epoch_progress: float, step: int, total_steps: int) -> StepOutput:
        inputs, terms = self.compute_terms(x, y, idx, epoch=epoch, step=step, total_steps=total_steps)
        total = sum(term_weight(term, epoch_progress) * terms[key] for key, term in zip(self.keys, self.recipe))
        assert isinstance(total, torch.Tensor)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            total.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        for key, loss in self.adaptive:
            loss.after_step(terms[key].detach())
        return StepOutput(inputs, terms, total)

    def logged_values(self, out: StepOutput) -> dict[str, torch.Tensor | float]:
        values: dict[str, torch.Tensor | float] = {"loss/total": out.total.detach()}
        values.update({f"loss/{k}": v.detach() for k, v in out.terms.items()})
        for _, loss in self.adaptive:
            values.update(loss.logged_values())
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        return values

    def close(self) -> None:
        self.tap.remove()
