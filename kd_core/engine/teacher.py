"""The teacher's outputs for each training step: read from a cache, or from a live forward pass.

Caching pays off because a frozen teacher's logits and embeddings of an un-augmented image never change:
they are computed once for the whole training set. Stage maps are never cached (too large), and
augmented or otherwise varying inputs make the cache invalid; :attr:`TeacherOutputs.why_live` says why
the teacher runs live, for the run's log and page.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_core.data import image_batches
from kd_core.engine.evaluation import EVAL_BATCH
from kd_core.engine.precision import Precision
from kd_core.features import FeatureTap
from kd_core.losses import DistillLoss, LossInputs
from kd_core.methods.base import Method


def cache_blocker(enabled: bool, augment: bool, needs: set[str], losses: list[DistillLoss], method: Method | None = None) -> str | None:
    """Why teacher outputs cannot be cached for this phase, or None when they can."""
    if not enabled:
        return "cache_teacher is off"
    if augment:
        return "augmentation changes the teacher's input every epoch"
    if method is not None and method.varies_teacher_inputs:
        return method.varies_teacher_inputs
    if "stages" in needs:
        return "the recipe needs stage feature maps, which are too large to keep"
    varying = [loss.name for loss in losses if not loss.teacher_cacheable]
    if varying:
        return f"{', '.join(varying)} change the teacher's input"
    return None


class TeacherOutputs:
    """Fills :class:`LossInputs` with the teacher's logits (and embedding/stages when the recipe needs them)."""

    def __init__(self, teacher: nn.Module, needs: set[str], precision: Precision, why_live: str | None, train_x: torch.Tensor) -> None:
        self.teacher = teacher
        self.needs = needs
        self.precision = precision
        self.why_live = why_live
        self.cache: dict[str, torch.Tensor] | None = None
        self.tap: FeatureTap | None = None
        if why_live is None:
            self.cache = self._compute_cache(train_x)
        else:
            self.tap = FeatureTap(teacher, stages="stages" in needs, embedding="embedding" in needs)

    @property
    def mode(self) -> str:
        return "cached" if self.cache is not None else "live"

    @torch.no_grad()
    def _compute_cache(self, train_x: torch.Tensor) -> dict[str, torch.Tensor]:
        with FeatureTap(self.teacher, embedding="embedding" in self.needs) as tap:
            logits, embeddings = [], []
            for xb in image_batches(train_x, EVAL_BATCH):
                with self.precision.autocast():
                    logits.append(self.teacher(xb).float())
                if tap.embedding is not None:
                    embeddings.append(tap.embedding.float())
        cache = {"logits": torch.cat(logits)}
        if embeddings:
            cache["embedding"] = torch.cat(embeddings)
        return cache

    def forward(self, x: torch.Tensor) -> None:
        """The live teacher forward of this step (inside the step's autocast); nothing when cached."""
        if self.tap is None:
            return
        self.tap.clear()
        with torch.no_grad():
            self._live_logits = self.teacher(x)

    def fill(self, inputs: LossInputs, idx: torch.Tensor) -> None:
        """Put this step's teacher outputs, as float32, into ``inputs``."""
        if self.cache is not None:
            inputs.teacher_logits = self.cache["logits"][idx]
            inputs.teacher_embedding = self.cache["embedding"][idx] if "embedding" in self.cache else None
            return
        assert self.tap is not None
        inputs.teacher_logits = self._live_logits.float()
        if "embedding" in self.needs:
            inputs.teacher_embedding = _float(self.tap.embedding)
        if "stages" in self.needs:
            inputs.teacher_stages = [s.float() for s in self.tap.stages]

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
