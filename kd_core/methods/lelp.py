"""LELP: Learning Embedding Linear Projections (Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher
Embeddings for Few-Class Distillation", arXiv 2409.20449, 2024; ICLR 2025 submission). No code was released.

With few classes the teacher's softmax says little (two numbers for a binary task). LELP reads more from the
teacher's penultimate embedding ``h`` and turns it into ``S`` pseudo-subclasses per class:

1. per class ``c``, the teacher embeddings of that class's training images are projected onto the **null
   space of the teacher's classifier weights** ``W`` (directions the logits already carry are left to the
   class probabilities), and PCA finds their top ``S`` directions;
2. a **random rotation** ``Q_c`` of those ``S`` directions equalises their variance in expectation, giving
   the directions ``v_{c,1..S}``;
3. the teacher's target for the ``S·C`` pseudo-subclasses is ``p_{c,s} = p_c · softmax_s(z_{c,s} / β)``,
   where ``p_c`` is the teacher's class probability (temperature τ) and ``z_{c,s}`` the projection of the
   sample's teacher embedding on ``v_{c,s}``: the subclass split never changes the class mass;
4. the student gets an ``S·C``-way linear head on its own embedding (a module of this method) trained with
   cross-entropy on those targets (the paper's experiments: no ground-truth term, α = 0); its class
   prediction is the sum of its subclass probabilities per class.

The paper's method text was not available here in full; steps 1-4 follow the abstract, the reviews of the
ICLR 2025 submission (OpenReview DKA7Hx7PSt), which quote the target formula, and these decisions of ours:

* ``z_{c,s} = v_{c,s}ᵀ (h − m_c) / σ_c``: centred on the class mean ``m_c`` (PCA is of centred data) and
  divided by ``σ_c``, the root of the mean variance of the kept directions, so ``β`` does not depend on the
  teacher's embedding scale. ``β`` is therefore in units of the class's own spread;
* one independent uniformly random rotation per class, drawn from a generator seeded by ``seed``;
* the subspaces are fitted once, before the student trains, on the training split (never validation or
  test), from un-augmented images and the frozen teacher in fp32; pseudo-subclass targets come from the
  teacher embedding of each training batch as the engine gives it (cached, or live when inputs vary);
* τ softens the teacher's class probabilities and the student's subclass logits alike, and the term is
  multiplied by τ² (Hinton's convention, as every temperature term here); the paper's default is not known
  to us, so τ = 1 (no softening);
* ``S = 5`` and ``β = 1`` (the paper's values are in an appendix not available here): 5 per class is the
  number of true sub-classes of our shipped binary task (even vs odd digits), β = 1 a soft split;
* ``alpha`` is the paper's α: the weight of a ground-truth cross-entropy on the summed class prediction,
  the LELP term getting ``1 − α``. A recipe ``ce`` term would train the student's original head, which
  LELP does not use for prediction, so the config check refuses it and points here;
* the student's own ``C``-way head is not part of LELP. So that the student checkpoint alone is still a
  classifier (export, the Analysis page), that head is fitted to the summed subclass prediction on
  *detached* embeddings (term ``own_head``): it gets no say in the backbone or the pseudo-subclass head,
  whose training is exactly the LELP term. The run's accuracy is always the exact sum of subclass
  probabilities.

Recipe terms that read the teacher (``kd``, feature terms) still work next to LELP: logit terms see the
class log-probabilities of the pseudo-subclass head.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import LossInputs
from kd_core.methods.base import Method, MethodContext, StudentOutputs, register_method
from kd_core.models import feature_spec

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision


# --------------------------------------------------------------------------- the subspaces (functional)


def null_space_basis(weight: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis ``[D, D − rank(W)]`` of ``{x : W x = 0}`` for classifier weights ``W [C, D]``."""
    w = weight.detach().double()
    _, s, vh = torch.linalg.svd(w, full_matrices=True)
    rank = int((s > rtol * s.max()).sum()) if s.numel() else 0
    return vh[rank:].T.contiguous()


