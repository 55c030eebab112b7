"""ReviewKD: Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021 (arXiv 2104.09044);
released code dvlab-research/ReviewKD (``CIFAR-100/model/reviewkd.py``, ``CIFAR-100/train.py``) and
megvii-research/mdistiller (``mdistiller/distillers/ReviewKD.py``, ``mdistiller/engine/cfg.py``).

The student's features are fused from deep to shallow by attention-based fusion (ABF) modules, and each
fused map is matched to the teacher's feature of the same level by the hierarchical context loss (HCL):

* Levels, deepest first: the pooled embedding (as a 1×1 map), then the stage maps from the deepest up.
  The student's post-ReLU stage outputs are fused (mdistiller's ``STU_PREACT: False``); the teacher's
  targets are its **pre-activation** stage features (``preact_feats``) and its pooled embedding.
* ABF of a level: ``x = BN(conv1×1(student feature))`` to ``mid = min(max_mid_channels, D_student)``
  channels; below the deepest level, the residual ``y`` from the level above is upsampled (nearest) to
  ``x``'s size and ``att = sigmoid(conv1×1([x, y]))`` (2 channels) blends them, ``x = x·att₀ + y·att₁``;
  ``x`` is resized (nearest) to the teacher's map size when they differ, the level's output is
  ``BN(conv3×3(x))`` with the teacher's channel count, and ``x`` is the residual handed to the next level.
  conv1/conv2 use Kaiming-uniform (a=1) initialisation.
* HCL of a pair: ``(MSE(f_s, f_t) + Σ_{l ∈ pyramid, l < h} 2^{−j}·MSE(pool_l(f_s), pool_l(f_t))) / (1 + Σ 2^{−j})``
  with adaptive average pooling to l×l and j = 1, 2, ... over the levels used; summed over the pairs.
* ``L = recipe (CE in the paper) + weight · min(epoch / warmup_epochs, 1) · HCL``, epochs counted from 1
  as in mdistiller (constant within an epoch). Defaults: mdistiller's ``CFG.REVIEWKD`` (weight 1, warm-up
  20, pyramid [4, 2, 1], mid channels ≤ 512); the CIFAR-100 resnet32x4 → resnet8x4 setting uses weight 5.

The ABF modules are this method's trainable modules: they join the student's optimizer and checkpoint,
count in ``recipe_extra_params``, and are unused at inference.

What differs from the released code:

* Pre-activation teacher features come from :class:`~kd_core.methods.preact.PreActivationTap` (hooks on the
  teacher's named stages that see the ReLU ending each stage) instead of models rewritten to return
  them. A stage that does not end in a ReLU contributes its output, which then is its pre-activation (Wide
  ResNet blocks); the run's summary lists, per teacher stage, whether a ReLU was found
  (``reviewkd_teacher_preact``). ``teacher_preact: false`` uses the post-activation stage outputs instead.
* Any pair of models with stage maps works: the deepest ``min(n_student, n_teacher)`` stages of each are
  paired in order (the released code lists channels and sizes per named pair), with sizes and channels
  read from one dummy forward. The reference pairs (resnet32x4 → resnet8x4) use all three stages.
* The dvlab code counts epochs from 0 in the warm-up (its first epoch has weight 0); mdistiller's count
  from 1 is used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import LossInputs
from kd_core.methods.base import Method, MethodContext, StudentOutputs, register_method
from kd_core.methods.preact import PreActivationTap

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision

PYRAMID = (4, 2, 1)


class ABF(nn.Module):
    """Attention-based fusion of one level's student feature with the fused feature of the level above."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, out_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this level's output, the residual for the next level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            att = self.att_conv(torch.cat([x, residual], 1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor], pyramid: Sequence[int] = PYRAMID) -> torch.Tensor:
    """Hierarchical context loss summed over the pairs ``(student_maps[i], teacher_maps[i])``."""
    total: torch.Tensor | float = 0.0
    for fs, ft in zip(student_maps, teacher_maps, strict=True):
        height = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, weights = 1.0, 1.0
        for size in pyramid:
            if size >= height:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weights += weight
        total = total + loss / weights
    assert isinstance(total, torch.Tensor)
    return total


def warmup_factor(epoch_progress: float, warmup_epochs: int) -> float:
    """``min(epoch / warmup_epochs, 1)`` with epochs counted from 1 (mdistiller), constant within an epoch."""
    if warmup_epochs <= 0:
        return 1.0
    return min((math.floor(epoch_progress) + 1) / warmup_epochs, 1.0)


