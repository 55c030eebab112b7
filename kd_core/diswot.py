"""Which student? DisWOT's training-free ranking of candidate students for a teacher and a dataset.

Dong, Li, Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR 2023 (code:
lliai/DisWOT-CVPR2023). The paper finds that, between *randomly initialised* teacher and student networks, the
similarity of sample relations and of feature semantics on one batch correlates with how well the student
distils. Score definitions follow the released code (README "Core Code", ``exps/parse_nb201_distill.py:
compute_diswot_procedure``, ``distiller_zoo/{SP,ICKD}.py``):

* both networks are re-initialised by ``network_weight_gaussian_init`` (conv and linear weights N(0, 1),
  biases 0, batch-norm γ = 1, β = 0) -- the released code does this to the trained teacher too -- and run in
  training mode (batch statistics) on one batch;
* **relation** = −SP distance between the two networks' last feature maps (``batch_similarity``):
  ``‖norm_rows(F_t F_tᵀ) − norm_rows(F_s F_sᵀ)‖² / B²`` with ``F`` the flattened maps ``[B, ·]``;
* **semantic** = −distance between the gradients of the classifier weights after one cross-entropy backward
  of each network ("grad-cam of fc layer");
* **score** = relation + semantic; higher = predicted to distil better. Nothing is trained: the gradient is
  taken with ``torch.autograd.grad`` on the classifier weight alone, no optimizer exists, every parameter and
  buffer of a candidate is as it was afterwards.

Where we differ, and why:

* the released semantic term (ICKD ``channel_similarity``) compares ``[K, Ch, Ch]`` channel Grams of the
  ``[K, Ch]`` fc-weight gradients and needs the teacher's and student's classifier widths to be equal (true
  in NAS-Bench-201, not for a zoo of heterogeneous students). We compare the ``[K, K]`` class Grams of the same
  gradients instead -- ``‖norm_rows(G_t G_tᵀ) − norm_rows(G_s G_sᵀ)‖² / K``, the same row-normalised Gram
  distance taken over classes, with ICKD's normalisation (mean over rows) -- which is width-agnostic;
* the last feature map is the last named stage of the architecture (its pooled embedding when it has no
  stages, e.g. an MLP; token models' blocks as maps);
* every candidate sees the same batch (the released loop draws a new batch per candidate), and the scores are
  averaged over ``repeats`` draws (a new batch and new random weights each), which the released code does once.

The released code also never zeroes the teacher's gradient between candidates (it accumulates); here each
pair starts from nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.features import FeatureTap
from kd_core.models import count_parameters, create_model, feature_spec

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.teachers import RunTeachers

PAPER = 'Dong, Li, Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR 2023'
TeacherInit = Literal["gaussian", "trained"]
RankBy = Literal["score", "relation", "semantic"]


def gaussian_init_(model: nn.Module) -> nn.Module:
    """The released ``network_weight_gaussian_init``: conv/linear weights N(0, 1), biases 0, norm layers γ = 1, β = 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def _gram_rows(f: torch.Tensor) -> torch.Tensor:
    f = f.reshape(f.shape[0], -1).double()
    return F.normalize(f @ f.T, dim=1)


def relation_distance(f_t: torch.Tensor, f_s: torch.Tensor) -> torch.Tensor:
    """SP's batch-similarity distance (``batch_similarity`` of the released code): ``Σ (G_t − G_s)² / B²``."""
    diff = _gram_rows(f_t) - _gram_rows(f_s)
    return (diff * diff).sum() / f_t.shape[0] ** 2


def semantic_distance(g_t: torch.Tensor, g_s: torch.Tensor) -> torch.Tensor:
    """Row-normalised class-Gram distance of two classifier-weight gradients ``[K, D_t]``, ``[K, D_s]``: ``Σ (G_t − G_s)² / K``."""
    diff = _gram_rows(g_t) - _gram_rows(g_s)
    return (diff * diff).sum() / g_t.shape[0]


@dataclass(frozen=True)
class PairScore:
    relation: float  # −relation distance
    semantic: float  # −semantic distance

    @property
    def score(self) -> float:
        return self.relation + self.semantic