def random_rotation(size: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random orthogonal ``[size, size]`` matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(size, dtype=torch.float64))[None, :]


@dataclass
class Subspaces:
    """Per class: the centre ``[C, D]``, the ``S`` directions ``[C, D, S]`` (orthonormal columns) and the scale ``[C]``."""

    centers: torch.Tensor
    directions: torch.Tensor
    scales: torch.Tensor

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """``z [B, C, S]``: each sample's standardised coordinates along every class's directions."""
        h = embedding.float()
        z = torch.einsum("bd,cds->bcs", h, self.directions) - torch.einsum("cd,cds->cs", self.centers, self.directions)[None]
        return z / self.scales[None, :, None]


def fit_subspaces(embeddings: torch.Tensor, labels: torch.Tensor, classifier_weight: torch.Tensor, num_classes: int, subclasses: int,
                  *, null_space: bool = True, rotation: bool = True, seed: int = 0) -> Subspaces:
    """Step 1-2 of LELP on teacher embeddings ``[N, D]`` of the training images with their labels ``[N]``."""
    h = embeddings.detach().double().cpu()
    y = labels.detach().cpu()
    dim = h.shape[1]
    basis = null_space_basis(classifier_weight.cpu()) if null_space else torch.eye(dim, dtype=torch.float64)
    if basis.shape[1] < subclasses:
        raise ValueError(f"lelp: {subclasses} subclasses per class need as many directions, but the teacher's embedding has only "
                         f"{basis.shape[1]} outside its classifier's row space; lower subclasses")
    generator = torch.Generator().manual_seed(seed)
    centers, directions, scales = [], [], []
    for c in range(num_classes):
        members = h[y == c]
        if len(members) < 2:
            raise ValueError(f"lelp: class {c} has {len(members)} training image(s); PCA needs at least 2")
        center = members.mean(0)
        coords = (members - center) @ basis  # coordinates in the null space of W
        eigvals, eigvecs = torch.linalg.eigh(coords.T @ coords / len(members))  # ascending
        top = eigvecs[:, -subclasses:].flip(1)  # [D', S], largest variance first
        top_var = eigvals[-subclasses:].clamp_min(0)
        if rotation:
            top = top @ random_rotation(subclasses, generator)
        centers.append(center)
        directions.append(basis @ top)
        scales.append(top_var.mean().sqrt().clamp_min(1e-12))
    return Subspaces(torch.stack(centers).float(), torch.stack(directions).float(), torch.stack(scales).float())


def pseudo_subclass_targets(teacher_logits: torch.Tensor, teacher_embedding: torch.Tensor, subspaces: Subspaces, beta: float,
                            temperature: float = 1.0) -> torch.Tensor:
    """Step 3: ``[B, C·S]`` probabilities ``p_c · softmax_s(z_{c,s}/β)`` (class-major: index ``c·S + s``)."""
    p_class = F.softmax(teacher_logits.float() / temperature, dim=1)  # [B, C]
    p_sub = F.softmax(subspaces.project(teacher_embedding) / beta, dim=2)  # [B, C, S]
    return (p_class[:, :, None] * p_sub).flatten(1)


