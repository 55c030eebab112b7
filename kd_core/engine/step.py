"""One optimizer step of a phase: forward passes in the configured precision, loss terms in float32.

Nothing here waits for the device: term values stay tensors until the metrics are flushed (about once a
second), where a non-finite value is caught and named (:mod:`kd_core.engine.guard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kd_core.config import LossTerm
from kd_core.engine.precision import Precision
from kd_core.engine.teacher import TeacherOutputs
from kd_core.features import FeatureTap
from kd_core.losses import DistillLoss, LossInputs
from kd_core.methods.base import Batch, Method, StudentOutputs


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
    """Forward, loss terms (the recipe's and a method's), backward and optimizer update for one batch."""

    def __init__(self, model: nn.Module, losses: list[DistillLoss], recipe: list[LossTerm], precision: Precision,
                 optimizer: torch.optim.Optimizer, teacher: TeacherOutputs | None, method: Method | None = None) -> None:
        self.model = model
        self.losses = losses
        self.recipe = recipe
        self.keys = term_keys(recipe)
        self.precision = precision
        self.optimizer = optimizer
        self.scaler = precision.grad_scaler()
        self.teacher = teacher
        self.method = method
        self.needs: set[str] = set().union(*(loss.needs for loss in losses), method.student_needs if method else ())
        self.tap = FeatureTap(model, stages="stages" in self.needs, embedding="embedding" in self.needs)
        # terms whose schedule follows their own value (TAID) get it after every step
        self.adaptive = [(key, loss) for key, loss in zip(self.keys, losses) if type(loss).after_step is not DistillLoss.after_step]
        # several devices: averages the gradients the DDP-wrapped model does not cover (loss terms', a method's)
        self.after_backward: Callable[[], None] | None = None

    def compute_terms(self, batch: Batch, *, epoch: int, step: int, total_steps: int, epoch_progress: float = 0.0) -> tuple[LossInputs, dict[str, torch.Tensor]]:
        """Forward passes under autocast; each loss term outside it, on float32 inputs.

        The recipe's terms come first (by :func:`term_keys`), then the method's own, as ``<method>.<term>``.
        """
        with self.precision.autocast():
            self.tap.clear()
            logits = self.model(batch.x)
            if self.teacher is not None:
                self.teacher.forward(batch.x)
        student = StudentOutputs(logits.float(), _float(self.tap.embedding), [s.float() for s in self.tap.stages])
        inputs = LossInputs(student_logits=student.logits, target=batch.y, index=batch.idx, soft_target=batch.soft_target,
                            epoch=epoch, step=step, total_steps=total_steps)
        if "embedding" in self.needs:
            inputs.student_embedding = student.embedding
        if "stages" in self.needs:
            inputs.student_stages = student.stages
        if self.teacher is not None:
            self.teacher.fill(inputs, batch.idx)
        distill = inputs if self.method is None else self.method.distill_inputs(inputs, student)
        terms = {key: loss(distill if loss.reads_teacher else inputs).float() for key, loss in zip(self.keys, self.losses)}
        if self.method is not None:
            own = self.method.losses(inputs, student, epoch_progress)
            terms.update({f"{self.method.name}.{name}": value.float() for name, value in own.items()})
        return inputs, terms

    def __call__(self, batch: Batch, *, epoch: int, epoch_progress: float, step: int, total_steps: int) -> StepOutput:
        inputs, terms = self.compute_terms(batch, epoch=epoch, step=step, total_steps=total_steps, epoch_progress=epoch_progress)
        total = sum(term_weight(term, epoch_progress) * terms[key] for key, term in zip(self.keys, self.recipe))
        if self.method is not None:  # a method's terms carry their own weights
            total = total + sum(value for key, value in terms.items() if key.startswith(f"{self.method.name}."))
        assert isinstance(total, torch.Tensor)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            total.backward()
            if self.after_backward is not None:
                self.after_backward()
            self.optimizer.step()
        else:
            self.scaler.scale(total).backward()
            if self.after_backward is not None:
                self.after_backward()
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
        if self.method is not None:
            values.update(self.method.logged_values())
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        return values

    def close(self) -> None:
        self.tap.remove()
