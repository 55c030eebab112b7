"""What makes two runs' teacher soft labels the same: the store key of :mod:`kd_core.engine.soft_labels`.

The key is a SHA-256 over (a) the teacher's identity, a hash of the target teacher's state-dict tensors
(trained here, loaded from a file or a run, random: all the same to it; an ensemble module's state dict holds
every member), (b) :func:`soft_label_identity`, everything about the data and the augmentation that changes
what the teacher sees in batch ``b`` of epoch ``e``, and (c) the storage format (full logits or top-k).

To make a new input path (a streaming loader, another augmentation) safe, add what distinguishes it to
:func:`soft_label_identity`: a field that is missing there means two different inputs share stored labels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from kd_core.engine.experiment import Experiment
    from kd_core.engine.phases import Phase

# bump when the batch order (kd_core.data.batch_indices), the augmentation (augment_batch) or its per-batch
# seeding (phase_run.train_epoch) changes: labels stored by an older version must no longer match
AUGMENTATION_VERSION = 1


def soft_label_identity(exp: Experiment, phase: Phase) -> dict[str, Any]:
    """The data and augmentation behind each (epoch, batch) of ``phase``: equal dicts mean equal teacher inputs."""
    config, dataset = exp.config, exp.config.dataset
    return {
        "augmentation_version": AUGMENTATION_VERSION,
        "dataset": dataset.name,
        "root": str(Path(dataset.root).expanduser().resolve()),
        "subset": dataset.subset,
        "classes": dataset.classes,
        "val_fraction": dataset.val_fraction,
        "image_size": dataset.image_size,
        "seed": config.seed,  # the split, the batch order and the crops/flips all follow it
        "batch_size": phase.model_config.batch_size,
        "augment": dataset.augment,
        "flip": exp.data.flip,
        "train_size": len(exp.data.train_y),
        "precision": exp.precision.name,
        "device_type": exp.device.type,  # CPU and CUDA kernels round differently
        "loader": exp.data.loader,  # resident crops a padded batch, streaming a random resized crop per image
        "channels_last": exp.channels_last,
        "compile": config.compile,  # a teacher trained here is compiled in its phase: its kernels round differently
    }


def teacher_identity(teacher: nn.Module) -> str:
    """SHA-256 over the module's class and every state-dict tensor (name, dtype, shape and bytes)."""
    digest = hashlib.sha256(f"{type(teacher).__module__}.{type(teacher).__qualname__}".encode())
    for name, tensor in teacher.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def store_fields(teacher: nn.Module, exp: Experiment, phase: Phase, storage: dict[str, Any]) -> dict[str, Any]:
    """Everything the key covers, as recorded in the store's manifest."""
    return {"teacher": teacher_identity(teacher), "data": soft_label_identity(exp, phase), "storage": storage}


def store_key(fields: dict[str, Any]) -> str:
    """The store's folder name: SHA-256 of the canonical JSON of :func:`store_fields`."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
