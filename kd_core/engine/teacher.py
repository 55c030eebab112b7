"""The teacher's outputs for each training step: from an in-memory cache, the soft-label store, or live.

Caching pays off because a frozen teacher's logits and embeddings of an un-augmented image never change:
they are computed once for the whole training set. Stage maps are never cached (too large), and
augmented or otherwise varying inputs make the cache invalid; :attr:`TeacherOutputs.why_live` says why
the teacher runs live, for the run's log and page.

Augmentation is seeded per (seed, epoch, batch), so when it is the only thing in the way the teacher's logits
of an epoch are the same in every run sharing teacher and data: they come from the soft-label store
(:mod:`kd_core.engine.soft_labels`) when an earlier run completed that epoch, and are written there otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from typing import TYPE_CHECKING, Any

from kd_core.data import batch_indices, image_batches
from kd_core.engine.errors import TrainingError
from kd_core.engine.evaluation import EVAL_BATCH
from kd_core.engine.precision import Precision
from kd_core.engine.soft_label_key import store_fields
from kd_core.engine.soft_labels import EpochLabels, SoftLabelStore, StoreUnreadable, storage_format
from kd_core.features import FeatureTap
from kd_core.losses import DistillLoss, LossInputs
from kd_core.methods.base import Method
from kd_core.settings import soft_labels_root

if TYPE_CHECKING:
    from kd_core.engine.experiment import Experiment
    from kd_core.engine.phases import Phase

AUGMENTED = "augmentation changes the teacher's input every epoch"


def cache_blocker(enabled: bool, augment: bool, needs: set[str], losses: list[DistillLoss], method: Method | None = None) -> str | None:
    """Why teacher outputs cannot be cached for this phase, or None when they can."""
    if not enabled:
        return "cache_teacher is off"
    if augment:
        return AUGMENTED
    if method is not None and method.varies_teacher_inputs:
        return method.varies_teacher_inputs
    if "stages" in needs:
        return "the recipe needs stage feature maps, which are too large to keep"
    varying = [loss.name for loss in losses if not loss.teacher_cacheable]
    if varying:
        return f"{', '.join(varying)} change the teacher's input"
    return None


def store_blocker(exp: Experiment, needs: set[str], losses: list[DistillLoss], method: Method | None) -> str | None:
    """Why the teacher's logits of augmented batches cannot come from the soft-label store, or None when they can."""
    if not exp.config.soft_labels.store:
        return "soft_labels.store is off"
    if exp.dist.active:
        return "several devices: each process sees only its rows of a batch, and the store keeps whole batches"
    other = cache_blocker(True, False, needs, losses, method)
    if other:
        return other
    if "embedding" in needs:
        return "the recipe needs the teacher's embedding, and the soft-label store keeps logits only"
    return method.soft_label_store_blocker() if method is not None else None


def open_store(exp: Experiment, phase: Phase, teacher: nn.Module) -> SoftLabelStore:
    """The soft-label store of this teacher, data and augmentation (nothing is read or written yet)."""
    num_classes, top_k = exp.data.num_classes, exp.config.soft_labels.top_k
    if top_k is not None and top_k >= num_classes:
        raise TrainingError(f"soft_labels.top_k: keep fewer than the dataset's {num_classes} classes (got {top_k})")
    storage = storage_format(num_classes, top_k)
    sizes = [len(b) for b in batch_indices(len(exp.data.train_y), phase.model_config.batch_size, shuffle=False, seed=0, epoch=0)]
    return SoftLabelStore(soft_labels_root(), store_fields(teacher, exp, phase, storage), num_classes, sizes)


def cache_too_large(exp: Experiment) -> str | None:
    """Why the teacher's logits of the whole training set do not fit the memory budget, or None when they do."""
    from kd_core.settings import resident_budget_bytes

    need, budget = len(exp.data.train_y) * exp.data.num_classes * 4, resident_budget_bytes(exp.device)
    if need > budget:
        return f"the teacher's logits of {len(exp.data.train_y):,} images would take {need / 2**20:,.0f} MB, over the {budget / 2**20:,.0f} MB budget"
    return None


def teacher_outputs_for(exp: Experiment, phase: Phase, teacher: nn.Module, needs: set[str], losses: list[DistillLoss],
                        method: Method | None) -> TeacherOutputs:
    """Cached when nothing varies the teacher's input; from the soft-label store when only augmentation does; else live."""
    why_live = cache_blocker(exp.config.cache_teacher, exp.config.dataset.augment, needs, losses, method) or cache_too_large(exp)
    store = None
    if why_live == AUGMENTED:
        why_not_stored = store_blocker(exp, needs, losses, method)
        if why_not_stored is None:
            store = open_store(exp, phase, teacher)
        else:
            why_live += f"; not from the soft-label store: {why_not_stored}"
    return TeacherOutputs(teacher, needs, exp.precision, why_live, exp.data.train_x, store)