def _forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last feature map and the gradient of the CE loss w.r.t. the classifier weight (no ``.grad`` is written)."""
    weight = model.get_submodule(feature_spec(model).classifier).weight
    with FeatureTap(model, stages=True, embedding=True) as tap:
        logits = model(x)
        feature = tap.stages[-1] if tap.stages else tap.embedding
    assert feature is not None
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y), weight)
    return feature.detach(), grad.detach()


def _run_untouched(model: nn.Module, train_mode: bool, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_forward`` in the given mode; the mode and every buffer (batch-norm running statistics) come back as they were."""
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train(train_mode)
    try:
        return _forward(model, x, y)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        model.train(was_training)


def score_pair(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, *, teacher_train_mode: bool = True) -> PairScore:
    """DisWOT's two similarities between ``teacher`` and ``student`` on the batch ``(x, y)``, as the models are.

    Both run in training mode (batch statistics, as the released code runs its fresh networks) unless
    ``teacher_train_mode`` is False (a trained teacher keeps its running statistics). Nothing is updated.
    """
    f_t, g_t = _run_untouched(teacher, teacher_train_mode, x, y)
    f_s, g_s = _run_untouched(student, True, x, y)
    return PairScore(relation=-float(relation_distance(f_t, f_s)), semantic=-float(semantic_distance(g_t, g_s)))


# --------------------------------------------------------------------------- the ranking


@dataclass(frozen=True)
class CandidateScore:
    rank: int
    arch: str
    params: int
    relation: float
    semantic: float
    score: float


@dataclass(frozen=True)
class Ranking:
    """Candidates best first, with the scores and everything needed to say what was measured."""

    teacher: str
    teacher_init: TeacherInit
    dataset: str
    num_classes: int
    batch_size: int
    repeats: int
    seed: int
    ranked_by: RankBy
    candidates: list[CandidateScore]

    def records(self) -> list[dict[str, Any]]:
        """One dict per candidate (rank, arch, params, relation, semantic, score), best first: a table's rows."""
        return [asdict(c) for c in self.candidates]

    def describe(self) -> str:
        """What the numbers are, in two lines (the CLI prints it above the table)."""
        teacher = (f"teacher {self.teacher} Gaussian-initialised, as the released DisWOT code does (its trained weights are not needed)"
                   if self.teacher_init == "gaussian" else f"teacher {self.teacher} with its trained weights")
        return (f"DisWOT ranking ({PAPER}): training-free, nothing was trained; students Gaussian-initialised.\n"
                f"{teacher}; {self.dataset} ({self.num_classes} classes), batches of {self.batch_size} training images, "
                f"mean over {self.repeats} draw(s), seed {self.seed}. Ranked by {self.ranked_by}; higher = predicted to distil better.")

    def table(self) -> str:
        """The ranking as a fixed-width table; numbers as the panel should show them."""
        header = ["rank", "student", "params", "relation (-SP)", "semantic (-fc grad)", "score"]
        rows = [header] + [[str(c.rank), c.arch, f"{c.params:,}", f"{c.relation:.6f}", f"{c.semantic:.6f}", f"{c.score:.6f}"]
                           for c in self.candidates]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _batches(config: ExperimentConfig, batch_size: int, repeats: int, seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int, int]:
    from kd_core.data import load_dataset

    d = config.dataset
    data = load_dataset(d.name, d.root, val_fraction=d.val_fraction, subset=d.subset, image_size=d.image_size, seed=config.seed, classes=d.classes)
    n = len(data.train_y)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training split ({n} images)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    picks = [order.roll(-r * batch_size)[:batch_size] for r in range(repeats)]
    return [(data.train_x[i], data.train_y[i]) for i in picks], data.num_classes, data.in_channels, data.image_size