@register_method
class ReviewKD(Method):
    name = "reviewkd"
    summary: ClassVar[str] = ("Knowledge review: attention-based fusion (ABF) merges the student's stages from deep to shallow, and the "
                              "hierarchical context loss (HCL) matches each fused map to the teacher's pre-activation feature of that level.")
    paper: ClassVar[str] = 'Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021'
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2104.09044"
    caveat: ClassVar[str] = ("Teacher pre-activations are read by hooks that find the ReLU ending each stage (a stage without one gives "
                             "its output); models with different stage counts pair their deepest stages. The recipe supplies CE.")
    student_needs: ClassVar[frozenset[str]] = frozenset(["stages", "embedding"])
    teacher_needs: ClassVar[frozenset[str]] = frozenset(["stages", "embedding"])
    has_own_loss: ClassVar[bool] = True

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 20, pyramid: Sequence[int] = PYRAMID, max_mid_channels: int = 512,
                 teacher_preact: bool = True) -> None:
        super().__init__()
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a number >= 0, got {weight!r}")
        if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a whole number >= 0, got {warmup_epochs!r}")
        self.pyramid = list(pyramid)
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.pyramid):
            raise ValueError(f"pyramid must be a list of pooled sizes >= 1 (e.g. [4, 2, 1]; empty for plain MSE), got {self.pyramid!r}")
        if not isinstance(max_mid_channels, int) or isinstance(max_mid_channels, bool) or max_mid_channels < 1:
            raise ValueError(f"max_mid_channels must be a whole number >= 1, got {max_mid_channels!r}")
        self.weight, self.warmup_epochs, self.max_mid_channels = float(weight), warmup_epochs, max_mid_channels
        self.teacher_preact = bool(teacher_preact)
        self.abfs = nn.ModuleList()
        self.out_sizes: list[tuple[int, int]] = []  # per level, deepest first: the teacher's map size
        self.num_stages = 0  # stages of each model that are paired (the deepest ones)
        self._tap: PreActivationTap | None = None
        self._hcl: torch.Tensor | None = None
        self._weight = 0.0
        self._reported = False

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        from kd_core.config_checks import has_stages

        errors = [(f"{role}.arch", f"reviewkd fuses stage feature maps, and {arch!r} has none: use a convolutional {role}")
                  for role, arch in (("teacher", config.teacher.arch), ("student", config.student.arch)) if not has_stages(arch)]
        if not any(term.weight > 0 for term in config.recipe):
            errors.append(("recipe", ("reviewkd adds a feature loss only, so the student's classifier needs the recipe: add "
                                      "{loss: ce, weight: 1.0} (the paper trains CE + HCL)")))
        return errors

    # ---- modules

    def build(self, context: MethodContext) -> None:
        s_stages, t_stages = context.student.stage_shapes, context.teacher.stage_shapes
        self.num_stages = min(len(s_stages), len(t_stages))
        if self.num_stages == 0:
            raise ValueError("reviewkd needs stage feature maps in the student and the teacher")
        s_dim, t_dim = context.student.embedding_dim, context.teacher.embedding_dim
        mid = min(self.max_mid_channels, s_dim)
        # levels deepest first: the pooled embedding, then the paired stages from the deepest
        levels = [((s_dim, 1, 1), (t_dim, 1, 1))] + list(zip(s_stages[-self.num_stages:], t_stages[-self.num_stages:]))[::-1]
        self.abfs = nn.ModuleList([ABF(s[0], mid, t[0], fuse=i > 0) for i, (s, t) in enumerate(levels)])
        self.out_sizes = [(t[1], t[2]) for _, t in levels]

    def distill_teacher(self, teachers: list[nn.Module]) -> nn.Module:
        """The teacher, with hooks that collect its stages' pre-activations on every forward."""
        teacher = teachers[0]
        if self.teacher_preact:
            if self._tap is not None:
                self._tap.remove()
            self._tap = PreActivationTap(teacher)
        return teacher

    # ---- the loss

    def fuse(self, stages: Sequence[torch.Tensor], embedding: torch.Tensor) -> list[torch.Tensor]:
        """The ABF outputs, deepest level first, from the student's stage maps (shallow to deep) and embedding."""
        inputs = [embedding.flatten(1)[:, :, None, None], *list(stages[-self.num_stages:])[::-1]]
        outputs: list[torch.Tensor] = []
        residual: torch.Tensor | None = None
        for abf, x, size in zip(self.abfs, inputs, self.out_sizes, strict=True):
            out, residual = abf(x, residual, size)
            outputs.append(out)
        return outputs

    def targets(self, inputs: LossInputs) -> list[torch.Tensor]:
        """The teacher's features, deepest level first: the pooled embedding, then the paired stages' (pre-)activations."""
        assert inputs.teacher_embedding is not None
        if self.teacher_preact:
            assert self._tap is not None
            stages = [s.float() for s in self._tap.stages]
        else:
            stages = list(inputs.teacher_stages or [])
        if len(stages) < self.num_stages:
            raise RuntimeError(f"reviewkd: the teacher's forward gave {len(stages)} stage maps, {self.num_stages} are needed")
        return [inputs.teacher_embedding.flatten(1)[:, :, None, None].float(), *stages[-self.num_stages:][::-1]]

    def losses(self, inputs: LossInputs, student: StudentOutputs, epoch_progress: float) -> dict[str, torch.Tensor]:
        assert student.embedding is not None
        hcl = hcl_loss(self.fuse(student.stages, student.embedding), self.targets(inputs), self.pyramid)
        self._weight = self.weight * warmup_factor(epoch_progress, self.warmup_epochs)
        self._hcl = hcl.detach()
        return {"hcl": self._weight * hcl}

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        if self._hcl is None:
            return {}
        return {"reviewkd_weight": self._weight, "reviewkd_hcl": self._hcl}

    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, Any]:
        if not self._reported and self._tap is not None and self._tap.ended_in_relu:
            # which of the paired teacher stages gave a true pre-activation (a ReLU ended the stage)
            run.experiment.sink.update_summary({"reviewkd_teacher_preact": list(self._tap.ended_in_relu[-self.num_stages:])})
            self._reported = True
        if self._tap is not None and run.progress.epoch + 1 >= run.phase.model_config.epochs:
            # the student phase is over: later forwards of the teacher (baseline, analysis) need no pre-activations
            self._tap.remove()
            self._tap.clear()
        return {}
