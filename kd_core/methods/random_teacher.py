"""Random-teacher self-distillation: Sarnthein, Bachmann, Anagnostidis, Hofmann, "Random Teachers are Good
Teachers", ICML 2023 (arXiv 2302.12091); released code safelix/dinopl (``dinopl/core.py``,
``dinopl/modules/l2bottleneck.py``, ``dinopl/probing.py``, ``configuration.py``,
``configs/cifar10_distillation_v2.json``).

DINO-style distillation without labels and without a trained teacher: the teacher is a randomly
initialised network of the student's own architecture, frozen for the whole run (parameters and batch-norm
statistics; it runs in eval mode, so its BN uses its initial statistics, dinopl's ``t_eval: true``). Both
networks carry a projection head on their penultimate embedding:

    MLP (Linear + GELU per hidden width) -> Linear (with bias) to the bottleneck -> L2-normalise
    -> Linear (no bias) to ``out_dim`` outputs

initialised as dinopl does (truncated normal, std 0.02; biases 0). The teacher's head is random and frozen
too. The student minimises ``CE = mean_b −Σ_k softmax((h_t − c)/τ_t)_k · log_softmax(h_s/τ_s)_k`` on one
view per image (dinopl's ``loss: CE``, ``loss_pairing: same``, one 1.0-scale crop). Defaults follow the
reference configuration ``cifar10_distillation_v2.json``: heads [2048, 2048] → 256 → 65536, both
temperatures 1, no centering; it trains with AdamW, lr 1e-3, no weight decay, batch 256 (set those in the
config's ``student`` section). The student starts as an exact copy of the teacher (dinopl's default
``s_init: teacher``; the paper's finding is that starting close to the teacher is what makes the student
learn features); ``neighborhood`` starts at ``θ_t + ε·θ_random`` and ``random`` from the student's own
independent initialisation, as dinopl's options of the same names.

Evaluation is the paper's: after every epoch a k-NN classifier and a linear probe are fitted on the
student's embeddings of the training split and scored on the validation split (``val/knn_top1``,
``val/probe_top1``; :mod:`kd_core.methods.probes`). **The student's prediction at evaluation is that linear
probe on its embedding**, so the run's student accuracy (``val/top1`` and the test accuracy in the summary)
is the probe's. The student's own classifier takes no part in training; after every epoch the probe is
written into it (an exact affine fold of the standardisation), so the saved student checkpoint and the
Analysis page predict what the run reports. The random teacher gets the same k-NN and
probe once, for comparison (``val/teacher_probe_top1`` every epoch, the ``teacher`` phase's
``val/probe_top1``, and ``teacher_probe_acc``/``teacher_knn_acc`` on the test split in the summary).
The probe trains for ``probe_epochs`` epochs (10 in the released code, about 2,000 AdamW steps on
CIFAR-10's 50,000 images); on a small training set 10 epochs are a few dozen steps and the probe underfits
badly, so raise it there (the shipped mnist5k config uses 100 epochs, about 1,800 steps).

Differences from the released code:

* dinopl's ``L2Bottleneck`` is configured to weight-normalise the last layer (``-/lb/fn/wn/l/-``), but its
  ``Linear.forward`` ignores the normalised weight it is handed, so the released code computes an
  ordinary linear layer there. ``weight_norm: false`` (the default) reproduces what the code computes;
  ``true`` normalises each output's weight vector to unit length, as the configuration string intends.
* Only the teacher can be centred (``teacher_centering``, DINO's EMA of the teacher's batch-mean
  projection with ``center_momentum``); the reference configuration centres neither network.
* The k-NN and probe fit on the standardised embeddings (dinopl logs raw and standardised); the probe's
  initialisation and batch order are seeded from the run's seed and epoch (dinopl draws them afresh).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import LossInputs
from kd_core.methods.base import Method, MethodContext, StudentOutputs, register_method
from kd_core.methods.probes import Standardizer, accuracy, fit_linear_probe, knn_predict
from kd_core.models import feature_spec

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision

STUDENT_INITS = ("teacher", "neighborhood", "random")
NOT_COMPUTED = -1.0
TEACHER_PROBE_SEED = 1_000_002  # the teacher's probe is seeded apart from the student's per-epoch ones (seed·1000003 + epoch)


class ProjectionHead(nn.Module):
    """dinopl's ``DINOHead`` with its default L2 bottleneck: MLP, bottleneck, L2-normalise, last linear layer."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], bottleneck_dim: int, out_dim: int, weight_norm: bool = False) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.bottleneck = nn.Linear(dims[-1], bottleneck_dim)
        self.last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.weight_norm = weight_norm
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(self.bottleneck(self.mlp(x)), dim=-1)
        weight = self.last.weight
        if self.weight_norm:
            weight = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return F.linear(h, weight)