def class_log_probs(subclass_logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, C]`` log of the summed subclass probabilities per class (the student's class prediction)."""
    log_p = F.log_softmax(subclass_logits.float(), dim=1)
    return log_p.view(log_p.shape[0], num_classes, -1).logsumexp(dim=2)


TEACHER_NEEDS = frozenset(["logits", "embedding", "stages", "class_means"])  # what makes a recipe term read the teacher


@functools.lru_cache(maxsize=64)
def _embedding_dim(arch: str, num_classes: int, in_channels: int, image_size: int) -> int:
    from kd_core.features import probe_shapes
    from kd_core.models import create_model

    return probe_shapes(create_model(arch, num_classes, in_channels, image_size), in_channels, image_size).embedding_dim


# --------------------------------------------------------------------------- the method


@register_method
class LELP(Method):
    name = "lelp"
    summary: ClassVar[str] = ("Few-class distillation: the teacher's embedding, projected on per-class PCA directions outside its "
                              "classifier's span, splits each class into pseudo-subclasses; the student learns them with an extra "
                              "head and predicts a class by summing its subclass probabilities.")
    paper: ClassVar[str] = ('Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher Embeddings for Few-Class Distillation", '
                            "arXiv 2409.20449 (2024)")
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2409.20449"
    caveat: ClassVar[str] = ("No official code: projections are centred on the class mean and scaled by the class's spread, one random "
                             "rotation per class; S and β defaults are ours (the paper's are not public here).")
    student_needs: ClassVar[frozenset[str]] = frozenset(["embedding"])
    teacher_needs: ClassVar[frozenset[str]] = frozenset(["logits", "embedding"])
    has_own_loss: ClassVar[bool] = True

    centers: torch.Tensor
    directions: torch.Tensor
    scales: torch.Tensor

    def __init__(self, subclasses: int = 5, beta: float = 1.0, temperature: float = 1.0, alpha: float = 0.0,
                 null_space: bool = True, rotation: bool = True, seed: int = 0) -> None:
        super().__init__()
        if isinstance(subclasses, bool) or not isinstance(subclasses, int) or subclasses < 1:
            raise ValueError(f"subclasses must be a whole number >= 1, got {subclasses!r}")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0 or not math.isfinite(beta):
            raise ValueError(f"beta (the subclass temperature) must be > 0, got {beta!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha (weight of the ground-truth cross-entropy) must be in [0, 1], got {alpha!r}")
        self.subclasses, self.beta, self.temperature, self.alpha = subclasses, float(beta), float(temperature), float(alpha)
        self.null_space, self.rotation, self.seed = null_space, rotation, seed
        self.head: nn.Linear | None = None
        self.num_classes = 0
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._own_head: nn.Linear | None = None  # the student's classifier; kept out of this module's parameters

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        from kd_core.data import DATASETS, num_classes_of
        from kd_core.losses import LOSSES

        errors = [(f"recipe[{i}].loss", (f"{term.loss!r} learns from the labels only and would train the student's original head, which "
                                          "lelp does not predict with; use method.params.alpha for a ground-truth term (the paper uses alpha: 0)"))
                  for i, term in enumerate(config.recipe) if term.loss in LOSSES and not LOSSES[term.loss].needs & TEACHER_NEEDS]
        params = config.method.params if config.method is not None else {}
        subclasses = params.get("subclasses", 5)
        info = DATASETS[config.dataset.name]
        num_classes = num_classes_of(config.dataset.name, config.dataset.classes)
        if params.get("null_space", True) and num_classes and isinstance(subclasses, int):
            dim = _embedding_dim(config.teacher.arch, num_classes, info.in_channels, config.dataset.image_size or info.image_size)
            if subclasses > dim - num_classes:
                errors.append(("method.params.subclasses", (f"the teacher {config.teacher.arch!r} has a {dim}-d embedding, {dim - num_classes} "
                                                            f"dimensions outside its classifier's span for {num_classes} classes: at most that many subclasses")))
        return errors

    # ---- set-up

    def build(self, context: MethodContext) -> None:
        if context.train_x is None or context.train_y is None:
            raise ValueError("lelp fits its subspaces on the training split, and the engine gave none (MethodContext.train_x)")
        c, s, d = context.num_classes, self.subclasses, context.teacher.embedding_dim
        self.num_classes = c
        self.head = nn.Linear(context.student.embedding_dim, c * s)
        self.register_buffer("centers", torch.zeros(c, d))
        self.register_buffer("directions", torch.zeros(c, d, s))
        self.register_buffer("scales", torch.ones(c))
        self._train = (context.train_x, context.train_y)

    def init_student(self, student: nn.Module, teacher: nn.Module) -> None:
        """Not a change to the student: the one moment the method sees the frozen teacher, so the subspaces are fitted here."""
        from kd_core.engine.evaluation import outputs_with_embedding

        assert self._train is not None, "build() first"
        self.__dict__["_own_head"] = student.get_submodule(feature_spec(student).classifier)  # not registered: not ours
        train_x, train_y = self._train
        self._train = None  # keep no reference to the data
        _, embeddings = outputs_with_embedding(teacher, train_x)  # fp32, eval mode, batched
        fitted = self.fit(embeddings, train_y, classifier_weight(teacher))
        self.centers.copy_(fitted.centers)
        self.directions.copy_(fitted.directions)
        self.scales.copy_(fitted.scales)

    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> Subspaces:
        return fit_subspaces(embeddings, labels, weight, self.num_classes, self.subclasses,
                             null_space=self.null_space, rotation=self.rotation, seed=self.seed)

    @property
    def subspaces(self) -> Subspaces:
        return Subspaces(self.centers, self.directions, self.scales)

    # ---- training

    def subclass_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        return self.head(embedding.flatten(1)).float()

    def teacher_targets(self, inputs: LossInputs) -> torch.Tensor:
        """The pseudo-subclass targets of a batch: the teacher's logits and embedding only, never the student's."""
        if inputs.teacher_logits is None or inputs.teacher_embedding is None:
            raise ValueError("lelp needs the teacher's logits and embedding for every batch")
        return pseudo_subclass_targets(inputs.teacher_logits, inputs.teacher_embedding, self.subspaces, self.beta, self.temperature)

    def distill_inputs(self, inputs: LossInputs, student: StudentOutputs) -> LossInputs:
        assert student.embedding is not None
        return LossInputs(**{**inputs.__dict__, "student_logits": class_log_probs(self.subclass_logits(student.embedding), self.num_classes)})

    def losses(self, inputs: LossInputs, student: StudentOutputs, epoch_progress: float) -> dict[str, torch.Tensor]:
        assert student.embedding is not None
        logits = self.subclass_logits(student.embedding)
        target = self.teacher_targets(inputs)
        t = self.temperature
        out = {"subclass_ce": (1.0 - self.alpha) * t * t * F.cross_entropy(logits / t, target)}
        class_log_p = class_log_probs(logits, self.num_classes)
        if self.alpha > 0:
            out["ce"] = self.alpha * F.nll_loss(class_log_p, inputs.target)
        if self._own_head is not None:  # the student's own head follows the prediction; nothing flows back from it
            own = F.linear(student.embedding.detach().flatten(1), self._own_head.weight, self._own_head.bias).float()
            out["own_head"] = F.cross_entropy(own, class_log_p.detach().exp())
        return out

    # ---- evaluation

    def student_logits(self, logits: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        assert embedding is not None
        return class_log_probs(self.subclass_logits(embedding), self.num_classes)

    @torch.no_grad()
    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, Any]:
        """How often the student's most likely pseudo-subclass is the teacher's, on the validation split."""
        from kd_core.engine.evaluation import outputs_with_embedding

        data = run.experiment.data
        if not len(data.val_y) or run.target_teacher is None:
            return {}
        t_logits, t_emb = outputs_with_embedding(run.target_teacher, data.val_x, precision)
        _, s_emb = outputs_with_embedding(run.model, data.val_x, precision)
        teacher_sub = pseudo_subclass_targets(t_logits, t_emb, self.subspaces, self.beta, self.temperature).argmax(1)
        was_training = self.training
        self.eval()
        student_sub = self.subclass_logits(s_emb).argmax(1)
        self.train(was_training)
        return {"val/lelp_subclass_agreement": 100.0 * float((teacher_sub == student_sub).float().mean())}


def classifier_weight(model: nn.Module) -> torch.Tensor:
    """The weight ``[C, D]`` of the model's final linear layer (named by its feature spec)."""
    layer = model.get_submodule(feature_spec(model).classifier)
    assert isinstance(layer, nn.Linear), type(layer)
    return layer.weight.detach()