class StoredEpochs:
    """Per epoch: read the teacher's logits from the store, or record the live ones and write them at the epoch's end.

    Only an epoch recorded from its first batch to its last, in order, is written: a run resumed mid-epoch
    trains the rest of that epoch live and leaves it to a later run.
    """

    def __init__(self, store: SoftLabelStore, device: torch.device) -> None:
        self.store, self.device = store, device
        self.epoch: int | None = None
        self.batch = 0
        self.labels: EpochLabels | None = None  # the current epoch, when read from the store
        self.recording: list[dict[str, torch.Tensor]] | None = None  # the current epoch's batches, when writable
        self.read_epochs: list[int] = []
        self.live_epochs: list[int] = []
        self.written_epochs: list[int] = []
        self.problems: list[str] = []  # stored epochs that could not be used, and epochs that could not be written

    def begin_batch(self, epoch: int, b: int) -> None:
        if epoch != self.epoch:
            self._start_epoch(epoch, b)
        elif self.recording is not None and b != len(self.recording):
            self.recording = None  # a batch skipped or repeated: this epoch cannot be written whole
        self.batch = b

    def _start_epoch(self, epoch: int, first_batch: int) -> None:
        self.epoch, self.labels, self.recording = epoch, None, None
        if epoch in self.store.complete_epochs():
            try:
                self.labels = self.store.read_epoch(epoch, self.device)
                self.read_epochs.append(epoch)
                return
            except StoreUnreadable as exc:
                self.problems.append(f"{exc}; the teacher ran live")
        self.live_epochs.append(epoch)
        self.recording = [] if first_batch == 0 else None

    def stored_batch(self) -> torch.Tensor | None:
        """The current batch's logits from the store, or None when this epoch runs the teacher live."""
        return None if self.labels is None else self.labels.batch(self.batch)

    def record(self, live_logits: torch.Tensor) -> torch.Tensor:
        """Keep the batch's live logits for the epoch file; return what the losses see (a top-k store: the reconstruction,
        so a run that writes the store learns from what later runs will read)."""
        encoded = self.store.encode(live_logits)
        if self.recording is not None:
            self.recording.append(encoded)
        return live_logits.float() if self.store.top_k is None else self.store.decode(encoded)

    def end_epoch(self, epoch: int) -> None:
        if epoch == self.epoch and self.recording is not None and len(self.recording) == len(self.store.batch_sizes):
            try:
                self.store.write_epoch(epoch, self.recording)
                self.written_epochs.append(epoch)
            except OSError as exc:  # a full or read-only disk costs the reuse, not the run
                self.problems.append(f"epoch {epoch} not written: {exc}")
        self.epoch, self.labels, self.recording = None, None, None

    def summary(self) -> dict[str, Any]:
        return {"key": self.store.key, "path": str(self.store.folder), "format": self.store.storage, "read_epochs": self.read_epochs,
                "written_epochs": self.written_epochs, "live_epochs": self.live_epochs, "problems": self.problems}


class TeacherOutputs:
    """Fills :class:`LossInputs` with the teacher's logits (and embedding/stages when the recipe needs them)."""

    def __init__(self, teacher: nn.Module, needs: set[str], precision: Precision, why_live: str | None, train_x: torch.Tensor,
                 store: SoftLabelStore | None = None) -> None:
        self.teacher = teacher
        self.needs = needs
        self.precision = precision
        self.why_live = why_live
        self.cache: dict[str, torch.Tensor] | None = None
        self.tap: FeatureTap | None = None
        self.stored = StoredEpochs(store, train_x.device) if store is not None else None
        if why_live is None:
            self.cache = self._compute_cache(train_x)
        else:
            self.tap = FeatureTap(teacher, stages="stages" in needs, embedding="embedding" in needs)

    @property
    def mode(self) -> str:
        """cached (in memory), stored (every epoch so far read from the soft-label store) or live."""
        if self.cache is not None:
            return "cached"
        if self.stored is not None and self.stored.read_epochs and not self.stored.live_epochs:
            return "stored"
        return "live"

    def store_summary(self) -> dict[str, Any] | None:
        """The store's key and folder, and which epochs were read, written or ran live (None without a store)."""
        return self.stored.summary() if self.stored is not None else None

    def begin_batch(self, epoch: int, b: int) -> None:
        """Called by the phase loop before each step: batch ``b`` of ``epoch`` (the store is per epoch and batch)."""
        if self.stored is not None:
            self.stored.begin_batch(epoch, b)

    def end_epoch(self, epoch: int) -> None:
        """Called by the phase loop when every batch of ``epoch`` was trained: a fully recorded epoch is written."""
        if self.stored is not None:
            self.stored.end_epoch(epoch)

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
        """The live teacher forward of this step (inside the step's autocast); nothing when cached or stored."""
        if self.tap is None or (self.stored is not None and self.stored.labels is not None):
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
        stored = self.stored.stored_batch() if self.stored is not None else None
        if stored is not None:  # the store serves logits only (store_blocker)
            inputs.teacher_logits = stored
            return
        assert self.tap is not None
        live = self._live_logits
        inputs.teacher_logits = self.stored.record(live) if self.stored is not None else live.float()
        if "embedding" in self.needs:
            inputs.teacher_embedding = _float(self.tap.embedding)
        if "stages" in self.needs:
            inputs.teacher_stages = [s.float() for s in self.tap.stages]

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