def freeze_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer of the same name: frozen, saved, never optimised."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, param.detach().clone())
    return module


def fold_into_classifier(model: nn.Module, scaler: Standardizer, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Write the probe ``W·(e − μ)/σ + b`` into the model's own linear classifier (``W/σ``, ``b − (W/σ)·μ``).

    The classifier takes no part in the label-free training loss, so this changes nothing the student learns,
    but the saved student (and every view that runs it on its own, such as the Analysis page) then predicts
    what the run reports. False when the classifier is not a linear layer of the probe's shape.
    """
    classifier = model.get_submodule(feature_spec(model).classifier)
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != weight.shape or classifier.bias is None:
        return False
    with torch.no_grad():
        folded = weight / scaler.std
        classifier.weight.copy_(folded)
        classifier.bias.copy_(bias - folded @ scaler.mean)
    return True


def dino_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``mean_b −Σ_k softmax(teacher)_k · log_softmax(student)_k`` (dinopl's ``multicrop_loss_clf`` for one crop pair)."""
    return -(F.softmax(teacher_logits, -1) * F.log_softmax(student_logits, -1)).sum(-1).mean()


def _check(ok: bool, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {message}, got {value!r}")


@register_method
class RandomTeacher(Method):
    name = "random_teacher"
    summary: ClassVar[str] = ("Self-distillation without labels from a frozen, randomly initialised copy of the student's architecture "
                              "(DINO-style heads); the student starts as the teacher and is scored by a k-NN and a linear probe on its embedding.")
    paper: ClassVar[str] = 'Sarnthein, Bachmann, Anagnostidis, Hofmann, "Random Teachers are Good Teachers", ICML 2023'
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2302.12091"
    caveat: ClassVar[str] = ("The student's accuracy is a linear probe on its embedding, fitted on the training split after every epoch "
                             "(the baseline is a supervised CE student, so the 'KD gain' is probe minus supervised). No labels reach the "
                             "training loss. probe_epochs (10, as released) suits CIFAR-sized sets; raise it for small ones.")
    student_needs: ClassVar[frozenset[str]] = frozenset(["embedding"])
    teacher_needs: ClassVar[frozenset[str]] = frozenset(["embedding"])
    has_own_loss: ClassVar[bool] = True

    center: torch.Tensor
    probe_weight: torch.Tensor
    probe_bias: torch.Tensor
    probe_mean: torch.Tensor
    probe_std: torch.Tensor
    teacher_scores: torch.Tensor

    def __init__(self, hidden_dims: Sequence[int] = (2048, 2048), bottleneck_dim: int = 256, out_dim: int = 65536,
                 weight_norm: bool = False, teacher_temperature: float = 1.0, student_temperature: float = 1.0,
                 teacher_centering: bool = False, center_momentum: float = 0.9,
                 student_init: str = "teacher", student_init_eps: float = 0.0,
                 knn_k: int = 20, probe_epochs: int = 10, probe_standardize: bool = True) -> None:
        super().__init__()
        self.hidden_dims = list(hidden_dims)
        _check(all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.hidden_dims), "hidden_dims",
               "must be a list of widths >= 1 (empty for no hidden layer)", self.hidden_dims)
        for name, value in (("bottleneck_dim", bottleneck_dim), ("out_dim", out_dim), ("knn_k", knn_k), ("probe_epochs", probe_epochs)):
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "must be a whole number >= 1", value)
        for name, value in (("teacher_temperature", teacher_temperature), ("student_temperature", student_temperature)):
            _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, "must be > 0", value)
        _check(isinstance(center_momentum, (int, float)) and 0 <= center_momentum < 1, "center_momentum", "must be in [0, 1)", center_momentum)
        _check(student_init in STUDENT_INITS, "student_init", f"must be one of {', '.join(STUDENT_INITS)}", student_init)
        _check(isinstance(student_init_eps, (int, float)) and math.isfinite(student_init_eps) and student_init_eps >= 0,
               "student_init_eps", "must be >= 0", student_init_eps)
        if student_init == "neighborhood":
            _check(student_init_eps > 0, "student_init_eps", "must be > 0 with student_init: neighborhood (0 would be an exact copy: "
                   "use student_init: teacher)", student_init_eps)
        elif student_init_eps != 0:
            raise ValueError(f"student_init_eps is used only with student_init: neighborhood (student_init is {student_init!r}); "
                             f"set it to 0 or use student_init: neighborhood")
        self.bottleneck_dim, self.out_dim, self.weight_norm = bottleneck_dim, out_dim, bool(weight_norm)
        self.teacher_temperature, self.student_temperature = float(teacher_temperature), float(student_temperature)
        self.teacher_centering, self.center_momentum = bool(teacher_centering), float(center_momentum)
        self.student_init, self.student_init_eps = student_init, float(student_init_eps)
        self.knn_k, self.probe_epochs, self.probe_standardize = knn_k, probe_epochs, bool(probe_standardize)
        self.head: ProjectionHead | None = None
        self.teacher_head: ProjectionHead | None = None
        self._kl: torch.Tensor | None = None

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        from kd_core.losses import LOSSES

        errors: list[tuple[str, str]] = []
        if config.teacher.source != "random":
            errors.append(("teacher.source", (f"random_teacher learns from a randomly initialised teacher that is never trained: set "
                                              f"teacher.source: random (it is {config.teacher.source!r})")))
        if config.teacher.arch != config.student.arch:
            errors.append(("teacher.arch", (f"random_teacher's teacher has the student's architecture: set teacher.arch: "
                                            f"{config.student.arch} (it is {config.teacher.arch!r})")))
        for i, term in enumerate(config.recipe):
            if term.loss in LOSSES and "target" in LOSSES[term.loss].needs:
                errors.append((f"recipe[{i}].loss", (f"random_teacher learns without labels, but {term.loss!r} reads them: remove this "
                                                     f"term (the method brings its own loss, so the recipe may be empty)")))
        return errors

    def build(self, context: MethodContext) -> None:
        dim, classes = context.student.embedding_dim, context.num_classes
        if context.teacher.embedding_dim != dim:
            raise ValueError(f"random_teacher: teacher embedding ({context.teacher.embedding_dim}) and student embedding ({dim}) differ")
        self.teacher_head = freeze_as_buffers(ProjectionHead(dim, self.hidden_dims, self.bottleneck_dim, self.out_dim, self.weight_norm))
        self.head = ProjectionHead(dim, self.hidden_dims, self.bottleneck_dim, self.out_dim, self.weight_norm)
        self.register_buffer("center", torch.zeros(self.out_dim))
        self.register_buffer("probe_weight", torch.zeros(classes, dim))
        self.register_buffer("probe_bias", torch.zeros(classes))
        self.register_buffer("probe_mean", torch.zeros(dim))
        self.register_buffer("probe_std", torch.ones(dim))
        # the random teacher's k-NN and probe accuracies: val, then test (computed once)
        self.register_buffer("teacher_scores", torch.full((4,), NOT_COMPUTED, dtype=torch.float64))

    @torch.no_grad()
    def init_student(self, student: nn.Module, teacher: nn.Module) -> None:
        assert self.head is not None and self.teacher_head is not None
        pairs = [(student, dict(teacher.named_parameters()), dict(teacher.named_buffers())),
                 (self.head, dict(self.teacher_head.named_buffers()), {})]
        for module, teacher_params, teacher_buffers in pairs:
            for name, param in module.named_parameters():
                if self.student_init == "teacher":
                    param.copy_(teacher_params[name])
                elif self.student_init == "neighborhood":
                    param.copy_(teacher_params[name] + self.student_init_eps * param)
            if self.student_init != "random":
                for name, buffer in module.named_buffers():
                    buffer.copy_(teacher_buffers[name])

    def losses(self, inputs: LossInputs, student: StudentOutputs, epoch_progress: float) -> dict[str, torch.Tensor]:
        assert self.head is not None and self.teacher_head is not None
        assert inputs.teacher_embedding is not None and student.embedding is not None
        with torch.no_grad():
            projection = self.teacher_head(inputs.teacher_embedding.flatten(1).float())
            teacher_logits = (projection - self.center) / self.teacher_temperature
            if self.teacher_centering:  # updated after it is applied, as dinopl does
                self.center.mul_(self.center_momentum).add_(projection.mean(0), alpha=1 - self.center_momentum)
        student_logits = self.head(student.embedding.flatten(1)) / self.student_temperature
        ce = dino_ce(student_logits, teacher_logits)
        with torch.no_grad():  # KL = CE − H(teacher), summed term by term: CE and H are close, their difference is not
            log_p_t = F.log_softmax(teacher_logits, -1)
            self._kl = (log_p_t.exp() * (log_p_t - F.log_softmax(student_logits, -1))).sum(-1).mean()
        return {"ce": ce}

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        return {} if self._kl is None else {"random_teacher_kl": self._kl}

    # ---- evaluation: k-NN and linear probe on the embedding

    def student_logits(self, logits: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """The linear probe fitted at the latest epoch end, on the student's (standardised) embedding."""
        assert embedding is not None
        x = (embedding.flatten(1).float() - self.probe_mean) / self.probe_std
        return F.linear(x, self.probe_weight, self.probe_bias)

    def probe_scores(self, train_emb: torch.Tensor, train_y: torch.Tensor, held_out: list[tuple[torch.Tensor, torch.Tensor]],
                     num_classes: int, seed: int) -> tuple[Standardizer, torch.Tensor, torch.Tensor, list[tuple[float, float]]]:
        """Fit the standardiser, k-NN and probe on ``train_emb``; (k-NN %, probe %) on each held-out (embedding, labels)."""
        scaler = Standardizer.fit(train_emb) if self.probe_standardize else Standardizer.identity(train_emb.shape[1], train_emb.device)
        train = scaler(train_emb)
        weight, bias = fit_linear_probe(train, train_y, num_classes, epochs=self.probe_epochs, generator=torch.Generator().manual_seed(seed))
        scores = []
        for emb, y in held_out:
            x = scaler(emb)
            scores.append((accuracy(knn_predict(train, train_y, x, self.knn_k, num_classes), y), accuracy(F.linear(x, weight, bias).argmax(1), y)))
        return scaler, weight, bias, scores

    @torch.no_grad()
    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, Any]:
        from kd_core.engine.evaluation import outputs_with_embedding

        exp = run.experiment
        data, seed = exp.data, exp.config.seed
        split, eval_x, eval_y = data.eval_split()
        train_emb = outputs_with_embedding(run.model, data.train_x, precision)[1]
        eval_emb = outputs_with_embedding(run.model, eval_x, precision)[1]
        scaler, weight, bias, [(knn, probe)] = self.probe_scores(train_emb, data.train_y, [(eval_emb, eval_y)], data.num_classes,
                                                                 seed * 1_000_003 + run.progress.epoch)
        self.probe_mean.copy_(scaler.mean)
        self.probe_std.copy_(scaler.std)
        self.probe_weight.copy_(weight)
        self.probe_bias.copy_(bias)
        fold_into_classifier(run.model, scaler, weight, bias)
        if float(self.teacher_scores[0]) == NOT_COMPUTED and run.teacher is not None:
            self.score_teacher(run, precision)
        t_knn, t_probe = float(self.teacher_scores[0]), float(self.teacher_scores[1])
        return {f"{split}/knn_top1": knn, f"{split}/probe_top1": probe, f"{split}/teacher_knn_top1": t_knn, f"{split}/teacher_probe_top1": t_probe}

    @torch.no_grad()
    def score_teacher(self, run: PhaseRun, precision: Precision) -> None:
        """The random teacher's k-NN and probe accuracies (held-out and test), once: logged and put in the summary."""
        from kd_core.engine.evaluation import outputs_with_embedding

        exp = run.experiment
        data = exp.data
        assert run.teacher is not None
        split, eval_x, eval_y = data.eval_split()
        embed = [outputs_with_embedding(run.teacher, x, precision)[1] for x in (data.train_x, eval_x, data.test_x)]
        _, _, _, [(knn, probe), (test_knn, test_probe)] = self.probe_scores(embed[0], data.train_y, [(embed[1], eval_y), (embed[2], data.test_y)],
                                                                            data.num_classes, exp.config.seed * 1_000_003 + TEACHER_PROBE_SEED)
        self.teacher_scores.copy_(torch.tensor([knn, probe, test_knn, test_probe], dtype=torch.float64))
        exp.logger.log("teacher", 0, 0, {f"{split}/knn_top1": knn, f"{split}/probe_top1": probe})
        exp.sink.update_summary({"teacher_probe_acc": round(test_probe, 2), "teacher_knn_acc": round(test_knn, 2)})
