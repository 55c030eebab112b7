"""MEAL V2: distillation from an ensemble of teachers (Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50
to 80%+ Top-1 Accuracy on ImageNet without Tricks", arXiv 2009.08453, 2020; code szq0214/MEAL-V2).

The soft target is the mean of the teachers' softmaxes at T = 1 (``extensions/teacher_wrapper.py`` of the
released code, ``combine=True``). The student learns it with the paper's similarity loss, a cross-entropy
against that mean with no hard labels and no T² (``extensions/kd_loss.py``). Here the recipe carries that
loss: :class:`TeacherEnsemble` hands the recipe's logit terms ``log p̄``, so ``{loss: kd, params:
{temperature: 1}}`` sees exactly ``p̄`` as the teacher's probabilities and equals the similarity loss minus
the entropy of ``p̄`` -- a constant of the student, hence the same gradients.

The optional discriminator follows the released ``train.py``, ``loss.py`` and ``models/discriminator.py``:
a three-layer MLP on the logits (1×1 convolutions there, ``C → C/K → C/K² → 2`` with K = 8 and a ReLU after
*every* layer, the last included) sees the student's logits and the teachers' mean *logits* stacked along
the batch, with targets [1, 0] for student rows and [0, 1] for teacher rows, under ``BCEWithLogitsLoss``;
its loss is added to the student's and one SGD optimizer minimises the sum over the student and the
discriminator. There is no gradient reversal, so the student is not trained adversarially: both minimise
the same loss. This is replicated as released (on by default, as ``train.py`` always trains it), and the
form says so. The released optimizer gives the discriminator its own ``--d_lr`` but the learning-rate
regime then sets every parameter group to the student's rate each epoch, so it effectively learns at the
student's rate -- as here, where it joins the student's optimizer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import LossInputs
from kd_core.methods.base import (
    Batch,
    Method,
    MethodContext,
    StudentOutputs,
    register_method,
)
from kd_core.models import FeatureSpec

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision

# an ensemble has no penultimate layer of its own; the config checks refuse feature terms with an ensemble
NO_CLASSIFIER = "ensemble_has_no_classifier"


def ensemble_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log mean_k softmax(z_k)`` over the teachers' logits ``[K, B, C]``, in float32, computed in log space.

    ``logsumexp_k log_softmax(z_k) − log K`` never takes the log of an underflowed probability, so it stays
    finite where ``mean(softmax).log()`` would give −inf (and a NaN inside a KL term).
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])


class TeacherEnsemble(nn.Module):
    """Frozen teachers averaged in probability space; ``forward`` returns ``log p̄``, ``p̄ = mean_k softmax(z_k)``.

    Why that output is exact for the recipe's terms at T = 1: ``softmax(log p̄) = p̄ / Σ_c p̄_c = p̄``, since
    ``p̄`` already sums to one. So ``kd`` at temperature 1 compares the student with exactly the mean of the
    teachers' softmaxes, as MEAL V2 does. At another temperature a term sees ``softmax(log p̄ / T) ∝ p̄^(1/T)``,
    the mean sharpened or flattened -- not the mean of the teachers' tempered softmaxes.

    The module is always in eval mode (``train(True)`` is ignored) so evaluating it never puts a frozen
    teacher's batch norm back into training mode. It has no stages or embedding: its ``feature_spec`` is
    empty, so the engine's feature taps work on it for logits only. The teachers' mean *logits* of the
    latest forward are kept for the discriminator.
    """

    def __init__(self, teachers: list[nn.Module]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.feature_spec = FeatureSpec(stages=(), classifier=NO_CLASSIFIER)
        self.last_input: torch.Tensor | None = None
        self.last_mean_logits: torch.Tensor | None = None
        super().train(False)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([teacher(x).float() for teacher in self.teachers])  # [K, B, C]
        self.last_input, self.last_mean_logits = x, logits.mean(0)
        return ensemble_log_probs(logits)


class LogitDiscriminator(nn.Module):
    """The released discriminator on class scores: ``C → h1 → h2 → 2`` with a ReLU after every layer.

    A 1×1 convolution on a 1×1 map (the released form) is a linear layer with the same default
    initialisation. Widths are ``C // K`` and ``C // K²`` as released (125 and 15 for 1,000 classes with
    K = 8), with floors of 16 and 4 so that a 10-class problem keeps a working network (10 // 8 // 8 = 0).
    """

    def __init__(self, num_classes: int, reduction: int = 8) -> None:
        super().__init__()
        h1 = max(num_classes // reduction, 16)
        h2 = max(h1 // reduction, 4)
        self.layers = nn.Sequential(nn.Linear(num_classes, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2), nn.ReLU())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.layers(logits)


def discriminator_targets(batch_size: int, device: torch.device) -> torch.Tensor:
    """[1, 0] for each of the ``batch_size`` student rows, then [0, 1] for each teacher row (as released)."""
    student = torch.tensor([1.0, 0.0], device=device).expand(batch_size, 2)
    teacher = torch.tensor([0.0, 1.0], device=device).expand(batch_size, 2)
    return torch.cat([student, teacher])


@register_method
class MEALV2(Method):
    name = "meal_v2"
    summary: ClassVar[str] = ("An ensemble of teachers: the student learns the mean of their softmax outputs (no hard labels), "
                              "with an optional discriminator on the logits.")
    paper: ClassVar[str] = ('Shen, Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without '
                            'Tricks", arXiv 2009.08453 (2020)')
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2009.08453"
    caveat: ClassVar[str] = ("No gradient reversal: as in the released code, the discriminator and the student minimise the same "
                             "loss with one optimizer, so the student is not trained adversarially (if anything it is pushed to "
                             "make its logits easier to tell from the teachers'). The student starts from scratch, not from "
                             "pretrained weights as in the paper.")
    takes_teachers: ClassVar[bool] = True

    def __init__(self, discriminator: bool = True, discriminator_weight: float = 1.0, discriminator_reduction: int = 8) -> None:
        super().__init__()
        if not isinstance(discriminator, bool):
            raise ValueError(f"discriminator must be true or false, got {discriminator!r}")  # noqa: TRY004 - the config check reports ValueErrors
        if isinstance(discriminator_weight, bool) or not isinstance(discriminator_weight, (int, float)) \
                or not math.isfinite(discriminator_weight) or discriminator_weight < 0:
            raise ValueError(f"discriminator_weight must be a finite number >= 0, got {discriminator_weight!r}")
        if isinstance(discriminator_reduction, float) and discriminator_reduction.is_integer():
            discriminator_reduction = int(discriminator_reduction)  # 8.0 from a form or JSON means 8
        if isinstance(discriminator_reduction, bool) or not isinstance(discriminator_reduction, int) or discriminator_reduction < 1:
            raise ValueError(f"discriminator_reduction must be a whole number >= 1, got {discriminator_reduction!r}")
        self.use_discriminator = discriminator
        self.discriminator_weight = float(discriminator_weight)
        self.discriminator_reduction = discriminator_reduction
        self.discriminator: LogitDiscriminator | None = None
        # set by distill_teacher; kept out of the module tree so the teachers never join the optimizer or checkpoint
        object.__setattr__(self, "_ensemble", None)
        self._batch: Batch | None = None
        self.num_train = self.num_classes = 0
        # the teachers' mean logits per training sample, filled on first use when the engine caches teacher
        # outputs (derived data: not in the checkpoint, rebuilt after a resume)
        self._memo: torch.Tensor | None = None
        self._known: torch.Tensor | None = None
        self._memo_complete = False
        self._disc_acc: torch.Tensor | None = None
        self._epoch_values: dict[str, float] | None = None

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        from kd_core.losses import LOSSES

        errors: list[tuple[str, str]] = []
        if not config.teachers:
            errors.append(("teachers", ("meal_v2 averages an ensemble: add at least one further teacher, "
                                        "e.g. teachers: [{arch: cnn_small, source: train, epochs: 10}]")))
        if not any(term.loss in LOSSES and "logits" in LOSSES[term.loss].needs and term.weight > 0 for term in config.recipe):
            errors.append(("recipe", ("meal_v2's soft target (the teachers' mean softmax) reaches the student through a logit "
                                      "distillation term: add {loss: kd, weight: 1, params: {temperature: 1}}")))
        return errors

    @property
    def ensemble(self) -> TeacherEnsemble | None:
        return self._ensemble  # type: ignore[no-any-return]

    def build(self, context: MethodContext) -> None:
        self.num_train, self.num_classes = context.num_train, context.num_classes
        if self.use_discriminator:
            self.discriminator = LogitDiscriminator(context.num_classes, self.discriminator_reduction)

    def distill_teacher(self, teachers: list[nn.Module]) -> nn.Module:
        ensemble = TeacherEnsemble(teachers)
        object.__setattr__(self, "_ensemble", ensemble)
        return ensemble

    def soft_label_store_blocker(self) -> str | None:
        if self.use_discriminator:
            return "meal_v2's discriminator reads the ensemble's live mean logits of each augmented batch"
        return None

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        self._batch = batch  # the discriminator needs the teachers' mean logits of this batch
        return batch

    def teacher_mean_logits(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The teachers' mean logits on the batch ``x`` (dataset indices ``idx``).

        When the teacher runs live, the ensemble has just seen ``x``: its mean logits are reused. Otherwise the
        engine serves cached teacher outputs, which it does only when a sample's input never changes between
        epochs; so the mean logits are computed once per sample, on first use, and kept by dataset index.
        """
        ensemble = self.ensemble
        assert ensemble is not None, "distill_teacher was not called"
        if ensemble.last_input is x and ensemble.last_mean_logits is not None:
            return ensemble.last_mean_logits.float()
        if self._memo is None or self._known is None:
            self._memo = torch.zeros(self.num_train, self.num_classes, device=x.device)
            self._known = torch.zeros(self.num_train, dtype=torch.bool, device=x.device)
        if not self._memo_complete:
            missing = ~self._known[idx]
            if bool(missing.any()):
                with torch.no_grad():
                    ensemble(x[missing])
                assert ensemble.last_mean_logits is not None
                self._memo[idx[missing]] = ensemble.last_mean_logits.float()
                self._known[idx[missing]] = True
                self._memo_complete = bool(self._known.all())
        return self._memo[idx]

    def losses(self, inputs: LossInputs, student: StudentOutputs, epoch_progress: float) -> dict[str, torch.Tensor]:
        if self.discriminator is None or self._batch is None:
            return {}
        teacher = self.teacher_mean_logits(self._batch.x, self._batch.idx).detach()
        out = self.discriminator(torch.cat([student.logits, teacher]))
        target = discriminator_targets(len(teacher), out.device)
        self._disc_acc = (out.argmax(1) == target.argmax(1)).float().mean().detach()
        return {"disc": self.discriminator_weight * F.binary_cross_entropy_with_logits(out, target)}

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        return {} if self._disc_acc is None else {"meal_disc_acc": self._disc_acc}

    @torch.no_grad()
    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, Any]:
        """Each teacher's and the ensemble's accuracy on the evaluation split (the teachers are frozen: computed once)."""
        from kd_core.engine.evaluation import predict
        from kd_core.engine.phases import teacher_name

        ensemble = self.ensemble
        if ensemble is None:
            return {}
        if self._epoch_values is None:
            def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
                return 100.0 * float((logits.argmax(1) == y).float().mean())

            values = {f"{run.split}/meal_{teacher_name(i)}_top1": top1(predict(t, run.eval_x, precision), run.eval_y)
                      for i, t in enumerate(ensemble.teachers)}
            values[f"{run.split}/meal_ensemble_top1"] = top1(predict(ensemble, run.eval_x, precision), run.eval_y)
            self._epoch_values = values
            data = run.experiment.data
            run.experiment.sink.update_summary({"teacher_ensemble_acc": top1(predict(ensemble, data.test_x, precision), data.test_y)})
        return dict(self._epoch_values)