def rank_students(config: ExperimentConfig | dict[str, Any], candidates: Sequence[str], *, batch_size: int = 64, repeats: int = 3,
                  seed: int | None = None, teacher_init: TeacherInit = "gaussian", by: RankBy = "score",
                  device: str | torch.device = "cpu", run_teachers: RunTeachers | None = None) -> Ranking:
    """Rank ``candidates`` (architecture names, e.g. ``["cnn_tiny", "lenet5", "timm:mobilenetv3_small_100"]``) as students of
    ``config``'s teacher on ``config``'s dataset by DisWOT's training-free score, best first.

    ``teacher_init="gaussian"`` (default, the released code) needs only the teacher's architecture;
    ``"trained"`` scores against the weights ``teacher.source`` names (``run:<id>`` with ``run_teachers``,
    ``file:``, ``torchvision``) and refuses a teacher that is not trained yet. Deterministic for ``seed``
    (default: the config's seed). ``by`` orders by the DisWOT score (relation + semantic, as released) or by one
    of its two parts; every part is returned either way. No candidate is trained: see the module docstring.
    """
    from kd_core.config import validate_config
    from kd_core.models import MODELS

    config = validate_config(config) if isinstance(config, dict) else config
    if not candidates:
        raise ValueError("give at least one candidate student architecture")
    unknown = [a for a in candidates if a not in MODELS]
    if unknown:
        raise ValueError(f"unknown architecture {unknown[0]!r}; `python -m kd_core models` lists them")
    if len(set(candidates)) < len(candidates):
        raise ValueError("each candidate may appear once")
    if repeats < 1 or batch_size < 2:
        raise ValueError("repeats must be >= 1 and batch_size >= 2")
    if teacher_init not in ("gaussian", "trained"):
        raise ValueError(f"teacher_init is 'gaussian' or 'trained', got {teacher_init!r}")
    if by not in ("score", "relation", "semantic"):
        raise ValueError(f"by is 'score', 'relation' or 'semantic', got {by!r}")
    seed = config.seed if seed is None else seed
    device = torch.device(device)
    batches, num_classes, in_channels, size = _batches(config, batch_size, repeats, seed)
    teacher_cfg = config.teacher
    trained = _trained_teacher(config, num_classes, in_channels, size, run_teachers).to(device) if teacher_init == "trained" else None

    def build(arch: str, init_seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return gaussian_init_(create_model(arch, num_classes, in_channels, size)).to(device)

    sums = {arch: [0.0, 0.0] for arch in candidates}
    for r, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        init_seed = seed * 1_000_003 + r
        teacher = trained if trained is not None else build(teacher_cfg.arch, init_seed + 500_009)
        for arch in candidates:
            pair = score_pair(teacher, build(arch, init_seed), x, y, teacher_train_mode=trained is None)
            sums[arch][0] += pair.relation / repeats
            sums[arch][1] += pair.semantic / repeats
    params = {arch: count_parameters(create_model(arch, num_classes, in_channels, size)) for arch in candidates}
    key = {"score": lambda a: sums[a][0] + sums[a][1], "relation": lambda a: sums[a][0], "semantic": lambda a: sums[a][1]}[by]
    order = sorted(candidates, key=lambda a: (-key(a), a))
    scored = [CandidateScore(i + 1, a, params[a], sums[a][0], sums[a][1], sums[a][0] + sums[a][1]) for i, a in enumerate(order)]
    return Ranking(teacher_cfg.arch, teacher_init, config.dataset.name, num_classes, batch_size, repeats, seed, by, scored)


def _trained_teacher(config: ExperimentConfig, num_classes: int, in_channels: int, size: int, run_teachers: RunTeachers | None) -> nn.Module:
    from kd_core.teachers import load_teacher_weights

    source = config.teacher.source
    if source in ("train", "random", "torchvision", "timm"):
        raise ValueError(f"teacher.source is {source!r}: there are no weights trained on this dataset to score against. The released DisWOT "
                         "code scores against a Gaussian-initialised teacher anyway (teacher_init 'gaussian', the default); to use "
                         "trained weights, name them with teacher.source run:<id> or file:<path>")
    teacher = create_model(config.teacher.arch, num_classes, in_channels, size)
    load_teacher_weights(teacher, source, config.teacher.arch, num_classes, run_teachers=run_teachers)
    return teacher.eval()
