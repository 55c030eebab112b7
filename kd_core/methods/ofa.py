"""OFA-KD, complete: projector branches on the student's stages, OFA's loss on every branch and on the final logits.

Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023 (arXiv 2310.19444); released code github.com/Hao840/OFAKD
(``distillers/ofa.py``, ``train.py`` arguments).

Every chosen student stage gets a branch (:mod:`kd_core.methods.ofa_branches`) that maps its features to
class logits, in a form its architecture family allows. The total, with the recipe's CE as the ground-truth
term (``--gt-loss-weight``), is::

    recipe (e.g. CE) + kd_weight · L_OFA(z_s, z_t) + branch_weight · Σ_stages L_OFA(branch_i(f_i), z_t)

with :func:`kd_core.losses.logit.ofa_loss` (target-enhanced CE against the teacher, exponent γ = ``eps``).
The branches are method modules: trained with the student, saved with the method, never part of the
student's prediction (the student's own head), so the saved student alone reproduces the run's accuracy.
Defaults are the released ``train.py``'s: every stage (``--ofa-stage 1 2 3 4`` on four-stage models),
T = 1, γ = 1 (its README uses 1.0 on CIFAR-100 and 1.5 on ImageNet), weights 1, 1, 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from kd_core.losses.base import LossInputs
from kd_core.losses.logit import ofa_loss
from kd_core.methods.base import Method, MethodContext, StudentOutputs, register_method
from kd_core.methods.ofa_branches import init_branch_weights, make_branch

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision


@functools.lru_cache(maxsize=None)
def stage_count(arch: str) -> int:
    """How many stage maps ``arch`` exposes (0 for models without spatial stages, such as the MLP)."""
    from kd_core.models import create_model, feature_spec

    return len(feature_spec(create_model(arch, 10, 3, 32)).stages)


@register_method
class OFA(Method):
    name = "ofa"
    summary: ClassVar[str] = ("Branches on the student's stages project each stage's features to class logits; OFA's "
                              "target-enhanced loss against the teacher on every branch and on the final logits. "
                              "Branches are dropped at inference.")
    paper: ClassVar[str] = ('Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous '
                            'Architectures in Knowledge Distillation", NeurIPS 2023')
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2310.19444"
    caveat: ClassVar[str] = (
        "Branches read the engine's stage taps (a ViT's blocks 3, 6, 9 and 12; tokens without the class token), so "
        "token branches average the tokens where the released code reads a ViT's class token (it averages for "
        "students without one). A convolutional branch has one stride-2 block per stage still to come in the "
        "student (the released 4 − stage on four-stage models). Not reproduced: the released recipe's gradient "
        "clipping for ViT/MLP students and its 224-pixel CIFAR inputs. The ground-truth term is the recipe's ce "
        "(label smoothing 0.1 in the released configs).")
    student_needs: ClassVar[frozenset[str]] = frozenset(["stages"])
    teacher_needs: ClassVar[frozenset[str]] = frozenset(["logits"])
    has_own_loss: ClassVar[bool] = True

    def __init__(self, stages: Sequence[int] = (), temperature: float = 1.0, eps: float = 1.0, kd_weight: float = 1.0,
                 branch_weight: float = 1.0) -> None:
        super().__init__()
        self.stages = list(stages)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.stages) or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages are distinct 1-based stage numbers of the student (empty = every stage), got {self.stages}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if eps < 0 or kd_weight < 0 or branch_weight < 0:
            raise ValueError(f"eps, kd_weight and branch_weight must be >= 0, got {eps}, {kd_weight}, {branch_weight}")
        if kd_weight == 0 and branch_weight == 0:
            raise ValueError("kd_weight and branch_weight are both 0, so OFA would add nothing; give one of them a positive weight")
        self.temperature, self.eps = float(temperature), float(eps)
        self.kd_weight, self.branch_weight = float(kd_weight), float(branch_weight)
        self.branches = nn.ModuleDict()  # "stage<i>" -> branch, built once the student is known
        self._context: MethodContext | None = None
        self._branch_losses: dict[str, torch.Tensor] = {}

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        errors = [(f"recipe[{i}].loss", "the ofa method already applies OFA's loss to the final logits (kd_weight): remove this term")
                  for i, term in enumerate(config.recipe) if term.loss == "ofa"]
        count = stage_count(config.student.arch)
        if count == 0:
            return errors + [("student.arch", f"ofa builds a branch on each stage of the student, and {config.student.arch!r} has no stages; "
                                              "use a convolutional or transformer student")]
        stages = config.method.params.get("stages", ()) if config.method is not None else ()
        stages = stages if isinstance(stages, (list, tuple)) else ()  # a wrong type is reported by the constructor
        bad = [s for s in stages if isinstance(s, int) and not 1 <= s <= count]
        if bad:
            errors.append(("method.params.stages", f"{config.student.arch!r} has stages 1..{count}; got {bad}"))
        return errors

    # ---- modules

    def build(self, context: MethodContext) -> None:
        self._context = context

    def init_student(self, student: nn.Module, teacher: nn.Module) -> None:
        """Build the branches: their form depends on the student's family (token grids or convolutional maps)."""
        from kd_core.models import feature_spec

        assert self._context is not None, "build() comes first"
        ctx = self._context
        shapes = ctx.student.stage_shapes
        if not shapes:
            raise ValueError("ofa needs a student with stage feature maps")
        tokens = feature_spec(student).tokens is not None
        for stage in self.stages or range(1, len(shapes) + 1):
            if not 1 <= stage <= len(shapes):
                raise ValueError(f"the student has stages 1..{len(shapes)}; got stage {stage}")
            self.branches[f"stage{stage}"] = make_branch(stage, len(shapes), shapes[stage - 1], tokens, ctx.student.embedding_dim,
                                                         ctx.teacher.embedding_dim, ctx.num_classes)
        init_branch_weights(self.branches)

    def branch_logits(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each branch's class logits from the student's stage maps (1-based stage numbers in the keys)."""
        return {key: branch(stages[int(key.removeprefix("stage")) - 1]) for key, branch in self.branches.items()}

    # ---- training

    def losses(self, inputs: LossInputs, student: StudentOutputs, epoch_progress: float) -> dict[str, torch.Tensor]:
        assert inputs.teacher_logits is not None and inputs.target is not None
        z_t, y = inputs.teacher_logits, inputs.target
        per_branch = {key: ofa_loss(z, z_t, y, self.temperature, self.eps) for key, z in self.branch_logits(student.stages).items()}
        self._branch_losses = {key: value.detach() for key, value in per_branch.items()}
        out = {"logits": self.kd_weight * ofa_loss(inputs.student_logits, z_t, y, self.temperature, self.eps)}
        out["branches"] = self.branch_weight * torch.stack(list(per_branch.values())).sum()
        return out

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        return {f"ofa_{key}_loss": value for key, value in self._branch_losses.items()}

    @torch.no_grad()
    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, Any]:
        """Top-1 of each branch on the held-out split: how much class information each stage carries."""
        from kd_core.data import iterate
        from kd_core.engine.evaluation import EVAL_BATCH
        from kd_core.features import FeatureTap

        model, x, y = run.model, run.eval_x, run.eval_y
        was_training, method_training = model.training, self.training
        model.eval()
        self.eval()
        correct = dict.fromkeys(self.branches, 0)
        with FeatureTap(model, stages=True) as tap:
            for xb, yb in iterate(x, y, EVAL_BATCH):
                tap.clear()
                with precision.autocast():
                    model(xb)
                for key, z in self.branch_logits([s.float() for s in tap.stages]).items():
                    correct[key] += int((z.argmax(1) == yb).sum())
        model.train(was_training)
        self.train(method_training)
        return {f"{run.split}/ofa_{key}_top1": 100.0 * n / max(len(y), 1) for key, n in correct.items()}
